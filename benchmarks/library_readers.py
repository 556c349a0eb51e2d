"""One reader of `streaming_libraries.py`, run in the Python environment that has its library (each library lives
in its own venv), importing only that library; it prints one `RESULT {json}` line.

    python benchmarks/library_readers.py convert {mosaic,litdata} SHARD_DIR OUT_DIR SHARD_BYTES
    python benchmarks/library_readers.py speed {own,webdataset,wids,mosaic,litdata} DATA PASSES
    python benchmarks/library_readers.py ranks {own,webdataset,wids,mosaic,litdata} DATA WORLD RANK[,RANK...]

`speed` times PASSES passes of the whole data set on one worker, alternately without and with each JPEG decoded
to RGB by PIL (the same `decode` for every reader); `ranks` reads each rank RANK's share of one pass once (of
WORLD ranks), the data files dropped from the page cache first, and reports the keys it got, its bytes read
(/proc/self/io: `rchar` counts read() calls, `read_bytes` what came from the disk, mmap faults included) and the
length the reader's own `len()` gives that rank's epoch. The ranks are simulated with the environment variables
each library reads (webdataset RANK/WORLD_SIZE, litdata GLOBAL_RANK/WORLD_SIZE, mosaic RANK/WORLD_SIZE with each
rank a node of its own); wids' sampler takes rank and num_replicas. wids and mosaic want a torch.distributed group
(wids' sampler ignores rank without one; mosaic starts one of WORLD_SIZE processes): they get one of this process.
"""

from __future__ import annotations

import glob
import io
import json
import os
import statistics
import sys
import tarfile
import time

from PIL import Image

BATCH = 16


def decode(jpg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpg)) as image:
        return image.convert("RGB").size


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as handle:
        return {name: int(value) for name, value in (line.split(": ") for line in handle)}


def drop_page_cache(folder: str) -> None:
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            descriptor = os.open(path, os.O_RDONLY)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(descriptor)


def tar_rows(path: str):
    """(key, {extension: bytes}) of a WebDataset tar, in order (the conversion's input)."""
    key, row = None, {}
    with tarfile.open(path) as tar:
        for member in tar:
            base, _, field = os.path.basename(member.name).partition(".")
            if base != key and row:
                yield key, row
                row = {}
            key, row[field] = base, tar.extractfile(member).read()
    if row:
        yield key, row


def litdata_rows(shard: str):
    """A tar shard's rows for litdata's `optimize` (read by litdata's own `iter_webdataset_tar`)."""
    from litdata import iter_webdataset_tar

    for row in iter_webdataset_tar(shard):
        yield {"key": row["__key__"], "jpg": row["jpg"], "txt": row["txt"].decode(), "json": row["json"].decode()}


def convert(library: str, shard_dir: str, out: str, shard_bytes: int) -> dict:
    shards = sorted(glob.glob(os.path.join(shard_dir, "*.tar")))
    start = time.perf_counter()
    if library == "mosaic":
        from streaming import MDSWriter

        columns = {"key": "str", "jpg": "bytes", "txt": "str", "json": "json"}
        with MDSWriter(out=out, columns=columns, size_limit=shard_bytes) as writer:
            for shard in shards:
                for key, row in tar_rows(shard):
                    fields = json.loads(row["json"])
                    writer.write({"key": key, "jpg": row["jpg"], "txt": row["txt"].decode(), "json": fields})
    else:
        from litdata import optimize

        optimize(fn=litdata_rows, inputs=shards, output_dir=out, chunk_bytes=shard_bytes, num_workers=1, verbose=False)
    files = [path for path in glob.glob(os.path.join(out, "**", "*"), recursive=True) if os.path.isfile(path)]
    return {"seconds": time.perf_counter() - start, "bytes": sum(map(os.path.getsize, files)), "files": len(files)}


