"""Run by test_streaming.py on 2 CPU processes (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`): each process
reads its share of WebDataset shards through 2 DataLoader workers for 2 epochs, then again with a resume half way
through the first; the main process writes every process's caption ids per epoch to OUTDIR/streamed.json.

Usage: torchrun --nproc_per_node 2 tests/streaming_worker.py SHARDS OUTDIR
"""

from __future__ import annotations

import json
import os
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_streaming import BATCH, read_caption_ids, streaming_loader  # noqa: E402


def main(shards: str, outdir: str) -> None:
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, "launch with ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2"
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = streaming_loader(shards, rank, world, workers=2)
    epochs = [read_caption_ids(loader, len(loader)) for _ in range(2)]
    # Resume: 3 batches of the first epoch, the position they leave, a new loader restored there, the rest.
    first = streaming_loader(shards, rank, world, workers=2)
    head = read_caption_ids(first, 3)
    resumed = streaming_loader(shards, rank, world, workers=2)
    resumed.load_state_dict(gather_object([first.state_dict()]))
    tail = read_caption_ids(resumed, 0, resumed.epoch(0, done=3))
    result = gather_object([{"epochs": epochs, "resumed": head + tail, "batches": len(loader), "batch": BATCH}])
    if accelerator.is_main_process:
        with open(os.path.join(outdir, "streamed.json"), "w") as handle:
            json.dump(result, handle)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
