"""`clip-accel train` under FSDP2 on CPU processes: how the test suite runs Accelerate's FSDP2 path.

Launched as `ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/fsdp.yaml tests/fsdp_train.py
...`: the real config file, the real launcher (which sets ACCELERATE_USE_FSDP and the FSDP_* options) and the real
entry point. One thing differs from a GPU launch: Accelerate only keeps an FSDP plugin for GPU-like process groups
and turns it into plain multi-CPU DDP otherwise. This script puts it back, so `accelerator.prepare` shards the
model with `fully_shard`, which torch runs on CPU tensors over gloo. Everything clip_accel does under FSDP2 (the
sharded forward hooks, the float32 best-model save, sharded checkpoints, the broadcast reload) is then what runs.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from clip_accel.cli import train_main

_initialise = AcceleratorState.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as Accelerate records it on GPUs


if __name__ == "__main__":
    AcceleratorState.__init__ = _keep_fsdp_on_cpu
    train_main()
