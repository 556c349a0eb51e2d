"""Weight EMA (`--ema_decay`): an exponential moving average of the trainable parameters, kept in float32 on the
device and updated after every optimizer step with foreach ops, nothing read back to the host.

    ema <- ema + (1 - d) x (weights - ema)      (d = --ema_decay; a skipped step moves nothing)

With `--ema_warmup`, d = min(decay, 1 - (1 + t)^(-2/3)) at the t-th applied update (timm's `ModelEmaV3` warm-up,
gamma 1, power 2/3), so early weights are not averaged in for long. Frozen parameters and buffers are not
averaged: the EMA model takes them as they are. Under FSDP2 each process averages its own shards. Memory: one
float32 copy of the trainable parameters (4 bytes each: ~0.6 GB for ViT-B/32's 151 M), and while the EMA
weights are evaluated the trained ones are set aside in another.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from .config import UserError

WARMUP_POWER = 2 / 3


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's values on this process: its shard under FSDP2 (a view: writing it writes the parameter)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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
        """Whole tensors (FSDP2 shards gathered: every process calls this, as Accelerate's save_state does)."""
        averages = {}
        for name, parameter, average in zip(self.names, self.parameters, self.averages, strict=True):
            if isinstance(parameter, DTensor):
                average = DTensor.from_local(
                    average,
                    parameter.device_mesh,
                    parameter.placements,
                    shape=parameter.shape,
                    stride=parameter.stride(),
                ).full_tensor()
            averages[name] = average.cpu()
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
