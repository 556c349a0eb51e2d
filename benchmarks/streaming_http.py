"""Streaming over HTTP against local shards (issue 30), with fsspec's HTTP client beside the own reader (issue 41):
rows/s through the real reader with full decoding, the server in its own process (`range_server.py`), what a
second epoch fetches with a node-local shard cache, and what each client does when the server fails.

    python benchmarks/streaming_http.py [--quick] [--markdown FILE]

The same WebDataset tar shards (224 px JPEGs and captions, their index beside them) are read as `--streaming`
trains: `StreamingLoader` over `StreamingPairs` with a `PairPreprocessor` (each JPEG decoded, resized and cropped,
each caption tokenized), 0 DataLoader workers, one pass, on one core with one torch thread (the server on the
other cores: on a cluster it is another machine), from the local folder; over HTTP through the own reader
(`remote.HttpShard`: Range windows over `requests`); and over HTTP through fsspec's HTTP filesystem (aiohttp) read
as an s3/gs/hf shard is (`remote.StoreShard`, 1 MB blocks), which is what one remote client would read with, with
HTTP's default read cache ("bytes") and with "readahead" (s3fs', gcsfs' and huggingface_hub's default). No option
selects fsspec for HTTP: the benchmark swaps it in for its passes (`http_through_fsspec`). Each HTTP reader reads
through a folder of its own (a link to the shards), so the server tells each one's bytes apart. After a warm-up
pass of each source, 9 rounds, the order alternating (local, own, fsspec, readahead; then the reverse); each round
also reads the tar rows alone (nothing decoded: the reader's and the client's own cost); ratios are medians of each
round's pair. The shard cache is measured in 5 rounds of its own, the readers alternating, each time with a fresh
cache and a folder not read before.

The failure table reads a 1 MB file through each client with the server failing as each case says (429/503 with
Retry-After, a connection dropped mid-body, no server at all, ...), the backoff's waits recorded, not slept.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: offline settings)
import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from PIL import Image  # noqa: E402

from clip_accel.config import DataConfig  # noqa: E402
from clip_accel.data import StreamingLoader, StreamingPairs  # noqa: E402
from clip_accel.data import shard_cache as shard_cache_module  # noqa: E402
from clip_accel.data import shards as shards_module  # noqa: E402
from clip_accel.data.preprocess import PairPreprocessor  # noqa: E402
from clip_accel.data.remote import StoreShard, is_http, open_shard  # noqa: E402
from clip_accel.data.retry import DEFAULT_RETRYING, Retrying  # noqa: E402
from clip_accel.data.shard_index import index_file, write_shard_index  # noqa: E402
from clip_accel.data.shards import ShardSource, add_tar_member, count_shard_rows, load_stream_split  # noqa: E402
from clip_accel.tokenizer import build_offline_tokenizer  # noqa: E402

BATCH = 16
# The reader on one core, the server on the others (on a real cluster the server is another machine; sharing the
# reader's core, it would be measured as much as the client). With one core, both share it.
CPUS = sorted(os.sched_getaffinity(0))
READER_CPUS, SERVER_CPUS = ({CPUS[0]}, set(CPUS[1:])) if len(CPUS) > 1 else (set(CPUS), None)
# The own HTTP reader; fsspec's HTTP filesystem with its default read cache ("bytes"), and with "readahead" (the
# default of s3fs, gcsfs and huggingface_hub's files).
CLIENTS = ("own", "fsspec", "readahead")
CACHE_TYPES = {"fsspec": None, "readahead": "readahead"}
FAILING_CLIENTS = CLIENTS[:2]  # (the failure table: a read cache changes nothing there)
READERS = ("local", *CLIENTS)
# (case, {"GET name"/"HEAD name": the server's answers instead, one a request}): range_server.py's FAILURES.
FAILURES = [
    ("none", {}),
    ("GET: 429, Retry-After 7", {"GET": [[429, "7"]]}),
    ("GET: 503, Retry-After 7, twice", {"GET": [[503, "7"], [503, "7"]]}),
    ("HEAD and GET: 503, Retry-After 7", {"HEAD": [[503, "7"]], "GET": [[503, "7"]]}),
    ("GET: half the body, then the connection closed", {"GET": ["drop"]}),
    ("GET: 500, then 502", {"GET": [500, 502]}),
    ("GET and HEAD: 503 for ever (retry budget 20 s)", {"GET": [503] * 100, "HEAD": [503] * 100}),
    ("GET and HEAD: 403", {"GET": [403], "HEAD": [403]}),
    ("no such file (404)", None),
    ("no server (connection refused)", None),
]


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


def rows_only(location: str) -> float:
    """Rows/s of the training split's tar rows read front to back, shard after shard, nothing decoded."""
    config = DataConfig(dataset_name=location, streaming=True, image_column="jpg", caption_column="txt")
    stream = ShardSource(config).shards("train")
    rows, start = 0, time.perf_counter()
    for shard in range(stream.num_shards):
        rows += sum(1 for _ in stream.rows(shard))
    return rows / (time.perf_counter() - start)


