"""`--hard_negative_batches`' order of a cached training split: rows laid out in groups of K mined neighbours
(`clip_accel.mining`), so that the near duplicates a random shuffle rarely brings together meet in one batch.

Accelerate cuts one order into the batches of all processes (each global batch is N consecutive chunks of B), so
the order alone decides which rows meet. It is a pure function of (seed, epoch, neighbours, K), as the seeded
shuffle it replaces: 1 process x 2B and 2 processes x B read the same global batches, and a resumed run (Accelerate's
`skip_first_batches` over the same sampler) the same rest of its epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch import Tensor
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
    `set_epoch` passes on (through its BatchSamplerShard to this sampler), every time it is iterated.

    The neighbours come from `mine(epoch)` ((rows, M) int64, each row's candidates nearest first, -1 where it has
    fewer than M), called by `prepare(epoch)` in the training loop's thread before the epoch is read: at the first
    epoch, and with `refresh_every` N > 0 again at the start of epochs N, 2N, ... (0-based). The neighbours in use
    and the epoch they were mined at are the checkpoint's (`state_dict`): a resumed run reads its epoch in the
    order it was begun in, and mines again only where the uninterrupted run did, with the same weights (those the
    epoch-end checkpoint holds).
    """

    def __init__(self, rows: int, group_size: int, seed: int, mine: Callable[[int], Tensor], refresh_every: int = 0):
        self.rows, self.group_size, self.seed = rows, group_size, seed
        self.mine, self.refresh_every = mine, refresh_every
        self.epoch = 0
        self.mined: Tensor | None = None  # the neighbours in use
        self.mined_epoch: int | None = None  # the epoch they were mined at
        self.neighbours: list[list[int]] = []  # `mined` as lists, -1s dropped

    def prepare(self, epoch: int) -> None:
        """Mine the neighbours for `epoch` where they are due (none yet, or a refresh epoch not mined at)."""
        due = epoch - epoch % self.refresh_every if self.refresh_every else 0
        if self.mined is None or self.mined_epoch < due:
            self._use(self.mine(epoch), epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows

    def __iter__(self) -> Iterator[int]:
        if self.mined is None:
            raise RuntimeError("NeighbourSampler: call prepare(epoch) before reading an epoch (no neighbours mined)")
        return iter(neighbour_order(self.neighbours, self.group_size, self.seed, self.epoch).tolist())

    def state_dict(self) -> dict:
        return {"neighbours": self.mined, "mined_epoch": self.mined_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state["neighbours"] is not None:
            self._use(state["neighbours"], state["mined_epoch"])

    def _use(self, mined: Tensor, epoch: int) -> None:
        if mined.shape[0] != self.rows:
            raise ValueError(f"{mined.shape[0]} rows of neighbours for a split of {self.rows} rows")
        self.mined, self.mined_epoch = mined, epoch
        self.neighbours = [[int(j) for j in row if j >= 0] for row in mined.tolist()]
