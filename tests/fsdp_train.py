"""`clip-accel train` under FSDP2 on CPU processes: how the test suite runs Accelerate's FSDP2 path.

Launched as `ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/fsdp.yaml tests/fsdp_train.py
...`: the real config file, the real launcher (which sets ACCELERATE_USE_FSDP and the FSDP_* options) and the real
entry point. One thing differs from a GPU launch: Accelerate only keeps an FSDP plugin for GPU-like process groups
and turns it into plain multi-CPU DDP otherwise. This script puts it back, so `accelerator.prepare` shards the
model with `fully_shard`, which torch runs on CPU tensors over gloo. Everything clip_accel does under FSDP2 (the
sharded forward hooks, the float32 best-model save, sharded checkpoints, the broadcast reload) is then what runs.

`tests/fsdp_train.py --runs RUNS.json` trains each run of RUNS.json in turn, in the same launch (tests/train_runs.py).
"""

import sys

import torch.distributed.fsdp
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from train_runs import train_runs

from clip_accel.cli import train_main

_initialise = AcceleratorState.__init__


def _keep_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs) -> None:
    _initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":  # Accelerate's default FSDP2 policy (state.py), as on GPUs
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as Accelerate records it on GPUs


_fully_shard, _reported = torch.distributed.fsdp.fully_shard, set()


def _reporting_fully_shard(module, *args, mp_policy=None, **kwargs):
    """Accelerate's `fully_shard` calls, each precision policy they pass written once to stderr for the tests."""
    policy = (str(getattr(mp_policy, "param_dtype", None)), str(getattr(mp_policy, "reduce_dtype", None)))
    if policy not in _reported:
        _reported.add(policy)
        print(f"fully_shard mp_policy: param_dtype={policy[0]} reduce_dtype={policy[1]}", file=sys.stderr)
    return _fully_shard(module, *args, mp_policy=mp_policy, **kwargs)


if __name__ == "__main__":
    AcceleratorState.__init__ = _keep_fsdp_on_cpu
    torch.distributed.fsdp.fully_shard = _reporting_fully_shard  # Accelerate imports it when it prepares
    if sys.argv[1:2] == ["--runs"]:
        train_runs(sys.argv[2], before_each=_reported.clear)  # each run writes its own policies
    else:
        train_main()
