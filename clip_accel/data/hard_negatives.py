"""`--hard_negative_batches`' order of a cached training split: rows laid out in groups of K mined neighbours
(`clip_accel.mining`), so that the near duplicates a random shuffle rarely brings together meet in one batch.

Accelerate cuts one order into the batches of all processes (each global batch is N consecutive chunks of B), so
the order alone decides which rows meet. It is a pure function of (seed, epoch, neighbours, K), as the seeded
shuffle it replaces: 1 process x 2B and 2 processes x B read the same global batches, and a resumed run (Accelerate's
`skip_first_batches` over the same sampler) the same rest of its epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def neighbour_order(neighbours: list[list[int]], group_size: int, seed: int, epoch: int) -> np.ndarray:
    """(N,) a permutation of the N rows for `epoch`, in groups of `group_size` neighbours.

    `neighbours`: each row's candidates, nearest first (false negatives already dropped). Rows are visited in a
    shuffle seeded by (seed, epoch); a row not yet placed opens a group and takes its nearest candidates not yet
    placed, up to `group_size` rows (fewer where its list runs out). The full groups come first, in the order they
    opened, then the rows of the short groups in theirs (random rows: an ordinary shuffled tail). Packed so: with
    `group_size` dividing the batch of all processes, no group is ever cut by a batch boundary, and the rows an
    epoch drops (drop_last) are rows left over by the grouping, other ones each epoch.
    """
    placed = np.zeros(len(neighbours), dtype=bool)
    full, short = [], []
    for row in np.random.default_rng([seed, epoch]).permutation(len(neighbours)).tolist():
        if placed[row]:
            continue
        group = [row]
        placed[row] = True
        for candidate in neighbours[row]:
            if len(group) == group_size:
                break
            if not placed[candidate]:
                group.append(candidate)
                placed[candidate] = True
        (full if len(group) == group_size else short).append(group)
    return np.fromiter((row for group in full + short for row in group), dtype=np.int64, count=len(neighbours))


class NeighbourSampler(Sampler[int]):
    """The training DataLoader's sampler under --hard_negative_batches: `neighbour_order` of the epoch Accelerate's
    `set_epoch` passes on (through its BatchSamplerShard to this sampler), every time it is iterated."""

    def __init__(self, neighbours: np.ndarray, group_size: int, seed: int) -> None:
        """`neighbours`: (N, M) int64, each row's candidates nearest first, -1 where it has fewer than M."""
        self.neighbours = [[int(j) for j in row if j >= 0] for row in neighbours]
        self.group_size, self.seed, self.epoch = group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.neighbours)

    def __iter__(self) -> Iterator[int]:
        return iter(neighbour_order(self.neighbours, self.group_size, self.seed, self.epoch).tolist())
