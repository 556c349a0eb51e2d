"""Run by test_fault_matrix.py on 2 CPU processes (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`): for each
kind of data the uninterrupted run, then every cell of the matrix, each run in these same processes; the main
process writes what each did to ROOT/two-processes.json.

Usage: torchrun --nproc_per_node 2 tests/fault_worker.py ROOT DEMO_DIR SHARDS MODEL_CONFIG
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fault_matrix import CELLS, KINDS, Inputs, run_cell, whole_run  # noqa: E402


def main(root: str, demo_dir: str, shards: str, model_config: str) -> None:
    assert int(os.environ.get("WORLD_SIZE", "1")) == 2, "launch with ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2"
    # One process group for every run: each run's end would destroy it, and a second rendezvous through torchrun's
    # store does not come back.
    AcceleratorState.destroy_process_group = PartialState.destroy_process_group = lambda self, group=None: None
    inputs = Inputs(root, demo_dir, shards, model_config)
    results = {}
    for kind in KINDS:
        runs = results[kind] = {"whole": whole_run(inputs, kind, 2)}
        assert dist.get_world_size() == 2  # a silent single-process launch must not pass for a two-process one
        for cell in CELLS:
            try:
                runs[cell.name] = run_cell(inputs, kind, 2, cell)
            except Exception:  # (on both processes alike: the next cell can still run)
                runs[cell.name] = {"error": traceback.format_exc()}
    if dist.get_rank() == 0:
        with open(os.path.join(root, "two-processes.json"), "w") as handle:
            json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
