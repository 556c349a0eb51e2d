"""--hard_negative_batches' order (clip_accel.data.hard_negatives): a pure function of (seed, epoch, neighbours),
every row once an epoch, groups of neighbours kept whole in the batches Accelerate cuts for any number of
processes, and the same rest of an epoch after a resume (`skip_first_batches`); the neighbours mined at the first
epoch and at each --hard_negative_refresh epoch, and after a resume only where the uninterrupted run mined."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from conftest import with_fresh_state
from torch.utils.data import DataLoader

from clip_accel.data.hard_negatives import NeighbourSampler, neighbour_order

CLUSTERS, SIZE = 12, 4  # 48 rows: row r in cluster r % 12 (spread, so the shuffle, not the layout, groups them)


def clustered_neighbours() -> np.ndarray:
    """(48, 6): each row's cluster mates first, then two rows of the next cluster, -1 padded where a list is short
    (row 0 has only its mates)."""
    rows = np.arange(CLUSTERS * SIZE)
    lists = []
    for row in rows:
        mates = [m for m in rows if m % CLUSTERS == row % CLUSTERS and m != row]
        others = [] if row == 0 else [m for m in rows if m % CLUSTERS == (row + 1) % CLUSTERS][:2]
        lists.append((mates + others + [-1] * 6)[:6])
    return np.asarray(lists, np.int64)


def sampler_of(neighbours: np.ndarray, seed: int) -> NeighbourSampler:
    """A sampler whose miner always finds `neighbours`, prepared for the first epoch."""
    sampler = NeighbourSampler(len(neighbours), SIZE, seed, lambda epoch: torch.from_numpy(neighbours))
    sampler.prepare(0)
    return sampler


def test_the_order_is_a_pure_function_of_seed_and_epoch_and_a_permutation_every_epoch():
    neighbours = sampler_of(clustered_neighbours(), seed=0).neighbours
    first = neighbour_order(neighbours, SIZE, seed=0, epoch=0)
    assert np.array_equal(first, neighbour_order(neighbours, SIZE, seed=0, epoch=0))
    assert sorted(first.tolist()) == list(range(CLUSTERS * SIZE))
    for seed, epoch in ((0, 1), (1, 0)):
        other = neighbour_order(neighbours, SIZE, seed=seed, epoch=epoch)
        assert sorted(other.tolist()) == list(range(CLUSTERS * SIZE))
        assert not np.array_equal(first, other)


def test_each_group_is_a_row_and_its_nearest_neighbours():
    order = neighbour_order(sampler_of(clustered_neighbours(), seed=3).neighbours, SIZE, 3, 0)
    groups = order.reshape(-1, SIZE) % CLUSTERS
    assert (groups == groups[:, :1]).all()  # every cluster is its first visited row's K - 1 nearest
    # A row with no candidate left is a short group: after the full ones, whatever the visit order.
    for epoch in range(4):
        order = neighbour_order([[1], [0], [3], [2], []], 2, seed=0, epoch=epoch).tolist()
        assert sorted(map(sorted, (order[0:2], order[2:4]))) == [[0, 1], [2, 3]] and order[4] == 4


def batches_of(sampler: NeighbourSampler, per_device: int, processes: int, epoch: int, done: int = 0) -> list:
    """The global batches (row lists) Accelerate's prepared loaders give `processes` processes for `epoch`, after
    skipping the first `done` (a resumed epoch), as `CachedTrainingData.epoch` asks for them."""
    rows = torch.arange(len(sampler))
    shares = []
    for process in range(processes):
        loader = DataLoader(rows, batch_size=per_device, sampler=sampler, drop_last=True)
        prepared = with_fresh_state(
            prepare_data_loader, loader, num_processes=processes, process_index=process, use_seedable_sampler=True
        )
        prepared.set_epoch(epoch)
        if done:
            prepared = skip_first_batches(prepared, done)
            prepared.set_epoch(epoch)
        shares.append([batch.tolist() for batch in prepared])
    return [sum(parts, []) for parts in zip(*shares, strict=True)]


@pytest.mark.parametrize("epoch", [0, 1])
def test_two_processes_read_one_process_s_batches_and_a_resume_reads_the_rest(epoch):
    sampler = sampler_of(clustered_neighbours(), seed=0)
    one = batches_of(sampler, 16, 1, epoch)
    assert len(one) == 3 and one == batches_of(sampler, 8, 2, epoch)
    assert one != batches_of(sampler, 16, 1, 1 - epoch)
    for batch in one:  # groups of neighbours whole in each batch of all processes
        assert all(len({row % CLUSTERS for row in batch[i : i + SIZE]}) == 1 for i in range(0, 16, SIZE))
    assert batches_of(sampler, 8, 2, epoch, done=1) == one[1:]
    assert batches_of(sampler, 16, 1, epoch, done=2) == one[2:]


def test_neighbours_are_mined_at_the_first_epoch_and_each_refresh_and_a_resume_mines_where_the_run_did(tmp_path):
    mined = []

    def mine(epoch: int) -> torch.Tensor:  # each mining finds other neighbours (the model has trained on)
        mined.append(epoch)
        return torch.from_numpy(np.roll(clustered_neighbours(), epoch, axis=0))

    def sampler(refresh_every: int) -> NeighbourSampler:
        return NeighbourSampler(CLUSTERS * SIZE, SIZE, 0, mine, refresh_every)

    with pytest.raises(RuntimeError, match="prepare"):
        iter(sampler(0))
    run, states = sampler(2), {}
    for epoch in range(5):
        run.prepare(epoch)
        run.prepare(epoch)  # (an epoch begun again mines nothing)
        run.set_epoch(epoch)
        states[epoch] = (run.state_dict(), list(run))  # (a checkpoint in the epoch, and its order)
        torch.save(states[epoch][0], tmp_path / f"{epoch}.pkl")  # (as Accelerate saves and loads it)
    assert mined == [0, 2, 4] and states[1][1] != states[2][1]
    once = sampler(0)
    for epoch in range(3):
        once.prepare(epoch)
    assert mined[3:] == [0]  # without refresh: mined once
    for checkpoint_epoch, epoch, mines in ((1, 1, []), (1, 2, [2]), (2, 3, []), (3, 4, [4])):
        # Resumed in the epoch of its checkpoint (from its middle) or in the next (from an epoch-end checkpoint).
        del mined[:]
        resumed = sampler(2)
        resumed.load_state_dict(torch.load(tmp_path / f"{checkpoint_epoch}.pkl", weights_only=False))
        resumed.prepare(epoch)
        resumed.set_epoch(epoch)
        assert mined == mines and list(resumed) == states[epoch][1]
