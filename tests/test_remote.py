"""Tar shards streamed over HTTP from a server on 127.0.0.1 (Range requests), from S3 (moto) and from a fake Hub
dataset repo through `hf://`: each process fetches its share,
a dropped connection resumes at its byte, a shard that stays unreachable is skipped and counted."""

from __future__ import annotations

import email.utils
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from hub_server import FakeHub
from huggingface_hub import HfFileSystem, constants
from launching import CPU_ENV, ROOT, TORCHRUN
from PIL import Image
from test_streaming import caption, read_caption_ids, stream_config, streaming_loader, write_shards

from clip_accel.cli import main
from clip_accel.config import DataConfig
from clip_accel.data import write_webdataset_shards
from clip_accel.data.remote import HttpShard, Retrying, ShardUnavailable, StoreShard, expand_braces, fetch_json
from clip_accel.data.shard_identity import shard_signature, shard_signatures
from clip_accel.data.shards import ShardSource, add_tar_member


class ShardServer(ThreadingHTTPServer):
    """Serves `root` with Range requests; counts the body bytes it sends; `drop_after`: each file's first
    response is cut after that many bytes (the connection closed mid-body). `failures`: {"GET name" or "HEAD name":
    what the file's next requests of that method get instead, one each}: a status (503, or (503, "Retry-After
    value")), or "drop" (half the body, then the connection closed)."""

    daemon_threads = True

    def __init__(self, root: str, drop_after: int | None = None, failures: dict | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.drop_after, self.failures = root, drop_after, failures or {}
        self.sent, self.dropped, self.lock = 0, set(), threading.Lock()
        self.sent_by_file: dict[str, int] = {}
        self.connections = self.requests = 0

    def finish_request(self, request, client_address) -> None:
        with self.lock:
            self.connections += 1
        super().finish_request(request, client_address)

    def sent_to(self, prefix: str) -> int:
        """Body bytes sent of the files whose names start with `prefix`."""
        return sum(sent for name, sent in self.sent_by_file.items() if name.startswith(prefix))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # (a client that closed a part-read window)
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # (as real servers: a body written after its headers is not held back)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path = os.path.join(self.server.root, self.path.lstrip("/"))
        with self.server.lock:
            self.server.requests += 1
            failure = (self.server.failures.get(f"{self.command} {self.path.lstrip('/')}") or [None]).pop(0)
        if isinstance(failure, int | tuple):
            status, retry_after = failure if isinstance(failure, tuple) else (failure, None)
            self.send_response(status)
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if not os.path.isfile(path):
            self.send_error(404)
            return
        size = os.path.getsize(path)
        first, last = 0, size - 1
        ranged = self.headers.get("Range")
        if ranged:
            start, _, end = ranged.removeprefix("bytes=").partition("-")
            first, last = int(start), min(int(end) if end else size - 1, size - 1)
            if first >= size:
                self.send_error(416)
                return
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        if ranged:
            self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as handle:
            handle.seek(first)
            data = handle.read(last - first + 1)
        with self.server.lock:
            drop = self.server.drop_after is not None and path not in self.server.dropped
            if drop:
                self.server.dropped.add(path)
                data = data[: self.server.drop_after]
            if failure == "drop":
                drop, data = True, data[: len(data) // 2]
            self.server.sent += len(data)
            name = os.path.basename(path)
            self.server.sent_by_file[name] = self.server.sent_by_file.get(name, 0) + len(data)
        self.wfile.write(data)
        if drop:
            self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve():
    servers = []

    def start(root: str, **options) -> ShardServer:
        server = ShardServer(root, **options)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def write_noise_shards(folder, shards: int, rows: int) -> list[int]:
    """Shards of `rows` rows of 48 px noise PNGs (~7 KB a row) and their captions, with their index."""
    os.makedirs(folder, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    for shard in range(shards):
        with tarfile.open(os.path.join(folder, f"train-{shard:05d}.tar"), "w") as tar:
            for item in range(shard * rows, (shard + 1) * rows):
                image = io.BytesIO()
                Image.fromarray(np.roll(noise, item, axis=1)).save(image, "PNG")
                add_tar_member(tar, f"{item:06d}.png", image.getvalue())
                add_tar_member(tar, f"{item:06d}.txt", caption(item).encode())
    main(["index-shards", str(folder)])
    return list(range(shards * rows))


def read_epoch(url: str, processes: int, **options) -> list[int]:
    """Every process's items of epoch 0, the processes simulated one after another."""
    seen = []
    for rank in range(processes):
        loader = streaming_loader(url, rank, processes, image_column="png", label_column=None, **options)
        seen += read_caption_ids(loader, 0, loader.epoch(0))
    return seen


def test_four_processes_stream_every_row_once_fetching_little_more_than_the_shards(tmp_path, serve):
    # 16 shards of 12 rows on 4 processes x 1 worker: index, probes and the pass together stay within 1.3x.
    folder = tmp_path / "shards"
    items = write_noise_shards(folder, 16, 12)
    server = serve(str(folder))
    seen = read_epoch(server.url, 4, workers=1)
    assert sorted(seen) == items  # 192 rows: 48 per process, 12 batches of 4
    shard_bytes = sum(os.path.getsize(folder / name) for name in os.listdir(folder) if name.endswith(".tar"))
    assert server.sent <= 1.3 * shard_bytes, server.sent / shard_bytes
    assert server.connections <= server.requests / 2, (server.connections, server.requests)  # (kept alive)


def test_a_dropped_connection_continues_at_its_byte(tmp_path, serve):
    folder = tmp_path / "shards"
    items = write_noise_shards(folder, 4, 10)
    server = serve(str(folder), drop_after=5000)
    assert sorted(read_epoch(server.url, 2)) == items
    assert len(server.dropped) == 5  # every shard's first response cut, and the index's


def test_an_unreachable_shard_stops_the_run_unless_allowed_then_it_is_skipped_and_counted(tmp_path, serve):
    folder = tmp_path / "shards"
    write_noise_shards(folder, 4, 8)
    os.rename(folder / "train-00002.tar", tmp_path / "gone.tar")
    server = serve(str(folder))
    message = r"1 shard stayed unreachable .*train-00002.tar: HTTP 404.*--max_unreachable_shards"
    for workers in (0, 1):
        loader = streaming_loader(server.url, workers=workers, image_column="png", label_column=None)
        with pytest.raises(ValueError, match=message):
            read_caption_ids(loader, 0, loader.epoch(0))
    with pytest.raises(ValueError, match=message):  # (an evaluation split, read whole, too)
        ShardSource(stream_config(server.url, image_column="png", label_column=None)).read("train")
    options = {"image_column": "png", "label_column": None, "max_unreachable_shards": 1}
    evaluated = ShardSource(stream_config(server.url, **options)).read("train").dataset
    assert len(evaluated) == 25 and evaluated["problem"].count(None) == 24  # (one row stands for the shard's)
    loader = streaming_loader(server.url, shuffle_buffer=0, **options)
    seen = read_caption_ids(loader, 0, loader.epoch(0))
    # The pass gives its 24 reachable rows; the epoch's last 2 batches come from the next pass (logged).
    assert sorted(seen[:24]) == [item for item in range(32) if not 16 <= item < 24] and loader.borrowed == 1
    assert len(loader.skipped) == 8 and all("train-00002.tar: HTTP 404" in why for why in loader.skipped.values())
    strict = streaming_loader(server.url, strict=True, **options)
    with pytest.raises(ValueError, match="--strict: .*train-00002.tar: HTTP 404"):
        read_caption_ids(strict, 0, strict.epoch(0))


class FakeTime:
    """A clock that only the backoff's sleeps move: each wait recorded, none taken."""

    def __init__(self) -> None:
        self.now, self.waits = 0.0, []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def retrying(self, seconds: float) -> Retrying:
        return Retrying(seconds, clock=self.clock, sleep=self.sleep)


def test_a_busy_server_is_waited_for_as_it_asks_and_the_size_probe_is_retried(tmp_path, serve):
    data = bytes(range(256)) * 200
    (tmp_path / "blob").write_bytes(data)
    in_40_s = email.utils.formatdate(time.time() + 40, usegmt=True)
    failures = {"HEAD blob": [(503, "7"), 429], "GET blob": ["drop", 500, (503, in_40_s), 502]}
    server = serve(str(tmp_path), failures=failures)
    clock = FakeTime()
    with HttpShard(server.url + "blob", clock.retrying(120)) as handle:
        assert handle.seek(0, os.SEEK_END) == len(data)  # (the size, by a HEAD)
        handle.seek(0)
        assert handle.read() == data
    waits = clock.waits
    assert len(waits) == 6 and waits[0] >= 7 and 38 <= waits[4] <= 41, waits  # (Retry-After: seconds, or a date)
    others = [waits[1], waits[2], waits[3], waits[5]]
    assert all(0 <= wait <= 30 for wait in others) and len(set(others)) == 4, waits  # (random: jitter)


def test_a_failing_read_is_given_up_after_its_budget_naming_the_url_and_the_option(tmp_path, serve):
    (tmp_path / "blob").write_bytes(b"x" * 1000)
    server = serve(str(tmp_path), failures={"GET blob": [503] * 1000})
    clock = FakeTime()
    with pytest.raises(ShardUnavailable, match=r"/blob: HTTP 503 .* --remote_retry_seconds 20"):
        HttpShard(server.url + "blob", clock.retrying(20)).read(10)
    assert sum(clock.waits) == pytest.approx(20) and len(clock.waits) >= 5  # (0.5, 1, 2, 4, ... s apart at most)
    server.failures["GET blob"] = [(503, "3600")]  # (a wait longer than the budget: given up at once)
    clock = FakeTime()
    with pytest.raises(ShardUnavailable, match="asks to wait 3600 s"):
        HttpShard(server.url + "blob", clock.retrying(20)).read(10)
    assert clock.waits == []
    with pytest.raises(ValueError, match="--remote_retry_seconds must be 0 or more"):
        stream_config(server.url, remote_retry_seconds=-1)
    with pytest.raises(ValueError, match="--max_unreachable_shards must be 0 or more"):
        stream_config(server.url, max_unreachable_shards=-1)
    with pytest.raises(ValueError, match="--remote_retry_seconds .* shape a stream: add --streaming"):
        stream_config("folder", streaming=False, remote_retry_seconds=5)


def test_only_transport_failures_are_retried_and_a_bug_is_not_an_unavailable_shard(monkeypatch):
    import fsspec

    store = fsspec.filesystem("memory")
    store.pipe("/shards/blob", b"0123456789")
    failures = iter([ConnectionResetError(104, "reset by peer")])
    opened = store.open

    def flaky_open(*args, **kwargs):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return opened(*args, **kwargs)

    monkeypatch.setattr(store, "open", flaky_open)
    clock = FakeTime()
    assert StoreShard("memory://shards/blob", clock.retrying(60)).read(4) == b"0123" and len(clock.waits) == 1
    with pytest.raises(ShardUnavailable, match="FileNotFoundError"):  # (at once)
        StoreShard("memory://shards/missing", clock.retrying(60)).read(4)

    def broken_open(*args, **kwargs):
        raise TypeError("a bug in the reader")

    monkeypatch.setattr(store, "open", broken_open)
    with pytest.raises(TypeError, match="a bug in the reader"):  # (raised as it is, at once)
        StoreShard("memory://shards/blob", clock.retrying(60)).read(4)
    assert len(clock.waits) == 1


def test_the_shard_index_fetch_is_retried_and_a_failure_names_its_url(tmp_path, serve):
    folder = tmp_path / "shards"
    write_noise_shards(folder, 2, 4)
    server = serve(str(folder), failures={"GET train.shardindex.json": ["drop", 500, (503, "2")]})
    clock = FakeTime()
    index = fetch_json(server.url + "train.shardindex.json", clock.retrying(60))
    assert len(index["shardlist"]) == 2 and len(clock.waits) == 3 and clock.waits[2] >= 2
    server.failures["GET train.shardindex.json"] = [500] * 1000
    with pytest.raises(ValueError, match=r"/train.shardindex.json: HTTP 500 .*--remote_retry_seconds 5"):
        fetch_json(server.url + "train.shardindex.json", FakeTime().retrying(5))


def test_a_base_url_without_an_index_stops_with_the_command_to_write_one(tmp_path, serve):
    folder = tmp_path / "shards"
    write_noise_shards(folder, 2, 4)
    os.remove(folder / "train.shardindex.json")
    server = serve(str(folder))
    with pytest.raises(ValueError, match="train.shardindex.json is not there: .*clip-accel index-shards"):
        streaming_loader(server.url, image_column="png", label_column=None)
    pattern = server.url + "train-{00000..00001}.tar"
    with pytest.raises(ValueError, match="have no shard index: write one with `clip-accel index-shards`"):
        streaming_loader(pattern, image_column="png", label_column=None)
    index = str(tmp_path / "index.json")
    main(["index-shards", str(folder), "--output", index])
    loader = streaming_loader(pattern, image_column="png", label_column=None, shard_index=index)
    assert len(read_caption_ids(loader, 2)) == 8


def test_index_shards_and_a_stream_never_take_dev_shards_for_training_shards(tmp_path, serve):
    folder = tmp_path / "shards"
    write_shards(str(folder), [3, 3], split="train")
    write_shards(str(folder), [2], split="dev", first=6)
    main(["index-shards", str(folder)])  # named after the split, where a remote stream looks for it
    assert sorted(name for name in os.listdir(folder) if name.endswith(".json")) == [
        "train.shardindex.json",
        "validation.shardindex.json",
    ]
    server = serve(str(folder))
    source = ShardSource(stream_config(server.url))
    assert source.split_names() == ["train", "validation"] and source.shards("validation").counts() == [2]
    index = str(tmp_path / "index.json")
    main(["index-shards", f"{server.url}train-{{00000..00001}}.tar::{server.url}dev-00000.tar", "--output", index])
    listed = [entry["url"].rsplit("/", 1)[1] for entry in json.loads(Path(index).read_text())["shardlist"]]
    assert listed == ["train-00000.tar", "train-00001.tar"]


def test_brace_patterns_and_seeks_over_http(tmp_path, serve):
    with pytest.raises(ValueError, match="is a URL: remote tar shards .* are read with --streaming"):
        DataConfig(dataset_name="https://host/data/", image_column="jpg", caption_column="txt")
    assert expand_braces("s/train-{008..011}.tar") == [f"s/train-{n:03d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    data = bytes(range(256)) * 2000
    (tmp_path / "blob").write_bytes(data)
    server = serve(str(tmp_path))
    with HttpShard(server.url + "blob") as handle:
        assert handle.read(10) == data[:10]
        handle.seek(300_000)
        assert handle.read(5) == data[300_000:300_005] and handle.tell() == 300_005
        assert handle.seek(0, os.SEEK_END) == len(data) and handle.read(5) == b""


def test_a_shard_cache_fetches_each_shard_once_per_node_and_changes_no_pass(tmp_path, serve):
    # 2 "nodes" (a cache folder each) x 1 process x 2 workers, 3 epochs: every epoch sees every row once, in a new
    # order, the order of the same run without a cache; a node fetches a shard at most once, whatever pass reads it.
    folder = tmp_path / "shards"
    items = write_noise_shards(folder, 8, 10)
    server = serve(str(folder))
    shard_bytes = sum(os.path.getsize(folder / name) for name in os.listdir(folder) if name.endswith(".tar"))

    def loaders(cached: bool) -> list:
        options = {"image_column": "png", "label_column": None}
        return [
            streaming_loader(
                server.url,
                rank,
                2,
                workers=2,
                **options,
                **({"shard_cache_dir": str(tmp_path / f"node{rank}")} if cached else {}),
            )
            for rank in range(2)
        ]

    cached, epochs = loaders(True), []
    for epoch in range(3):
        epochs.append([item for loader in cached for item in read_caption_ids(loader, 0, loader.epoch(epoch))])
        assert sorted(epochs[-1]) == items
    assert epochs[0] != epochs[1] != epochs[2]
    assert server.sent_to("train-") <= 2 * shard_bytes, server.sent_to("train-") / shard_bytes  # (once per node)
    uncached = loaders(False)
    assert [item for loader in uncached for item in read_caption_ids(loader, 0, loader.epoch(1))] == epochs[1]


def test_a_shard_cache_stays_within_its_limit_and_keeps_no_partial_shard(tmp_path, serve):
    folder = tmp_path / "shards"
    items = write_noise_shards(folder, 6, 10)
    os.rename(folder / "train-00004.tar", tmp_path / "gone.tar")  # a 404: its rows skipped, nothing left behind
    server = serve(str(folder))
    shard = os.path.getsize(folder / "train-00000.tar")
    cache = tmp_path / "cache"
    loader = streaming_loader(
        server.url,
        image_column="png",
        label_column=None,
        shard_cache_dir=str(cache),
        shard_cache_gb=2.5 * shard / 1e9,
        max_unreachable_shards=1,
    )
    seen = read_caption_ids(loader, 0, loader.epoch(0))
    loader.pairs.split.stream.cache.wait()  # (the shards it fetched ahead)
    assert sorted(seen[:50]) == [item for item in items if not 40 <= item < 50]
    node = loader.pairs.split.stream.cache.folder  # (CACHE/HOSTNAME: shard_cache)
    kept = [entry for entry in os.listdir(node) if entry.endswith(".tar")]
    assert len(kept) == 2 and not [entry for entry in os.listdir(node) if ".part" in entry]


@pytest.fixture
def s3_bucket(monkeypatch):
    """A moto S3 server on 127.0.0.1 with a bucket `clip-shards`, found as the real store is (AWS_* variables)."""
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "not-a-secret"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    store = s3fs.S3FileSystem()
    store.makedirs("clip-shards", exist_ok=True)  # (s3fs may still talk to an earlier test's server)
    yield store
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_shards_stream_from_s3_with_their_index_or_one_written_by_index_shards(tmp_path, s3_bucket, caplog):
    folder = tmp_path / "shards"
    items = write_noise_shards(folder, 4, 6)
    s3_bucket.put(f"{folder}/", "clip-shards/data/", recursive=True)
    assert sorted(read_epoch("s3://clip-shards/data/", 2, workers=1)) == items  # (DataLoader workers read S3 too)
    s3_bucket.rm("clip-shards/data/train.shardindex.json")
    with pytest.raises(ValueError, match="have no shard index: write one with `clip-accel index-shards`"):
        streaming_loader("s3://clip-shards/data/", image_column="png", label_column=None)
    index = str(tmp_path / "index.json")
    main(["index-shards", "s3://clip-shards/data/", "--output", index])  # (tar headers only, by ranged reads)
    loader = streaming_loader("s3://clip-shards/data/*.tar", image_column="png", label_column=None, shard_index=index)
    assert sorted(read_caption_ids(loader, 0, loader.epoch(0))) == items
    assert "not-a-secret" not in caplog.text


HUB_TOKEN = "hf_fakeTokenForTheseTests0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub that this process's huggingface_hub talks to, anonymously (public repos only)."""
    with FakeHub(token=HUB_TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        # (hf_hub_url, which HfFileSystem reads files through, formats this template, built at import)
        template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        HfFileSystem.clear_instance_cache()
        yield server
        HfFileSystem.clear_instance_cache()


def test_shards_stream_from_a_hub_dataset_repo_over_range_requests(tmp_path, hub, monkeypatch):
    # 8 shards of 6 rows (~60 KB each) and their index, uploaded as the folder is, on 2 processes x 1 worker.
    # Reads of 16 KB blocks (1 MB in use, more than a test shard): each shard comes in several ranged GETs,
    # and each process's first-row probes of the first shard (its columns) cost a block, not the shard.
    monkeypatch.setattr(StoreShard, "BLOCK", 16 * 1024)
    folder = tmp_path / "shards"
    items = write_noise_shards(folder, 8, 6)
    files = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    hub.add_repo("user/shards", files, repo_type="dataset")
    assert sorted(read_epoch("hf://datasets/user/shards/", 2, workers=1)) == items
    shards = {name: len(content) for name, content in files.items() if name.endswith(".tar")}
    reads = [download for download in hub.downloads if download["path"] in shards]
    assert {download["path"] for download in reads} == set(shards)
    assert all(download["range"] is not None for download in reads), reads  # (206s: never a whole-file GET)
    assert any(download["range"][0] > 0 for download in reads)  # (reads went on where the last one stopped)
    assert hub.sent_bytes("train-") <= 1.3 * sum(shards.values()), hub.sent_bytes("train-") / sum(shards.values())


@pytest.mark.slow
def test_a_four_process_run_streams_its_training_split_over_http_once(tmp_path, serve, demo_dir, tiny_pretrained_dir):
    # 16 training shards of 12 demo rows (img2dataset's stats files beside them) on 4 processes x 1 worker: the
    # whole 1-epoch run, start-up, index and evaluation included, fetches at most 1.3x the training shards.
    folder = tmp_path / "shards"
    for split in ("train", "val", "test"):
        write_webdataset_shards(demo_dir, str(folder), split, rows_per_shard=12)
    for shard in folder.glob("train-*.tar"):
        (folder / shard.name.replace(".tar", "_stats.json")).write_text('{"successes": 12, "count": 12}')
    server = serve(str(folder))
    options = {"dataset_name": server.url, "streaming": "true", "image_column": "jpg", "caption_column": "txt"}
    # (a model folder with its tokenizer: a model from scratch learns one from the training captions, read once more)
    options |= {"label_column": "json.class_label", "model_name_or_path": tiny_pretrained_dir, "num_train_epochs": 1}
    options |= {"per_device_train_batch_size": 8, "dataloader_num_workers": 1, "output_dir": tmp_path / "out"}
    options |= {"cache_dir": tmp_path / "cache"}
    args = [str(part) for name, value in options.items() for part in (f"--{name}", value)]
    command = [*TORCHRUN, "--standalone", "--nproc_per_node", "4", "scripts/train.py", *args]
    result = subprocess.run(command, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    training = json.loads((tmp_path / "out" / "eval_results.json").read_text())["training"]
    assert training["num_processes"] == 4 and training["optimizer_steps"] == 192 // 32
    shards = sum(shard.stat().st_size for shard in folder.glob("train-*.tar"))
    assert server.sent_to("train-") <= 1.3 * shards, server.sent_to("train-") / shards
    for split in ("validation-", "test-"):  # read once, by the main process, and sent to the others
        size = sum(shard.stat().st_size for shard in folder.glob(f"{split}*.tar"))
        assert server.sent_to(split) <= 1.3 * size, (split, server.sent_to(split) / size)


def test_a_shard_s_signature_is_the_same_over_http_from_s3_and_on_disk_and_changes_with_its_content(
    tmp_path, serve, s3_bucket
):
    # What a checkpoint keeps of each shard (data.shard_identity): its size and first block, one small read each.
    folder = tmp_path / "shards"
    write_noise_shards(folder, 2, 3)
    names = ["train-00000.tar", "train-00001.tar"]
    local = shard_signatures([str(folder / name) for name in names])
    assert None not in local and local[0] != local[1]
    server = serve(str(folder))
    s3_bucket.put(f"{folder}/", "clip-shards/data/", recursive=True)
    assert shard_signatures([server.url + name for name in names]) == local
    assert server.sent == 2 * 512  # (one Range request of a block per shard)
    assert shard_signatures([f"s3://clip-shards/data/{name}" for name in names]) == local
    shutil.copy(folder / names[1], folder / names[0])  # another shard's content under train-00000.tar's name
    assert shard_signature(server.url + names[0]) == local[1]
    assert shard_signature(server.url + "train-00009.tar") is None  # (unreachable: not compared on resume)
