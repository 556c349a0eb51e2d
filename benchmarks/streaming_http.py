"""Streaming over HTTP against local shards (issue 30): rows/s through the real reader with full decoding, the
server in its own process (`range_server.py`), and what a second epoch fetches with a node-local shard cache.

    python benchmarks/streaming_http.py [--quick] [--markdown FILE]

The same WebDataset tar shards (224 px JPEGs and captions, their index beside them) are read as `--streaming`
trains: `StreamingLoader` over `StreamingPairs` with a `PairPreprocessor` (each JPEG decoded, resized and cropped,
each caption tokenized), 0 DataLoader workers, one pass, on one core with one torch thread (the server on
the other cores: on a cluster it is another machine); after a warm-up pass of each, local and HTTP rounds
in alternating order (the median of each round's HTTP/local ratio), 9 rounds.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: offline settings)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from PIL import Image  # noqa: E402

from clip_accel.config import DataConfig  # noqa: E402
from clip_accel.data import StreamingLoader, StreamingPairs  # noqa: E402
from clip_accel.data.preprocess import PairPreprocessor  # noqa: E402
from clip_accel.data.shard_index import index_file, write_shard_index  # noqa: E402
from clip_accel.data.shards import ShardSource, add_tar_member, count_shard_rows, load_stream_split  # noqa: E402
from clip_accel.tokenizer import build_offline_tokenizer  # noqa: E402

BATCH = 16
# The reader on one core, the server on the others (on a real cluster the server is another machine; sharing the
# reader's core, it would be measured as much as the client). With one core, both share it.
CPUS = sorted(os.sched_getaffinity(0))
READER_CPUS, SERVER_CPUS = ({CPUS[0]}, set(CPUS[1:])) if len(CPUS) > 1 else (set(CPUS), None)


def write_jpeg_shards(folder: str, shards: int, rows: int) -> None:
    os.makedirs(folder, exist_ok=True)
    generator = np.random.default_rng(0)
    paths = []
    for shard in range(shards):
        paths.append(os.path.join(folder, f"train-{shard:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tar:
            for item in range(shard * rows, (shard + 1) * rows):
                image = io.BytesIO()
                pixels = generator.integers(0, 256, (28, 28, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
                Image.fromarray(pixels).save(image, "JPEG", quality=90)
                add_tar_member(tar, f"{item:08d}.jpg", image.getvalue())
                add_tar_member(tar, f"{item:08d}.txt", f"item {item}".encode())
    write_shard_index(index_file(folder, "train"), paths, [rows] * shards)


def one_pass(location: str, tokenizer, epoch: int = 0, **options) -> tuple[float, int]:
    """(rows/s, rows) of one pass of `location`'s training split."""
    config = DataConfig(dataset_name=location, streaming=True, image_column="jpg", caption_column="txt", **options)
    stream = ShardSource(config).shards("train")
    split = load_stream_split(config, "train", count_shard_rows(config, stream), stream)
    pairs = StreamingPairs(split, config, PairPreprocessor(tokenizer, 224, 77), 0, 1, seed=0)
    loader = StreamingLoader(pairs, BATCH)
    rows, start = 0, time.perf_counter()
    for batch in loader.epoch(epoch):
        loader.taken(batch)
        rows += len(batch["caption_ids"])
    return rows / (time.perf_counter() - start), rows


def serve(root: str) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "range_server.py"), root],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, SERVER_CPUS) if SERVER_CPUS else None,
    )
    return server, f"http://127.0.0.1:{server.stdout.readline().strip()}/"


def stop(server: subprocess.Popen) -> int:
    server.send_signal(signal.SIGTERM)
    sent = int(server.stdout.readline().strip() or 0)
    server.wait(timeout=30)
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shards, one round (a smoke run)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    PartialState(cpu=True)
    os.sched_setaffinity(0, READER_CPUS)
    torch.set_num_threads(1)
    shards, rows, rounds = (4, 32, 1) if args.quick else (4, 1024, 9)
    root = tempfile.mkdtemp(prefix="stream-http-")
    folder = os.path.join(root, "shards")
    write_jpeg_shards(folder, shards, rows)
    shard_bytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".tar"))
    tokenizer = build_offline_tokenizer([f"item {item}" for item in range(shards * rows)])
    server, url = serve(folder)
    local, remote = [], []
    try:
        one_pass(folder, tokenizer), one_pass(url, tokenizer)  # (warm-up, not counted: imports, first pages)
        for round_ in range(rounds):  # (the order alternates: local first, then HTTP first, ...)
            for source in (folder, url) if round_ % 2 == 0 else (url, folder):
                (local if source == folder else remote).append(one_pass(source, tokenizer)[0])
    finally:
        sent = stop(server)
    server, url = serve(folder)
    cache = os.path.join(root, "cache")
    try:
        first = one_pass(url, tokenizer, 0, shard_cache_dir=cache)[0]
        second = one_pass(url, tokenizer, 1, shard_cache_dir=cache)[0]
    finally:
        cached_sent = stop(server)
    ratios = sorted(http / disk for http, disk in zip(remote, local, strict=True))  # (each round's pair: drift cancels)
    ratio = statistics.median(ratios)
    table = [
        ["local shards", f"{statistics.median(local):.0f}", "1.00x", "-"],
        [
            "HTTP (Range windows), server in its own process",
            f"{statistics.median(remote):.0f}",
            f"{ratio:.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})",
            f"{sent / (rounds + 1) / shard_bytes:.2f}x a pass",
        ],
        [
            "HTTP + --shard_cache_dir, epoch 0 (fetched into the cache)",
            f"{first:.0f}",
            f"{first / statistics.median(local):.2f}x",
            "-",
        ],
        [
            "HTTP + --shard_cache_dir, epoch 1 (from the cache)",
            f"{second:.0f}",
            f"{second / statistics.median(local):.2f}x",
            f"{cached_sent / shard_bytes:.2f}x for both epochs",
        ],
    ]
    verdict = "met" if ratio >= 0.9 else "MISSED"
    text = (
        f"{common.machine_description()}\n\n{shards} shards x {rows} rows of 224 px JPEGs "
        f"({shard_bytes / 1e6:.1f} MB), "
        f"one process on core {min(READER_CPUS)} (1 torch thread), the server on {SERVER_CPUS or 'the same core'}, "
        f"0 workers, batch {BATCH}; after a warm-up pass of each, {rounds} rounds in alternating order; "
        "HTTP's \"of local\" is the median of the rounds' ratios.\n\n"
        + common.markdown_table(["shards read from", "rows/s", "of local", "bytes the server sent"], table)
        + f"\n\nTarget (loopback HTTP >= 0.9x local shards, full decoding): {verdict} ({ratio:.2f}x).\n"
    )
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
