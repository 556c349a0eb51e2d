"""Identical-caption positives and composed captions, side by side: the figures behind BENCHMARKS.md section 7 and
the README's "Fine-tuning on your own catalogue".

Data: the demo catalogue written with 30 % of its items sharing a title with another photo of the same product
(`write_demo_dataset(shared_titles=0.3)`; train 1200, validation 200, test 200 pairs at 64 px). A tiny CLIP and a
tiny SigLIP are trained from scratch with the demo recipe's schedule (recipes/demo.yaml), each with today's
own-pair loss (`--caption_positives own`) and the multi-positive loss (`identical`), from the same start (same
seed), for three seeds. Then the same for `--caption_template "{product_title}, by {brand}"` (CLIP, identical
positives). Each row gives the test split's figures under both recall rules: own pair (the only correct caption
is the image's own) and identical caption (any caption equal to it counts).

Step time: `step.plain_step` of the trainer's own prepared run, one batch of 64 per step, the two losses
interleaved on the same model and batches (median of rounds; CPU-dependent).

    python benchmarks/catalogue_loss.py [--markdown FILE]
    python benchmarks/catalogue_loss.py --smoke   # every code path, tiny sizes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import statistics
import time

import common
from accelerate.state import AcceleratorState  # noqa: E402

from clip_accel.data.demo import write_demo_dataset  # noqa: E402
from clip_accel.data.indo_fashion import INDO_FASHION_FILES  # noqa: E402
from clip_accel.options import parse_config  # noqa: E402
from clip_accel.step import plain_step  # noqa: E402
from clip_accel.trainer import prepare_run  # noqa: E402

ROOT = common.BENCH_DIR / "catalogue_loss"
SHARED_TITLES = 0.3
SEEDS = (0, 1, 2)
FAMILIES = {"CLIP": "clip-tiny", "SigLIP": "siglip-tiny"}
BRAND_TEMPLATE = "{product_title}, by {brand}"


def figures(metrics: dict) -> list[str]:
    test = metrics["test"]
    lenient = test["identical_caption_match"]
    cells = [test[f"image_to_text_R@{k}"] for k in (1, 5)] + [test[f"text_to_image_R@{k}"] for k in (1, 5)]
    cells += [lenient[f"image_to_text_R@{k}"] for k in (1, 5)]
    return [f"{value:.3f}" for value in cells]


def step_times(argv: list[str], rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step of each loss on the trainer's prepared run, interleaved in a new order
    every round; "own (A/A)" is the own-pair loss timed a second time, the noise floor of the comparison."""
    try:
        run = prepare_run(*parse_config(argv))
        batches = [batch for batch, _ in zip(run.train_data.epoch(0), range(steps), strict=False)]
        modes = {"own": "own", "identical": "identical", "own (A/A)": "own"}
        times = {mode: [] for mode in modes}
        order = random.Random(0)
        for index in range(rounds + 1):  # round 0 warms up
            for mode in order.sample(list(modes), len(modes)):
                run.step_context.caption_positives = modes[mode]
                start = time.perf_counter()
                for batch in batches:
                    plain_step(run.step_context, [batch])
                if index:
                    times[mode].append((time.perf_counter() - start) / len(batches))
        return {mode: statistics.median(values) for mode, values in times.items()}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def loss_times(batch: int, dim: int, repeats: int) -> list[str]:
    """Forward + backward of the CLIP and SigLIP losses alone on one process at a large batch, own against
    identical positives (30 % of the rows repeat a caption), median of interleaved repeats."""
    import torch
    import torch.nn.functional as F

    from clip_accel.loss import contrastive_loss, sigmoid_loss

    generator = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(batch, dim, generator=generator), dim=-1) for _ in range(2))
    ids = torch.arange(batch)
    ids[1 : int(0.3 * batch) : 2] = ids[0 : int(0.3 * batch) - 1 : 2]
    rows = []
    for name, loss_fn, scale in (
        ("CLIP", contrastive_loss, torch.tensor(4.6)),
        ("SigLIP", sigmoid_loss, torch.tensor([2.3, -10.0])),
    ):
        times = {"own": [], "identical": []}
        for index in range(repeats + 1):
            for mode in ("own", "identical") if index % 2 else ("identical", "own"):
                leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
                start = time.perf_counter()
                loss_fn(*leaves, caption_ids=ids if mode == "identical" else None).backward()
                if index:
                    times[mode].append(time.perf_counter() - start)
        own, identical = (statistics.median(times[mode]) for mode in ("own", "identical"))
        rows.append(
            [name, f"{batch} x {batch}", f"{own * 1000:.1f}", f"{identical * 1000:.1f}", f"{identical / own:.2f}"]
        )
    return rows


