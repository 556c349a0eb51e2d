"""Streaming readers side by side (issue 30, item 7): clip_accel's own tar reader against webdataset, wids, MosaicML
`streaming` and `litdata`, on the same shards.

    python benchmarks/streaming_libraries.py [--quick] [--markdown FILE]
        [--wds-python PY] [--mosaic-python PY] [--litdata-python PY]

It writes WebDataset tar shards as img2dataset writes them (`NNNNN.tar` of `KEY.jpg` (224 px shortest side, JPEG
quality 95), `KEY.txt`, `KEY.json` with a class_label, and `NNNNN_stats.json` beside each; the shards hold
different numbers of rows, as failed downloads leave them), plus the wids index wids needs (the format of
`clip-accel index-shards`). MosaicML `streaming` and `litdata` read only their own formats, so the tars are
converted to MDS (`MDSWriter`) and to litdata's chunks (`optimize`, from its `iter_webdataset_tar`), shards or
chunks of the tar shards' mean size, uncompressed; the conversion's time and size are reported apart. Then, per
reader (`library_readers.py`, each in a subprocess of the Python that has its library):

1. rows/s of one worker reading the whole pass: read only (each row's JPEG bytes, caption and JSON), and read plus
   each JPEG decoded to RGB by PIL (the same function for every reader). 5 rounds (--quick: 1) interleave the
   readers in a new order each, 2 passes each; medians.
2. bytes one process reads of a pass at N = 4 simulated ranks (one after another in one subprocess, mosaic's one
   subprocess each; the data dropped from the page cache before each): `rchar` (bytes its read() calls asked
   for) and `read_bytes` (bytes from the disk, mmap included; the kernel's readahead, 8 MB on the machine below,
   rounds it up to whole small files).
3. exactness at N = 4 ranks x 1 worker, one epoch (and at N = 3, which 32 shards do not divide; not with
   --quick): rows missing from or repeated in the union of the ranks', the rows each rank got, and the rows each
   rank's `len()` promises (clip_accel: its epoch's batches of 16 x 16).

Each library lives in its own venv (never the project's environment: mosaicml-streaming pins transformers<5 and
numpy<2.2, and both pull torchvision). Create them with (torch first, so pip keeps the local CPU build):

    python -m venv /tmp/venv_wds && /tmp/venv_wds/bin/pip install torch==2.13.0 \
        && /tmp/venv_wds/bin/pip install webdataset==1.0.2 wids==0.1.11 pillow
    python -m venv /tmp/venv_litdata && /tmp/venv_litdata/bin/pip install torch==2.13.0 \
        && /tmp/venv_litdata/bin/pip install -c <(echo torch==2.13.0) litdata==0.2.76 pillow
    python -m venv /tmp/venv_mosaic && /tmp/venv_mosaic/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        && /tmp/venv_mosaic/bin/pip install mosaicml-streaming==0.13.0 pillow

(`import streaming` imports torchvision, and the only torchvision wheels here are built against torch's CUDA
build, which cannot load beside torch 2.13.0+cpu; torch 2.14.1 is that CUDA build, ~6 GB, from the local wheels.)
The venv pythons default to those paths, or $CLIP_ACCEL_{WDS,MOSAIC,LITDATA}_PYTHON, or the options; a reader
whose venv is missing is reported as not measured.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: offline settings)
import numpy as np  # noqa: E402

from clip_accel.data.demo import CLASS_LABELS  # noqa: E402
from clip_accel.data.shard_index import write_shard_index  # noqa: E402
from clip_accel.data.shards import add_tar_member  # noqa: E402

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "library_readers.py")
READERS = {"own": "own", "webdataset": "wds", "wids": "wds", "mosaic": "mosaic", "litdata": "litdata"}
FORMATS = {"own": "tars as written", "webdataset": "tars as written", "wids": "tars + wids index"}
FORMATS.update(mosaic="MDS (converted)", litdata="litdata chunks (optimize)")
BATCH = 16


def write_shards(folder: str, shards: int, rows: int) -> list[str]:
    """img2dataset-like shards; returns every row's key."""
    os.makedirs(folder)
    photos = []
    for index in range(64):  # (distinct photos, reused: decoding costs what a photo costs)
        photo = common._product_photo(np.random.default_rng([0, index]))
        photo = photo.resize((224, round(224 * photo.height / photo.width)))
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=95)
        photos.append(buffer.getvalue())
    rng, keys, files, counts = np.random.default_rng(0), [], [], []
    for shard in range(shards):
        failed = set(rng.choice(rows, int(rng.integers(0, rows // 8 + 1)), replace=False).tolist())
        path = os.path.join(folder, f"{shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for item in (item for item in range(rows) if item not in failed):
                key = f"{shard:05d}{item:04d}"
                label = CLASS_LABELS[(shard * rows + item) % len(CLASS_LABELS)]
                caption = f"a {label.replace('_', ' ')} photo, item {key}"
                fields = {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key}
                fields.update(status="success", width=224, height=298, class_label=label)
                add_tar_member(tar, f"{key}.jpg", photos[(shard * rows + item) % len(photos)])
                add_tar_member(tar, f"{key}.txt", caption.encode())
                add_tar_member(tar, f"{key}.json", json.dumps(fields).encode())
                keys.append(key)
        with open(os.path.join(folder, f"{shard:05d}_stats.json"), "w") as handle:
            json.dump({"count": rows, "successes": rows - len(failed), "failed_to_download": len(failed)}, handle)
        files.append(path)
        counts.append(rows - len(failed))
    write_shard_index(os.path.join(folder, "train.shardindex.json"), files, counts)  # (wids reads only an index)
    os.sync()  # (written back, so the page cache can drop them)
    return keys


def helper(python: str | None, *args) -> dict | list | str:
    """`library_readers.py ARGS` under `python`: its RESULT, or why there is none."""
    if not python or not os.path.exists(python):
        return f"not measured (no venv: {python})"
    args = [",".join(map(str, arg)) if isinstance(arg, list) else str(arg) for arg in args]
    done = subprocess.run([python, HELPER, *args], capture_output=True, text=True, timeout=900)
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not results:
        return f"failed: {(done.stderr.strip().splitlines() or ['(no output)'])[-1][:200]}"
    return json.loads(results[-1][len("RESULT ") :])


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


def machine() -> str:
    with open("/proc/cpuinfo") as handle:
        model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    return f"CPU `{model}` (/proc/cpuinfo); {common.machine_description()}"


def share_row(name: str, world: int, results: list[dict], pass_bytes: int, keys: list[str]) -> list:
    """The ranks' table row: most bytes one rank read, exactness, rows and batches per rank."""
    seen = [key for result in results for key in result["keys"]]
    most_asked = max(result["rchar"] for result in results)
    most_disk = max(result["read_bytes"] for result in results)
    got = [len(result["keys"]) for result in results]
    return [
        name,
        world,
        f"{most_asked / 1e6:.2f} ({most_asked / pass_bytes:.3f})",
        f"{most_disk / 1e6:.2f} ({most_disk / pass_bytes:.3f})",
        len(set(keys) - set(seen)),
        len(seen) - len(set(seen)),
        " / ".join(map(str, got)),
        " / ".join(str(result["length"]) for result in results) if results[0]["length"] is not None else "-",
        " / ".join(str(count // BATCH) for count in got),
        "yes" if len({count // BATCH for count in got}) == 1 else "**no**",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 shards of up to 64 rows, one round (a smoke run)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    for venv in ("wds", "mosaic", "litdata"):
        default = os.environ.get(f"CLIP_ACCEL_{venv.upper()}_PYTHON", f"/tmp/venv_{venv}/bin/python")
        parser.add_argument(f"--{venv}-python", default=default, help=f"the Python of the {venv} venv")
    args = parser.parse_args()
    pythons = {"own": sys.executable, "wds": args.wds_python, "mosaic": args.mosaic_python}
    pythons["litdata"] = args.litdata_python
    shards, rows, rounds = (16, 64, 1) if args.quick else (32, 128, 5)
    worlds = (4,) if args.quick else (4, 3)  # (3: shards that do not divide among the ranks)
    started = machine()
    work = tempfile.mkdtemp(prefix="stream-libs-")
    tars = os.path.join(work, "shards")
    keys = write_shards(tars, shards, rows)
    tar_bytes = sum(os.path.getsize(os.path.join(tars, f"{s:05d}.tar")) for s in range(shards))
    data = dict.fromkeys(READERS, tars)
    conversion = {}
    for name in ("mosaic", "litdata"):
        data[name] = os.path.join(work, name)
        conversion[name] = helper(pythons[name], "convert", name, tars, data[name], tar_bytes // shards)
    os.sync()

    speed = {name: {"read": [], "decode": []} for name in READERS}
    versions, failures = {}, {}
    for _ in range(rounds):  # (readers interleaved, a new order each round: the machine is shared)
        for name in random.sample(list(READERS), len(READERS)):
            result = helper(pythons[READERS[name]], "speed", name, data[name], 2)
            if isinstance(result, str):
                failures[name] = result
                continue
            versions[name] = result["version"]
            for mode in ("read", "decode"):
                speed[name][mode].append(result[mode])
    ranks = {}
    for name in (name for name in READERS if name not in failures):
        for world in worlds:
            groups = [[rank] for rank in range(world)] if name == "mosaic" else [list(range(world))]
            results = [helper(pythons[READERS[name]], "ranks", name, data[name], world, group) for group in groups]
            failures.update((name, result) for result in results if isinstance(result, str))
            ranks[name, world] = [rank for result in results if not isinstance(result, str) for rank in result]

    own_decode = statistics.median(speed["own"]["decode"]) if speed["own"]["decode"] else None
    speed_rows, share_rows = [], []
    for name in READERS:
        converted = conversion.get(name)
        if isinstance(converted, dict):
            made = f"{converted['seconds']:.1f} s, {converted['bytes'] / 1e6:.1f} MB in {converted['files']} files"
        else:
            made = converted or "none (reads the tars)"
        if name in failures:
            speed_rows.append([name, "-", FORMATS[name], made, failures[name], "-", "-", "-"])
            share_rows.append([name, "-", failures[name], *["-"] * 7])
            continue
        read, decode = (statistics.median(speed[name][mode]) for mode in ("read", "decode"))
        spread = {mode: f"{min(speed[name][mode]):,.0f}-{max(speed[name][mode]):,.0f}" for mode in speed[name]}
        ratio = f"{decode / own_decode:.2f}x" if own_decode else "-"
        speed_rows.append(
            [name, versions[name], FORMATS[name], made, f"{read:,.0f} ({spread['read']})", f"{1e6 / read:.0f}"]
            + [f"{decode:,.0f} ({spread['decode']})", ratio]
        )
        pass_bytes = tar_bytes if name not in conversion else converted["bytes"]
        share_rows += [share_row(name, world, ranks[name, world], pass_bytes, keys) for world in worlds]
    note = (
        f"{shards} shards of up to {rows} rows ({len(keys)} rows, {tar_bytes / 1e6:.1f} MB of tars; 224 px JPEGs "
        f"at quality 95, mean {tar_bytes / len(keys) / 1e3:.1f} KB a row with its members); {rounds} round(s) of "
        "2 passes per reader, medians."
    )
    speed_table = common.markdown_table(
        ["reader", "version", "input", "conversion", "rows/s read only (range)", "µs a row"]
        + ["rows/s read + decode (range)", "vs own"],
        speed_rows,
    )
    share_table = common.markdown_table(
        [
            "reader",
            "ranks",
            "most MB one rank asked for (rchar; of the pass)",
            "most MB one rank read from disk, cold (of the pass)",
            "rows missing",
            "rows repeated",
            "rows per rank",
            "len() per rank (own: its epoch's batches x 16)",
            f"full batches of {BATCH} per rank",
            "equal batches",
        ],
        share_rows,
    )
    text = (
        f"Start: {started}\n\nEnd: load average {', '.join(f'{v:.2f}' for v in os.getloadavg())}\n\n{note}\n\n"
        f"### One worker, the whole pass\n\n{speed_table}\n\n### N ranks x 1 worker, one epoch\n\n"
        f"{share_table}\n"
    )
    print(text)
    common.write_markdown(args.markdown, text)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
