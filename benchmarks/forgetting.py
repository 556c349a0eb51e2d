"""What each fine-tuning recipe gains on a new catalogue and keeps of what the starting model knew: the figures behind
BENCHMARKS.md section 10 and the README's summary. A simulation (no pretrained weights reach this machine).

The simulation: the demo catalogue (2,400/400/400 pairs at 64 px) split by class. A tiny CLIP (width 64, 4 layers
per tower) is "pretrained" from scratch on the SOURCE classes (8 of the 15), the demo recipe for 30 epochs, then
fine-tuned from that folder on the TARGET catalogue (the other 7 classes: other garments, their titles' other
words) by each row's recipe. Per row: target test I2T and T2I R@1, and what was kept of the source test split:
its retrieval (mean R@1 of both directions) and its zero-shot top-1 (its images classified among the 8 source
classes by the prompts), beside what the start scored before fine-tuning. Every row starts from the same folder,
with the same seed, data order and schedule (10 epochs, lr 1e-3 cosine, batch 64, early stopping on target
validation).

Paired, as in benchmarks/fine_grained.py: each seed pretrains its own start, and every row of that seed fine-tunes
from it, so a row's difference from full fine-tuning within a seed holds only the recipe's effect. The start and full
fine-tuning are given as mean ± sd over the seeds; every other row (WiSE-FT too) as its mean paired difference from
full fine-tuning with its 95% interval (Student's t, seeds - 1 degrees of freedom): an interval that holds 0 says
this benchmark saw no difference. Each seed's figures and the step times are kept in
$CLIP_ACCEL_BENCH_DIR/forgetting/results.json (results-smoke.json for --smoke).

Rows. full: every weight trains. vision-half frozen: the vision embeddings and the first 2 of 4 vision layers
frozen (the ViT-B/32 recipe's 6 of 12). LLRD: --layer_decay 0.6. EMA: --ema_decay 0.95 (its horizon, 20 steps,
a tenth of the run's ~190; ViT-B/32 runs of thousands of steps use 0.9998), evaluated and saved on the EMA
weights. class prompts: "a photo of a {class_label}" beside each title (FLYP). LoRA: rank 8 on q/v, at 10x the
learning rate (adapters start at zero and need it). WiSE-FT: `clip-accel wise-ft` on the full row, the mix
chosen among 0, 0.25, ..., 1 on the mean of target and source validation mean R@1.

Step time: seconds per optimizer step of each row's prepared run (`step.plain_step`, the same 8 batches), seed 0,
against the full row timed first and again last (the A/A control); CPU-dependent.

    python benchmarks/forgetting.py [--seeds 5] [--markdown FILE]   # ~3 min per seed on 2 idle cores
    python benchmarks/forgetting.py --smoke                         # every code path (one seed) in 2-3 min

On a shared machine, OMP_NUM_THREADS=1: 5 seeds took 38 min at one thread beside another benchmark, where two
threads stalled on the contended cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import common
from accelerate.state import AcceleratorState  # noqa: E402

from clip_accel.config import DataConfig  # noqa: E402
from clip_accel.data.demo import CLASS_LABELS, write_demo_dataset  # noqa: E402
from clip_accel.data.indo_fashion import INDO_FASHION_FILES  # noqa: E402
from clip_accel.evaluation import evaluate_folder  # noqa: E402
from clip_accel.options import parse_config  # noqa: E402
from clip_accel.step import plain_step  # noqa: E402
from clip_accel.trainer import prepare_run  # noqa: E402
from clip_accel.wise_ft import WiseFtOptions, wise_ft  # noqa: E402

ROOT = common.BENCH_DIR / "forgetting"
SOURCE_CLASSES = CLASS_LABELS[::2]  # 8 of the 15
MODEL = {
    "projection_dim": 64,
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4},
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 8,
    },
}
# The demo recipe's options (recipes/demo.yaml) less its --scratch_config, at a fine-tuning schedule.
FINE_TUNE = ["--per_device_train_batch_size", "64", "--per_device_eval_batch_size", "200", "--weight_decay", "0.1"]
FINE_TUNE += ["--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1", "--early_stopping_patience", "3"]
FINE_TUNE += ["--overwrite_output_dir", "--report_to", "none", "--num_train_epochs", "10", "--learning_rate", "1e-3"]
SIZES = {"num_train": 2400, "num_val": 400, "num_test": 400}
START, BASELINE, WISE_FT = "start, before fine-tuning", "full fine-tune", "WiSE-FT of full"
FIGURES = ("I2T", "T2I", "source R@1", "ZS")
ROWS = {
    BASELINE: [],
    "vision-half frozen": ["--freeze", "vision_layers", "--freeze_vision_layers", "2"],
    "LLRD 0.6": ["--layer_decay", "0.6"],
    "EMA 0.95": ["--ema_decay", "0.95"],
    "LLRD 0.6 + EMA 0.95": ["--layer_decay", "0.6", "--ema_decay", "0.95"],
    "class prompts": ["--extra_caption_templates", "a photo of a {class_label}"],
    "LoRA r8 (lr x10)": ["--lora_rank", "8", "--learning_rate", "1e-2"],
}
WISE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
WISE_HELDOUT_METRIC = "mean_R@1"


def split_by_class(demo: str, root: Path = ROOT) -> dict[str, str]:
    """The demo catalogue as two catalogues in the Indo-fashion layout under `root`: the source classes and the
    others (their JSON lines filtered, the images shared through a link)."""
    folders = {}
    for name, keep in (("source", True), ("target", False)):
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        os.symlink(os.path.join(demo, "images"), folder / "images")
        for file in INDO_FASHION_FILES.values():
            with open(os.path.join(demo, file)) as handle:
                lines = [line for line in handle if (json.loads(line)["class_label"] in SOURCE_CLASSES) == keep]
            (folder / file).write_text("".join(lines))
        folders[name] = str(folder)
    return folders


def data_args(folder: str, root: Path = ROOT) -> list[str]:
    return ["--data_dir", folder, "--cache_dir", str(root / "cache"), "--demo", "false"]


def fresh(function, *args, **kwargs):
    """`function(...)`, then Accelerate's process state reset for the next call's Accelerator."""
    try:
        return function(*args, **kwargs)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def figures(target: dict, source: dict) -> dict[str, float]:
    """A row's cells: its target test recall, and what it kept of the source test split."""
    cells = {"I2T": target["image_to_text_R@1"], "T2I": target["text_to_image_R@1"]}
    return {**cells, "source R@1": source["mean_R@1"], "ZS": source["zero_shot_top1"]}