def open_through_fsspec(url: str, retrying: Retrying = DEFAULT_RETRYING):
    """`remote.open_shard` as it would be with one remote client: an HTTP shard read as a store's (fsspec)."""
    return StoreShard(url, retrying) if is_http(url) else open_shard(url, retrying)


@contextlib.contextmanager
def http_through_fsspec(cache_type: str | None = None):
    """HTTP shards read by `open_through_fsspec` where `open_shard` is called (a pass's shards, the cache's fetches);
    `cache_type`: their read cache, set as a user would (fsspec's config: `FSSPEC_HTTP_CACHE_TYPE`), else HTTP's."""
    saved = shards_module.open_shard, shard_cache_module.open_shard, fsspec.config.conf.get("http")
    shards_module.open_shard = shard_cache_module.open_shard = open_through_fsspec
    if cache_type is not None:
        fsspec.config.conf["http"] = {**(saved[2] or {}), "cache_type": cache_type}
    try:
        yield
    finally:
        shards_module.open_shard, shard_cache_module.open_shard = saved[:2]
        fsspec.config.conf.pop("http", None)
        if saved[2] is not None:
            fsspec.config.conf["http"] = saved[2]


def reading(reader: str):
    return http_through_fsspec(CACHE_TYPES[reader]) if reader in CACHE_TYPES else contextlib.nullcontext()


class Server:
    """`range_server.py` serving `root` in its own process on the server cores; `stop` gives the body bytes it sent
    by the first folder of their paths."""

    def __init__(self, root: str, failures: dict | None = None) -> None:
        command = [sys.executable, os.path.join(os.path.dirname(__file__), "range_server.py"), root]
        self.process = subprocess.Popen([*command, json.dumps(failures or {})], stdout=subprocess.PIPE, text=True)
        if SERVER_CPUS:  # (set from here: a `preexec_fn` would fork this large process)
            os.sched_setaffinity(self.process.pid, SERVER_CPUS)
        self.url = f"http://127.0.0.1:{self.process.stdout.readline().strip()}/"

    def stop(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGTERM)
        sent = json.loads(self.process.stdout.readline().strip() or "{}")
        self.process.wait(timeout=30)
        return sent


class FakeTime:
    """A clock that only the backoff's sleeps move: each wait recorded, none taken."""

    def __init__(self) -> None:
        self.now, self.waits = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def failure_answers() -> dict:
    """`FAILURES` as `range_server.py` takes them: each case's answers for a file of its own per case and client,
    in the folder `failures`."""
    cases = enumerate(FAILURES)
    return {
        f"{method} failures/{case}-{client}": answer
        for case, (_, failing) in cases
        for client in FAILING_CLIENTS
        for method, answer in (failing or {}).items()
    }


def failure_table(folder: str, url: str) -> list[list[str]]:
    """Each `FAILURES` case read through both clients from `url` (a server of `folder` with `failure_answers`)."""
    data = np.random.default_rng(1).bytes(1024 * 1024)
    for case in range(len(FAILURES)):
        for client in FAILING_CLIENTS:
            with open(os.path.join(folder, f"{case}-{client}"), "wb") as handle:
                handle.write(data)
    with socket.socket() as unused:  # (a port nothing listens on)
        unused.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{unused.getsockname()[1]}/"
    table = []
    for case, (name, _) in enumerate(FAILURES):
        base, budget = (refused if name.startswith("no server") else url), (20 if "budget" in name else 120)
        cells = [name]
        for client in FAILING_CLIENTS:
            cells += read_failing(base + ("missing" if "404" in name else f"{case}-{client}"), client, data, budget)
        table.append(cells)
    return table


