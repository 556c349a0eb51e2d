"""The reference table in one command: the zero-shot row, the reference's three fine-tuning rows and our proposal,
each a normal `accelerate launch -m clip_accel train` run of a bundled recipe, then OUTPUT/RESULTS.md and
OUTPUT/results_recall.png beside the reference figures. Nothing is written outside OUTPUT.

A finished row (its eval_results.json exists) is not run again; a row with checkpoints resumes from the latest;
so an interrupted sweep picks up where it stopped. `smoke` runs the same sweep on the demo data with the tiny
from-scratch model, in a couple of minutes on a CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from .checkpoint import list_checkpoints
from .config import UserError
from .plots import plot_recall_bars
from .results import RECALL_COLUMNS, ZERO_SHOT_COLUMNS, markdown_table, metric_cells, with_starting_model

logger = logging.getLogger(__name__)
RESULTS_FILE, PICTURE_FILE = "RESULTS.md", "results_recall.png"


def _reference(*values: float) -> dict[str, float]:
    """The reference project's figures, given in RECALL_COLUMNS order."""
    return {key: value for (_, key), value in zip(RECALL_COLUMNS, values, strict=True)}


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str  # a bundled recipe (clip_accel/recipes/NAME.yaml)
    reference: dict[str, float] | None  # the reference project's test figures
    epochs: str
    learning_rate: str


