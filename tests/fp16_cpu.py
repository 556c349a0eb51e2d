"""Accelerate's fp16 path (float16 autocast and its grad scaler) on CPU: how the test suite runs it.

Accelerate sets up fp16 only off the CPU (accelerator.py, `Accelerator.__init__`: `self.state.mixed_precision ==
"fp16" and self.device.type != "cpu"`), though torch has both a CPU float16 autocast and a CPU grad scaler.
`keep_fp16_on_cpu` does what those lines do on a GPU (native autocast on, the scaler from Accelerate's own
`get_grad_scaler`), so `prepare` wraps the optimizer with the scaler, `backward` scales, `step` unscales and
skips, and `save_state`/`load_state` keep the scaler: the branches a GPU run of clip_accel under fp16 takes.

As a script it runs `clip-accel` so (`python tests/fp16_cpu.py train --config demo --mixed_precision fp16`):
the CPU smoke mode of benchmarks/gpu_check.sh runs its fp16 demo that way.
"""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import get_grad_scaler

_initialise = Accelerator.__init__


def keep_fp16_on_cpu(monkeypatch, **scaler_options) -> list[Accelerator]:
    """Every Accelerator made while `monkeypatch` holds takes the fp16 path on CPU; `scaler_options` go to the
    grad scaler (as GradScalerKwargs would). Returns the list those Accelerators are appended to."""
    made = []

    def with_fp16_on_cpu(self, *args, **kwargs) -> None:
        _initialise(self, *args, **kwargs)
        if self.state.mixed_precision == "fp16" and self.device.type == "cpu" and self.scaler is None:
            self.native_amp = True
            options = self.scaler_handler.to_kwargs() if self.scaler_handler is not None else {}
            self.scaler = get_grad_scaler(self.distributed_type, **{**options, **scaler_options})
        made.append(self)

    monkeypatch.setattr(Accelerator, "__init__", with_fp16_on_cpu)
    return made


if __name__ == "__main__":
    import pytest

    from clip_accel.cli import main

    with pytest.MonkeyPatch.context() as patch:
        keep_fp16_on_cpu(patch)
        main()
