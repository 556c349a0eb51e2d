"""A pass's order is a pure function of (shard rows, seed, pass, slots, window); where it stands is a count per
slot, and what it has left after elastic resumes is a few intervals, checked against a brute-force replay."""

from __future__ import annotations

import numpy as np
import pytest

from clip_accel.data.stream_order import PassOrder, positions_left, slot_intervals, windows

SHARDS = [7, 0, 13, 5, 20, 1, 9]  # uneven, with an empty shard (55 rows)
SEED, PASS = 3, 1


def reading_order(own, window: int, skip: int = 0) -> list[int]:
    return [int(p) for positions in windows(own, window, SEED, PASS, skip) for p in positions]


@pytest.mark.parametrize("window", [0, 1, 4, 64])
def test_every_slot_reads_its_positions_once_and_a_pass_every_shard_row_once(window):
    order = PassOrder(SHARDS, SEED, PASS)
    rows = []
    for slot in range(3):
        own = slot_intervals([(0, order.total)], slot, 3)
        read = reading_order(own, window)
        assert sorted(read) == [p for begin, end in own.tolist() for p in range(begin, end)]
        assert reading_order(own, window, skip=5) == read[5:]  # a resume goes on where it stood
        rows += [order.shard_row(p) for p in read]
    assert sorted(rows) == [(shard, row) for shard, count in enumerate(SHARDS) for row in range(count)]


def test_a_window_is_read_from_its_shards_once_in_row_order():
    order = PassOrder(SHARDS, SEED, PASS)
    positions = next(windows([(0, order.total)], 16, SEED, PASS))
    runs = list(order.runs(np.sort(positions)))
    assert len({shard for shard, _, _ in runs}) == len(runs)  # each shard once
    assert sum(end - first for _, first, end in runs) == 16  # contiguous positions: no row in between


def test_the_order_is_a_function_of_its_integers_alone():
    def order(seed, pass_index):
        whole = PassOrder(SHARDS, seed, pass_index)
        return [whole.shard_row(int(p)) for w in windows([(0, whole.total)], 8, seed, pass_index) for p in w]

    assert order(3, 1) == order(3, 1)
    assert order(3, 1) != order(3, 2) and order(3, 1) != order(4, 1)
    assert reading_order([(0, 55)], 0) == list(range(55))  # window 0: no shuffle


def test_slots_cut_the_positions_into_contiguous_parts_as_equal_as_rows_allow():
    left = [(0, 10), (20, 25), (30, 41)]
    parts = [slot_intervals(left, slot, 4) for slot in range(4)]
    assert [p for part in parts for begin, end in part.tolist() for p in range(begin, end)] == [
        p for begin, end in left for p in range(begin, end)
    ]
    assert sorted(sum(end - begin for begin, end in part) for part in parts) == [6, 6, 7, 7]


def brute_force_left(total: int, segments: list[dict], window: int) -> list[int]:
    """Each segment's slots read in full reading order, the consumed ones taken out: positions as a list."""
    left = list(range(total))
    for segment in segments:
        counts = [count for per_process in segment["consumed"] for count in per_process]
        slots = len(counts)
        taken = set()
        for slot, count in enumerate(counts):
            own = left[len(left) * slot // slots : len(left) * (slot + 1) // slots]
            read = []
            for first in range(0, len(own), window):
                chunk = np.asarray(own[first : first + window])
                read += chunk[np.random.default_rng([SEED, PASS, int(chunk[0])]).permutation(len(chunk))].tolist()
            taken |= set(read[:count])
        left = [p for p in left if p not in taken]
    return left


def test_what_a_pass_has_left_after_elastic_resumes_equals_a_replay():
    segments = [
        {"consumed": [[3, 5], [0, 4]]},  # 2 processes x 2 workers
        {"consumed": [[2], [7], [1]]},  # then 3 processes x 1 worker
        {"consumed": [[4]]},  # then one
    ]
    for depth in range(len(segments) + 1):
        left = positions_left(55, segments[:depth], SEED, PASS, window=4)
        assert [p for begin, end in left.tolist() for p in range(begin, end)] == brute_force_left(
            55, segments[:depth], 4
        )


def test_a_billion_rows_cost_a_few_intervals_not_an_array():
    shard_rows = [1000] * 1_000_000  # 10^9 rows
    segments = [{"consumed": [[123_456] * 4 for _ in range(64)]}]  # 64 processes x 4 workers, mid-pass
    left = positions_left(sum(shard_rows), segments, SEED, PASS, window=1000)
    assert int((left[:, 1] - left[:, 0]).sum()) == 10**9 - 256 * 123_456
    assert len(left) <= 256 * (1 + 1000)  # per slot: the rest of its run, and its open window's scattered rows
    order = PassOrder(shard_rows, SEED, PASS)
    first = next(windows(slot_intervals(left, 17, 32), 1000, SEED, PASS))
    assert len(first) == 1000 and len(list(order.runs(np.sort(first)))) <= 1000
