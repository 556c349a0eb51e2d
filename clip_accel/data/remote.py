"""Remote WebDataset tar shards: where they are (`remote_splits`), how one is read (`open_shard`), and a node-local
cache of fetched shards (`ShardCache`).

A stream's `--dataset_name` may be an `http(s)://` URL, or `s3://`, `gs://`, `hf://` (any store `fsspec` knows,
its package installed: `pip install clip_accel[s3]` adds s3fs, `[gcs]` gcsfs; `hf://` comes with
huggingface_hub), naming
- a base location whose splits have a shard index beside their shards (`BASE/train.shardindex.json`, and
  `validation`/`test`: what `write_webdataset_shards` and `clip-accel index-shards` write; upload the folder as it
  is), the shards' URLs relative to the index;
- a brace pattern of shard URLs (`https://host/data/train-{00000..00015}.tar`, several patterns joined by `::`),
  each shard's split named by its path below the pattern's folder as in a local folder (`shard_index.
  shards_by_split`); their rows then come from `--shard_index FILE`;
- or, in a store that lists its files (not HTTP), a folder or glob of tar shards without an index (their rows
  then from `--shard_index FILE`, which `clip-accel index-shards URL --output FILE` writes).

`HttpShard` reads a shard front to back in `Range` windows, seeks with a new one (past what a slot does not
need), and when a connection drops mid-shard retries from the byte where it stopped, so no row is lost or read
twice; `StoreShard` does the same over an fsspec file, and `fetch_json` (a shard index) through the same HTTP
session. What is retried, and for how long, is `retry`'s (`--remote_retry_seconds`). Credentials: from where each
store's own client looks (the URL for HTTP; for s3 the `AWS_*` variables and ~/.aws, an endpoint as
`AWS_ENDPOINT_URL`; gcloud's for gs; the Hub token for hf), never from an option, and nothing is logged but the URL.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import threading
from urllib.parse import urljoin

import requests

from ..config import UserError
from .retry import (
    DEFAULT_RETRYING,
    RETRY_STATUSES,
    Retries,
    Retrying,
    ShardUnavailable,
    raise_unless_transient,
    retry_after,
    retry_after_of,
)
from .shard_index import SPLITS, shards_by_split

TIMEOUT_S = 60
BUFFER_BYTES = 64 * 1024
STORE_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # the extra that installs a store's package


def is_remote(location: str) -> bool:
    """An `http(s)://` URL or a store's (`s3://`, `gs://`, `hf://`, ...): not a local path or a Hub id."""
    return "://" in location and not location.startswith("file://")


