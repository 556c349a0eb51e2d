"""LoRA through `peft`: low-rank adapters on the chosen linear layers of both towers (default: every attention
projection); everything else, `logit_scale` included, stays as the starting model has it.

A run is saved two ways: the output folder holds a merged plain `CLIPModel` (each adapted weight W + alpha/r B A)
that `from_pretrained` loads without peft, and OUTPUT/adapter/ the adapter alone in peft's format, for
`PeftModel.from_pretrained(starting model, OUTPUT/adapter)`.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from transformers import CLIPModel

from .config import ModelConfig, UserError

ADAPTER_DIR = "adapter"


def add_lora(clip: CLIPModel, config: ModelConfig) -> None:
    """Inject adapters in place (rank `config.lora_rank` on `config.lora_target_modules`); only they train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise ImportError("--lora_rank needs peft: pip install 'clip-accel[lora]' (or pip install peft).") from error
    targets = config.lora_targets
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in clip.named_modules() if isinstance(m, torch.nn.Linear)})
    missing = sorted(set(targets) - set(linear))
    if missing:
        raise UserError(
            f"--lora_target_modules {missing} name no linear layer of this model; its linear layers are {linear}."
        )
    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        bias="none",
        base_model_name_or_path=config.model_name_or_path,
    )
    inject_adapter_in_model(lora_config, clip)  # freezes every parameter but the adapters'
    clip.requires_grad_(False)
    for name, parameter in clip.named_parameters():
        parameter.requires_grad = ".lora_" in name


def has_lora(clip: CLIPModel) -> bool:
    return isinstance(getattr(clip, "peft_config", None), dict)


def merged_state_dict(clip: CLIPModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict (CLIPModel layout plus `base_layer`/`lora_A`/`lora_B` keys) as a plain CLIPModel's:
    every adapted weight merged, W + scaling B A, in float32 and cast back."""
    scalings = {name: module.scaling["default"] for name, module in clip.named_modules() if hasattr(module, "lora_A")}
    merged = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        layer, parameter = key.split(".base_layer.")
        merged[f"{layer}.{parameter}"] = value
        if parameter == "weight":
            down = state_dict[f"{layer}.lora_A.default.weight"].float()
            up = state_dict[f"{layer}.lora_B.default.weight"].float()
            merged[f"{layer}.weight"] = (value.float() + scalings[layer] * (up @ down)).to(value.dtype)
    return merged


def lora_layout(plain: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A merged plain state dict loaded into a LoRA model (keys of `current`): merged weights as the base layers,
    zero `lora_B` (so the adapters add nothing), `lora_A` kept. The model then computes what the merged one does."""
    layout = {}
    for key, value in current.items():
        if ".lora_B." in key:
            layout[key] = torch.zeros_like(value)
        elif ".lora_A." in key:
            layout[key] = value
        else:
            layout[key] = plain[key.replace(".base_layer.", ".")]
    return layout


def save_adapter(clip: CLIPModel, state_dict: dict[str, torch.Tensor], folder: str) -> None:
    """The adapter alone, as `PeftModel.save_pretrained` writes it (adapter_model.safetensors, adapter_config.json)."""
    os.makedirs(folder, exist_ok=True)
    adapter = {
        "base_model.model." + key.replace(".default.", "."): value.contiguous()
        for key, value in state_dict.items()
        if ".lora_" in key
    }
    save_file(adapter, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    clip.peft_config["default"].save_pretrained(folder)