def shared_titles(folder, split: str) -> str:
    with open(os.path.join(folder, INDO_FASHION_FILES[split])) as handle:
        titles = [json.loads(line)["product_title"] for line in handle]
    counts = collections.Counter(titles)
    return f"{sum(counts[title] > 1 for title in titles)} of {len(titles)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Every code path in seconds (tiny sizes).")
    parser.add_argument("--markdown", default=None, help="Also write the tables to this file.")
    args = parser.parse_args()
    smoke = args.smoke
    shutil.rmtree(ROOT / "runs", ignore_errors=True)
    sizes = {"num_train": 256, "num_val": 40, "num_test": 40} if smoke else {}
    demo = write_demo_dataset(ROOT / ("demo-smoke" if smoke else "demo"), shared_titles=SHARED_TITLES, **sizes)
    # The demo recipe's schedule on this folder (not --demo, which would rewrite it as the plain demo).
    base = ["--config", "demo", "--demo", "false", "--data_dir", str(demo), "--cache_dir", str(ROOT / "cache")]
    base += ["--no_eval_initial_model"]
    base += ["--per_device_eval_batch_size", "100"] + (["--num_train_epochs", "1"] if smoke else [])
    seeds = SEEDS[:1] if smoke else SEEDS
    headers = ["Model", "captions", "positives", "seed"]
    headers += ["I2T R@1", "I2T R@5", "T2I R@1", "T2I R@5", "I2T R@1 (identical)", "I2T R@5 (identical)"]
    rows, shared = [], None
    for family, preset in FAMILIES.items():
        for seed in seeds:
            for positives in ("own", "identical"):
                output_dir = str(ROOT / "runs" / f"{preset}-{positives}-{seed}")
                options = ["--scratch_config", preset, "--caption_positives", positives, "--seed", str(seed)]
                metrics, _ = common.train_row([*base, *options, "--output_dir", output_dir])
                shared = metrics["training"]["train_pairs_sharing_a_caption"], metrics["training"]["train_pairs"]
                rows.append([family, "titles", positives, seed, *figures(metrics)])
    for seed in seeds:
        output_dir = str(ROOT / "runs" / f"clip-tiny-brand-{seed}")
        options = ["--scratch_config", "clip-tiny", "--caption_template", BRAND_TEMPLATE, "--seed", str(seed)]
        metrics, _ = common.train_row([*base, *options, "--output_dir", output_dir])
        rows.append(["CLIP", f"`{BRAND_TEMPLATE}`", "identical", seed, *figures(metrics)])
    rows.sort(key=lambda row: (row[0], row[1] != "titles", row[1], row[2] != "own", row[3]))

    timing = []
    for family, preset in FAMILIES.items():
        output_dir = str(ROOT / "runs" / f"timing-{preset}")
        argv = [*base, "--scratch_config", preset, "--output_dir", output_dir, "--seed", "0"]
        seconds = step_times(argv, rounds=2 if smoke else 9, steps=3 if smoke else 10)
        own = seconds["own"]
        timing.append([family] + [f"{seconds[mode] * 1000:.1f}" for mode in seconds])
        timing[-1] += [f"{seconds['identical'] / own:.3f}", f"{seconds['own (A/A)'] / own:.3f}"]
    losses = loss_times(256 if smoke else 4096, 512, repeats=2 if smoke else 7)
    text = "\n\n".join(
        [
            f"Machine: {common.machine_description()}",
            f"Training split: {shared[0]} of {shared[1]} pairs share their title with another pair; test split: "
            f"{shared_titles(demo, 'test')}. Global batch 64; the recipe's schedule with early stopping.",
            common.markdown_table(headers, rows),
            "Step time (`plain_step`, batch 64, median of rounds, the losses interleaved on one model):",
            common.markdown_table(
                ["Model", "own ms", "identical ms", "own again ms", "identical/own", "A/A: own again/own"], timing
            ),
            "The losses alone, forward + backward on one process, embeddings of width 512, median of repeats:",
            common.markdown_table(["Loss", "logits", "own ms", "identical ms", "identical/own"], losses),
        ]
    )
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
