"""The demo trained from WebDataset shards (--streaming) beside the same run from the cache.

The embedded demo catalogue (1,200/200/200 photos) is written in the Indo-fashion layout, then as tar shards
(`clip_accel.data.write_webdataset_shards`: 8 training shards of 150 photos as they are, one validation and one
test shard), and the demo recipe (`--config demo`) trains on each: from the uint8 cache, and streamed with 0 and 2
DataLoader workers, each with seeds 42 (the recipe's), 0, 1 and 2. Same schedule and evaluation splits (read
whole and cached in both); what differs is the order of the training pairs (the cache shuffles the split; the
stream its shards and a 1,000-row buffer per worker, so the number of workers changes the order too). The seeds
give the spread that order alone makes.

    python benchmarks/streaming_demo.py [--seeds 42 0 1 2] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import common

from clip_accel.data.demo import write_demo_dataset
from clip_accel.data.shards import write_webdataset_shards

STREAMED = ["--image_column", "jpg", "--caption_column", "txt", "--label_column", "json.class_label"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 0, 1, 2])
    parser.add_argument("--output", help="Also write the table to this markdown file.")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="clip_accel_streaming_demo-")
    data_dir, shards = os.path.join(root, "demo"), os.path.join(root, "shards")
    write_demo_dataset(data_dir)
    for split, rows in (("train", 150), ("val", 200), ("test", 200)):
        write_webdataset_shards(data_dir, shards, split, rows_per_shard=rows)
    common_args = ["--config", "demo", "--demo", "false", "--dataset_label", "demo", "--report_to", "none"]
    runs = {
        "uint8 cache (--data_dir)": ["--data_dir", data_dir],
        "streamed shards, 0 workers": ["--dataset_name", shards, "--streaming", "true", *STREAMED],
        "streamed shards, 2 workers": [
            *["--dataset_name", shards, "--streaming", "true", *STREAMED],
            *["--dataloader_num_workers", "2"],
        ],
    }
    rows = []
    for name, argv in runs.items():
        figures = []
        for seed in args.seeds:
            out = os.path.join(root, f"{name.split()[0]}-{argv[-1].replace('/', '_')}-{seed}")
            metrics, seconds = common.train_row(
                [*common_args, *argv, "--seed", str(seed), "--output_dir", out, "--cache_dir", os.path.join(root, "c")]
            )
            test = metrics["test"]
            figures.append((test["image_to_text_R@1"], test["text_to_image_R@1"], test["zero_shot_top1"], seconds))
        columns = list(zip(*figures, strict=True))
        rows.append(
            [name]
            + [
                " / ".join(f"{value:.3f}" for value in column) + f" (mean {sum(column) / len(column):.3f})"
                for column in columns[:3]
            ]
            + [f"{common.median(list(columns[3])):.0f}"]
        )
    seeds = ", ".join(map(str, args.seeds))
    table = common.markdown_table(
        [f"training data (seeds {seeds})", "test I2T R@1", "test T2I R@1", "zero-shot top-1", "wall s (median)"], rows
    )
    text = f"Machine: {common.machine_description()}\n\n{table}\n"
    print(text)
    common.write_markdown(args.output, text)


if __name__ == "__main__":
    main()
