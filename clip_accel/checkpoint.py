"""Checkpoints and the best model, both written so that a kill never leaves a half-written folder behind.

OUTPUT/checkpoints/step-0000040/ holds `accelerator.save_state` (model as safetensors, optimizer, grad scaler,
every process's RNG state) plus `trainer_state.json` (step, epoch, batches consumed in that epoch, schedule,
early-stopping state, log history). A rename is atomic, so a `step-*` folder is always complete; a kill during a
save leaves only a `.staging-*` folder, which is ignored and replaced next time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.distributed.tensor import DTensor, distribute_tensor

from .lora import ADAPTER_DIR, has_lora, merged_state_dict, save_adapter
from .model import ContrastiveModel, unwrap

logger = get_logger(__name__)
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where the loop is. Everything a resumed run needs beyond what `accelerator.save_state` keeps."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    initial: dict = field(default_factory=dict)  # the starting model's test metrics
    unlogged_losses: list = field(default_factory=list)  # losses of the current logging interval so far
    early_stopping: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    sharded: bool = False  # written under FSDP2 (a sharded model and optimizer)
    num_processes: int = 1
    stream: list = field(default_factory=list)  # --streaming: each process's position in the stream (data.streaming)


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: TrainerState, keep: int) -> str:
    """Every process calls this (each saves its own RNG state). The main process writes the rest, renames and
    prunes; with node-local output folders (`save_on_each_node`), each node's first process does, in its own."""
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{state.step:07d}")
    staging = os.path.join(root, f".staging-step-{state.step:07d}")
    writer = (
        accelerator.is_local_main_process
        if accelerator.project_configuration.save_on_each_node
        else accelerator.is_main_process
    )
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if writer:
        with open(os.path.join(staging, STATE_FILE), "w") as handle:
            json.dump(asdict(state), handle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}", main_process_only=False)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(match.group(1)), name) for name in os.listdir(root) if (match := _NAME.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def resolve_checkpoint(output_dir: str, which: str) -> str:
    """`latest` (the newest complete checkpoint in output_dir) or a checkpoint folder path."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(
                f"--resume_from_checkpoint latest: {output_dir}/{CHECKPOINTS} holds no checkpoint. "
                "Start without it, or pass a checkpoint folder."
            )
        return found[-1]
    if not os.path.isfile(os.path.join(which, STATE_FILE)):
        raise ValueError(
            f"--resume_from_checkpoint {which!r} is not a checkpoint folder (no {STATE_FILE}); "
            f"checkpoints live in OUTPUT/{CHECKPOINTS}/step-*."
        )
    return which


def load_checkpoint(accelerator: Accelerator, path: str) -> TrainerState:
    """Restore model, optimizer, scaler and RNG (Accelerate loads with weights_only=True) and the loop state."""
    with open(os.path.join(path, STATE_FILE)) as handle:
        state = TrainerState(**json.load(handle))
    _check_resumable(accelerator, state, path)
    accelerator.load_state(path)
    logger.info(
        f"Resumed from {path}: step {state.step}, epoch {state.epoch + 1}, "
        f"{state.batches_in_epoch} batches of that epoch already done"
    )
    return state


def _check_resumable(accelerator: Accelerator, state: TrainerState, path: str) -> None:
    """A DDP checkpoint holds whole tensors and resumes on any number of processes; an FSDP2 one holds shards,
    resumed here only under FSDP2 on as many processes as wrote it (the combinations the tests run)."""
    sharded = accelerator.is_fsdp2
    if state.sharded == sharded and (not sharded or state.num_processes == accelerator.num_processes):
        return
    written = f"FSDP2 on {state.num_processes} processes" if state.sharded else "DDP (or one process)"
    now = f"FSDP2 on {accelerator.num_processes} processes" if sharded else "DDP (or one process)"
    raise ValueError(
        f"{path} was written under {written} and this run is {now}: resume it with the launch that wrote it, "
        "or start from its best model (--model_name_or_path OUTPUT) instead of resuming."
    )


def load_from_main_process(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Fill `module`'s parameters and buffers in place with `weights`, whole tensors that only the main process
    holds (the others pass {}): each is broadcast, then copied whole (DDP, one process) or as this process's shard
    (an FSDP2 DTensor). No other process reads a disk, so other nodes need not share the main one's."""
    for name, tensor in module.state_dict().items():
        whole = (
            weights[name].to(tensor.device, tensor.dtype)
            if weights
            else torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        )
        torch.distributed.broadcast(whole, src=0)
        with torch.no_grad():
            if isinstance(tensor, DTensor):
                shard = distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None)
                tensor.to_local().copy_(shard.to_local())
            else:
                tensor.copy_(whole)


def _replace(source: str, target: str) -> None:
    """Move `source` onto `target`; a folder (the adapter) is swapped whole: the old one is moved aside first, so a
    crash leaves the old folder or the new one readable, never neither."""
    if not os.path.isdir(target):
        os.replace(source, target)
        return
    aside = f"{target}.old"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    os.replace(source, target)
    shutil.rmtree(aside)


def save_model(accelerator: Accelerator, model: torch.nn.Module, processor, output_dir: str) -> None:
    """save_pretrained (safetensors) + processor into output_dir. Written to a temporary folder first and moved
    into place file by file, so a crash mid-save leaves the previous best model readable."""
    state_dict = accelerator.get_state_dict(model)  # every process: FSDP2 gathers the whole tensors here
    if accelerator.is_main_process:
        # A compiled model's keys carry torch.compile's wrapper prefix; the saved CLIPModel must not.
        state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
        staging = os.path.join(output_dir, ".staging-model")
        os.makedirs(staging, exist_ok=True)
        clip = unwrap(accelerator, model).clip
        state_dict = ContrastiveModel.clip_state_dict(state_dict)
        if has_lora(clip):  # the adapter alone, and the merged plain CLIPModel that loads without peft
            save_adapter(clip, state_dict, os.path.join(staging, ADAPTER_DIR))
            state_dict = merged_state_dict(clip, state_dict)
        clip.save_pretrained(staging, state_dict=state_dict)
        processor.save_pretrained(staging)
        for name in os.listdir(staging):
            _replace(os.path.join(staging, name), os.path.join(output_dir, name))
        if not has_lora(clip):  # an earlier LoRA run's adapter in this folder would not belong to this model
            shutil.rmtree(os.path.join(output_dir, ADAPTER_DIR), ignore_errors=True)
        os.rmdir(staging)
    accelerator.wait_for_everyone()