def source_test(folder: str, source: str) -> dict:
    return fresh(evaluate_folder, folder, DataConfig(data_dir=source, cache_dir=str(ROOT / "cache")))


def one_seed(seed: int, folders: dict[str, str], smoke: bool) -> dict[str, dict[str, float]]:
    runs = ROOT / "runs" / str(seed)
    shutil.rmtree(runs, ignore_errors=True)
    common_args = ["--config", "demo", "--scratch_config", str(ROOT / "model.json"), "--seed", str(seed)]
    common_args += ["--no_eval_initial_model", "--per_device_eval_batch_size", "200", "--num_train_epochs", "30"]
    common_args += ["--num_train_epochs", "1"] if smoke else []
    start = str(runs / "start")
    common.train_row(common_args + data_args(folders["source"]) + ["--output_dir", start])
    target_data = DataConfig(data_dir=folders["target"], cache_dir=str(ROOT / "cache"))
    start_figures = figures(fresh(evaluate_folder, start, target_data), source_test(start, folders["source"]))
    results = {START: start_figures}
    tune = ["--model_name_or_path", start, "--seed", str(seed), "--no_eval_initial_model"]
    tune += FINE_TUNE + (["--num_train_epochs", "1"] if smoke else [])
    for name, options in ROWS.items():
        output = str(runs / name.split()[0].lower())
        metrics, _ = common.train_row(tune + data_args(folders["target"]) + ["--output_dir", output] + options)
        results[name] = figures(metrics["test"], source_test(output, folders["source"]))
    mixed = fresh(
        wise_ft,
        WiseFtOptions(
            finetuned=str(runs / "full"),
            weights=WISE_WEIGHTS,
            output_dir=str(runs / "wise-ft"),
            base=start,
            data=target_data,
            heldout=DataConfig(data_dir=folders["source"], cache_dir=str(ROOT / "cache")),
            heldout_metric=WISE_HELDOUT_METRIC,
        ),
    )
    chosen = next(mix for mix in mixed["mixes"] if mix["weight"] == mixed["chosen_weight"])
    results[WISE_FT] = figures(chosen["in-domain/test"], chosen["held-out/test"])
    results[WISE_FT]["w"] = mixed["chosen_weight"]
    return results


