"""Model loading (pretrained or from scratch), freezing strategies, and on-device pixel normalisation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from importlib import resources

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from .config import ModelConfig
from .tokenizer import build_offline_tokenizer


def load_model_and_processor(
    config: ModelConfig, training_captions: Callable[[], Iterable[str]]
) -> tuple[CLIPModel, CLIPProcessor]:
    """Load `config.model_name_or_path`, or build a fresh model from `config.scratch_config`.

    `training_captions` is only called on the from-scratch path, where the tokenizer is learned from them.
    """
    if config.scratch_config is None:
        # transformers 5 loads with dtype="auto": an fp16 checkpoint would train in fp16. Training wants fp32
        # master weights; mixed precision is autocast's job.
        model = CLIPModel.from_pretrained(config.model_name_or_path, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(config.model_name_or_path)
        return model, processor
    tokenizer = build_offline_tokenizer(training_captions())
    clip_config = _read_clip_config(config.scratch_config)
    clip_config.text_config.vocab_size = len(tokenizer)
    # CLIP pools the text tower at the end-of-text token; these ids must match the tokenizer we just built.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(clip_config.text_config, name, getattr(tokenizer, name))
    image_size = clip_config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    model = CLIPModel(clip_config)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _read_clip_config(name_or_path: str) -> CLIPConfig:
    """A bundled preset name (clip_accel/presets/NAME.json) or a path to a CLIPConfig JSON file."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as handle:
            return CLIPConfig(**json.load(handle))
    preset = resources.files("clip_accel") / "presets" / f"{name_or_path}.json"
    if not preset.is_file():
        available = sorted(p.name.removesuffix(".json") for p in (resources.files("clip_accel") / "presets").iterdir())
        raise ValueError(
            f"--scratch_config {name_or_path!r} is neither a JSON file nor a preset; presets: {available}."
        )
    return CLIPConfig(**json.loads(preset.read_text()))


class ContrastiveModel(torch.nn.Module):
    """A CLIPModel as the trainer drives it: one `forward` for both towers, returning L2-normalised (B, D)
    `image_embeds` and `text_embeds` (None for a tower given no input) and the `logit_scale` parameter's value.

    Every use of the weights goes through `forward`, so wrappers that act only around it see each one: DDP's
    hooks, and FSDP2's, which gather sharded parameters only inside a module's forward (evaluation and zero-shot
    prompts included). `logit_scale` lives here as a 1-element parameter because FSDP2 cannot shard a 0-D one;
    `clip_state_dict` gives back CLIPModel's own layout for saving.
    """

    def __init__(self, clip: CLIPModel) -> None:
        super().__init__()
        value = clip.logit_scale.detach().clone().reshape(1)
        requires_grad = clip.logit_scale.requires_grad
        del clip.logit_scale  # one owner: this module's parameter below
        self.clip = clip
        self.logit_scale = torch.nn.Parameter(value, requires_grad=requires_grad)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        # Normalised in float32 whatever the autocast dtype: the loss and the recall are computed in float32.
        image_embeds = text_embeds = None
        if pixel_values is not None:
            features = self.clip.get_image_features(pixel_values=pixel_values).pooler_output
            image_embeds = F.normalize(features.float(), dim=-1)
        if input_ids is not None:
            features = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            text_embeds = F.normalize(features.float(), dim=-1)
        # A new tensor, not a view: FSDP2 frees the gathered parameter when forward returns.
        return image_embeds, text_embeds, self.logit_scale.reshape(()).clone()

    @staticmethod
    def clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state dict in CLIPModel's layout (what `save_pretrained` writes)."""
        clip = {key.removeprefix("clip."): value for key, value in state_dict.items() if key != "logit_scale"}
        return {**clip, "logit_scale": state_dict["logit_scale"].reshape(())}

    @staticmethod
    def from_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A CLIPModel state dict in this module's layout."""
        wrapped = {f"clip.{key}": value for key, value in state_dict.items() if key != "logit_scale"}
        return {**wrapped, "logit_scale": state_dict["logit_scale"].reshape(1)}


def unwrap(accelerator, model: torch.nn.Module) -> ContrastiveModel:
    """The ContrastiveModel inside whatever `accelerator.prepare` wrapped it in: DDP, mixed-precision forward, and
    torch.compile (which Accelerate keeps by default). Under FSDP2 it is the (sharded) module itself."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def logit_scale_value(model: ContrastiveModel) -> float:
    """exp(logit_scale) as a number, whole even where the parameter is sharded (an FSDP2 DTensor)."""
    parameter = model.logit_scale.detach()
    parameter = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
    return parameter.exp().item()


def enable_gradient_checkpointing(model: CLIPModel) -> None:
    """Both towers' layers recompute their activations in the backward; non-reentrant, so it works under
    `torch.no_grad` passes (exact accumulation's first pass), DDP and frozen inputs."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5's name
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def image_size_of(model: CLIPModel) -> int:
    return model.config.vision_config.image_size


def freeze_parameters(model: CLIPModel, strategy: str, vision_layers: int = 6) -> tuple[int, int]:
    """Apply a freezing strategy in place; returns (trainable, total) parameter counts.

    - "none": everything trains.
    - "vision_layers": the vision embeddings and the first `vision_layers` vision encoder layers are frozen.
    - "backbones": both towers are frozen except their final layer norms; the two projections and `logit_scale`
      train (the reference project's "freeze both backbones" row).
    """
    model.requires_grad_(True)
    if strategy == "vision_layers":
        encoder_layers = model.vision_model.encoder.layers
        if vision_layers > len(encoder_layers):
            raise ValueError(
                f"--freeze_vision_layers {vision_layers} exceeds the {len(encoder_layers)} vision layers "
                "of this model; pass a smaller number."
            )
        model.vision_model.embeddings.requires_grad_(False)
        model.vision_model.pre_layrnorm.requires_grad_(False)
        for layer in encoder_layers[:vision_layers]:
            layer.requires_grad_(False)
    elif strategy == "backbones":
        model.vision_model.requires_grad_(False)
        model.text_model.requires_grad_(False)
        model.vision_model.post_layernorm.requires_grad_(True)
        model.text_model.final_layer_norm.requires_grad_(True)
    elif strategy != "none":
        raise ValueError(f"Unknown freezing strategy {strategy!r}; use none, vision_layers or backbones.")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class PixelNormalizer(torch.nn.Module):
    """uint8 (B, H, W, 3) pixels -> normalised float (B, 3, H, W) on the device.

    The cache stores uint8 (4x smaller than float32); the permute leaves the result channels-last in memory,
    which the patch-embedding convolution likes.
    """

    def __init__(self, image_mean: Iterable[float], image_std: Iterable[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(list(image_std)).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(list(image_mean)).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # In place on the fresh float copy: no further full-size temporaries (BENCHMARKS.md: +16 % pairs/s on CPU).
        return pixels.permute(0, 3, 1, 2).to(torch.float32, copy=True).sub_(self.shift).mul_(self.scale)
