"""WebDataset tar shards over HTTP(S): where they are (`remote_splits`) and how one is read (`HttpShard`).

A stream's `--dataset_name` may be
- a base URL whose splits have a shard index beside their shards (`BASE/train.shardindex.json`, and
  `validation`/`test`: what `write_webdataset_shards` and `clip-accel index-shards` write; upload the folder as it
  is), the shards' URLs relative to the index; or
- a brace pattern of shard URLs (`https://host/data/train-{00000..00015}.tar`, several patterns joined by `::`,
  a split named by each shard's prefix as in a local folder); their rows then come from `--shard_index FILE`.

`HttpShard` reads a shard front to back in `Range` windows, seeks with a new one (past what a slot does not
need), and when a connection drops mid-shard retries with backoff from the byte where it stopped, so
no row is lost or read twice. Credentials: none are sent but what the URL carries; nothing is logged but the URL.
"""

from __future__ import annotations

import http.client
import io
import itertools
import json
import os
import re
import time
import urllib.error
import urllib.request
from urllib.parse import urljoin

from .shard_index import shard_prefix

RETRIES = 5  # attempts after a dropped connection, 0.2 s, 0.4 s, ... apart
TIMEOUT_S = 60
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test", "eval": "validation"}


def is_remote(location: str) -> bool:
    return location.startswith(("http://", "https://"))


class ShardUnavailable(OSError):
    """A shard that still fails after the retries."""


class HttpShard(io.RawIOBase):
    """A read-only, seekable file over HTTP Range requests (module docstring). Sequential reads ask for windows
    that double from 16 KB up to 1 MB, so a reader that stops inside a shard (the end of a slot) leaves at most
    a window unread on the wire; a seek past the current window starts a new one."""

    MIN_WINDOW, MAX_WINDOW = 16 * 1024, 1024 * 1024

    def __init__(self, url: str, retries: int = RETRIES) -> None:
        super().__init__()
        self.url, self.retries = url, retries
        self.offset, self.size, self.response = 0, None, None
        self.window, self.window_end = self.MIN_WINDOW, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.offset

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            target = self._size() + offset
        else:
            target = offset + (self.offset if whence == os.SEEK_CUR else 0)
        if self.response is not None and self.offset <= target < self.window_end:
            self.read(target - self.offset)  # (inside the window being received: read through it)
            return self.offset
        self._close_response()
        self.offset, self.window = target, self.MIN_WINDOW
        return target

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(self._size() - self.offset, 0)
        chunks, wanted, attempt = [], size, 0
        while wanted > 0:
            if self.response is None or self.offset >= self.window_end:
                self._close_response()
                if self.size is not None and self.offset >= self.size:
                    break
                try:
                    self._open()
                except (OSError, http.client.HTTPException) as error:
                    if isinstance(error, ShardUnavailable):
                        raise
                    attempt = self._retry(attempt, error)
                    continue
                if self.response is None:  # (past the end)
                    break
            try:
                data = self.response.read(min(wanted, self.window_end - self.offset))
                failure = None
            except (OSError, http.client.HTTPException) as error:
                data, failure = b"", error
            if data:
                chunks.append(data)
                self.offset += len(data)
                wanted -= len(data)
                attempt = 0
                continue
            self._close_response()  # a window that ended early: the connection dropped
            attempt = self._retry(attempt, failure)
        return b"".join(chunks)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._close_response()
        super().close()

    def _retry(self, attempt: int, failure: BaseException | None) -> int:
        attempt += 1
        if attempt > self.retries:
            raise ShardUnavailable(
                f"{self.url}: the connection failed {attempt} times at byte {self.offset}"
                + (f" ({type(failure).__name__}: {failure})" if failure is not None else " (it ended early)")
            )
        time.sleep(0.2 * 2 ** (attempt - 1))
        return attempt

    def _open(self) -> None:
        end = self.offset + self.window
        if self.size is not None:
            end = min(end, self.size)
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.offset}-{end - 1}"})
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as error:
            if error.code == 416:  # (a range past the end)
                self.size = self.offset if self.size is None else self.size
                return
            if error.code in (401, 403, 404):
                raise ShardUnavailable(f"{self.url}: HTTP {error.code} {error.reason}") from None
            raise
        length = int(response.headers.get("Content-Length", "0") or 0)
        if response.status == 200:  # the whole file: a server without Range requests
            if self.offset:
                response.close()
                raise ShardUnavailable(f"{self.url}: the server ignores Range requests, which a seek needs")
            self.size = length
        else:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit():
                self.size = int(total)
        self.response, self.window_end = response, self.offset + length
        self.window = min(self.window * 2, self.MAX_WINDOW)

    def _size(self) -> int:
        if self.size is None:
            request = urllib.request.Request(self.url, method="HEAD")
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                self.size = int(response.headers["Content-Length"])
        return self.size

    def _close_response(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None


def fetch_json(url: str) -> dict | None:
    """A small JSON file (a shard index) over HTTP; None where the server has none."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def remote_splits(location: str) -> tuple[dict[str, list[str]], dict[str, list[int] | None]]:
    """({split: shard URLs}, {split: their rows, or None where no index gives them}) of a remote location
    (module docstring)."""
    if "{" in location or location.endswith(".tar"):
        urls = [url for pattern in location.split("::") for url in expand_braces(pattern)]
        splits: dict[str, list[str]] = {}
        for url in urls:
            split = SPLIT_NAMES.get(shard_prefix(url.rsplit("/", 1)[-1]) or "train", "train")
            splits.setdefault(split, []).append(url)
        return splits, dict.fromkeys(splits)
    base = location if location.endswith("/") else location + "/"
    splits, counts = {}, {}
    for split in ("train", "validation", "test"):
        index_url = urljoin(base, f"{split}.shardindex.json")
        index = fetch_json(index_url)
        if index is None:
            continue
        try:
            entries = [(urljoin(index_url, entry["url"]), int(entry["nsamples"])) for entry in index["shardlist"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{index_url} is not a shard index ({type(error).__name__}: {error})") from None
        splits[split], counts[split] = [url for url, _ in entries], [rows for _, rows in entries]
    if not splits:
        raise ValueError(
            f"{base}train.shardindex.json is not there: put the shard index beside the shards (`clip-accel "
            "index-shards FOLDER` writes it before you upload them), or give the shards as a brace pattern "
            "(https://host/train-{00000..00099}.tar) with --shard_index FILE."
        )
    return splits, counts


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
