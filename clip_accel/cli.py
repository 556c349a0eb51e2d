"""Console entry points; scripts/*.py are one-line wrappers around these."""

from __future__ import annotations

import argparse
import logging


def _setup_logging() -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    for noisy in ("transformers", "datasets", "httpx", "httpx2", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_main(args: list[str] | None = None) -> dict:
    """`accelerate launch scripts/train.py --config recipes/demo.yaml [--option value ...]`"""
    from .config import parse_config
    from .trainer import train

    data_config, model_config, train_config = parse_config(args)
    _setup_logging()
    return train(data_config, model_config, train_config).metrics


def evaluate_main(args: list[str] | None = None) -> dict:
    """`python scripts/evaluate.py --model_name_or_path OUTPUT --data_dir DIR --split test`"""
    from .evaluation import evaluate_checkpoint

    parser = argparse.ArgumentParser(description="Image-text retrieval recall@K of any CLIP checkpoint.")
    parser.add_argument("--model_name_or_path", required=True, help="Folder from save_pretrained or a Hub id.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="Folder in the Indo-fashion layout.")
    source.add_argument("--dataset_name", help="Any dataset datasets.load_dataset accepts.")
    source.add_argument("--demo", action="store_true", help="The embedded demo catalogue.")
    parser.add_argument("--split", default="test", help="Split to evaluate (default: test).")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument(
        "--per_device_eval_batch_size",
        type=int,
        default=None,
        help="Default: the value in the model folder's training_config.json, else 128. The same "
        "batch size gives bit-identical embeddings; another can flip near-ties.",
    )
    parser.add_argument(
        "--identical_captions_match",
        action="store_true",
        help="Count any identical caption as a correct match in the main figures (default: only "
        "the own pair; the other rule is always reported alongside).",
    )
    parser.add_argument("--output_file", default=None, help="Write the metrics here as JSON.")
    parsed = parser.parse_args(args)
    _setup_logging()
    return evaluate_checkpoint(parsed)
