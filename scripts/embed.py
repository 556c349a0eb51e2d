"""Embed a split or an image folder: `python scripts/embed.py --model_name_or_path OUT --demo --output_file F`."""

from clip_accel.cli import embed_main

if __name__ == "__main__":
    embed_main()
