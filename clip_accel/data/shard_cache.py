"""A node-local cache of training shards (`--shard_cache_dir`): each shard fetched whole once per node, read from
the node's disk after that, the least recently used ones removed past `--shard_cache_gb`.

The node's processes share the folder: a shard is fetched by whichever process asks first (the others wait on its
lock file, then read it), written under a temporary name and renamed when complete, so a killed run leaves no
half shard behind. Each DataLoader worker fetches the next shards of its slot in a background thread while it
decodes the current one (`prefetch`), so reading a remote shard overlaps the work. Removing a shard another
process still reads is safe: on Linux an open file stays readable after it is unlinked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import queue
import re
import shutil
import threading

from ..config import check_writable_folder
from .remote import open_shard
from .retry import DEFAULT_RETRYING, Retrying

READ_AHEAD = 2  # shards a worker fetches ahead of the one it reads
COPY_BYTES = 1024 * 1024


class ShardCache:
    def __init__(self, folder: str, limit_bytes: int, retrying: Retrying = DEFAULT_RETRYING) -> None:
        check_writable_folder(folder, "--shard_cache_dir", "name a folder on the node's own disk this user can write")
        self.folder, self.limit_bytes, self.retrying = folder, limit_bytes, retrying
        self.fetched = 0  # shards this process fetched (not found in the cache)
        self._queue: queue.Queue | None = None
        self._owner = None  # the process whose thread serves `_queue` (a forked worker starts its own)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_queue": None, "_owner": None}

    def path(self, url: str) -> str:
        """Where `url` is kept: its name, after a hash of the whole URL (two stores may hold `00000.tar`)."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return os.path.join(self.folder, f"{digest}-{os.path.basename(url.rstrip('/'))}")

    def local(self, url: str) -> str:
        """The cached copy of `url`, fetched first if the node has none (an `OSError` of the fetch propagates)."""
        path = self.path(url)
        if os.path.exists(path):
            os.utime(path)  # (recently used: the last to be removed)
            return path
        os.makedirs(self.folder, exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (another process of the node may be fetching it)
            if not os.path.exists(path):
                partial = f"{path}.part{os.getpid()}"
                try:
                    with open_shard(url, self.retrying) as source, open(partial, "wb") as target:
                        shutil.copyfileobj(source, target, COPY_BYTES)
                    os.replace(partial, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(partial)
                self.fetched += 1
                self._evict(keep=path)
        return path

    def prefetch(self, urls: list[str]) -> None:
        """Fetch `urls` in this process's background thread (failures are left for `local` to meet and report)."""
        if self._owner != os.getpid():
            self._queue, self._owner = queue.Queue(), os.getpid()
            threading.Thread(target=self._serve, args=(self._queue,), daemon=True).start()
        for url in urls:
            if not os.path.exists(self.path(url)):
                self._queue.put(url)

    def wait(self) -> None:
        """Until the shards asked for ahead are fetched (or have failed)."""
        if self._queue is not None and self._owner == os.getpid():
            self._queue.join()

    def _serve(self, urls: queue.Queue) -> None:
        while True:
            url = urls.get()
            with contextlib.suppress(OSError):
                self.local(url)
            urls.task_done()

    def _evict(self, keep: str) -> None:
        """Remove the least recently used shards until the folder holds at most `limit_bytes` (`keep` stays)."""
        shards = []
        for entry in os.scandir(self.folder):
            partial = re.search(r"\.part(\d+)$", entry.name)
            if partial and not _running(int(partial.group(1))):  # (a fetch its process did not live to finish)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
            elif entry.is_file() and not partial and not entry.name.endswith(".lock"):
                stat = entry.stat()
                shards.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in shards)
        for _, size, path in sorted(shards):
            if total <= self.limit_bytes:
                break
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                total -= size


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
