"""One command for the reference table: the zero-shot row, the reference's three fine-tuning rows and our
proposal, each a normal `accelerate launch scripts/train.py` run, then RESULTS.md beside the reference figures.

A finished row (its eval_results.json exists) is not run again; a row with checkpoints resumes from the latest;
so an interrupted sweep picks up where it stopped. `--smoke` runs the same sweep on the demo data with the tiny
from-scratch model, in a couple of minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from .checkpoint import list_checkpoints

logger = logging.getLogger(__name__)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC_COLUMNS = (
    "image_to_text_R@1",
    "text_to_image_R@1",
    "image_to_text_R@5",
    "text_to_image_R@5",
    "image_to_text_R@10",
    "text_to_image_R@10",
)
HEADERS = ("I2T R@1", "T2I R@1", "I2T R@5", "T2I R@5", "I2T R@10", "T2I R@10")
ZERO_SHOT = ("zero_shot_top1", "zero_shot_top5")


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str
    reference: tuple[float, ...] | None  # the reference project's figures, METRIC_COLUMNS order
    epochs: str
    learning_rate: str


REFERENCE_ZERO_SHOT = (0.0351, 0.0220, 0.1085, 0.0707, 0.1557, 0.1117)
ROWS = (
    Row(
        "Freeze first 6 vision layers",
        "recipes/indo_fashion_freeze_vision6.yaml",
        (0.1924, 0.1873, 0.4407, 0.4397, 0.5607, 0.5613),
        "15",
        "5e-5",
    ),
    Row(
        "Freeze both backbones",
        "recipes/indo_fashion_freeze_backbones.yaml",
        (0.1659, 0.1599, 0.3944, 0.3887, 0.5117, 0.5053),
        "15",
        "5e-5",
    ),
    Row(
        "Unfreeze all",
        "recipes/indo_fashion_unfreeze_all.yaml",
        (0.1652, 0.1548, 0.4007, 0.3861, 0.5171, 0.5160),
        "20",
        "5e-5",
    ),
    Row(
        "clip_accel proposal (global batch 512, exact accumulation, warmup + cosine, early stopping)",
        "recipes/indo_fashion_best.yaml",
        None,
        "≤20",
        "1e-5",
    ),
)
# The smoke sweep: demo data, tiny from-scratch model (2 vision layers, so "first 6" becomes "first 1").
SMOKE_OVERRIDES = [
    "--demo",
    "--model_config",
    "clip-tiny",
    "--num_train_epochs",
    "3",
    "--freeze_vision_layers",
    "1",
    "--per_device_train_batch_size",
    "64",
    "--gradient_accumulation_steps",
    "1",
    "--learning_rate",
    "1e-3",
    "--preprocessing_num_workers",
    "1",
    "--dataloader_num_workers",
    "0",
    "--checkpointing_steps",
    "0",
]


def row_command(row: Row, args: argparse.Namespace, output_dir: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        args.accelerate_config,
        "scripts/train.py",
        "--config",
        row.recipe,
        "--output_dir",
        output_dir,
        "--overwrite_output_dir",
    ]
    command += SMOKE_OVERRIDES if args.smoke else ["--data_dir", args.data_dir]
    if list_checkpoints(output_dir):
        command += ["--resume_from_checkpoint", "latest"]
    return command + args.extra


def run_sweep(args: argparse.Namespace) -> dict[str, dict]:
    """Run (or reuse) every row; returns name -> eval_results.json contents."""
    results, commands = {}, {}
    for index, row in enumerate(ROWS):
        output_dir = os.path.join(args.output_dir, os.path.basename(row.recipe).removesuffix(".yaml"))
        results_file = os.path.join(output_dir, "eval_results.json")
        command = row_command(row, args, output_dir)
        commands[row.name] = shlex.join(["accelerate", "launch"] + command[3:])
        if os.path.isfile(results_file):
            logger.info(f"[{index + 1}/{len(ROWS)}] {row.name}: already finished, reusing {results_file}")
        else:
            logger.info(f"[{index + 1}/{len(ROWS)}] {row.name}: {commands[row.name]}")
            subprocess.run(command, cwd=REPO, check=True)
        with open(results_file) as handle:
            results[row.name] = json.load(handle)
    return {"results": results, "commands": commands}


def _cells(metrics: dict) -> list[str]:
    """Recall columns, then zero-shot classification top-1/top-5 (– where the split has no labels)."""
    return [f"{metrics[key]:.4f}" for key in METRIC_COLUMNS] + [
        f"{metrics[key]:.4f}" if key in metrics else "–" for key in ZERO_SHOT
    ]


def _difference(ours: dict, reference: tuple[float, ...]) -> str:
    return " ".join(
        f"{metrics - ref:+.4f}" for metrics, ref in zip((ours[k] for k in METRIC_COLUMNS), reference, strict=True)
    )


def results_markdown(sweep: dict, args: argparse.Namespace, picture: str | None) -> str:
    """RESULTS.md: our rows and the reference rows side by side, differences, the commands, the picture."""
    results, first = sweep["results"], next(iter(sweep["results"].values()))
    data = (
        "the embedded demo data with the tiny from-scratch model (`--smoke`)"
        if args.smoke
        else f"Indo-fashion at `{args.data_dir}`"
    )
    lines = [
        f"# Results: CLIP fine-tuning on {data}",
        "",
        "Generated by `python scripts/reproduce_table.py "
        + " ".join(shlex.quote(a) for a in sys.argv[1:])
        + "`. Test split, image→text (I2T) and text→image (T2I) recall; for each query the only positive is its "
        "own pair, ties count against the query. ZS = zero-shot classification accuracy of the test images "
        "against prompts built from the class labels (7 templates averaged); the reference did not report it.",
        "",
        "| Model | Source | " + " | ".join(HEADERS) + " | ZS top-1 | ZS top-5 | Epochs run | LR |",
        "|---|---|" + "---|" * 10,
    ]
    zero_shot = first.get("initial", {}).get("test")
    if zero_shot:
        lines.append("| Zero-shot (starting model) | ours | " + " | ".join(_cells(zero_shot)) + " | – | – |")
    if not args.smoke:
        lines.append(
            "| Zero-shot | reference | " + " | ".join(f"{v:.4f}" for v in REFERENCE_ZERO_SHOT) + " | – | – | – | – |"
        )
    for row in ROWS:
        metrics, training = results[row.name]["test"], results[row.name]["training"]
        epochs = f"{training['epochs_run']:g}"
        lines.append(f"| {row.name} | ours | " + " | ".join(_cells(metrics)) + f" | {epochs} | {_lr(row, args)} |")
        if row.reference and not args.smoke:
            lines.append(
                f"| {row.name} | reference | "
                + " | ".join(f"{v:.4f}" for v in row.reference)
                + f" | – | – | {row.epochs} | {row.learning_rate} |"
            )
    lines += [
        "",
        "If any identical caption counts as a correct match (product titles repeat; not the default):",
        "",
        "| Model | " + " | ".join(HEADERS) + " |",
        "|---|" + "---|" * 6,
    ]
    for row in ROWS:
        lenient = results[row.name]["test"].get("identical_caption_match")
        if lenient:
            lines.append(f"| {row.name} | " + " | ".join(f"{lenient[key]:.4f}" for key in METRIC_COLUMNS) + " |")
    lines += ["", "Differences (ours − reference), in the column order above:", ""]
    for row in ROWS:
        if row.reference and not args.smoke:
            lines.append(f"- {row.name}: {_difference(results[row.name]['test'], row.reference)}")
    if args.smoke:
        lines.append(
            "- (smoke run: the reference figures are for ViT-B/32 on real Indo-fashion and are not comparable)"
        )
    lines += ["", "## Commands", ""] + [f"- {name}: `{command}`" for name, command in sweep["commands"].items()]
    if picture:
        lines += ["", "## Picture", "", f"![Recall@K, zero-shot vs fine-tuned]({picture})"]
    return "\n".join(lines) + "\n"


def _lr(row: Row, args: argparse.Namespace) -> str:
    return "1e-3" if args.smoke else row.learning_rate


def reproduce_main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="Regenerate the reference table and write RESULTS.md.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="The Indo-fashion download (Kaggle layout).")
    source.add_argument("--smoke", action="store_true", help="Same sweep on the demo data with a tiny model.")
    parser.add_argument("--output_dir", default="outputs/reference_table")
    parser.add_argument("--accelerate_config", default="accelerate_configs/single_gpu.yaml")
    parser.add_argument("--results_file", default="RESULTS.md")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="More options for every run, after `--`.")
    args = parser.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    if args.smoke and args.accelerate_config == parser.get_default("accelerate_config"):
        args.accelerate_config = "accelerate_configs/cpu.yaml"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sweep = run_sweep(args)
    picture = _picture(sweep, args)
    with open(args.results_file, "w") as handle:
        handle.write(results_markdown(sweep, args, picture))
    logger.info(f"Wrote {args.results_file}")
    return args.results_file


def _picture(sweep: dict, args: argparse.Namespace) -> str | None:
    from .plots import plot_recall_bars

    rows = {}
    first = next(iter(sweep["results"].values()))
    if first.get("initial"):
        rows["zero-shot"] = first["initial"]["test"]
    rows.update({row.name.split(" (")[0]: sweep["results"][row.name]["test"] for row in ROWS})
    path = os.path.join(os.path.dirname(os.path.abspath(args.results_file)), "results_recall.png")
    return os.path.basename(plot_recall_bars(rows, path, title="Test recall@K"))
