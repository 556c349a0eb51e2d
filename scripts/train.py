"""Fine-tune CLIP: `accelerate launch scripts/train.py --config demo` (see README)."""

from clip_accel.cli import train_main

if __name__ == "__main__":
    train_main()
