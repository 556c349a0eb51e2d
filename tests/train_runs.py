"""Several `clip-accel train` runs in one launch, one after another: how tests/test_fsdp.py gets its uninterrupted
runs without paying a launch (two processes importing torch, transformers and datasets) for each.

    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/train_runs.py RUNS.json

RUNS.json holds a list of `clip-accel train` option lists. Each run is `train_main(options)`, the function
scripts/train.py calls; Accelerate's process state is reset after each, so the next run builds its Accelerator
afresh, as in a new launch. The runs share the launch's process group: Accelerate's end of training leaves it
standing (a group made again in the same processes can read the store keys the last one left and hang).
Before each run every process writes `=== run N ===` to stderr, so the tests read each run's lines apart
(`run_logs`). tests/fsdp_train.py runs such a file under FSDP2 (`--runs RUNS.json`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed
from accelerate.state import AcceleratorState, GradientState, PartialState

from clip_accel.cli import train_main

MARK = "=== run {} ==="


def train_runs(path: str, before_each: Callable[[], None] = lambda: None) -> None:
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    for index, options in enumerate(json.loads(Path(path).read_text())):
        before_each()
        print(MARK.format(index), file=sys.stderr, flush=True)
        try:
            train_main(options)
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
    PartialState.destroy_process_group = destroy
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_logs(stderr: str, count: int) -> list[str]:
    """The stderr of each of a launch's `count` runs, from its first process's mark to the next run's. Every line a
    run writes from its start-up to its last step falls there (its processes meet in the process group between
    the marks); a main process's last lines (the results table) may follow the next run's mark."""
    starts = [stderr.index(MARK.format(index)) for index in range(count)]
    return [stderr[start:end] for start, end in zip(starts, [*starts[1:], len(stderr)], strict=True)]


if __name__ == "__main__":
    train_runs(sys.argv[1])
