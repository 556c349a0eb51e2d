"""What identifies a shard's content, known without reading the shard: its size in bytes and a digest of its first
512 bytes (a tar shard's first member header: the member's name, size and modification time). One small read a
shard, the same bytes wherever the shard lies (a local file, HTTP, an fsspec store), so a stream resumed from a
copy of its shards elsewhere still resumes, where modification times or ETags would differ.

A checkpoint keeps them (`StreamingLoader.identity`) and a resume stops where a shard's differ
(`checkpoint.check_resume`): another file under a shard's name and row count. A shard rewritten with its size and
its first member kept (a caption corrected in place) passes: its rows, which the checkpoint's position counts, are
the same rows.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

from ..config import UserError
from .remote import TIMEOUT_S, is_http, is_remote, session, store

HEAD_BYTES = 512  # a tar header block
REMOTE_AT_ONCE = 16  # remote shards' signatures read at a time (one request each)


def shard_signatures(files: list[str]) -> list[str | None]:
    """Each shard's `shard_signature`, remote ones `REMOTE_AT_ONCE` at a time."""
    if any(is_remote(url) for url in files):
        with ThreadPoolExecutor(REMOTE_AT_ONCE) as pool:
            return list(pool.map(shard_signature, files))
    return [shard_signature(path) for path in files]


def shard_signature(url: str) -> str | None:
    """`SIZE:DIGEST` of a shard (module docstring); None where it cannot be read now (it is then not compared: a
    shard that stays unreachable has its rows skipped as it is read)."""
    try:
        size, head = _size_and_head(url)
    except UserError:
        raise
    except Exception:  # (requests, fsspec and a store's client each raise their own: unreadable, no signature)
        return None
    if size is None:
        return None
    return f"{size}:{hashlib.blake2b(head, digest_size=8).hexdigest()}"


def _size_and_head(url: str) -> tuple[int | None, bytes]:
    """The shard's size and first `HEAD_BYTES`: from the disk, one Range request over HTTP, a ranged read of a
    store."""
    if is_http(url):
        headers = {"Range": f"bytes=0-{HEAD_BYTES - 1}", "Accept-Encoding": "identity"}
        with session().get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as response:
            if response.status_code >= 400:
                raise OSError(f"{url}: HTTP {response.status_code}")
            head = response.raw.read(HEAD_BYTES)
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if response.status_code == 206:
                return (int(total) if total.isdigit() else None), head
            return int(response.headers.get("Content-Length", "0") or 0) or None, head  # (Range ignored)
    if is_remote(url):
        fs, path = store(url)
        return fs.size(path), fs.cat_file(path, start=0, end=HEAD_BYTES)
    with open(url, "rb") as handle:
        return os.fstat(handle.fileno()).st_size, handle.read(HEAD_BYTES)
