"""Start-up checks of what the launcher started against what Accelerate made of it: before any work is done."""

from __future__ import annotations

import os
import secrets

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from .config import DataConfig, UserError
from .data import preprocessing_cache_dir
from .data.sources import data_source_dir


def check_supported_launch() -> None:
    """Stop before any work on a launch clip_accel's tests never run (read from what `accelerate launch` sets,
    before any Accelerator exists): DeepSpeed, whose engine takes over accumulation, clipping and the float32
    weights, and FSDP version 1. FSDP2 is supported."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true"):
        raise UserError(
            "clip_accel does not run under DeepSpeed (the launch set ACCELERATE_USE_DEEPSPEED): for sharded "
            "training use FSDP2 (`accelerate launch --config_file accelerate_configs/fsdp.yaml ...`); CLIP ViT-B/32 "
            "and ViT-L/14 with their AdamW state fit on one GPU each, where DDP (multi_gpu.yaml) is faster."
        )
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError(
            "clip_accel runs FSDP version 2 only (the launch asked for FSDP version "
            f"{os.environ.get('FSDP_VERSION', '1')}): set `fsdp_version: 2` in the accelerate config, as "
            "accelerate_configs/fsdp.yaml does."
        )


def check_fsdp_layers(model: torch.nn.Module) -> None:
    """Under FSDP, every layer class the accelerate config wraps (`fsdp_transformer_layer_cls_to_wrap`) must be in
    this model: accelerate_configs/fsdp.yaml names CLIP's, and SigLIP's and SigLIP 2's are called otherwise."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true"):
        return
    wrapped = [name for name in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name]
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in wrapped if name not in present]
    if missing:
        layers = ",".join(sorted(name for name in present if name.endswith("EncoderLayer")))
        raise UserError(
            f"The accelerate config's fsdp_transformer_layer_cls_to_wrap names {','.join(missing)}, which this "
            f"{type(model).__name__} does not have: set `fsdp_transformer_layer_cls_to_wrap: {layers}` there."
        )


def check_launch(accelerator: Accelerator) -> None:
    """Stop before any work when the processes or the precision are not what the launch asked for."""
    check_processes(accelerator)
    check_precision(accelerator)


def check_processes(accelerator: Accelerator) -> None:
    """torchrun (or any launcher) started WORLD_SIZE processes, but Accelerate joined none of them: without a GPU
    and without ACCELERATE_USE_CPU=1 it sets up one independent run per process, all writing the same folder."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise UserError(
            f"The launcher started {launched} processes, but Accelerate sees {accelerator.num_processes} "
            f"({accelerator.distributed_type.value} on {accelerator.device.type}): each process would train on "
            "its own and overwrite the others' files. On a machine without GPUs set ACCELERATE_USE_CPU=1 "
            "(`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...`); on GPUs check that every process sees one."
        )


def check_precision(accelerator: Accelerator) -> None:
    if accelerator.mixed_precision == "no":
        return
    device = accelerator.device.type
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        # Accelerate makes fp16's autocast and grad scaler only off the CPU (accelerator.py: `mixed_precision ==
        # "fp16" and self.device.type != "cpu"`); elsewhere it would train in float32 and log fp16.
        raise UserError(
            f"--mixed_precision fp16 runs with a grad scaler, which Accelerate sets up on GPUs only: on {device} "
            "the run would train in float32 while reporting fp16. Use --mixed_precision bf16 (or no) here."
        )
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    if dtype is None or not torch.amp.is_autocast_available(device):
        raise UserError(
            f"--mixed_precision {accelerator.mixed_precision} is not available on {device}; use "
            "--mixed_precision no (or bf16 where supported)."
        )
    with torch.autocast(device, dtype=dtype):
        probe = torch.ones(2, 2, device=accelerator.device) @ torch.ones(2, 2, device=accelerator.device)
    if probe.dtype != dtype:
        raise UserError(
            f"{device} autocast does not compute in {dtype} here; use --mixed_precision no or another precision."
        )


def check_checkpoint_storage(accelerator: Accelerator, node_local: bool) -> None:
    """FSDP2 checkpoints are sharded (torch.distributed.checkpoint), and their `.metadata`, which every shard's
    loading needs, is written by the first process only: with node-local output folders the other nodes would
    keep shards they cannot load. Stop before training instead of at the first resume."""
    if node_local and accelerator.is_fsdp2:
        raise UserError(
            "FSDP2 with a node-local --output_dir: each node would keep its shards of every checkpoint, but only "
            "the first node the index of them (.metadata), so no run could resume. Give every node the same "
            "--output_dir on shared storage, or train with DDP (accelerate_configs/multi_gpu.yaml), whose "
            "checkpoints each node keeps whole."
        )


def storage_is_shared(accelerator: Accelerator, folder: str) -> bool:
    """True when every process sees the same `folder` (one filesystem for all nodes), False when each node sees
    its own (node-local disks). Each node's first process drops a marker there; every process counts the markers
    it can see. A mix (some nodes share, others do not) stops the run."""
    if accelerator.num_processes == 1:
        return True
    os.makedirs(folder, exist_ok=True)
    nonce = broadcast_object_list([secrets.token_hex(8)])[0]  # this run's markers only, never a crashed run's
    marker = os.path.join(folder, f".clip_accel-storage-{nonce}-{accelerator.process_index}")
    if accelerator.is_local_main_process:
        open(marker, "w").close()
    accelerator.wait_for_everyone()
    seen = sum(name.startswith(f".clip_accel-storage-{nonce}-") for name in os.listdir(folder))
    views = gather_object([(accelerator.is_local_main_process, seen)])
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        os.remove(marker)
    nodes = sum(is_first for is_first, _ in views)
    if all(count == nodes for _, count in views):
        return True
    if all(count == 1 for _, count in views):
        return False
    raise UserError(
        f"{folder} is shared by some nodes but not all (each process saw {[count for _, count in views]} of "
        f"{nodes} nodes): give it to every node on one shared filesystem, or give every node a disk of its own."
    )


def data_prepared_per_node(accelerator: Accelerator, config: DataConfig) -> bool:
    """Whether each node writes its own demo catalogue and preprocessing cache: their folders are node-local."""
    folders = [preprocessing_cache_dir(config)] + ([data_source_dir(config)] if config.demo else [])
    return not all(storage_is_shared(accelerator, folder) for folder in folders)


def check_streaming_launch(accelerator: Accelerator, config: DataConfig) -> None:
    """--streaming is tested on one process, under DDP and under FSDP2; not under FSDP1."""
    if config.streaming and accelerator.distributed_type.value == "FSDP" and not accelerator.is_fsdp2:
        raise UserError(
            "--streaming runs on one device, under DDP or under FSDP2 (tested): set fsdp_version: 2 in the "
            "Accelerate config (accelerate_configs/fsdp.yaml), or drop --streaming."
        )
