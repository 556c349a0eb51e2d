"""The order of a pass over a stream, and where a pass stands: pure functions of a few integers.

A pass reads the shards in an order drawn from (seed, pass): its positions 0..rows-1 are the shards' rows end to
end in that order. They are cut into processes x DataLoader workers contiguous slots, as equal as whole rows allow
(a process reads about 1/N of the pass's bytes, whole shards but at most two, which it reads from or up to a
row). A slot reads its positions in windows of `window` consecutive ones, the rows of each window in an order drawn
from (seed, pass, the window's first position): MosaicML streaming's block shuffle, its blocks cut inside a slot
so that a window's rows are read from the shards once, in order, and handed on shuffled (memory: one window).

What a slot has consumed is a count. The positions a pass has left after any number of topologies read part of it
(an elastic resume) are intervals, computed in O(slots x window) per topology: nothing depends on the pass's
number of rows. A slot's position after `count` consumed is `count // window` whole windows and the first
`count % window` of the next one's order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

ORDER = "windows-1"  # this order's name, kept in checkpoints: one written in another order does not resume
Intervals = np.ndarray  # (k, 2) int64: [begin, end) positions of a pass, in reading order
UNSHUFFLED = 1024  # positions a slot reads at a time with window 0 (no shuffle: in order)


class PassOrder:
    """Pass `pass_index`'s order of shards of `shard_rows` rows: which shard row each position is."""

    def __init__(self, shard_rows: list[int], seed: int, pass_index: int) -> None:
        self.shard_rows = np.asarray(shard_rows, dtype=np.int64)
        self.shards = np.random.default_rng([seed, pass_index]).permutation(len(shard_rows))
        self.starts = np.concatenate([[0], np.cumsum(self.shard_rows[self.shards])])  # each shard's first position
        self.places = np.argsort(self.shards)  # each shard's place in the order

    def place(self, shard: int) -> int:
        return int(self.places[shard])

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def runs(self, positions: np.ndarray) -> Iterator[tuple[int, int, int]]:
        """The shard rows of ascending `positions` as (shard, first row, end row) runs, in position order: each
        shard's needed rows once, from its first needed row to its last."""
        places = np.searchsorted(self.starts, positions, side="right") - 1
        for place in np.unique(places).tolist():
            mine = positions[places == place] - self.starts[place]
            yield int(self.shards[place]), int(mine[0]), int(mine[-1]) + 1

    def shard_row(self, position: int) -> tuple[int, int]:
        place = int(np.searchsorted(self.starts, position, side="right")) - 1
        return int(self.shards[place]), int(position - self.starts[place])


def slot_intervals(left, slot: int, slots: int) -> Intervals:
    """Slot `slot` of `slots`: a contiguous part of the positions `left`, the parts as equal as whole rows allow."""
    left = _as_array(left)
    total = _size(left)
    return _cut(left, total * slot // slots, total * (slot + 1) // slots)


def windows(own, window: int, seed: int, pass_index: int, skip: int = 0) -> Iterator[np.ndarray]:
    """A slot's positions `own` in reading order, a window at a time (each an array, the window's order), after the
    first `skip` of that order."""
    own, size = _as_array(own), window or UNSHUFFLED
    for first in range(skip - skip % size, _size(own), size):
        positions = _positions(_cut(own, first, first + size))
        if window:
            drawn = np.random.default_rng([seed, pass_index, int(positions[0])])
            positions = positions[drawn.permutation(len(positions))]
        yield positions[max(skip - first, 0) :]


def positions_left(total: int, segments: list[dict], seed: int, pass_index: int, window: int) -> Intervals:
    """The positions of a pass of `total` rows that `segments` left: each segment is a topology that read part of
    the pass (`consumed`: per process, per DataLoader worker, how many of its slot's positions it consumed, in its
    slot's reading order); it had cut the positions the segments before it left into its slots."""
    left = _as_array([(0, total)] if total else [])
    size = window or UNSHUFFLED
    for segment in segments:
        counts = [count for per_process in segment["consumed"] for count in per_process]
        remaining = []
        for slot, count in enumerate(counts):
            own = slot_intervals(left, slot, len(counts))
            whole = count - count % size  # windows read to their end
            if count % size:  # the window read part-way: its positions not yet handed on
                started = next(windows(own, window, seed, pass_index, whole))
                remaining.append(_as_intervals(np.sort(started[count % size :])))
                whole += size
            remaining.append(_cut(own, whole, _size(own)))
        left = np.concatenate(remaining) if remaining else left[:0]
    return left


def _as_array(intervals) -> Intervals:
    return np.asarray(intervals, dtype=np.int64).reshape(-1, 2)


def _size(intervals: Intervals) -> int:
    return int((intervals[:, 1] - intervals[:, 0]).sum())


def _cut(intervals: Intervals, begin: int, end: int) -> Intervals:
    """Positions `begin` to `end` (counted through `intervals`) as intervals: O(log k) to find them."""
    offsets = np.concatenate([[0], np.cumsum(intervals[:, 1] - intervals[:, 0])])  # positions before each interval
    begin, end = max(begin, 0), min(end, int(offsets[-1]))
    if begin >= end:
        return intervals[:0]
    first = int(np.searchsorted(offsets, begin, side="right")) - 1
    last = int(np.searchsorted(offsets, end, side="left"))  # (exclusive)
    cut = intervals[first:last].copy()
    cut[0, 0] += begin - offsets[first]
    cut[-1, 1] -= offsets[last] - end
    return cut[cut[:, 0] < cut[:, 1]]


def _positions(intervals: Intervals) -> np.ndarray:
    """Every position of `intervals`, in order."""
    lengths = intervals[:, 1] - intervals[:, 0]
    starts = np.repeat(intervals[:, 0] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return starts + np.arange(int(lengths.sum()))


def _as_intervals(positions: np.ndarray) -> Intervals:
    """Ascending positions as maximal intervals."""
    if not len(positions):
        return np.empty((0, 2), np.int64)
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    firsts, lasts = positions[np.concatenate([[0], breaks])], positions[np.concatenate([breaks - 1, [-1]])]
    return np.stack([firsts, lasts + 1], axis=1)
