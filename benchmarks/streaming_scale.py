"""Streaming at cluster scale (issue 30): what one process reads of a pass, how mixed a global batch is, and how
long start-up takes to know each shard's rows.

    python benchmarks/streaming_scale.py [--quick] [--markdown FILE]

1. Bytes read per process in one pass at N = 1, 2, 4, 8 processes, the ranks simulated one after another in this
   process through the real reader (`StreamingLoader`, 0 workers; bytes from /proc/self/io): contiguous slots of
   the counted rows. With them, the distinct shards a global batch's pairs come from (windows of 1,000 rows, 64
   rows a shard).
2. Start-up: finding and counting 100, 1,000 and 5,000 shards' rows (32 rows each; `ShardSource.shards` +
   `count_shard_rows`), from
   the tar headers and from the shard index beside them, the shards in the page cache (local disk).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: offline settings)
import numpy as np  # noqa: E402
from accelerate import PartialState  # noqa: E402
from PIL import Image  # noqa: E402

from clip_accel.config import DataConfig  # noqa: E402
from clip_accel.data import StreamingLoader, StreamingPairs  # noqa: E402
from clip_accel.data.preprocess import PairPreprocessor, caption_id  # noqa: E402
from clip_accel.data.shard_index import index_file, write_shard_index  # noqa: E402
from clip_accel.data.shards import ShardSource, add_tar_member, count_shard_rows, load_stream_split  # noqa: E402
from clip_accel.tokenizer import build_offline_tokenizer  # noqa: E402

BATCH = 16


def write_shards(folder: str, shards: int, rows: int, image_px: int) -> None:
    """`shards` tar shards of `rows` rows: a noise PNG (`image_px` square) and the caption `item N`."""
    os.makedirs(folder, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
    for shard in range(shards):
        with tarfile.open(os.path.join(folder, f"train-{shard:05d}.tar"), "w") as tar:
            for item in range(shard * rows, (shard + 1) * rows):
                image = io.BytesIO()
                Image.fromarray(np.roll(noise, item, axis=1)).save(image, "PNG")
                add_tar_member(tar, f"{item:08d}.png", image.getvalue())
                add_tar_member(tar, f"{item:08d}.txt", f"item {item}".encode())


def bytes_read() -> int:
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


def one_pass(folder: str, processes: int, tokenizer, ids: dict) -> tuple[int, list]:
    """(most bytes one process read, each process's items per batch) of pass 0 on `processes` processes."""
    config = DataConfig(dataset_name=folder, streaming=True, image_column="png", caption_column="txt")
    stream = ShardSource(config).shards("train")
    split = load_stream_split(config, "train", count_shard_rows(config, stream), stream)
    most, batches = 0, []
    for rank in range(processes):
        pairs = StreamingPairs(split, config, PairPreprocessor(tokenizer, 32, 16), rank, processes, seed=0)
        loader = StreamingLoader(pairs, BATCH)
        before = bytes_read()
        mine = []
        for batch in loader.epoch(0):
            loader.taken(batch)
            mine.append([ids[value] for value in batch["caption_ids"].tolist()])
        most = max(most, bytes_read() - before)
        batches.append(mine)
    return most, batches


def share_table(quick: bool) -> str:
    shards, rows = (16, 64) if quick else (32, 64)
    folder = os.path.join(tempfile.mkdtemp(prefix="stream-scale-"), "shards")
    write_shards(folder, shards, rows, 48)
    items = shards * rows
    pass_bytes = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
    tokenizer = build_offline_tokenizer([f"item {item}" for item in range(items)])
    ids = {caption_id(tokenizer(f"item {item}")["input_ids"]): item for item in range(items)}
    table = []
    for processes in (1, 2, 4, 8):
        most, batches = one_pass(folder, processes, tokenizer, ids)
        global_batches = [sum((mine[k] for mine in batches), []) for k in range(len(batches[0]))]
        distinct = [len({item // rows for item in batch}) for batch in global_batches]
        table.append(
            [
                processes,
                f"{most / 1e6:.2f}",
                f"{most / pass_bytes:.3f}",
                f"{1 / processes:.3f}",
                f"{np.mean(distinct):.1f}",
            ]
        )
    headers = ["processes", "most MB one process read", "of the pass", "1/N", "shards per global batch"]
    note = (
        f"{shards} shards x {rows} rows ({pass_bytes / 1e6:.1f} MB a pass), batch {BATCH} per process, "
        "windows of 1,000 rows (--shuffle_buffer), 0 workers; bytes from /proc/self/io."
    )
    return note + "\n\n" + common.markdown_table(headers, table)


def startup_table(quick: bool) -> str:
    rows_per_shard, rows = 32, []
    for count in (50, 200) if quick else (100, 1000, 5000):
        folder = os.path.join(tempfile.mkdtemp(prefix="stream-start-"), "shards")
        os.makedirs(folder)
        payload = bytes(1024)  # (counting reads headers only: what the members hold does not matter)
        for shard in range(count):
            with tarfile.open(os.path.join(folder, f"train-{shard:05d}.tar"), "w") as tar:
                for row in range(rows_per_shard):
                    add_tar_member(tar, f"{row:08d}.png", payload)
                    add_tar_member(tar, f"{row:08d}.txt", b"a caption")
        config = DataConfig(dataset_name=folder, streaming=True, image_column="png", caption_column="txt")
        for label in ("tar headers (no index)", "shard index beside the shards"):
            if label.startswith("shard index"):
                files = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".tar"))
                write_shard_index(index_file(folder, "train"), files, [rows_per_shard] * count)
            start = time.perf_counter()
            counts = count_shard_rows(config, ShardSource(config).shards("train"))
            rows.append([label, count, sum(counts), f"{time.perf_counter() - start:.2f}"])
    return common.markdown_table(["rows from", "shards", "rows", "find + count (s)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shards (a smoke run)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    PartialState(cpu=True)
    text = (
        f"{common.machine_description()}\n\n### Bytes read per process in one pass\n\n{share_table(args.quick)}\n\n"
        f"### Start-up: each shard's rows\n\n{startup_table(args.quick)}\n"
    )
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
