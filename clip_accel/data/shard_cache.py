"""A node-local cache of training shards (`--shard_cache_dir`): each shard fetched whole once per node, read from
the node's disk after that, the least recently used ones removed past `--shard_cache_gb`.

The node's processes share the folder, and every shard has a lock file beside it (`flock`):
- a shard is fetched under its lock held exclusively, by whichever process asks first (the others wait on the
  lock, then read it), written under a temporary name (`.part` and the fetching process's id) and renamed when
  complete, so a killed run leaves no half shard behind (the next eviction removes a `.part` whose process is gone);
- a reader holds the lock shared for as long as it has the shard open (`open`: taken before the shard is looked
  for, so no eviction comes between the hit and the open), and an eviction takes a lock only if no one holds it
  (a shard being read or fetched is passed over, the next least recently used removed instead).
Each DataLoader worker fetches the next shards of its slot in a background thread while it decodes the current one
(`prefetch`), so reading a remote shard overlaps the work; a fetch that fails there fails its reader (`open`) at
once, not after a second round of retries.

Nodes never share files: each keeps its shards, lock and temporary files in its own folder, `DIR/HOSTNAME/`. A
process id means nothing on another node (a node would take another's fetch for a dead one) and `flock` between
nodes depends on the network file system, so a `--shard_cache_dir` on shared storage is a cache per node (of
`--shard_cache_gb` each), as on local disks; a folder on a network file system is named in a warning, since
a local disk is what the cache is for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import queue
import re
import shutil
import socket
import threading

from accelerate.logging import get_logger

from ..config import check_writable_folder
from .remote import open_shard
from .retry import DEFAULT_RETRYING, Retrying

logger = get_logger(__name__)
READ_AHEAD = 2  # shards a worker fetches ahead of the one it reads
COPY_BYTES = 1024 * 1024
NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p")
_HELD: set[_Lock] = set()  # the lock files this process holds (a forked child lets go of its copies)


class ShardCache:
    def __init__(self, folder: str, limit_bytes: int, retrying: Retrying = DEFAULT_RETRYING) -> None:
        check_writable_folder(folder, "--shard_cache_dir", "name a folder on the node's own disk this user can write")
        if (kind := network_file_system(folder)) is not None:
            logger.warning(
                f"--shard_cache_dir {folder} is on a network file system ({kind}): each node keeps its own copies "
                "there (up to --shard_cache_gb each); a folder on the node's own disk is faster.",
                main_process_only=True,
            )
        node = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "node"
        self.folder, self.limit_bytes, self.retrying = os.path.join(folder, node), limit_bytes, retrying
        os.makedirs(self.folder, exist_ok=True)
        self.fetched = 0  # shards this process fetched (not found in the cache)
        self._queue: queue.Queue | None = None
        self._owner = None  # the process whose thread serves `_queue` (a forked worker starts its own)
        self._failed: dict[str, Exception] = {}  # url -> why its background fetch failed (for its reader)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_queue": None, "_owner": None, "_failed": {}}

    def path(self, url: str) -> str:
        """Where `url` is kept: its name, after a hash of the whole URL (two stores may hold `00000.tar`)."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        return os.path.join(self.folder, f"{digest}-{os.path.basename(url.rstrip('/'))}")

    def open(self, url: str) -> io.BufferedReader:
        """The cached copy of `url` open for reading, fetched first if the node has none (an `OSError` of the
        fetch propagates), and kept from eviction until it is closed."""
        failed = self._failed.pop(url, None)
        if failed is not None:
            raise failed
        path = self.path(url)
        while True:
            lock = _lock(path + ".lock", fcntl.LOCK_SH)  # (waits while another process fetches it)
            if not os.path.exists(path):
                lock.release()
                lock = self._fetch(url, keep_shared=True)
            try:
                os.utime(path)  # (recently used: the last to be removed)
                return io.BufferedReader(_HeldFile(path, lock), COPY_BYTES)
            except FileNotFoundError:  # (removed in the instant between a fetch and its reader's lock)
                lock.release()

    def prefetch(self, urls: list[str]) -> None:
        """Fetch `urls` in this process's background thread (a failure is kept for `open` to raise)."""
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
            try:
                self._fetch(url)
            except Exception as error:  # (met again by the shard's reader, which raises it)
                self._failed[url] = error
            finally:
                urls.task_done()

    def _fetch(self, url: str, keep_shared: bool = False) -> _Lock | None:
        """Fetch `url` into the cache unless it is there, under its lock held exclusively; with `keep_shared`,
        return that lock held shared (the caller reads the shard), else let it go."""
        path = self.path(url)
        lock = _lock(path + ".lock", fcntl.LOCK_EX)
        try:
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
            if keep_shared:
                lock.share()
                lock, held = None, lock
                return held
            return None
        finally:
            if lock is not None:
                lock.release()

    def _evict(self, keep: str) -> None:
        """Remove the least recently used shards no process holds until the folder holds at most `limit_bytes`
        (`keep` stays), and the temporary files of fetches whose process is gone."""
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
            lock = None if path == keep else _lock(path + ".lock", fcntl.LOCK_EX | fcntl.LOCK_NB)
            if lock is None:  # (being read or fetched: kept)
                continue
            try:
                for name in (path, path + ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(name)
            finally:
                lock.release()
            total -= size


class _Lock:
    """A lock file this process holds (`flock`), let go by `release` (once, and only in this process: a forked
    child lets go of its copies at the fork, `_let_go_in_child`)."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor
        _HELD.add(self)

    def share(self) -> None:
        """Held exclusively, now shared (a fetch's lock handed to its reader)."""
        fcntl.flock(self.descriptor, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.descriptor is not None:
            _HELD.discard(self)
            os.close(self.descriptor)
            self.descriptor = None


class _HeldFile(io.FileIO):
    """A cached shard open for reading, its lock held shared until it is closed."""

    def __init__(self, path: str, lock: _Lock) -> None:
        self.lock = None
        super().__init__(path, "rb")
        self.lock = lock

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None


def _lock(path: str, mode: int) -> _Lock | None:
    """The lock file `path` (made if missing) held with `flock` `mode`, on the file the path names (one removed
    meanwhile by an eviction is locked anew); None with `LOCK_NB` where another holds it."""
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, mode)
        except BlockingIOError:
            os.close(descriptor)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return _Lock(descriptor)
        os.close(descriptor)


def _let_go_in_child() -> None:
    """In a forked child (a DataLoader worker): close its copies of the parent's lock descriptors, which would
    otherwise keep the parent's locks held after the parent let go."""
    for lock in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(lock.descriptor)
        lock.descriptor = None
    _HELD.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def network_file_system(folder: str, mounts: str = "/proc/mounts") -> str | None:
    """The type of the network file system `folder` is on (the deepest mount point above it in `mounts`), else
    None (a local disk, or no mount table)."""
    try:
        with open(mounts) as handle:
            table = [line.split()[1:3] for line in handle if len(line.split()) >= 3]
    except OSError:
        return None
    folder = os.path.realpath(folder)
    above = [(point, kind) for point, kind in table if folder == point or folder.startswith(point.rstrip("/") + "/")]
    if not above:
        return None
    kind = max(above, key=lambda mount: len(mount[0]))[1]
    return kind if kind in NETWORK_FILE_SYSTEMS else None
