"""The reference table: `python scripts/reproduce_table.py --data_dir /data/indo-fashion` (or --smoke)."""

from clip_accel.cli import reproduce_main

if __name__ == "__main__":
    reproduce_main()
