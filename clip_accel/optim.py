"""The optimizer and its schedule: fused AdamW over the trainable parameters, with layer-wise learning-rate decay.

Layer-wise LR decay (`--layer_decay D`, timm's convention, per tower). Each tower's parameters get an id:

| parameters                                                                  | id      |
|-----------------------------------------------------------------------------|---------|
| embeddings (patch, position, class and token embeddings; CLIP's vision `pre_layrnorm`) | 0       |
| encoder layer i (0-based)                                                   | i + 1   |
| everything after the last layer (final norms, SigLIP's pooling heads, projections) | L + 1 |
| `logit_scale`, `logit_bias` (shared by the towers)                          | L + 1   |

with L the tower's number of layers; a parameter with id `id` trains at lr x D^(L + 1 - id). The top of each
tower (and the scale) keeps the full rate, the embeddings get D^(L + 1) of it. D = 1 turns it off.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from accelerate.logging import get_logger
from transformers import get_scheduler

from .config import TrainConfig

logger = get_logger(__name__)

_LAYER = re.compile(r"\.encoder\.layers\.(\d+)\.")
_TOWERS = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}


def tower_depths(model: torch.nn.Module) -> dict[str, int]:
    """Each tower's number of encoder layers, from the model's config (a ContrastiveModel or a CLIPModel)."""
    config = getattr(model, "clip", model).config
    return {"vision": config.vision_config.num_hidden_layers, "text": config.text_config.num_hidden_layers}


def layer_id(name: str, depths: dict[str, int]) -> tuple[str | None, int]:
    """(tower, id) of a parameter by the module docstring's table; tower None for the shared scale and bias
    (their id is the top: no decay)."""
    tower = next((tower for tower, parts in _TOWERS.items() if any(part in name for part in parts)), None)
    if tower is None:
        return None, 0
    if ".embeddings." in name or "pre_layrnorm" in name:
        return tower, 0
    layer = _LAYER.search(name)
    return tower, int(layer.group(1)) + 1 if layer else depths[tower] + 1


def lr_scale(name: str, depths: dict[str, int], layer_decay: float) -> float:
    """The factor of the learning rate this parameter trains at: D^(L + 1 - id)."""
    tower, index = layer_id(name, depths)
    return 1.0 if tower is None else layer_decay ** (depths[tower] + 1 - index)


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """AdamW's groups: the trainable parameters by (learning-rate factor, weight decay). Biases, norms, the class
    embedding and logit_scale (all < 2-D) get no weight decay. Without layer decay: the two groups decay and no
    decay; with it, one per factor and decay, the top first, each naming its layer ids (`layers`)."""
    depths = tower_depths(model) if config.layer_decay < 1 else {}
    grouped = defaultdict(list)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = parameter.ndim >= 2 and "logit_scale" not in name
        scale = lr_scale(name, depths, config.layer_decay) if depths else 1.0
        grouped[-scale, not decays].append((name, parameter))
    if not depths:  # the usual two groups, decay then no decay (an empty one too)
        grouped.setdefault((-1.0, False), [])
        grouped.setdefault((-1.0, True), [])
    groups = []
    for (scale, no_decay), members in sorted(grouped.items()):
        group = {
            "params": [parameter for _, parameter in members],
            "weight_decay": 0.0 if no_decay else config.weight_decay,
            "lr": config.learning_rate * -scale,
        }
        if depths:
            ids = sorted({layer_id(name, depths) for name, _ in members}, key=lambda key: (key[0] or "", key[1]))
            group["layers"] = ", ".join("scale" if tower is None else f"{tower} {index}" for tower, index in ids)
        groups.append(group)
    return groups


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """Fused AdamW (CPU and CUDA) over `parameter_groups` (trainable parameters only: DDP then never waits on
    frozen ones). Fused: one kernel for all the parameters, and it skips a step on the device when told the
    gradients were not finite (step.py)."""
    return torch.optim.AdamW(
        parameter_groups(model, config),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=True,
    )


def log_parameter_groups(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """One line per group under layer decay: its layer ids, learning rate, weight decay and parameters."""
    if config.layer_decay >= 1:
        return
    for group in optimizer.param_groups:
        count = sum(parameter.numel() for parameter in group["params"])
        logger.info(
            f"--layer_decay {config.layer_decay:g}: lr {group['lr']:.3g}, weight decay {group['weight_decay']:g}, "
            f"{count:,} parameters: {group['layers']}"
        )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Warmup then cosine/linear/constant, in optimizer steps, each group's rate scaled alike (so layer decay's
    ratios hold throughout).

    Not handed to accelerator.prepare: its wrapper steps N times per optimizer step on N processes. The step
    code steps it exactly once per optimizer step, so the schedule means the same at any scale.
    """
    # "constant" in transformers ignores warmup; its warmup variant with 0 steps is the same constant schedule.
    schedule = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
    return get_scheduler(schedule, optimizer, config.warmup_steps_for(total_steps), total_steps)


def top_learning_rate(scheduler) -> float:
    """The full rate now (the top layers'), whatever order the groups are in."""
    return max(scheduler.get_last_lr())