def read_failing(url: str, client: str, data: bytes, budget: float) -> list[str]:
    """[the backoff's waits, what the read came to] of `url` read through `client` in 64 KB reads."""
    clock = FakeTime()
    retrying = Retrying(budget, clock=lambda: clock.now, sleep=clock.sleep)
    try:
        with (open_through_fsspec if client == "fsspec" else open_shard)(url, retrying) as handle:
            got = b"".join(iter(lambda: handle.read(64 * 1024), b""))
        outcome = "read whole" if got == data else f"read {len(got)} bytes, not the file's {len(data)}"
    except Exception as error:
        message = re.split(r", \d+ times in ", str(error).removeprefix(f"{url}: ").replace(url, "URL"))[0]
        message = re.sub(r"port=\d+", "port=...", message)
        outcome = f"{type(error).__name__}: {message}"[:100]
    waits = ", ".join(f"{wait:.1f}" for wait in clock.waits[:5]) + (", ..." if len(clock.waits) > 5 else "")
    return [f"{len(clock.waits)} ({waits})" if clock.waits else "none", outcome.replace("|", "/")]


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (rounds {min(values):.2f}-{max(values):.2f})"


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]  # (each round's pair: drift cancels)


def measure(where: dict, tokenizer, rounds: int, warm_up: bool) -> tuple[dict, dict]:
    """({reader: rows/s of each round's pass}, the same read only) of the shards `where` says each reader finds."""
    decoded, read = ({reader: [] for reader in READERS} for _ in range(2))
    for reader in READERS if warm_up else ():  # (not counted: imports, first pages, connections)
        with reading(reader):
            one_pass(where[reader], tokenizer), rows_only(where[reader])
    for round_ in range(rounds):
        for reader in READERS if round_ % 2 == 0 else READERS[::-1]:
            with reading(reader):
                decoded[reader].append(one_pass(where[reader], tokenizer)[0])
                read[reader].append(rows_only(where[reader]))
    return decoded, read


def cache_folder(round_: int, client: str) -> str:
    """The folder (a link to the shards) `client` reads through in the shard cache's round `round_`."""
    return f"cache{round_}-{client}"


def measure_cache(url: str, rounds: int, tokenizer) -> dict:
    """{client: ([epoch 0 rows/s], [epoch 1 rows/s])} in `rounds` rounds, the clients' order alternating, each
    time a fresh cache and a folder of the server at `url` not read before."""
    cached = {client: ([], []) for client in CLIENTS}
    for round_ in range(rounds):
        for client in CLIENTS if round_ % 2 == 0 else CLIENTS[::-1]:
            cache, shards = tempfile.mkdtemp(prefix="cache-"), f"{url}{cache_folder(round_, client)}/"
            try:
                with reading(client):
                    for epoch in (0, 1):
                        cached[client][epoch].append(one_pass(shards, tokenizer, epoch, shard_cache_dir=cache)[0])
            finally:
                shutil.rmtree(cache)
    return cached


def local_and_http_table(decoded: dict, sent: dict, cached: dict, shard_bytes: int) -> tuple[list[list], float]:
    """Issue 30's table (local shards, the own HTTP reader, its shard cache's two epochs) and HTTP's median of local."""
    local = statistics.median(decoded["local"])
    first, second = (statistics.median(cached["own"][epoch]) for epoch in (0, 1))
    table = [
        ["local shards", f"{local:.0f}", "1.00x", "-"],
        [
            "HTTP (Range windows), server in its own process",
            f"{statistics.median(decoded['own']):.0f}",
            spread(ratios(decoded["own"], decoded["local"])),
            f"{sent['own']:.2f}x a pass",
        ],
        ["HTTP + --shard_cache_dir, epoch 0 (fetched into the cache)", f"{first:.0f}", f"{first / local:.2f}x", "-"],
        [
            "HTTP + --shard_cache_dir, epoch 1 (from the cache)",
            f"{second:.0f}",
            f"{second / local:.2f}x",
            f"{max(cached['own'][2]):.2f}x for both epochs",
        ],
    ]
    return table, statistics.median(ratios(decoded["own"], decoded["local"]))


def clients_table(decoded: dict, read: dict, cached: dict, sent: dict) -> tuple[list[list], dict]:
    """Issue 41's table (each HTTP client's rows/s, and fsspec's of the own reader's) and {fsspec client: its
    median of the own reader's rows/s, full decoding}."""
    table = []
    for name, figures in [
        ("one pass, full decoding (rows/s)", decoded),
        ("one pass, tar rows read only (rows/s)", read),
        ("--shard_cache_dir epoch 0: fetched into the cache (rows/s)", {c: cached[c][0] for c in CLIENTS}),
        (
            "--shard_cache_dir epoch 1: from the cache, the same local reads for all (rows/s)",
            {c: cached[c][1] for c in CLIENTS},
        ),
    ]:
        row = [name] + [f"{statistics.median(figures[client]):.0f}" for client in CLIENTS]
        table.append(row + [spread(ratios(figures[client], figures["own"])) for client in CLIENTS[1:]])
    table.append(["bytes the server sent, a pass"] + [f"{sent[client]:.2f}x" for client in CLIENTS] + ["-", "-"])
    return table, {client: statistics.median(ratios(decoded[client], decoded["own"])) for client in CLIENTS[1:]}


