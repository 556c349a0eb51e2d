"""Recall@K of any CLIP checkpoint: `python scripts/evaluate.py --model_name_or_path OUT --data_dir DIR`."""

from clip_accel.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
