"""Run by test_streaming.py: `evaluate_folder` on a stream's test split (read whole by the main process), recording
the size of each object list the main process broadcasts to the others (pickled); the main process writes the
figures and those sizes to OUTPUT as JSON. Launched on PROCESSES processes (`ACCELERATE_USE_CPU=1 torchrun`, one
node or one process per "node"), or called in-process with 1.

Usage: torchrun ... tests/stream_eval_worker.py MODEL SHARDS CACHE OUTPUT PROCESSES
"""

from __future__ import annotations

import json
import os
import pickle
import sys

from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_streaming import stream_config  # noqa: E402

import clip_accel.data  # noqa: E402
from clip_accel.evaluation import evaluate_folder  # noqa: E402


def main(model: str, shards: str, cache: str, output: str, processes: int) -> None:
    sent, broadcast = [], clip_accel.data.broadcast_object_list

    def measured(objects: list, from_process: int = 0):
        if PartialState().is_main_process:
            sent.append(len(pickle.dumps(objects)))
        return broadcast(objects, from_process)

    clip_accel.data.broadcast_object_list = measured
    try:
        metrics = evaluate_folder(model, stream_config(shards, cache_dir=cache), batch_size=16)
    finally:
        clip_accel.data.broadcast_object_list = broadcast
    state = PartialState()
    assert state.num_processes == processes, f"{state.num_processes} processes; launch with ACCELERATE_USE_CPU=1"
    if state.is_main_process:
        with open(output, "w") as handle:
            json.dump({"metrics": metrics, "broadcast_bytes": sent}, handle)
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:5], int(sys.argv[5]))
