"""Fine-grained catalogue retrieval: what each option buys over plain fine-tuning, as paired differences over seeds.
A simulation on tiny models (no pretrained weights reach this machine): the figures behind BENCHMARKS.md section 12.

The catalogue is the demo's (2,400/400/400 pairs at 64 px), whose products differ by one attribute at a time: every
class comes in 8 colours, 4 patterns, 5 border colours and several fabrics, named in the title and drawn, so an item's
nearest neighbours are the same garment in another colour or pattern. As in benchmarks/forgetting.py, a tiny CLIP
(width 64, 4 layers per tower) is pretrained from scratch on 8 of the 15 classes (30 epochs), then fine-tuned on
the other 7 by each row's options (10 epochs, lr 1e-3 cosine, batch 64, early stopping on validation).

Paired: each seed pretrains its own start, and every row of that seed fine-tunes from it with the same seed, data
order and schedule, so a row's difference from plain fine-tuning within a seed holds only the option's effect. The
table gives the mean paired difference over the seeds with its 95% interval (Student's t, seeds - 1 degrees of
freedom); an interval that holds 0 says the option made no difference this benchmark could see. Columns: test
image->text and text->image R@1 and their mean R@5 over all target items; R@1 among same-class items (each image
ranked only against the texts of its own class, and each text against those images: the near-twin measure);
zero-shot top-1 among the 7 target classes; the whole run's wall time against plain fine-tuning's (same seed,
same call; CPU-dependent; a mining row's includes its mining, and early stopping can end runs at other epochs).
A second table holds the nested-size run's 32- and 16-dim prefixes against plain fine-tuning's embeddings cut to
the same sizes (`embed --dim`), paired by seed.

    python benchmarks/fine_grained.py [--seeds 5] [--rows ROW ...] [--markdown FILE]   # ~3 min per seed and row
    python benchmarks/fine_grained.py --smoke                                         # every path in a minute

Each seed's start and each (seed, row)'s figures are kept under $CLIP_ACCEL_BENCH_DIR/fine_grained (results.json):
a call with `--rows` measures those rows (and plain fine-tuning, again: its figures come out the same, its time is
what the call's rows are compared with) and tables every row measured on each seed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time

import common
import forgetting
import torch

from clip_accel.config import DataConfig
from clip_accel.data.demo import CLASS_LABELS, write_demo_dataset
from clip_accel.embedding import embed
from clip_accel.metrics import retrieval_metrics

ROOT = common.BENCH_DIR / "fine_grained"
BASELINE = "plain fine-tune"
NESTED = "nested sizes 64,32,16 (full size's recall)"
# Left out of --smoke: its one epoch ends before the refresh, so the row would repeat the row of batches unrefreshed.
REFRESHED = "hard-negative batches, re-mined every 2 epochs"
ROWS = {
    BASELINE: [],
    "hard negatives weighted in the loss (alpha 9)": ["--negative_hardness", "9"],
    "hard-negative batches (groups of 4)": ["--hard_negative_batches", "4"],
    "hard-negative batches + weighted loss": ["--hard_negative_batches", "4", "--negative_hardness", "9"],
    NESTED: ["--matryoshka_dims", "64,32,16"],
    REFRESHED: ["--hard_negative_batches", "4", "--hard_negative_refresh", "2"],
}
PREFIXES = (32, 16)  # the smaller sizes NESTED trains, compared with plain fine-tuning's embeddings cut as short
METRICS = ("I2T R@1", "T2I R@1", "mean R@5", "same-class mean R@1", "zero-shot top-1")


def same_class_recall(folder: str, data: DataConfig) -> float:
    """Mean of both directions' R@1 with each query ranked among its own class's candidates, over all test rows."""
    embeddings = forgetting.fresh(embed, folder, data)
    hits, rows = 0.0, 0
    for label in sorted(set(embeddings.labels)):
        mine = torch.tensor([index for index, row_label in enumerate(embeddings.labels) if row_label == label])
        figures = retrieval_metrics(embeddings.image_embeds[mine], embeddings.text_embeds[mine], ks=(1,))
        hits, rows = hits + figures["mean_R@1"] * len(mine), rows + len(mine)
    return hits / rows


def prefix_recall(folder: str, data: DataConfig, dim: int) -> float:
    """Test mean R@1 of `folder`'s embeddings cut to their first `dim` dimensions and renormalised (`embed --dim`;
    each item's own caption its only match)."""
    embeddings = forgetting.fresh(embed, folder, data, dim=dim)
    return retrieval_metrics(embeddings.image_embeds, embeddings.text_embeds, ks=(1,))["mean_R@1"]


def prefix_table(seeds: list[str], root, target: DataConfig) -> str:
    """Each smaller size's recall: plain fine-tuning's embeddings cut to it against the nested-size run's (the same
    seed's folders, kept under ROOT/runs), as the paired difference over the seeds that measured both."""
    runs = [(root / "runs" / seed / "row0", root / "runs" / seed / f"row{list(ROWS).index(NESTED)}") for seed in seeds]
    rows = []
    for dim in PREFIXES:
        plain = [prefix_recall(str(plain), target, dim) for plain, _ in runs]
        nested = [prefix_recall(str(nested), target, dim) for _, nested in runs]
        difference = common.paired([n - p for n, p in zip(nested, plain, strict=True)])
        rows.append([f"{dim} of 64 dims", common.spread(plain), common.spread(nested), difference])
    headers = ["test mean R@1 at", "plain fine-tune, cut", "nested sizes 64,32,16", "paired difference"]
    return common.markdown_table(headers, rows)


