"""How many rows each WebDataset tar shard holds, known without reading the shards.

An epoch of a stream must be the same number of batches on every process, so the training split's rows are
counted per shard before the first step. They come, cheapest first, from:
- a shard index in wids' format (`{"wids_version": 1, "shardlist": [{"url": ..., "nsamples": ...}]}`, the urls
  relative to the index's folder): `--shard_index FILE`, else `SPLIT.shardindex.json` beside the shards, written by
  `write_webdataset_shards` and by `clip-accel index-shards FOLDER`;
- img2dataset's `NNNNN_stats.json` beside each `NNNNN.tar` (its `successes` are the samples in the tar);
- the tar headers alone: each member's header read and its payload skipped (seeked past), so counting a local shard
  reads about 1.5 KB per row whatever its images weigh.

Which split a shard belongs to is named by its path, for every source alike (a local folder, remote shards, the
index command): `shards_by_split`.
"""

from __future__ import annotations

import json
import os
import re

from datasets.data_files import SPLIT_KEYWORDS

from ..config import UserError

INDEX_SUFFIX = ".shardindex.json"
SPLITS = tuple(str(split) for split in SPLIT_KEYWORDS)  # train, validation, test


def index_file(folder: str, split: str) -> str:
    """Where the index of `split`'s shards sits beside them."""
    return os.path.join(folder, f"{split}{INDEX_SUFFIX}")


def write_shard_index(path: str, shards: list[str], counts: list[int]) -> str:
    """Write a wids shard index of `shards` (their rows `counts`), each url relative to the index's folder (a
    remote shard's URL as it is)."""
    folder = os.path.dirname(os.path.abspath(path))
    shardlist = [
        {"url": shard if "://" in shard else os.path.relpath(os.path.abspath(shard), folder), "nsamples": count}
        for shard, count in zip(shards, counts, strict=True)
    ]
    with open(path, "w") as handle:
        json.dump({"wids_version": 1, "shardlist": shardlist}, handle, indent=1)
    return path


def read_shard_index(path: str) -> dict[str, int]:
    """{shard file name: rows} of a wids shard index; a malformed one is an error naming it."""
    try:
        with open(path) as handle:
            index = json.load(handle)
        return {os.path.basename(entry["url"]): int(entry["nsamples"]) for entry in index["shardlist"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{path} is not a readable shard index ({type(error).__name__}: {error}); it holds "
            '{"wids_version": 1, "shardlist": [{"url": "train-00000.tar", "nsamples": 1000}, ...]}: write it '
            "again with `clip-accel index-shards FOLDER`."
        ) from None


def indexed_counts(shards: list[str], index: str | None = None) -> list[int] | None:
    """Each shard's rows from `index` (or the index of their split beside them, or img2dataset's stats files),
    without opening a shard; None when nothing records them. An index that does not list every shard is an
    error."""
    folder = os.path.dirname(shards[0]) if shards else ""
    if index is None and shards:
        beside = index_file(folder, split_of(os.path.basename(shards[0])) or "train")
        index = beside if os.path.isfile(beside) else None
    if index is not None:
        counts = read_shard_index(index)
        missing = [os.path.basename(shard) for shard in shards if os.path.basename(shard) not in counts]
        if missing:
            raise UserError(
                f"{index} does not list {len(missing)} of the {len(shards)} shards (e.g. {missing[0]}): write it "
                "again with `clip-accel index-shards FOLDER` after adding shards."
            )
        return [counts[os.path.basename(shard)] for shard in shards]
    stats = [re.sub(r"\.tar$", "_stats.json", shard) for shard in shards]
    if shards and all(os.path.isfile(path) for path in stats):
        return [_successes(path) for path in stats]
    return None


def parse_header(header: bytes, url: str, offset: int) -> tuple[int, str | None, str | None]:
    """(payload size, row key, field) of a tar member's 512-byte header; key and field are None for what is no
    regular file (folders, links, pax headers). Plain ustar names (up to 100 characters, plus the ustar prefix);
    the key keeps its folder, as webdataset's does: `a/b/000001.jpg` is row `a/b/000001`, field `jpg`."""
    try:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise UserError(f"{url}: a tar header at byte {offset} is not a tar header") from None
    if header[156:157] not in (b"0", b"\0"):
        return size, None, None
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")  # ustar: long paths' folders
    folder, _, file_name = (f"{prefix}/{name}" if prefix else name).rpartition("/")
    base, _, field = file_name.partition(".")
    return size, f"{folder}/{base}" if folder else base, field


def count_tar_rows(path: str, open_file=None) -> int:
    """The rows (groups of members sharing a key) of a tar shard, from its headers alone (`open_file`: a remote
    shard's opener, whose seeks are Range requests)."""
    rows, key = 0, None
    with open_file(path) if open_file is not None else open(path, "rb") as handle:
        while len(header := handle.read(512)) == 512 and header[0] != 0:
            size, base, _ = parse_header(header, path, handle.tell() - 512)
            handle.seek(size + (-size % 512), os.SEEK_CUR)  # (past the payload, padded to whole blocks)
            if base is not None and base != key:
                rows, key = rows + 1, base
        if handle.tell() > handle.seek(0, os.SEEK_END):
            raise UserError(f"{path} is truncated: write the shard again or remove it.")
    return rows


def split_of(path: str) -> str | None:
    """The split a shard's path below the location it was found in names by `datasets`' keywords between
    separators (`SPLIT_KEYWORDS`: train, training; validation, valid, dev, val; test, testing, eval, evaluation),
    the file name's first, then its folders' from the deepest; None where none does."""
    for part in reversed(path.split("/")):
        words = set(re.split(r"[-._ 0-9]+", part))
        for split, keywords in SPLIT_KEYWORDS.items():
            if words & set(keywords):
                return str(split)
    return None


def shards_by_split(shards: list[str], location: str) -> dict[str, list[str]]:
    """{split: shards, in the order given} of the shards found below `location` (a folder, a URL's folder: its own
    name names no split), by `split_of`. Shards that name no split are the training split when none does
    (img2dataset's `00000.tar`); beside shards that do, they are an error, neither trained on nor dropped."""
    root = location.rstrip("/") + "/"
    found: dict[str | None, list[str]] = {}
    for shard in shards:
        below = shard[len(root) :] if shard.startswith(root) else os.path.basename(shard)
        found.setdefault(split_of(below), []).append(shard)
    unnamed = found.pop(None, [])
    if unnamed and found:
        raise UserError(
            f"{unnamed[0]} names no split ({len(unnamed)} such shards), while {location}'s other shards do "
            f"({', '.join(map(str, found))}): name each shard after its split (train-*.tar, validation-*.tar, "
            "test-*.tar, or a train/ validation/ test/ folder) or move it out; a shard is never guessed into a split."
        )
    return {"train": unnamed} if unnamed else {str(split): named for split, named in found.items()}


def _successes(path: str) -> int:
    try:
        with open(path) as handle:
            return int(json.load(handle)["successes"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: no img2dataset 'successes' count ({type(error).__name__}: {error})") from None
