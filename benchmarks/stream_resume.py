"""What an elastic resume of a stream costs to compute, at up to 10^9 simulated rows (issue 41, item 5).

    python benchmarks/stream_resume.py [--rows 1e9] [--old-up-to 1e7]

A pass of ROWS rows in shards of 1,000 was read part-way by 64 processes x 4 DataLoader workers (each slot
123,456 rows in, mid-window), and resumes on 32 processes x 4 workers: the rows it has left, and each new slot's
first window of rows to read. Timed in this process (seconds, perf_counter) with its peak memory (tracemalloc:
numpy's allocations are traced), for the pass's order of clip_accel.data.stream_order, and, where this checkout
still has it, for the replay it replaces (`streaming.rows_left`: an index array of every row, each slot's shuffle
buffer replayed row by row), up to --old-up-to rows.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip_accel.data import streaming  # noqa: E402
from clip_accel.data.stream_order import PassOrder, positions_left, slot_intervals, windows  # noqa: E402

SHARD_ROWS, WINDOW, SEED, PASS = 1000, 1000, 0, 3
OLD = (64, 4)  # processes x workers that read part of the pass
NEW = (32, 4)  # the resumed launch's
CONSUMED = 123_456  # rows each old slot had consumed


def measured(work) -> tuple[float, float]:
    """(seconds, peak MB) of `work()`."""
    tracemalloc.start()
    start = time.perf_counter()
    work()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak


def new_resume(rows: int) -> None:
    order = PassOrder([SHARD_ROWS] * (rows // SHARD_ROWS), SEED, PASS)
    segments = [{"consumed": [[min(CONSUMED, rows // 512)] * OLD[1] for _ in range(OLD[0])]}]
    left = positions_left(order.total, segments, SEED, PASS, WINDOW)
    slots = NEW[0] * NEW[1]
    for slot in range(slots):
        first = next(windows(slot_intervals(left, slot, slots), WINDOW, SEED, PASS))
        list(order.runs(np.sort(first)))


def old_resume(rows: int) -> None:
    segments = [{"consumed": [[min(CONSUMED, rows // 512)] * OLD[1] for _ in range(OLD[0])]}]
    streaming.rows_left(rows, segments, SEED, PASS, WINDOW)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=float, default=1e9)
    parser.add_argument("--old-up-to", type=float, default=1e7, help="the replay's largest size (0: skip it)")
    args = parser.parse_args()
    print(f"Resume of a pass read by {OLD[0]} x {OLD[1]} slots on {NEW[0]} x {NEW[1]}; shards of {SHARD_ROWS} rows")
    print("| rows | computation | seconds | peak MB |\n|---|---|---|---|")
    sizes = [int(10**exponent) for exponent in range(6, 10) if 10**exponent <= args.rows]
    for rows in sizes:
        seconds, peak = measured(lambda rows=rows: new_resume(rows))
        print(f"| {rows:.0e} | pass order: intervals + each new slot's first window | {seconds:.2f} | {peak:.1f} |")
        if hasattr(streaming, "rows_left") and rows <= args.old_up_to:
            seconds, peak = measured(lambda rows=rows: old_resume(rows))
            print(f"| {rows:.0e} | replay (rows_left, before) | {seconds:.2f} | {peak:.1f} |")


if __name__ == "__main__":
    main()
