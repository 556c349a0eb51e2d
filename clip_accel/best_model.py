"""The best model in OUTPUT/: saved as the validation metric improves (so that a kill never leaves it half-written)
and read back once training ends, on every process, for the final test evaluation."""

from __future__ import annotations

import os
import shutil

import torch
from accelerate import Accelerator
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import PreTrainedModel

from .lora import ADAPTER_DIR, has_lora, lora_layout, merged_state_dict, save_adapter
from .model import ContrastiveModel, save_model_folder, unwrap


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
    """The model folder (`save_model_folder`: safetensors, processor, sentence-transformers' files) in output_dir.
    Written to a temporary folder first and moved into place file by file, so a crash mid-save leaves the previous
    best model readable."""
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
        save_model_folder(clip, processor, staging, state_dict)
        for name in os.listdir(staging):
            _replace(os.path.join(staging, name), os.path.join(output_dir, name))
        if not has_lora(clip):  # an earlier LoRA run's adapter in this folder would not belong to this model
            shutil.rmtree(os.path.join(output_dir, ADAPTER_DIR), ignore_errors=True)
        os.rmdir(staging)
    accelerator.wait_for_everyone()


def load_best_model(accelerator: Accelerator, model: torch.nn.Module, output_dir: str) -> PreTrainedModel | None:
    """Load the best model saved in `output_dir` into the prepared `model` (what the final test evaluation measures
    and what users get) and return it (on the main process; None on the others). Only the main process wrote it, so
    only it reads it; the others receive it over the network (other nodes may not share its disk), whole or as
    their FSDP2 shards."""
    module = unwrap(accelerator, model)
    best, weights = None, {}
    if accelerator.is_main_process:
        best = module.family.model_class.from_pretrained(output_dir, dtype=torch.float32)
        weights = ContrastiveModel.from_clip_state_dict(best.state_dict())
        if has_lora(module.clip):  # the merged weights, in the adapted model's layout (adapters adding zero)
            weights = lora_layout(weights, module.state_dict())
    if accelerator.num_processes == 1:
        module.load_state_dict(weights)
    else:
        load_from_main_process(module, weights)
    return best


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
