"""Weight EMA (`--ema_decay`): an exponential moving average of the trainable parameters, kept in float32 on the
device and updated after every optimizer step with foreach ops, nothing read back to the host.

    ema <- ema + (1 - d) x (weights - ema)      (d = --ema_decay; a skipped step moves nothing)

With `--ema_warmup`, d = min(decay, 1 - (1 + t)^(-2/3)) at the t-th applied update (timm's `ModelEmaV3` warm-up,
gamma 1, power 2/3), so early weights are not averaged in for long. Frozen parameters and buffers are not
averaged: the EMA model takes them as they are. Under FSDP2 each process averages its own shards, and a
checkpoint gathers them whole on the main process alone. Memory: one float32 copy of the trainable parameters
(4 bytes each: ~0.6 GB for ViT-B/32's 151 M), and while the EMA weights are evaluated the trained ones are set
aside in another.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from .config import UserError

WARMUP_POWER = 2 / 3


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's values on this process: its shard under FSDP2 (a view: writing it writes the parameter)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _whole_on_main(shard: torch.Tensor, parameter: DTensor) -> torch.Tensor | None:
    """The whole tensor whose part `parameter`'s placements give this process as `shard`, on the main process
    (global rank 0), gathered there from every process's part; None on the others. A gather, not the all-gather of
    `full_tensor()`: only the main process ever holds the whole tensor."""
    mesh, placements = parameter.device_mesh, parameter.placements
    ranks = mesh.mesh.flatten().tolist()
    main = torch.distributed.get_rank() == 0
    if sorted(ranks) != list(range(torch.distributed.get_world_size())) or not all(
        type(placement) in (Shard, Replicate) for placement in placements
    ):  # (not FSDP2's layout, whose parts this reassembles: every process gathers the whole, as before)
        whole = DTensor.from_local(shard, mesh, placements, shape=parameter.shape, stride=parameter.stride())
        whole = whole.full_tensor()  # (a collective: every process takes part)
        return whole if main else None
    parts = {rank: _part(parameter.shape, mesh.mesh, placements, rank) for rank in ranks}
    size = max(math.prod(stop - start for start, stop in part) for part in parts.values())  # (parts differ by a row)
    sent = torch.zeros(size, dtype=shard.dtype, device=shard.device)
    sent[: shard.numel()] = shard.reshape(-1)
    received = [torch.empty_like(sent) for _ in ranks] if main else None
    torch.distributed.gather(sent, received, dst=0)
    if not main:
        return None
    whole = torch.empty(parameter.shape, dtype=shard.dtype)  # (on the host: the device holds only what came)
    for rank, part in parts.items():
        region = tuple(slice(start, stop) for start, stop in part)
        whole[region] = received[rank][: whole[region].numel()].reshape(whole[region].shape).cpu()
    return whole


def _part(shape: torch.Size, ranks: torch.Tensor, placements, rank: int) -> list[tuple[int, int]]:
    """(start, stop) along each dimension of the part a process holds: a Shard(d) placement splits dimension d as
    `torch.chunk` does (the last parts may be shorter or empty), once per mesh dimension that shards it."""
    coordinate = (ranks == rank).nonzero()[0].tolist()
    part = [(0, size) for size in shape]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            start, stop = part[placement.dim]
            chunk = -(-(stop - start) // ranks.shape[mesh_dim])
            first = min(start + coordinate[mesh_dim] * chunk, stop)
            part[placement.dim] = (first, min(first + chunk, stop))
    return part


class WeightEma:
    """The EMA of `module`'s trainable parameters (module docstring); `update` after each optimizer step."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        named = [(name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad]
        self.names = [name for name, _ in named]
        self.parameters = [parameter for _, parameter in named]
        self.averages = [_local(parameter).detach().float().clone() for parameter in self.parameters]
        device = self.averages[0].device if self.averages else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.float32, device=device)  # applied updates, on the device

    def current_decay(self) -> torch.Tensor:
        """d for the next update (a device tensor: the warm-up counts applied updates on the device)."""
        decay = torch.full_like(self.updates, self.decay)
        if self.warmup:
            return torch.minimum(decay, 1 - (2 + self.updates) ** -WARMUP_POWER)
        return decay

    @torch.no_grad()
    def update(self, skipped: torch.Tensor) -> None:
        """One step of the recurrence, unless `skipped` (the step's 0-D bool device flag: non-finite gradients)."""
        applied = (~skipped).float()
        weight = (1 - self.current_decay()) * applied
        current = [_local(parameter).detach().float() for parameter in self.parameters]
        torch._foreach_lerp_(self.averages, current, weight)
        self.updates += applied

    @contextmanager
    def applied(self):
        """Inside the block the model holds the EMA weights (to evaluate or save them); the trained ones after."""
        trained = [_local(parameter).detach().clone() for parameter in self.parameters]
        with torch.no_grad():
            for parameter, average in zip(self.parameters, self.averages, strict=True):
                _local(parameter).copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, values in zip(self.parameters, trained, strict=True):
                    _local(parameter).copy_(values)

    def state_dict(self) -> dict:
        """Whole tensors. Under FSDP2 every process calls this (as Accelerate's save_state does) and sends its shards
        to the main process, the only one that writes an FSDP2 checkpoint (node-local output folders are refused
        under FSDP2): the others keep none of the averages."""
        averages = {}
        for name, parameter, average in zip(self.names, self.parameters, self.averages, strict=True):
            whole = _whole_on_main(average, parameter) if isinstance(parameter, DTensor) else average
            if whole is not None:
                averages[name] = whole.cpu()
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates.cpu(), "averages": averages}

    def load_state_dict(self, state: dict) -> None:
        if sorted(state["averages"]) != sorted(self.names):
            raise UserError(
                "The checkpoint's weight EMA covers other parameters than this run trains (another --freeze or "
                "--lora_rank?): resume with the options that wrote it."
            )
        for index, (name, parameter) in enumerate(zip(self.names, self.parameters, strict=True)):
            whole = state["averages"][name].to(self.averages[index].device)
            if isinstance(parameter, DTensor):  # this process's shard of the whole tensor
                whole = distribute_tensor(whole, parameter.device_mesh, parameter.placements, src_data_rank=None)
                whole = whole.to_local()
            self.averages[index].copy_(whole)
        self.updates.copy_(state["updates"])
