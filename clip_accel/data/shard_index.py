"""How many rows each WebDataset tar shard holds, known without reading the shards.

An epoch of a stream must be the same number of batches on every process, so the training split's rows are
counted per shard before the first step. They come, cheapest first, from:
- a shard index in wids' format (`{"wids_version": 1, "shardlist": [{"url": ..., "nsamples": ...}]}`, the urls
  relative to the index's folder, and each shard found by that path): `--shard_index FILE`, else
  `SPLIT.shardindex.json` in the folder holding the shards, written by `write_webdataset_shards` and by
  `clip-accel index-shards FOLDER`;
- img2dataset's `NNNNN_stats.json` beside each `NNNNN.tar` (its `successes` are the samples in the tar);
- the tar headers alone: each member's header read and its payload skipped (seeked past), so counting a local shard
  reads about 1.5 KB per row whatever its images weigh.

Which split a shard belongs to is named by its path, for every source alike (a local folder, remote shards, the
index command): `shards_by_split`.
A count that came from outside is checked against the shard as it is read (`shards.TarShards.expect`).
"""

from __future__ import annotations

import collections
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
    """{shard: rows} of a wids shard index, each shard keyed by its path (`_shard_key`): its url taken relative to
    the index's folder, so two shards of one file name in two folders are two entries; a malformed index is an
    error naming it."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path) as handle:
            index = json.load(handle)
        return {_shard_key(entry["url"], folder): int(entry["nsamples"]) for entry in index["shardlist"]}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{path} is not a readable shard index ({type(error).__name__}: {error}); it holds "
            '{"wids_version": 1, "shardlist": [{"url": "train-00000.tar", "nsamples": 1000}, ...]}: write it '
            "again with `clip-accel index-shards FOLDER`."
        ) from None


def index_beside(shards: list[str], split: str | None = None) -> str | None:
    """Where the index of local `shards` (of `split`; default: the split the first one's file name names, else
    train) sits beside them: `SPLIT.shardindex.json` in the folder that holds them all, where `clip-accel
    index-shards FOLDER` writes it; None for remote shards."""
    if not shards or any("://" in shard for shard in shards):
        return None
    split = split or split_of(os.path.basename(shards[0])) or "train"
    return index_file(os.path.commonpath([os.path.dirname(os.path.abspath(shard)) for shard in shards]), split)


def recorded_in(shards: list[str], index: str | None = None) -> str | None:
    """The shard index `indexed_counts` reads `shards`' rows from: `index` (--shard_index), else the one beside
    them where there is one; None when there is neither."""
    if index is not None:
        return index
    beside = index_beside(shards)
    return beside if beside is not None and os.path.isfile(beside) else None


def stats_file(shard: str) -> str:
    """img2dataset's `NNNNN_stats.json` beside its `NNNNN.tar`."""
    return re.sub(r"\.tar$", "_stats.json", shard)


def indexed_counts(shards: list[str], index: str | None = None) -> list[int] | None:
    """Each shard's rows from `index` (or the index beside them, or img2dataset's stats files), without opening
    a shard; None when nothing records them. An index that does not list every shard is an error (`_index_counts`
    says how a shard is found in it)."""
    index = recorded_in(shards, index)
    if index is not None:
        counts = _index_counts(read_shard_index(index), shards)
        missing = [shard for shard, count in zip(shards, counts, strict=True) if count is None]
        if missing:
            raise UserError(
                f"{index} does not list {len(missing)} of the {len(shards)} shards (e.g. {missing[0]}): write it "
                "again with `clip-accel index-shards FOLDER` after adding or moving shards."
            )
        return counts
    stats = [stats_file(shard) for shard in shards]
    if shards and all(os.path.isfile(path) for path in stats):
        return [_successes(path) for path in stats]
    return None


def _index_counts(counts: dict[str, int], shards: list[str]) -> list[int | None]:
    """Each shard's entry in an index's `counts` (`read_shard_index`), by its path. A remote shard not listed by
    its URL is found by its file name where the index and the shards each hold that name once: an index written of
    the shards' local copy (`index-shards FOLDER --output FILE` before uploading them) lists local paths."""
    entries = collections.Counter(os.path.basename(key) for key in counts)
    named = collections.Counter(os.path.basename(shard) for shard in shards)
    unique = {os.path.basename(key): rows for key, rows in counts.items() if entries[os.path.basename(key)] == 1}
    found = []
    for shard in shards:
        rows = counts.get(_shard_key(shard))
        if rows is None and "://" in shard and named[os.path.basename(shard)] == 1:
            rows = unique.get(os.path.basename(shard))
        found.append(rows)
    return found


def _shard_key(shard: str, folder: str = "") -> str:
    """A shard as an index's entries are keyed: a remote one's URL; a local one's absolute path (a relative one
    taken from `folder`)."""
    return shard if "://" in shard else os.path.normpath(os.path.join(os.path.abspath(folder), shard))


REGULAR_FILES = (b"0", b"\0", b"7")  # tar type flags of a member holding a file's bytes (7: contiguous file)
UNREADABLE = {b"S": "a GNU sparse file ('S')", b"M": "a GNU multi-volume continuation ('M')"}