def one_process_group(data: str) -> None:
    """A gloo process group of this process alone (what a rank's barriers then wait for: itself)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = os.path.join(os.path.dirname(os.path.abspath(data)), f"group-{os.getpid()}")  # (the run's folder)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def reader(library: str, data: str, rank: int, world: int):
    """(a function giving one pass of this rank's (key, jpg bytes, caption, json) rows, the rows its `len()` gives
    this rank's epoch, the library's version)."""
    if library == "own":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import numpy as np

        from clip_accel.data.shards import StreamSplit, TarShards
        from clip_accel.data.stream_order import PassOrder, slot_intervals
        from clip_accel.data.streaming import epoch_batches

        stream = TarShards(sorted(glob.glob(os.path.join(data, "*.tar"))))
        counts = stream.counts()  # (from img2dataset's NNNNN_stats.json beside the shards)
        order = PassOrder(counts, 0, 0)
        mine = slot_intervals([(0, order.total)], rank, world)  # (what StreamingPairs reads on 1 worker, unshuffled)
        split = StreamSplit("train", stream, sum(counts), data, counts)
        return (
            lambda: (
                (row["__key__"], row["jpg"]["bytes"], row["txt"], row["json"])
                for begin, end in mine.tolist()
                for shard, start, stop in order.runs(np.arange(begin, end))
                for row in stream.rows(shard, start, stop)
            ),
            epoch_batches(split, BATCH, world) * BATCH,
            "clip_accel",
        )
    if library == "webdataset":
        import webdataset as wds

        shards = sorted(glob.glob(os.path.join(data, "*.tar")))
        dataset = wds.WebDataset(  # (split_by_node reads RANK and WORLD_SIZE)
            shards, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker
        )
        rows = lambda: ((r["__key__"], r["jpg"], r["txt"].decode(), json.loads(r["json"])) for r in dataset)  # noqa: E731
        return rows, None, f"webdataset {wds.__version__}"
    if library == "wids":
        import wids

        index = glob.glob(os.path.join(data, "*.shardindex.json"))[0]
        dataset = wids.ShardListDataset(index, localname=lambda url: url, transformations=[])  # (no copy)
        if world == 1:
            sampler = wids.ShardedSampler(dataset)  # (ShardListSampler)
        else:  # (DistributedChunkedSampler ignores rank and num_replicas without a process group)
            one_process_group(data)
            sampler = wids.DistributedChunkedSampler(dataset, num_replicas=world, rank=rank, seed=0)
        return (
            lambda: (
                (r["__key__"], r[".jpg"].getvalue(), r[".txt"].getvalue().decode(), json.loads(r[".json"].getvalue()))
                for r in map(dataset.__getitem__, sampler)
            ),
            len(sampler) if world > 1 else len(dataset),
            f"wids {wids.__version__}",
        )
    if library == "mosaic":
        import streaming

        if world > 1:  # (else it would start a process group of WORLD_SIZE and wait for the other ranks)
            one_process_group(data)
        streaming.base.util.clean_stale_shared_memory()
        dataset = streaming.StreamingDataset(local=data, shuffle=False, batch_size=BATCH)
        rows = lambda: ((r["key"], r["jpg"], r["txt"], r["json"]) for r in dataset)  # noqa: E731
        return rows, len(dataset), f"mosaicml-streaming {streaming.__version__}"
    import litdata

    dataset = litdata.StreamingDataset(data, shuffle=False)
    rows = lambda: ((r["key"], r["jpg"], r["txt"], json.loads(r["json"])) for r in dataset)  # noqa: E731
    return rows, len(dataset), f"litdata {litdata.__version__}"


def simulate_rank(library: str, rank: int, world: int) -> None:
    if library == "mosaic":  # (each simulated rank is a node of one process: no barrier waits for the others)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    else:
        os.environ.update(RANK=str(rank), GLOBAL_RANK=str(rank), WORLD_SIZE=str(world))


def speed(library: str, data: str, passes: int) -> dict:
    """Median rows/s of one worker over the whole data set, read only and read + decode."""
    simulate_rank(library, 0, 1)
    rows, _, version = reader(library, data, 0, 1)
    timings = {"read": [], "decode": []}
    for _ in range(passes):
        for mode, values in timings.items():
            start, count = time.perf_counter(), 0
            for _key, jpg, _caption, _fields in rows():
                count += 1
                if mode == "decode":
                    decode(jpg)
            values.append(count / (time.perf_counter() - start))
    return {"version": version, **{mode: statistics.median(values) for mode, values in timings.items()}}


def ranks(library: str, data: str, world: int, ranks: list[int]) -> list[dict]:
    """Each rank's keys, `len()` and bytes read (its data dropped from the page cache first), one after another
    in this process (mosaic: one rank a process, its shared memory being per process)."""
    results = []
    for rank in ranks:
        simulate_rank(library, rank, world)
        drop_page_cache(data)
        rows, length, version = reader(library, data, rank, world)
        before = io_counters()
        keys = [key for key, _jpg, _caption, _fields in rows()]
        after = io_counters()
        results.append({"keys": keys, "length": length, **{n: after[n] - before[n] for n in ("rchar", "read_bytes")}})
    return results


if __name__ == "__main__":
    action, library, *rest = sys.argv[1:]
    if action == "convert":
        result = convert(library, rest[0], rest[1], int(rest[2]))
    elif action == "speed":
        result = speed(library, rest[0], int(rest[1]))
    else:
        result = ranks(library, rest[0], int(rest[1]), [int(rank) for rank in rest[2].split(",")])
    print("RESULT " + json.dumps(result))