def report(
    decoded: dict, read: dict, sent: dict, cached: dict, failures: list, shard_bytes: int, layout: str, quick: bool
) -> str:
    """The three tables (`local_and_http_table`, `clients_table`, `failure_table`) with what they measured."""
    rounds = len(decoded["own"])
    table, ratio = local_and_http_table(decoded, sent, cached, shard_bytes)
    clients, speed = clients_table(decoded, read, cached, sent)
    return (
        f"{common.machine_description()}\n\n{layout} of 224 px JPEGs "
        f"({shard_bytes / 1e6:.1f} MB), "
        f"one process on core {min(READER_CPUS)} (1 torch thread), the server on {SERVER_CPUS or 'the same core'}, "
        f"0 workers, batch {BATCH}; {'after a warm-up pass of each, ' if not quick else ''}{rounds} rounds in "
        f"alternating order (the cache: {len(cached['own'][0])}); ratios are the medians of the rounds' own ratios.\n\n"
        + common.markdown_table(["shards read from", "rows/s", "of local", "bytes the server sent"], table)
        + f"\n\nTarget (loopback HTTP >= 0.9x local shards, full decoding): {'met' if ratio >= 0.9 else 'MISSED'} "
        f"({ratio:.2f}x).\n\n### One HTTP client? The own reader against fsspec's HTTP filesystem (issue 41)\n\n"
        + common.markdown_table(
            [
                "measured",
                "own reader (requests, Range windows)",
                "fsspec HTTP (aiohttp; StoreShard; cache: bytes, its default)",
                "fsspec HTTP, cache readahead",
                "fsspec / own",
                "readahead / own",
            ],
            clients,
        )
        + "\n\nfsspec's HTTP client at least as fast as the own reader (full decoding): "
        f"{'yes' if max(speed.values()) >= 1.0 else 'no'} ({speed['fsspec']:.2f}x; readahead "
        f"{speed['readahead']:.2f}x).\n\nWhen the server fails (a 1 MB file read in 64 KB "
        "reads; retry budget 120 s unless said; the backoff's waits in seconds, recorded, not slept):\n\n"
        + common.markdown_table(
            ["the server", "own: waits", "own: outcome", "fsspec: waits", "fsspec: outcome"], failures
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shards, one round, no warm-up (a smoke run)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args()
    PartialState(cpu=True)
    os.sched_setaffinity(0, READER_CPUS)
    torch.set_num_threads(1)
    shards, rows, rounds, cache_rounds = (4, 8, 1, 1) if args.quick else (4, 1024, 9, 5)
    root = tempfile.mkdtemp(prefix="stream-http-")
    folder, failing = os.path.join(root, "shards"), os.path.join(root, "failures")
    os.makedirs(failing)
    # One server; each reader (and each cache round) reads the shards through a folder of its own, a link to them,
    # so the bytes it sent to each are told apart.
    for name in [*CLIENTS, *(cache_folder(round_, client) for round_ in range(cache_rounds) for client in CLIENTS)]:
        os.symlink("shards", os.path.join(root, name))
    server = Server(root, failure_answers())
    try:
        write_jpeg_shards(folder, shards, rows)
        tokenizer = build_offline_tokenizer([f"item {item}" for item in range(shards * rows)])
        where = {"local": folder, **{client: f"{server.url}{client}/" for client in CLIENTS}}
        decoded, read = measure(where, tokenizer, rounds, warm_up=not args.quick)
        cached = measure_cache(server.url, cache_rounds, tokenizer)
        failures = failure_table(failing, server.url + "failures/")
    finally:
        sent = server.stop()
    shard_bytes = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".tar"))
    shutil.rmtree(root)
    passes = 2 * (rounds + (not args.quick))  # (a decoded pass and one read only a round, the warm-up's too)
    sent_a_pass = {client: sent.get(client, 0) / passes / shard_bytes for client in CLIENTS}
    for client in CLIENTS:  # (the bytes of a cache round: both epochs)
        cached[client] += ([sent.get(cache_folder(round_, client), 0) / shard_bytes for round_ in range(cache_rounds)],)
    text = report(
        decoded, read, sent_a_pass, cached, failures, shard_bytes, f"{shards} shards x {rows} rows", args.quick
    )
    print(text)
    common.write_markdown(args.markdown, text)


if __name__ == "__main__":
    main()