def is_http(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def open_shard(url: str, retrying: Retrying = DEFAULT_RETRYING):
    """A shard's bytes as a seekable binary file: over HTTP Range requests, through fsspec, or from the disk; a
    remote one's failures retried by `retrying`."""
    if is_http(url):
        return io.BufferedReader(HttpShard(url, retrying), BUFFER_BYTES)  # (a tar's 512-byte headers from memory)
    if is_remote(url):
        return StoreShard(url, retrying)
    return open(url, "rb")


class RemoteShard(io.RawIOBase):
    """A read-only, seekable remote file read from `offset` on (`HttpShard`, `StoreShard` say how)."""

    offset = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.offset

    def read_some(self, size: int) -> bytes:
        """Up to `size` bytes, fewer where more would cost another request (a buffer's fill)."""
        return self.read(size)

    def readinto(self, buffer) -> int:
        data = self.read_some(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class HttpShard(RemoteShard):
    """A read-only, seekable file over HTTP Range requests (module docstring), on one kept-alive connection
    (`requests`: the proxies, redirects and certificates of the environment). Each shard's reads, and each
    seek past the current window, start with a window of 16 KB (a probe of a shard's first row costs little more)
    growing 4x up to 4 MB, so a reader that stops inside a shard (the end of a slot) leaves at most a window unread
    on the wire."""

    MIN_WINDOW, MAX_WINDOW = 16 * 1024, 4 * 1024 * 1024
    HEADERS = {"Accept-Encoding": "identity"}  # (Range counts the file's bytes, not a compressed body's)

    def __init__(self, url: str, retrying: Retrying = DEFAULT_RETRYING) -> None:
        super().__init__()
        self.url, self.retries = url, retrying.streak(url)
        self.offset, self.size, self.response = 0, None, None
        self.window, self.window_end = self.MIN_WINDOW, 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            target = self._size() + offset
        else:
            target = offset + (self.offset if whence == os.SEEK_CUR else 0)
        if self.response is not None and self.offset <= target < self.window_end:
            self.read(target - self.offset)  # (inside the window being received: read through it)
            return self.offset
        if target != self.offset:
            self._close_response()
            self.offset, self.window = target, self.MIN_WINDOW
        return target

    def read_some(self, size: int) -> bytes:
        return self.read(size, within_window=True)

    def read(self, size: int = -1, within_window: bool = False) -> bytes:
        """`size` bytes (all the rest with -1), fewer only at the end; `within_window`: only the current window's
        if one is open (a buffer filled with the 64 KB it asks for would otherwise cost a short slot its windows)."""
        if size is None or size < 0:
            size = max(self._size() - self.offset, 0)
        chunks, wanted = [], size
        while wanted > 0:
            if self.response is None or self.offset >= self.window_end:
                if chunks and within_window:
                    break
                self._close_response()
                if self.size is not None and self.offset >= self.size:
                    break
                self._open()
                if self.response is None:  # (past the end)
                    break
            try:
                data = self.response.raw.read(min(wanted, self.window_end - self.offset))
                failure = "the connection ended early"
            except Exception as error:
                raise_unless_transient(error, self.url)
                data, failure = b"", error
            if data:
                chunks.append(data)
                self.offset += len(data)
                wanted -= len(data)
                self.retries.reset()
                continue
            self._close_response()  # a window that ended early: the connection dropped
            self.retries.wait(failure, where=f" at byte {self.offset}")
        return b"".join(chunks)

    def close(self) -> None:
        self._close_response()
        super().close()

    def _request(self, method: str, headers: dict) -> requests.Response:
        """A response whose status is final (`http_request`); any other error status makes the shard unavailable."""
        response = http_request(method, self.url, self.retries, {**self.HEADERS, **headers})
        if response.status_code >= 400 and response.status_code != 416:
            response.close()
            raise ShardUnavailable(f"{self.url}: HTTP {response.status_code} {response.reason}")
        return response

    def _open(self) -> None:
        end = self.offset + self.window
        if self.size is not None:
            end = min(end, self.size)
        response = self._request("GET", {"Range": f"bytes={self.offset}-{end - 1}"})
        if response.status_code == 416:  # (a range past the end)
            response.close()
            self.size = self.offset if self.size is None else self.size
            return
        length = int(response.headers.get("Content-Length", "0") or 0)
        if response.status_code == 200:  # the whole file: a server without Range requests
            if self.offset:
                response.close()
                raise ShardUnavailable(f"{self.url}: the server ignores Range requests, which a seek needs")
            self.size = length
        else:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit():
                self.size = int(total)
        self.response, self.window_end = response, self.offset + length
        self.window = min(self.window * 4, self.MAX_WINDOW)

    def _size(self) -> int:
        if self.size is None:
            response = self._request("HEAD", {})
            response.close()
            self.size = int(response.headers["Content-Length"])
        return self.size

    def _close_response(self) -> None:
        """Done with the window: a window read to its end leaves its connection for the next one; one left
        part-read (a seek, the end of a slot) or broken closes it."""
        if self.response is not None:
            if self.offset < self.window_end:
                self.response.raw.close()
            self.response.close()
            self.response = None


_SESSIONS = threading.local()


def session() -> requests.Session:
    """This thread's HTTP session (its connections kept alive from one shard to the next); a DataLoader worker
    forked from a process that had one starts its own (a socket is never shared between processes)."""
    if getattr(_SESSIONS, "pid", None) != os.getpid():
        _SESSIONS.pid, _SESSIONS.session = os.getpid(), requests.Session()
    return _SESSIONS.session


def http_request(method: str, url: str, retries: Retries, headers: dict | None = None, stream: bool = True):
    """`method` on `url` through this thread's session, until a response whose status is final: a transport failure
    and HTTP 408/425/429/5xx waited for by `retries` (a server's Retry-After honoured)."""
    while True:
        try:
            response = session().request(method, url, headers=headers, stream=stream, timeout=TIMEOUT_S)
        except Exception as error:
            raise_unless_transient(error, url)
            retries.wait(error)
            continue
        if response.status_code not in RETRY_STATUSES:
            return response
        response.close()
        failure = f"HTTP {response.status_code} {response.reason}"
        retries.wait(failure, retry_after(response.headers.get("Retry-After")))


class StoreShard(RemoteShard):
    """A read-only, seekable file in an fsspec store (`s3://`, `gs://`, `hf://`): the store's own ranged reads
    (blocks of 1 MB), reopened at the byte it stood at, after a wait, when a read fails in passing (`retry`)."""

    BLOCK = 1024 * 1024

    def __init__(self, url: str, retrying: Retrying = DEFAULT_RETRYING) -> None:
        super().__init__()
        self.url, self.retries = url, retrying.streak(url)
        self.fs, self.path = store(url)
        self.offset, self.file = 0, None

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            offset += self._call(lambda file: file.size)
        elif whence == os.SEEK_CUR:
            offset += self.offset
        self.offset = offset
        if self.file is not None:
            self.file.seek(offset)
        return offset

    def read(self, size: int = -1) -> bytes:
        data = self._call(lambda file: file.read(size))
        self.offset += len(data)
        return data

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()

    def _call(self, action):
        while True:
            try:
                if self.file is None:
                    self.file = self.fs.open(self.path, "rb", block_size=self.BLOCK)
                    self.file.seek(self.offset)
                result = action(self.file)
                self.retries.reset()
                return result
            except Exception as error:  # (a store's client raises its own errors: `retry` sorts them)
                if self.file is not None:
                    self.file.close()
                    self.file = None
                raise_unless_transient(error, self.url)
                self.retries.wait(error, retry_after_of(error), where=f" at byte {self.offset}")


def store(url: str):
    """(fsspec filesystem, path) of a store's URL; a store whose package is missing is an error naming it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        scheme = url.split("://", 1)[0]
        extra = STORE_EXTRAS.get(scheme)
        hint = f"`pip install clip_accel[{extra}]`" if extra else f"the fsspec package for {scheme}://"
        raise UserError(f"{url}: {scheme}:// needs {hint} ({type(error).__name__}: {error}).") from None


def fetch_json(url: str, retrying: Retrying = DEFAULT_RETRYING) -> dict | None:
    """A small JSON file (a shard index), over HTTP (the shards' session) or from a store, its failures retried
    as a shard's; None where there is none. One that cannot be read or is no JSON is an error naming it."""
    try:
        data = _http_file(url, retrying.streak(url)) if is_http(url) else _store_file(url, retrying.streak(url))
    except ShardUnavailable as error:
        raise UserError(f"{error}: check the URL and the server (or its credentials).") from None
    try:
        return None if data is None else json.loads(data)
    except ValueError as error:
        raise UserError(f"{url} is not JSON ({error}): write it again (clip-accel index-shards).") from None


def _http_file(url: str, retries: Retries) -> bytes | None:
    """A small file over HTTP, whole; None where there is none (404)."""
    response = http_request("GET", url, retries, stream=False)
    if response.status_code == 404:
        return None
    if response.status_code >= 400:
        raise ShardUnavailable(f"{url}: HTTP {response.status_code} {response.reason}")
    return response.content


def _store_file(url: str, retries: Retries) -> bytes | None:
    """A small file of a store, whole; None where there is none."""
    fs, path = store(url)
    while True:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as error:
            raise_unless_transient(error, url)
            retries.wait(error, retry_after_of(error))


def join_url(base: str, relative: str) -> str:
    """`relative` (a shard index's url) against the index's own URL."""
    if "://" in relative:
        return relative
    return urljoin(base, relative) if is_http(base) else base.rsplit("/", 1)[0] + "/" + relative


def remote_splits(
    location: str, retrying: Retrying = DEFAULT_RETRYING
) -> tuple[dict[str, list[str]], dict[str, list[int] | None]]:
    """({split: shard URLs}, {split: their rows, or None where no index gives them}) of a remote location
    (module docstring); an index's fetch retried by `retrying`."""
    if "{" in location or location.endswith(".tar") or (not is_http(location) and "*" in location):
        patterns = location.split("::")
        urls = [url for pattern in patterns for url in _shard_urls(pattern)]
        splits = shards_by_split(urls, _folder_of(patterns))
        return splits, dict.fromkeys(splits)
    base = location if location.endswith("/") else location + "/"
    splits, counts = {}, {}
    for split in SPLITS:
        index_url = base + f"{split}.shardindex.json"
        index = fetch_json(index_url, retrying)
        if index is None:
            continue
        try:
            entries = [(join_url(index_url, entry["url"]), int(entry["nsamples"])) for entry in index["shardlist"]]
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{index_url} is not a shard index ({type(error).__name__}: {error})") from None
        splits[split], counts[split] = [url for url, _ in entries], [rows for _, rows in entries]
    if not splits and not is_http(location):  # a store's folder without an index: its shards, rows from elsewhere
        urls = _shard_urls(base + "*.tar")
        if urls:
            splits = shards_by_split(urls, base)
            return splits, dict.fromkeys(splits)
    if not splits:
        raise UserError(
            f"{base}train.shardindex.json is not there: put the shard index beside the shards (`clip-accel "
            "index-shards FOLDER` writes it before you upload them), or give the shards as a brace pattern "
            "(https://host/train-{00000..00099}.tar) with --shard_index FILE."
        )
    return splits, counts


def _shard_urls(pattern: str) -> list[str]:
    """A pattern's shard URLs: its braces expanded; in a store (not HTTP) its `*` matched against the listing."""
    urls = expand_braces(pattern)
    if is_http(pattern) or "*" not in pattern:
        return urls
    fs, _ = store(urls[0])
    return sorted(fs.unstrip_protocol(path) for url in urls for path in fs.glob(store(url)[1]))


def _folder_of(patterns: list[str]) -> str:
    """The folder the patterns' shards are found below: where the first brace or wildcard is, or the file's folder;
    of several patterns, the folder they share. Its own path names no split (as a local folder's)."""
    folders = [re.split(r"[{*?\[]", pattern, maxsplit=1)[0].rsplit("/", 1)[0] + "/" for pattern in patterns]
    return os.path.commonprefix(folders).rsplit("/", 1)[0] + "/"


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); `{x,y}` lists too."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = []
    for part in parts:
        if not (part.startswith("{") and part.endswith("}")):
            choices.append([part])
            continue
        body = part[1:-1]
        numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numbers:
            first, last = numbers.groups()
            width = len(first) if first.startswith("0") else 0
            choices.append([str(n).zfill(width) for n in range(int(first), int(last) + 1)])
        else:
            choices.append(body.split(","))
    return ["".join(combination) for combination in itertools.product(*choices)]
