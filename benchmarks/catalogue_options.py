"""What each "own catalogue" option costs and buys, measured on the demo data: the figures behind the README's
section "Fine-tuning on your own catalogue".

The setup imitates fine-tuning a pretrained CLIP on a new catalogue, offline. The demo catalogue (drawn at 96 px, so
--augment's larger cache holds real detail) is split by class: a tiny CLIP is trained from scratch on the first
8 classes ("general": the starting model and what it knows), then fine-tuned on the other 7 ("own catalogue") with
each option, the same schedule and seed. Each row gives the own catalogue's test figures, the general classes'
test figures (what was kept), and the run's wall time (evaluation included).

- full fine-tune, --augment (mild: open_clip's 0.9-1.0; strong: 0.5-1.0 with flips), LoRA (rank 8),
  --gradient_checkpointing (the same gradient: the same figures, slower);
- WiSE-FT of the full fine-tune (`clip-accel wise-ft`, the general data as held-out), its chosen mix;
- gradient checkpointing's memory and speed on the bundled ViT-B/32 config (where activations dominate): peak
  RSS and time of forward + backward of a batch, each in a fresh process, side by side.

One seed and ~100 test pairs per side: differences below ~0.05 in R@1 are within noise.

    python benchmarks/catalogue_options.py [--markdown FILE]
    python benchmarks/catalogue_options.py --smoke   # seconds: every code path, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import common
from accelerate.state import AcceleratorState  # noqa: E402

from clip_accel.cli import wise_ft_main  # noqa: E402
from clip_accel.data.demo import CLASS_LABELS, write_demo_dataset  # noqa: E402
from clip_accel.data.indo_fashion import INDO_FASHION_FILES  # noqa: E402
from clip_accel.evaluation import evaluate_folder  # noqa: E402
from clip_accel.options import parse_config  # noqa: E402

GENERAL = set(CLASS_LABELS[:8])
ROOT = common.BENCH_DIR / "catalogue"
# The demo recipe's schedule (recipes/demo.yaml) for both stages; fine-tuning at a lower peak learning rate.
SCHEDULE = ["--num_train_epochs", "10", "--per_device_train_batch_size", "64", "--lr_scheduler_type", "cosine"]
SCHEDULE += ["--warmup_ratio", "0.1", "--early_stopping_patience", "3", "--logging_steps", "10"]
SCHEDULE += ["--overwrite_output_dir", "--per_device_eval_batch_size", "100", "--seed", "0"]
PRETRAIN = ["--scratch_config", "clip-tiny", "--learning_rate", "1e-3", "--no_eval_initial_model"]
FINE_TUNE = ["--learning_rate", "3e-4"]
OPTIONS = {
    "full fine-tune": [],
    "--augment (0.9-1.0)": ["--augment"],
    "--augment 0.5-1.0 --augment_flip": ["--augment", "--augment_scale", "0.5", "1.0", "--augment_flip"],
    "LoRA rank 8 (lr 3e-3)": ["--lora_rank", "8", "--lora_alpha", "16", "--learning_rate", "3e-3"],
    "--gradient_checkpointing": ["--gradient_checkpointing"],
}


def split_by_class(source: str, target: str, keep) -> str:
    """A copy of the Indo-fashion-layout folder `source` holding only the rows whose class `keep` accepts (the
    images are shared through a link)."""
    os.makedirs(target, exist_ok=True)
    for name in INDO_FASHION_FILES.values():
        with open(os.path.join(source, name)) as rows, open(os.path.join(target, name), "w") as kept:
            kept.writelines(line for line in rows if keep(json.loads(line)["class_label"]))
    if not os.path.exists(os.path.join(target, "images")):
        os.symlink(os.path.join(source, "images"), os.path.join(target, "images"))
    return target


def general_figures(model: str, general: str, smoke: bool) -> dict:
    try:
        return evaluate_folder(model, parse_config(["--data_dir", general, *common_options(smoke)])[0], batch_size=100)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def common_options(smoke: bool) -> list[str]:
    options = ["--cache_dir", str(ROOT / "cache")]
    return options + (["--max_train_samples", "128", "--max_eval_samples", "40"] if smoke else [])


def checkpointing_memory(smoke: bool) -> list[list]:
    """Peak RSS and seconds of forward + backward, with and without gradient checkpointing, each in a fresh
    process (so one's peak does not hide the other's); interleaved, best of the rounds."""
    rows, rounds = {}, 1 if smoke else 2
    for _ in range(rounds):
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--memory-probe", str(int(checkpointing)), str(int(smoke))]
            probe = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            best = rows.setdefault(checkpointing, probe)
            best["seconds"] = min(best["seconds"], probe["seconds"])
    off, on = rows[False], rows[True]
    return [
        [
            "ViT-B/32 config, batch 32" if not smoke else "tiny config (smoke)",
            f"{off['peak_mib']:.0f}",
            f"{on['peak_mib']:.0f}",
            f"{on['peak_mib'] / off['peak_mib']:.2f}",
            f"{off['seconds']:.2f}",
            f"{on['seconds']:.2f}",
            f"{on['seconds'] / off['seconds']:.2f}",
        ]
    ]


def memory_probe(checkpointing: bool, smoke: bool) -> None:
    """One process: build the model, then time forward + backward of one batch (after one warm-up) and report the
    peak resident memory (the model's weights and gradients are the same with or without checkpointing)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from clip_accel.model import ContrastiveModel, enable_gradient_checkpointing

    config = CLIPConfig(**common.SMALL_CLIP_CONFIG) if smoke else common.preset_config("clip-vit-b-32")
    clip = CLIPModel(config)
    if checkpointing:
        enable_gradient_checkpointing(clip)
    model = ContrastiveModel(clip).train()
    size, side = (8 if smoke else 32), config.vision_config.image_size
    pixels = torch.randn(size, 3, side, side)
    input_ids = torch.randint(0, config.text_config.vocab_size - 1, (size, 20))
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        image, text, scale = model(pixel_values=pixels, input_ids=input_ids)
        (image @ text.T * scale.exp()).logsumexp(1).mean().backward()
        seconds.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: the same baseline both ways
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": peak_mib, "seconds": seconds[-1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Every code path in seconds (tiny sizes).")
    parser.add_argument("--markdown", default=None, help="Also write the tables to this file.")
    args = parser.parse_args()
    smoke = args.smoke
    shutil.rmtree(ROOT / "runs", ignore_errors=True)
    sizes = {"num_train": 240, "num_val": 90, "num_test": 90} if smoke else {}
    demo = write_demo_dataset(ROOT / ("demo-smoke" if smoke else "demo"), image_size=96, seed=0, **sizes)
    general = split_by_class(str(demo), str(demo) + "-general", lambda label: label in GENERAL)
    own = split_by_class(str(demo), str(demo) + "-own", lambda label: label not in GENERAL)
    base = [*SCHEDULE, *common_options(smoke)] + (["--num_train_epochs", "2"] if smoke else [])
    start_dir = str(ROOT / "runs" / "start")
    common.train_row([*base, *PRETRAIN, "--data_dir", general, "--output_dir", start_dir])
    tuned = [*base, *FINE_TUNE, "--data_dir", own, "--model_name_or_path", start_dir]

    headers = ["Row", "own I2T R@1", "own T2I R@1", "own ZS top-1", "general mean R@1", "general ZS top-1", "wall s"]
    rows, full = [], None
    for index, (name, options) in enumerate(OPTIONS.items()):
        output_dir = str(ROOT / "runs" / f"option-{index}")
        metrics, seconds = common.train_row([*tuned, "--output_dir", output_dir, *options])
        if full is None:  # the first row: the full fine-tune, whose starting-model figures head the table
            full = (metrics, output_dir)
            kept = general_figures(start_dir, general, smoke)
            rows.append(_row("starting model (no fine-tuning)", metrics["initial"]["test"], kept, None))
        rows.append(_row(name, metrics["test"], general_figures(output_dir, general, smoke), seconds))
    wise_dir = str(ROOT / "runs" / "wise_ft")
    start = time.perf_counter()
    try:
        wise_ft_main(
            [full[1], "--heldout_data_dir", general, "--output_dir", wise_dir, "--cache_dir", str(ROOT / "cache")]
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    with open(os.path.join(wise_dir, "wise_ft.json")) as handle:
        wise = json.load(handle)
    chosen = next(mix for mix in wise["mixes"] if mix["weight"] == wise["chosen_weight"])
    rows.append(
        _row(
            f"WiSE-FT of the full fine-tune, chosen w={wise['chosen_weight']:g}",
            chosen["in-domain/test"],
            chosen["held-out/test"],
            time.perf_counter() - start,
        )
    )
    wise_rows = [
        [f"{mix['weight']:g}"]
        + [f"{mix[s][k]:.4f}" for s in ("in-domain/test", "held-out/test") for k in ("mean_R@1", "zero_shot_top1")]
        for mix in wise["mixes"]
    ]
    memory = checkpointing_memory(smoke)
    text = "\n\n".join(
        [
            f"Machine: {common.machine_description()}",
            f"Own catalogue: {full[0]['test']['num_pairs']} test pairs; general: {kept['num_pairs']} test pairs; "
            "one seed.",
            common.markdown_table(headers, rows),
            "WiSE-FT mixes (test splits; w = 0 the starting model, 1 the full fine-tune):",
            common.markdown_table(
                ["w", "own mean R@1", "own ZS top-1", "general mean R@1", "general ZS top-1"], wise_rows
            ),
            "Gradient checkpointing, forward + backward of one batch (fresh process each):",
            common.markdown_table(
                ["Model", "peak MiB off", "peak MiB on", "on/off", "s off", "s on", "on/off"], memory
            ),
        ]
    )
    print(text)
    common.write_markdown(args.markdown, text)


def _row(name: str, own: dict, general: dict, seconds: float | None) -> list:
    cells = [own["image_to_text_R@1"], own["text_to_image_R@1"], own.get("zero_shot_top1")]
    cells += [general["mean_R@1"], general.get("zero_shot_top1")]
    return [name, *(f"{v:.4f}" if v is not None else "–" for v in cells), "–" if seconds is None else f"{seconds:.0f}"]


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-probe":
        memory_probe(bool(int(sys.argv[2])), bool(int(sys.argv[3])))
    else:
        main()
