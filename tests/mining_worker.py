"""Run by test_mining.py on 2 CPU processes (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`): the demo run with
--hard_negative_batches; the main process writes what it did to ROOT/two-processes.json.

Usage: torchrun --nproc_per_node 2 tests/mining_worker.py ROOT DEMO_DIR MODEL_CONFIG
"""

from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from accelerate.state import AcceleratorState, PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_fault_matrix import Inputs, configs, observed_training  # noqa: E402
from test_mining import OPTION  # noqa: E402


def main(root: str, demo_dir: str, model_config: str) -> None:
    assert int(os.environ.get("WORLD_SIZE", "1")) == 2, "launch with ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2"
    # The process group kept to the end: the record gathers every process's batches after the run.
    AcceleratorState.destroy_process_group = PartialState.destroy_process_group = lambda self, group=None: None
    output = os.path.join(root, "two")
    record = observed_training(configs(Inputs(root, demo_dir, "", model_config), "cached", 2, output, **OPTION))
    if dist.get_rank() == 0:
        with open(os.path.join(root, "two-processes.json"), "w") as handle:
            json.dump(record | {"output": output}, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