REFERENCE_ZERO_SHOT = _reference(0.0351, 0.0220, 0.1085, 0.0707, 0.1557, 0.1117)
ROWS = (
    Row(
        "Freeze first 6 vision layers",
        "indo_fashion_freeze_vision6",
        _reference(0.1924, 0.1873, 0.4407, 0.4397, 0.5607, 0.5613),
        "15",
        "5e-5",
    ),
    Row(
        "Freeze both backbones",
        "indo_fashion_freeze_backbones",
        _reference(0.1659, 0.1599, 0.3944, 0.3887, 0.5117, 0.5053),
        "15",
        "5e-5",
    ),
    Row(
        "Unfreeze all",
        "indo_fashion_unfreeze_all",
        _reference(0.1652, 0.1548, 0.4007, 0.3861, 0.5171, 0.5160),
        "20",
        "5e-5",
    ),
    Row(
        "clip_accel proposal (global batch 512, exact accumulation, warmup + cosine, early stopping)",
        "indo_fashion_best",
        None,
        "≤20",
        "1e-5",
    ),
)
# Ours, not the reference's: added with --siglip (the reference fine-tuned CLIP only).
SIGLIP_ROW = Row(
    "clip_accel SigLIP ViT-B/16 (ours; not a reference row)",
    "indo_fashion_siglip",
    None,
    "≤20",
    "1e-5",
)
SMOKE_LEARNING_RATE = "1e-3"
# The smoke sweep: demo data, tiny from-scratch model (2 vision layers, so "first 6" becomes "first 1").
SMOKE_OVERRIDES = (
    *("--demo", "--scratch_config", "clip-tiny", "--num_train_epochs", "3", "--freeze_vision_layers", "1"),
    *("--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "1"),
    *("--learning_rate", SMOKE_LEARNING_RATE, "--checkpointing_steps", "0"),
)
# Without --accelerate_config: one process, on the CPU for the smoke sweep, bf16 on one GPU otherwise.
SMOKE_LAUNCH = ("--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no")
GPU_LAUNCH = ("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16")


@dataclass(frozen=True)
class SweepOptions:
    output_dir: str
    data_dir: str | None = None  # the Indo-fashion download; None with smoke
    smoke: bool = False
    accelerate_config: str | None = None
    extra: tuple[str, ...] = ()  # more options for every run
    invocation: str = "clip-accel reproduce"  # the command line, for RESULTS.md
    siglip: bool = False  # also the SigLIP row (ours)

    @property
    def rows(self) -> tuple[Row, ...]:
        return (*ROWS, SIGLIP_ROW) if self.siglip else ROWS

    def __post_init__(self) -> None:
        if self.smoke == (self.data_dir is not None):
            raise UserError("Give either --data_dir (the Indo-fashion download) or --smoke (the demo data).")


def row_command(row: Row, options: SweepOptions, output_dir: str) -> list[str]:
    launch = (
        ("--config_file", options.accelerate_config)
        if options.accelerate_config
        else (SMOKE_LAUNCH if options.smoke else GPU_LAUNCH)
    )
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--dynamo_backend", "no"]
    command += ["-m", "clip_accel", "train", "--config", row.recipe, "--output_dir", output_dir]
    command += ["--overwrite_output_dir", *(SMOKE_OVERRIDES if options.smoke else ("--data_dir", options.data_dir))]
    if options.smoke and row is SIGLIP_ROW:  # the smoke sweep's tiny model, of the SigLIP family
        command += ["--scratch_config", "siglip-tiny"]
    if list_checkpoints(output_dir):
        command += ["--resume_from_checkpoint", "latest"]
    return command + list(options.extra)


def run_sweep(options: SweepOptions) -> str:
    """Run (or reuse) every row, then write RESULTS.md and its picture; returns RESULTS.md's path."""
    results, commands = {}, {}
    for index, row in enumerate(options.rows):
        output_dir = os.path.join(options.output_dir, row.recipe)
        results_file = os.path.join(output_dir, "eval_results.json")
        command = row_command(row, options, output_dir)
        commands[row.name] = shlex.join(["accelerate", "launch", *command[3:]])
        if os.path.isfile(results_file):
            logger.info(f"[{index + 1}/{len(options.rows)}] {row.name}: already finished, reusing {results_file}")
        else:
            logger.info(f"[{index + 1}/{len(options.rows)}] {row.name}: {commands[row.name]}")
            subprocess.run(command, check=True)
        with open(results_file) as handle:
            results[row.name] = json.load(handle)
    bars = with_starting_model(
        results[ROWS[0].name], {row.name.split(" (")[0]: results[row.name]["test"] for row in options.rows}
    )
    plot_recall_bars(bars, os.path.join(options.output_dir, PICTURE_FILE), title="Test recall@K")
    path = os.path.join(options.output_dir, RESULTS_FILE)
    with open(path, "w") as handle:
        handle.write(results_markdown(results, commands, options))
    logger.info(f"Wrote {path}")
    return path


def results_markdown(results: dict[str, dict], commands: dict[str, str], options: SweepOptions) -> str:
    """RESULTS.md: our rows and the reference rows side by side, differences, the commands, the picture."""
    columns = RECALL_COLUMNS + ZERO_SHOT_COLUMNS
    data = "the embedded demo data with the tiny from-scratch model" if options.smoke else "Indo-fashion"
    table = []
    starting = results[ROWS[0].name].get("initial", {}).get("test")
    if starting:
        table.append(["Zero-shot (starting model)", "ours", *metric_cells(starting, columns), "–", "–"])
    if not options.smoke:
        table.append(["Zero-shot", "reference", *metric_cells(REFERENCE_ZERO_SHOT, columns), "–", "–"])
    for row in options.rows:
        ours = results[row.name]
        epochs = f"{ours['training']['epochs_run']:g}"
        learning_rate = SMOKE_LEARNING_RATE if options.smoke else row.learning_rate
        table.append([row.name, "ours", *metric_cells(ours["test"], columns), epochs, learning_rate])
        if row.reference and not options.smoke:
            table.append([row.name, "reference", *metric_cells(row.reference, columns), row.epochs, row.learning_rate])
    lenient = [
        [row.name, *metric_cells(results[row.name]["test"]["identical_caption_match"], RECALL_COLUMNS)]
        for row in options.rows
        if "identical_caption_match" in results[row.name]["test"]
    ]
    lines = [
        f"# Results: CLIP{' and SigLIP' if options.siglip else ''} fine-tuning on {data}",
        "",
        f"Generated by `{options.invocation}`. Test split, image→text (I2T) and text→image (T2I) recall; for each "
        "query the only positive is its own pair, ties count against the query. ZS = zero-shot classification "
        "accuracy of the test images against prompts built from the class labels (templates averaged); the "
        "reference did not report it.",
        "",
        markdown_table(["Model", "Source", *(title for title, _ in columns), "Epochs run", "LR"], table),
        "",
        "If any identical caption counts as a correct match (product titles repeat; not the default):",
        "",
        markdown_table(["Model", *(title for title, _ in RECALL_COLUMNS)], lenient),
        "",
        "Differences (ours − reference), in the column order above:",
        "",
    ]
    if options.smoke:
        lines.append(
            "- (smoke run: the reference figures are for ViT-B/32 on real Indo-fashion and are not comparable)"
        )
    else:
        for row in (row for row in ROWS if row.reference):
            ours = results[row.name]["test"]
            lines.append(f"- {row.name}: " + " ".join(f"{ours[k] - row.reference[k]:+.4f}" for _, k in RECALL_COLUMNS))
    lines += ["", "## Commands", "", *(f"- {name}: `{command}`" for name, command in commands.items())]
    lines += ["", "## Picture", "", f"![Recall@K, zero-shot vs fine-tuned]({PICTURE_FILE})"]
    return "\n".join(lines) + "\n"
