"""`python -m clip_accel COMMAND ...` (and `accelerate launch -m clip_accel train ...`): see clip_accel.cli."""

from clip_accel.cli import main

if __name__ == "__main__":
    main()
