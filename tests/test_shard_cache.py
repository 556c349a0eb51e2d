"""The node-local shard cache (`--shard_cache_dir`) shared by a node's processes, and by nodes whose folders lie on
one shared file system: no shard removed under a reader, no node's files removed by another."""

from __future__ import annotations

import glob
import os
import socket
import threading
import time

import pytest
from test_streaming import write_shards

import clip_accel.data.shard_cache as shard_cache_module
from clip_accel.data.shard_cache import ShardCache
from clip_accel.data.shards import TarShards

NO_PROCESS = 2**22 + 1  # (above Linux's largest pid_max: no process has it)


@pytest.fixture
def shards(tmp_path) -> list[str]:
    """Three shards of 4 rows, read through the cache as a shared file system's would be."""
    write_shards(str(tmp_path / "shards"), [4, 4, 4])
    return sorted(glob.glob(str(tmp_path / "shards" / "*.tar")))


def age(path: str, seconds: float) -> None:
    """`path` last used `seconds` ago (the least recently used is the first evicted)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_another_process_evicting_at_the_cache_hit_never_takes_the_shard_being_opened(shards, tmp_path, monkeypatch):
    size = os.path.getsize(shards[0])
    reader = ShardCache(str(tmp_path / "cache"), int(1.5 * size))
    other = ShardCache(str(tmp_path / "cache"), int(1.5 * size))  # another process of the node
    stream = TarShards(shards, cache=reader)
    assert len(list(stream.rows(0))) == 4  # (shard 0 now in the cache)
    age(reader.path(shards[0]), 60)
    utime = os.utime

    def other_process_fetches_then(path, *args, **kwargs):  # (at the cache hit, before the shard is opened)
        monkeypatch.setattr(os, "utime", utime)
        other.prefetch([shards[1]])  # over 1.5 shards: its eviction picks the least recently used, shard 0
        other.wait()
        return utime(path, *args, **kwargs)

    monkeypatch.setattr(os, "utime", other_process_fetches_then)
    assert len(list(stream.rows(0))) == 4
    assert other.fetched == 1 and reader.fetched == 1  # (the reader's copy kept: read, not fetched again)


def test_a_shard_being_read_is_kept_from_eviction_and_evicted_once_closed(shards, tmp_path):
    size = os.path.getsize(shards[0])
    reader = ShardCache(str(tmp_path / "cache"), int(1.5 * size))
    other = ShardCache(str(tmp_path / "cache"), int(1.5 * size))
    rows = TarShards(shards, cache=reader).rows(0)
    next(rows)  # (shard 0 open, 1 row read)
    age(reader.path(shards[0]), 60)
    other.prefetch([shards[1], shards[2]])
    other.wait()
    assert os.path.exists(reader.path(shards[0]))  # (the limit waits for its reader: shard 1 went instead)
    assert len(list(rows)) == 3
    other.prefetch([shards[1]])
    other.wait()
    assert not os.path.exists(reader.path(shards[0])) and os.path.exists(other.path(shards[1]))


def test_nodes_sharing_a_cache_folder_never_remove_each_other_s_files(shards, tmp_path, monkeypatch):
    folder = str(tmp_path / "shared-cache")
    monkeypatch.setattr(socket, "gethostname", lambda: "node-b")
    node_b = ShardCache(folder, 10**9)
    node_b.prefetch([shards[0]])
    node_b.wait()
    fetching = node_b.path(shards[1]) + f".part{NO_PROCESS}"  # node b fetches, its pid unknown on node a
    with open(fetching, "wb") as handle:
        handle.write(b"half a shard")
    monkeypatch.setattr(socket, "gethostname", lambda: "node-a")
    node_a = ShardCache(folder, 1)  # (evicts all it can)
    stale = node_a.path(shards[1]) + f".part{NO_PROCESS}"  # node a's own fetch, whose process died
    with open(stale, "wb") as handle:
        handle.write(b"half a shard")
    node_a.prefetch([shards[2]])
    node_a.wait()
    assert os.path.exists(fetching) and os.path.exists(node_b.path(shards[0]))
    assert not os.path.exists(stale) and os.path.exists(node_a.path(shards[2]))


def test_a_failed_background_fetch_never_hangs_and_its_reader_meets_the_error(shards, tmp_path, monkeypatch):
    cache = ShardCache(str(tmp_path / "cache"), 10**9)

    def broken(*args, **kwargs):
        raise TypeError("a bug in the fetch")

    monkeypatch.setattr(shard_cache_module, "open_shard", broken)
    cache.prefetch([shards[0]])
    waiting = threading.Thread(target=cache.wait, daemon=True)
    waiting.start()
    waiting.join(timeout=30)
    assert not waiting.is_alive()
    with pytest.raises(TypeError, match="a bug in the fetch"):
        list(TarShards(shards, cache=cache).rows(0))


def test_a_cache_folder_on_a_network_file_system_is_named_in_a_warning(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/export {tmp_path / 'nfs'} nfs4 rw,relatime 0 0\n"
        f"/dev/sdb1 {tmp_path / 'nfs' / 'local'} xfs rw 0 0\n"
    )
    assert shard_cache_module.network_file_system(str(tmp_path / "nfs" / "cache"), str(mounts)) == "nfs4"
    assert shard_cache_module.network_file_system(str(tmp_path / "nfs" / "local" / "cache"), str(mounts)) is None
    assert shard_cache_module.network_file_system(str(tmp_path / "elsewhere"), str(mounts)) is None