def step_times(start: str, target: str, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step of each row's prepared run; "full (A/A)" is the full row timed last."""
    times = {}
    for name, options in [*ROWS.items(), ("full (A/A)", [])]:
        argv = ["--model_name_or_path", start, *FINE_TUNE, *data_args(target), *options]
        argv += ["--output_dir", str(ROOT / "runs" / "timing")]
        try:
            run = prepare_run(*parse_config(argv))
            batches = [batch for batch, _ in zip(run.train_data.epoch(0), range(steps), strict=False)]
            rounds_seen = []
            for index in range(rounds + 1):  # round 0 warms up
                began = time.perf_counter()
                for batch in batches:
                    plain_step(run.step_context, [batch])
                if index:
                    rounds_seen.append((time.perf_counter() - began) / len(batches))
            times[name] = statistics.median(rounds_seen)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
    return times


def table(per_seed: list[dict[str, dict[str, float]]], times: dict[str, float]) -> str:
    """The start and full fine-tuning as mean ± sd over the seeds; every other recipe as its paired difference from
    full fine-tuning on the same seed; each recipe's step time against full's."""
    headers = ["Recipe", "target I2T R@1", "target T2I R@1", "source mean R@1 kept", "source zero-shot top-1 kept"]
    headers += ["step time vs full"]
    rows = []
    for name in per_seed[0]:
        if name in (START, BASELINE):
            cells = [common.spread([seed[name][key] for seed in per_seed]) for key in FIGURES]
            label = f"{name} (absolute: mean ± sd)"
        else:
            cells = [common.paired([seed[name][key] - seed[BASELINE][key] for seed in per_seed]) for key in FIGURES]
            label = f"{name} (paired difference)"
        if name == WISE_FT:
            weights = ", ".join(str(seed[name]["w"]) for seed in per_seed)
            label = f"{name}, mix chosen on validation: w = {weights} (paired difference)"
            step = "as full"
        else:
            step = f"{times[name] / times[BASELINE]:.2f}" if name in times else "-"
        rows.append([label, *cells, step])
    rows.append([f"{BASELINE}, timed again (A/A)", "", "", "", "", f"{times['full (A/A)'] / times[BASELINE]:.2f}"])
    return common.markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Every code path, one seed, one epoch per run.")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--markdown", default=None, help="Also write the table to this file.")
    args = parser.parse_args()
    if not args.smoke and not 2 <= args.seeds <= max(common.T_975):
        parser.error(f"--seeds takes 2 to {max(common.T_975)} (a paired interval needs two seeds at least)")
    began = time.perf_counter()
    sizes = {"num_train": 300, "num_val": 60, "num_test": 60} if args.smoke else SIZES
    demo = write_demo_dataset(ROOT / ("demo-smoke" if args.smoke else "demo"), **sizes)
    folders = split_by_class(str(demo))
    (ROOT / "model.json").write_text(json.dumps(MODEL))
    kept = ROOT / ("results-smoke.json" if args.smoke else "results.json")
    per_seed = []
    for seed in range(1 if args.smoke else args.seeds):
        per_seed.append(one_seed(seed, folders, args.smoke))
        kept.write_text(json.dumps({"per seed": per_seed}, indent=1))
    times = step_times(str(ROOT / "runs" / "0" / "start"), folders["target"], 1 if args.smoke else 5, 8)
    kept.write_text(json.dumps({"per seed": per_seed, "step seconds": times}, indent=1))
    counts = {
        name: len(Path(folder, INDO_FASHION_FILES["test"]).read_text().splitlines()) for name, folder in folders.items()
    }
    text = "\n".join(
        [
            f"Source: {len(SOURCE_CLASSES)} classes ({', '.join(SOURCE_CLASSES)}), {counts['source']} test pairs; "
            f"target: the other {len(CLASS_LABELS) - len(SOURCE_CLASSES)}, {counts['target']} test pairs. "
            f"{len(per_seed)} seed(s), each pretraining its own start; every recipe of a seed fine-tunes from it "
            f"with the same seed, data order and schedule. The start and {BASELINE}: mean ± sd over the seeds; "
            f"every other row: its mean difference from {BASELINE} on the same seed [95% interval, Student's t, "
            f"seeds - 1 degrees of freedom]. Whole benchmark "
            f"{(time.perf_counter() - began) / 60:.1f} min. {common.machine_description()}",
            "",
            table(per_seed, times),
        ]
    )
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
