"""Run by test_ema.py on 2 CPU processes (`torchrun --nproc_per_node 2`): a small module sharded by FSDP2's
`fully_shard` (gloo), its weight EMA checkpointed as Accelerate checkpoints it (`state_dict` on every process, the
main process's written) and restored on both. The main process writes OUTDIR/ema.json: how many values each
process's `state_dict` held, whether the main process's are the whole averages, and whether each process got its
shards back.

Usage: torchrun --nproc_per_node 2 tests/ema_worker.py OUTDIR
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from clip_accel.ema import WeightEma


def main(outdir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2, "launch with torchrun --nproc_per_node 2"
    torch.manual_seed(0)
    # Shards of 3 and 2 rows (5 x 3, 5), of 1 and 0 rows (1 x 5, 1); the first bias frozen (not averaged).
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 1))
    module[0].bias.requires_grad_(False)
    fully_shard(module, mesh=init_device_mesh("cpu", (2,)))
    ema = WeightEma(module, 0.5)
    with torch.no_grad():  # (each process's shards move differently)
        for parameter in module.parameters():
            parameter.to_local().add_(1.0 + rank)
    ema.update(torch.tensor(False))
    whole = {  # (the reference, gathered here on both processes)
        name: DTensor.from_local(
            average, parameter.device_mesh, parameter.placements, shape=parameter.shape, stride=parameter.stride()
        ).full_tensor()
        for name, parameter, average in zip(ema.names, ema.parameters, ema.averages, strict=True)
    }
    state = ema.state_dict()
    path = os.path.join(outdir, "ema.pt")
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    shards = [average.clone() for average in ema.averages]
    for average in ema.averages:
        average.zero_()
    ema.load_state_dict(torch.load(path, weights_only=True))
    report = {
        "held": sum(tensor.numel() for tensor in state["averages"].values()),
        "restored": all(map(torch.equal, ema.averages, shards)),
    }
    reports = [None, None]
    dist.all_gather_object(reports, report)
    if rank == 0:
        matches = sorted(state["averages"]) == sorted(whole)
        matches = matches and all(torch.equal(state["averages"][name], tensor) for name, tensor in whole.items())
        total = sum(tensor.numel() for tensor in whole.values())
        with open(os.path.join(outdir, "ema.json"), "w") as handle:
            json.dump({"processes": reports, "whole": matches, "values": total}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