def one_seed(seed: int, folders: dict[str, str], root, rows: dict[str, list[str]], smoke: bool) -> dict:
    """Each of `rows` fine-tuned from seed `seed`'s start (pretrained here unless ROOT/runs/SEED/start holds it),
    its figures kept in ROOT/results.json: a later call with other rows reuses the start and the figures."""
    runs, kept = root / "runs" / str(seed), root / "results.json"
    results = json.loads(kept.read_text()) if kept.is_file() else {}
    if not (runs / "start" / "model.safetensors").is_file():
        pretrain = ["--config", "demo", "--scratch_config", str(root / "model.json"), "--seed", str(seed)]
        pretrain += ["--no_eval_initial_model", "--per_device_eval_batch_size", "200", "--overwrite_output_dir"]
        pretrain += ["--num_train_epochs", "1" if smoke else "30", "--output_dir", str(runs / "start")]
        common.train_row(pretrain + forgetting.data_args(folders["source"], root))
    target = DataConfig(data_dir=folders["target"], cache_dir=str(root / "cache"))
    tune = ["--model_name_or_path", str(runs / "start"), "--seed", str(seed), "--no_eval_initial_model"]
    tune += forgetting.FINE_TUNE + (["--num_train_epochs", "1"] if smoke else [])
    for name, options in rows.items():
        output = str(runs / f"row{list(ROWS).index(name)}")
        argv = tune + forgetting.data_args(folders["target"], root) + ["--output_dir", output] + options
        metrics, seconds = common.train_row(argv)
        test = metrics["test"]
        results.setdefault(str(seed), {})[name] = {
            "I2T R@1": test["image_to_text_R@1"],
            "T2I R@1": test["text_to_image_R@1"],
            "mean R@5": (test["image_to_text_R@5"] + test["text_to_image_R@5"]) / 2,
            "same-class mean R@1": same_class_recall(output, target),
            "zero-shot top-1": test["zero_shot_top1"],
            "seconds": seconds,
        }
        # Wall times compare within one call: a row keeps the baseline's of the call that measured it.
        results[str(seed)][name]["baseline seconds"] = results[str(seed)][BASELINE]["seconds"]
        kept.write_text(json.dumps(results, indent=1))
    return results[str(seed)]


def table(per_seed: list[dict[str, dict[str, float]]]) -> str:
    """Plain fine-tuning's figures, then each other row measured on every seed as its paired difference."""
    headers = ["Option", *METRICS, "run time vs plain"]
    baseline = [seed[BASELINE] for seed in per_seed]
    rows = [
        [
            f"{BASELINE} (absolute: mean ± sd)",
            *(common.spread([run[metric] for run in baseline]) for metric in METRICS),
            "1.00",
        ]
    ]
    for name in ROWS:
        if name == BASELINE or not all(name in seed for seed in per_seed):
            continue
        pairs = [(seed[name], seed[BASELINE]) for seed in per_seed]
        cells = [common.paired([run[metric] - base[metric] for run, base in pairs]) for metric in METRICS]
        ratio = statistics.mean(run["seconds"] / run["baseline seconds"] for run, _ in pairs)
        rows.append([f"{name} (paired difference)", *cells, f"{ratio:.2f}"])
    return common.markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="Every code path: 2 seeds, one epoch per run.")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="Default: every row.")
    parser.add_argument("--markdown", default=None, help="Also write the table to this file.")
    args = parser.parse_args()
    if not 2 <= args.seeds <= max(common.T_975):
        parser.error(f"--seeds takes 2 to {max(common.T_975)} (a paired interval needs two seeds at least)")
    began = time.perf_counter()
    root = ROOT / "smoke" if args.smoke else ROOT
    if args.smoke:
        shutil.rmtree(root, ignore_errors=True)
    sizes = {"num_train": 300, "num_val": 60, "num_test": 60} if args.smoke else forgetting.SIZES
    demo = write_demo_dataset(root / "demo", **sizes)
    folders = forgetting.split_by_class(str(demo), root)
    (root / "model.json").write_text(json.dumps(forgetting.MODEL))
    chosen = [name for name in args.rows if not (args.smoke and name == REFRESHED)]  # (see REFRESHED)
    rows = {name: ROWS[name] for name in dict.fromkeys([BASELINE, *chosen])}
    seeds = range(2 if args.smoke else args.seeds)
    per_seed = [one_seed(seed, folders, root, rows, args.smoke) for seed in seeds]
    target_classes = [label for label in CLASS_LABELS if label not in forgetting.SOURCE_CLASSES]
    text = "\n".join(
        [
            f"Fine-tuned on {len(target_classes)} classes ({', '.join(target_classes)}), pretrained on the other "
            f"{len(forgetting.SOURCE_CLASSES)}. Paired over {len(per_seed)} seeds; this call "
            f"{(time.perf_counter() - began) / 60:.1f} min. {common.machine_description()}",
            "",
            table(per_seed),
        ]
    )
    measured = [str(seed) for seed, results in zip(seeds, per_seed, strict=True) if NESTED in results]
    if len(measured) >= 2:
        target = DataConfig(data_dir=folders["target"], cache_dir=str(root / "cache"))
        text += "\n\nThe smaller sizes, seeds " + ", ".join(measured) + ":\n\n" + prefix_table(measured, root, target)
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