def next_member(handle, url: str) -> tuple[int, str | None, str | None] | None:
    """(payload size, row key, field) of the tar member `handle` stands at, its payload left to read or skip;
    None at the tar's end. Key and field are None for what is no regular file (folders, links). A name too long
    for the ustar header comes from the PAX extended header (`x`, Python's tarfile default) or the GNU long-name
    header (`L`) before it; a PAX global header (`g`) and a GNU long link name (`K`) are passed over. The key keeps
    its folder, as webdataset's does: `a/b/000001.jpg` is row `a/b/000001`, field `jpg`. A member kind this reader
    cannot take (`UNREADABLE`) and a truncated tar are errors naming the shard."""
    extended = {}  # what the PAX or GNU headers before the member say of it: "path", "size"
    while True:
        offset = handle.tell()
        header = handle.read(512)
        if len(header) < 512:
            if header or handle.tell() > handle.seek(0, os.SEEK_END):  # (a seek past the end: a payload cut short)
                raise UserError(f"{url} is truncated: write the shard again or remove it.")
            return None
        if header[0] == 0:  # a zero block ends a tar
            return None
        size, kind = _member_size(header, url, offset), header[156:157]
        if kind in UNREADABLE:
            raise UserError(
                f"{url}: the member at byte {offset} is {UNREADABLE[kind]}, which clip_accel's tar reader does not "
                "take: write the shard again with plain members (`tarfile`, webdataset's TarWriter and img2dataset "
                "write them)."
            )
        if kind in (b"x", b"L"):
            payload = _payload(handle, size, url)
            extended.update(
                _pax_records(payload, url, offset) if kind == b"x" else {"path": _text(payload.split(b"\0", 1)[0])}
            )
            continue
        if kind in (b"g", b"K"):
            handle.seek(size + (-size % 512), os.SEEK_CUR)
            continue
        size = int(extended.get("size", size))
        if kind not in REGULAR_FILES:
            return size, None, None
        path = extended.get("path")
        if path is None:
            name, prefix = _text(header[:100].split(b"\0", 1)[0]), _text(header[345:500].split(b"\0", 1)[0])
            path = f"{prefix}/{name}" if prefix else name  # (ustar: a long path's folders in the prefix field)
        folder, _, file_name = path.rpartition("/")
        base, _, field = file_name.partition(".")
        return size, f"{folder}/{base}" if folder else base, field


def count_tar_rows(path: str, open_file=None) -> int:
    """The rows (groups of members sharing a key) of a tar shard, from its headers alone (`open_file`: a remote
    shard's opener, whose seeks are Range requests)."""
    with open_file(path) if open_file is not None else open(path, "rb") as handle:
        return count_rows_from(handle, path)


def count_rows_from(handle, url: str, rows: int = 0, key: str | None = None) -> int:
    """The rows of a tar from the member `handle` stands at on, its payloads seeked past: `rows` already counted,
    the last of them `key`'s."""
    while (member := next_member(handle, url)) is not None:
        size, base, _ = member
        handle.seek(size + (-size % 512), os.SEEK_CUR)  # (past the payload, padded to whole blocks)
        if base is not None and base != key:
            rows, key = rows + 1, base
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


def _member_size(header: bytes, url: str, offset: int) -> int:
    if header[124] & 0x80:  # GNU base-256 (sizes of 8 GiB and more)
        return int.from_bytes(header[125:136], "big")
    try:
        return int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise UserError(f"{url}: a tar header at byte {offset} is not a tar header") from None


def _payload(handle, size: int, url: str) -> bytes:
    """A PAX or GNU header's payload, read with its padding."""
    payload = handle.read(size)
    if len(payload) < size or len(handle.read(-size % 512)) < -size % 512:
        raise UserError(f"{url} is truncated: write the shard again or remove it.")
    return payload


def _pax_records(payload: bytes, url: str, offset: int) -> dict[str, str]:
    """A PAX extended header's records (`LENGTH KEY=VALUE\\n`, LENGTH counting the whole record in bytes)."""
    records, at = {}, 0
    try:
        while at < len(payload) and payload[at] != 0:
            length_text = payload[at : payload.index(b" ", at)]
            record = payload[at + len(length_text) + 1 : at + int(length_text) - 1]
            key, _, value = record.partition(b"=")
            records[_text(key)] = _text(value)
            at += int(length_text)
    except ValueError:
        raise UserError(f"{url}: the PAX header at byte {offset} does not parse: write the shard again.") from None
    if any(key.startswith("GNU.sparse.") for key in records):
        raise UserError(
            f"{url}: the member after byte {offset} is a GNU sparse file (PAX), which clip_accel's tar reader does "
            "not take: write the shard again with plain members."
        )
    return records


def _text(name: bytes) -> str:
    return name.decode("utf-8", "replace")


def _successes(path: str) -> int:
    try:
        with open(path) as handle:
            return int(json.load(handle)["successes"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: no img2dataset 'successes' count ({type(error).__name__}: {error})") from None
