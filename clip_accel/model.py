"""Model loading (pretrained or from scratch), model families, freezing strategies, and on-device pixel
normalisation.

Three families, told apart by the checkpoint's config (`model_type`), never by a flag: CLIP (`CLIPModel`: softmax
contrastive loss, shortest-side resize and centre crop, text padded to the batch's longest caption, up to 77
tokens), SigLIP (`SiglipModel`: sigmoid loss with a learned bias, square resize without crop, text padded to
64 tokens as it was trained, since its text tower pools the last position) and SigLIP 2 (`Siglip2Model`, NaFlex:
SigLIP's loss and text, images kept at their aspect ratio as sequences of patches with their grid).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    PreTrainedModel,
    Siglip2Config,
    Siglip2ImageProcessorPil,
    Siglip2Model,
    Siglip2Processor,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
)
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

from .config import ModelConfig, UserError
from .data.loader import HOST_GRIDS
from .data.preprocess import ImageLayout
from .open_clip_format import CONFIG_FILE as OPEN_CLIP_CONFIG
from .open_clip_format import is_open_clip_folder
from .open_clip_source import converted_folder, is_open_clip_source
from .text_positions import long_clip_positions, stretch_text_positions
from .tokenizer import build_offline_siglip2_tokenizer, build_offline_tokenizer


@dataclass(frozen=True)
class Family:
    """What differs between the model families the trainer supports."""

    name: str  # config.json's model_type
    title: str  # as people write it
    model_class: type[PreTrainedModel]
    loss: str  # "softmax" (CLIP's InfoNCE) or "sigmoid" (SigLIP's, with a learned bias)
    resize: str  # the processor's image layout (ImageLayout): "crop" (CLIP), "square" (SigLIP), "patches" (SigLIP 2)
    text_length: int  # the most text tokens
    pad_to: int | None  # pad every text to this length (the model pools a fixed position), else to the longest
    max_logit_scale: float | None  # the cap on logit_scale after each step (CLIP's ln 100), or none

    @property
    def sigmoid(self) -> bool:  # SigLIP's loss, and its learned bias
        return self.loss == "sigmoid"


CLIP = Family("clip", "CLIP", CLIPModel, "softmax", "crop", 77, None, math.log(100.0))
SIGLIP = Family("siglip", "SigLIP", SiglipModel, "sigmoid", "square", 64, 64, None)
SIGLIP2 = Family("siglip2", "SigLIP 2", Siglip2Model, "sigmoid", "patches", 64, 64, None)
FAMILIES = {"clip": CLIP, "siglip": SIGLIP, "siglip2": SIGLIP2}
CONFIG_CLASSES = {"clip": CLIPConfig, "siglip": SiglipConfig, "siglip2": Siglip2Config}


def family_of(config) -> Family:
    """The family of a model config (`model_type`); a clear error for the rest."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise UserError(f"Model type {model_type!r} is not supported: start from a CLIP, SigLIP or SigLIP 2 checkpoint.")


def image_layout(model: PreTrainedModel, processor) -> ImageLayout:
    """How this model's processor lays out an image (what the cache stores, see `ImageLayout`). SigLIP 2: the patch
    size and count that a `processor(images=...)` call uses, where the processor's defaults (256 patches of 16)
    override its image processor's own settings."""
    family = family_of(model.config)
    if family.resize != "patches":
        return ImageLayout(family.resize, model.config.vision_config.image_size)
    image_processor = processor.image_processor
    settings = {"patch_size": image_processor.patch_size, "max_num_patches": image_processor.max_num_patches}
    # The processor's defaults: a class attribute in transformers >= 5.2x, `_defaults` of its kwargs type before.
    legacy = getattr(getattr(processor, "valid_processor_kwargs", None), "_defaults", {}).get("images_kwargs", {})
    for defaults in (getattr(processor, "images_kwargs", {}), legacy):
        settings.update({key: value for key, value in defaults.items() if key in settings})
    if settings["patch_size"] != model.config.vision_config.patch_size:
        raise UserError(
            f"The processor cuts {settings['patch_size']}-pixel patches but the model's vision tower takes "
            f"{model.config.vision_config.patch_size}-pixel ones: save the model with a matching processor."
        )
    return ImageLayout("patches", patch_size=settings["patch_size"], max_num_patches=settings["max_num_patches"])


def is_local_path(name_or_path: str) -> bool:
    """Whether a model name can only be a folder: it exists, or it is absolute or starts with ./, ../ or ~ (a Hub
    id is NAME or ORG/NAME)."""
    return os.path.exists(name_or_path) or os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))


def check_model_location(name_or_path: str) -> None:
    """A model folder holds a config.json; a name that can only be a folder exists. Said plainly, before
    transformers reads it as a Hub id or asks the folder for a `model_type`."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")) and not is_open_clip_folder(name_or_path):
            raise UserError(
                f"{name_or_path} holds no config.json, so it is not a model folder (clip-accel train and "
                f"save_pretrained write one; open_clip writes {OPEN_CLIP_CONFIG}): name a trained model's folder "
                "or a Hub id."
            )
    elif is_local_path(name_or_path):
        raise UserError(f"{name_or_path} is not a folder: name a trained model's folder or a Hub id (ORG/NAME).")


def load_pretrained(name_or_path: str, open_clip_model: str | None = None):
    """(model in float32, processor) of a saved folder or Hub id, of whichever supported family its config names; or
    of an open_clip model (a folder open_clip wrote, `hf-hub:ORG/NAME`, or a checkpoint file of the architecture
    `open_clip_model`), converted to a CLIP folder once (open_clip_source.py) and loaded from there.

    transformers 5 loads with dtype="auto": an fp16 checkpoint would train in fp16. Training wants fp32 master
    weights; mixed precision is autocast's job."""
    if is_open_clip_source(name_or_path, open_clip_model):
        name_or_path = converted_folder(name_or_path, open_clip_model)
    elif os.path.isfile(name_or_path):
        raise UserError(
            f"{name_or_path} is a file: a transformers model is a folder; a checkpoint open_clip's training wrote "
            "(epoch_N.pt) needs its architecture, --open_clip_model NAME (e.g. ViT-B-32)."
        )
    check_model_location(name_or_path)
    family = family_of(AutoConfig.from_pretrained(name_or_path))
    model = family.model_class.from_pretrained(name_or_path, dtype=torch.float32)
    return model, AutoProcessor.from_pretrained(name_or_path)


def load_model_and_processor(config: ModelConfig, training_captions: Callable[[], Iterable[str]]):
    """Load `config.model_name_or_path`, or build a fresh model from `config.scratch_config`.

    `training_captions` is only called on the from-scratch path, where the tokenizer is learned from them. A fresh
    SigLIP starts at the paper's t = log 10, b = -10 (transformers initialises both at 0, from where the tiny demo
    does not learn; b = -log(batch), the prior for small batches, collapsed it to constant embeddings).
    """
    if config.scratch_config is None:
        model, processor = load_pretrained(config.model_name_or_path, config.open_clip_model)
        if config.text_positions:
            check_text_positions(model.config, config.text_positions)
            stretch_text_positions(model, processor.tokenizer, config.text_positions)
        return model, processor
    model_config = _read_model_config(config.scratch_config)
    family = family_of(model_config)
    if config.text_positions:  # (a fresh text tower has nothing to stretch: it simply gets N positions)
        check_text_positions(model_config, config.text_positions, fresh=True)
        model_config.text_config.max_position_embeddings = config.text_positions
    if family is SIGLIP2:  # its folders always load a Siglip2Tokenizer (whatever they name): so it learns one
        tokenizer = build_offline_siglip2_tokenizer(training_captions())
    else:
        tokenizer = build_offline_tokenizer(training_captions(), max_length=text_length(model_config))
    model_config.text_config.vocab_size = len(tokenizer)
    # CLIP pools the text tower at the end-of-text token; these ids must match the tokenizer we just built.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model_config.text_config, name, getattr(tokenizer, name))
    if family.sigmoid:
        model_config.text_config.max_position_embeddings = family.text_length
        model = family.model_class(model_config)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        if family is SIGLIP2:
            # A processor call cuts 256 patches of 16 whatever its image processor says (see image_layout).
            if model_config.vision_config.patch_size != 16:
                raise UserError(
                    f"--scratch_config: a SigLIP 2 needs vision_config.patch_size 16 (its processor's), not "
                    f"{model_config.vision_config.patch_size}."
                )
            image_processor = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=256)
            return model, Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
        size = model_config.vision_config.image_size
        image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
        return model, SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    image_size = model_config.vision_config.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPModel(model_config), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def text_length(config) -> int:
    """The most text tokens a model of this config reads: a CLIP's text positions (77, unless stretched by
    --text_positions), SigLIP's 64 (its texts are padded to that many)."""
    family = family_of(config)
    return config.text_config.max_position_embeddings if family is CLIP else family.text_length


def check_text_positions(config, positions: int, fresh: bool = False) -> None:
    """--text_positions N is for CLIP, and stretches: N at least the model's positions (a `fresh` model from
    --scratch_config: any N)."""
    family = family_of(config)
    if family is not CLIP:
        raise UserError(
            f"--text_positions stretches CLIP's learned table of text positions; {family.title}'s text tower was "
            f"trained on texts padded to {family.text_length} tokens and pools its last position, so a longer "
            "text would move what it pools: drop --text_positions, or start from a CLIP model."
        )
    length = config.text_config.max_position_embeddings
    if fresh or positions >= length:
        return
    raise UserError(
        f"--text_positions {positions} is fewer than the model's {length} text positions: positions are only "
        f"stretched; pass more than {length} (Long-CLIP's {long_clip_positions(length)}), or drop it."
    )


def align_with_trainer(model: PreTrainedModel, processor) -> None:
    """Make what a saved folder says agree with what the trainer computes, so that every class and client that loads
    it (the per-tower classes, the zero-shot pipeline, sentence-transformers) gets the trainer's embeddings. In
    place; a second call changes nothing.

    - CLIP: each tower's sub-config gets the top-level `projection_dim`. CLIPModel builds both projections from the
      top-level value, CLIPVisionModelWithProjection and CLIPTextModelWithProjection from their own sub-config's
      (512 unless set), and cannot load a folder where the two disagree.
    - SigLIP, SigLIP 2: the tokenizer returns no `attention_mask` (`model_input_names`, as the Hub's SigLIP
      tokenizers say). Their text towers were trained on text padded to 64 tokens without one; a client that
      passes it on attends to other positions and gets other text embeddings.
    """
    family = family_of(model.config)
    if family is CLIP:
        for tower_config in (model.config.text_config, model.config.vision_config):
            tower_config.projection_dim = model.config.projection_dim
    if family.pad_to:
        tokenizer = processor.tokenizer
        tokenizer.model_input_names = ["input_ids"]  # what a call returns
        tokenizer.init_kwargs["model_input_names"] = ["input_ids"]  # what save_pretrained writes


def save_model_folder(model: PreTrainedModel, processor, folder: str, state_dict: dict | None = None) -> None:
    """`save_pretrained` of the model (with `state_dict`'s weights when given) and its processor into `folder`, with
    `align_with_trainer`'s settings, and the two files sentence-transformers reads: whatever loads the folder
    computes what the trainer computed."""
    align_with_trainer(model, processor)  # (a folder written elsewhere, or by an older clip_accel, is saved right)
    model.save_pretrained(folder, state_dict=state_dict)
    processor.save_pretrained(folder)
    for name, content in sentence_transformers_files(family_of(model.config)).items():
        with open(os.path.join(folder, name), "w") as handle:
            json.dump(content, handle, indent=2)


def sentence_transformers_files(family: Family) -> dict[str, list | dict]:
    """modules.json and sentence_bert_config.json of a model folder: sentence-transformers embeds text and images
    with `get_text_features` and `get_image_features`, and pads text as the trainer does. It pads to the longest
    text unless told; SigLIP's texts are padded to 64 tokens."""
    module = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
    towers = {"text": "get_text_features", "image": "get_image_features"}
    settings = {
        "transformer_task": "feature-extraction",
        "modality_config": {
            name: {"method": method, "method_output_name": "pooler_output"} for name, method in towers.items()
        },
        "module_output_name": "sentence_embedding",
    }
    if family.pad_to:
        settings["processing_kwargs"] = {"text": {"padding": "max_length", "max_length": family.pad_to}}
    return {"modules.json": [module], "sentence_bert_config.json": settings}


def _read_model_config(name_or_path: str) -> CLIPConfig | SiglipConfig | Siglip2Config:
    """A bundled preset name (clip_accel/presets/NAME.json) or a path to a CLIPConfig, SiglipConfig or
    Siglip2Config JSON file (`"model_type": "siglip"` or `"siglip2"` picks those)."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as handle:
            values = json.load(handle)
    else:
        preset = resources.files("clip_accel") / "presets" / f"{name_or_path}.json"
        if not preset.is_file():
            presets = resources.files("clip_accel") / "presets"
            available = sorted(p.name.removesuffix(".json") for p in presets.iterdir())
            raise UserError(
                f"--scratch_config {name_or_path!r} is neither a JSON file nor a preset; presets: {available}."
            )
        values = json.loads(preset.read_text())
    config_class = CONFIG_CLASSES.get(values.get("model_type"), CLIPConfig)
    return config_class(**{key: value for key, value in values.items() if key != "model_type"})


class ContrastiveModel(torch.nn.Module):
    """A CLIPModel as the trainer drives it: one `forward` for both towers, returning L2-normalised (B, D)
    `image_embeds` and `text_embeds` (None for a tower given no input) and the `logit_scale` parameter's value.

    Every use of the weights goes through `forward`, so wrappers that act only around it see each one: DDP's
    hooks, and FSDP2's, which gather sharded parameters only inside a module's forward (evaluation and zero-shot
    prompts included). `logit_scale` lives here as a 1-element parameter because FSDP2 cannot shard a 0-D one;
    `clip_state_dict` gives back CLIPModel's own layout for saving.
    """

    def __init__(self, clip: CLIPModel | SiglipModel) -> None:
        super().__init__()
        self.family = family_of(clip.config)
        self.clip = clip
        # One owner each: this module's parameters (SigLIP also learns a bias added to every logit).
        for name in ("logit_scale", "logit_bias") if self.family.sigmoid else ("logit_scale",):
            parameter = getattr(clip, name)
            value, requires_grad = parameter.detach().clone().reshape(1), parameter.requires_grad
            delattr(clip, name)
            setattr(self, name, torch.nn.Parameter(value, requires_grad=requires_grad))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.Tensor | None = None,
        spatial_shapes_on_host: np.ndarray | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """`spatial_shapes` (SigLIP 2): (B, 2) grids on the device; `spatial_shapes_on_host`, the same as a numpy
        array, for a transformers whose position embeddings read each grid on the host. A numpy array, not a
        tensor: DDP and FSDP2 copy every tensor input of a forward to the device (a blocking copy)."""
        # Normalised in float32 whatever the autocast dtype: the loss and the recall are computed in float32.
        image_embeds = text_embeds = None
        if pixel_values is not None:
            image_inputs = {"pixel_values": pixel_values}
            if spatial_shapes is not None:  # SigLIP 2: patch sequences, the first rows x columns of each in use
                in_use = spatial_shapes.prod(-1, keepdim=True)
                mask = torch.arange(pixel_values.shape[1], device=pixel_values.device) < in_use
                on_host = spatial_shapes_on_host is not None
                grids = torch.from_numpy(spatial_shapes_on_host) if on_host else spatial_shapes
                image_inputs.update(pixel_attention_mask=mask.long(), spatial_shapes=grids)
            features = self.clip.get_image_features(**image_inputs).pooler_output
            image_embeds = F.normalize(features.float(), dim=-1)
        if input_ids is not None:
            features = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            text_embeds = F.normalize(features.float(), dim=-1)
        # New tensors, not views: FSDP2 frees the gathered parameters when forward returns. CLIP: the scale (0-D);
        # SigLIP: (scale, bias).
        if self.family.sigmoid:
            return image_embeds, text_embeds, torch.cat([self.logit_scale, self.logit_bias])
        return image_embeds, text_embeds, self.logit_scale.reshape(()).clone()

    @staticmethod
    def clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state dict in the wrapped model's layout (what `save_pretrained` writes): CLIP keeps a 0-D
        `logit_scale`, SigLIP 1-element `logit_scale` and `logit_bias`."""
        logits = {"logit_scale", "logit_bias"}
        clip = {key.removeprefix("clip."): value for key, value in state_dict.items() if key not in logits}
        if "logit_bias" in state_dict:
            return {**clip, "logit_scale": state_dict["logit_scale"], "logit_bias": state_dict["logit_bias"]}
        return {**clip, "logit_scale": state_dict["logit_scale"].reshape(())}

    @staticmethod
    def from_clip_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A CLIPModel (or SiglipModel) state dict in this module's layout."""
        logits = {"logit_scale", "logit_bias"}
        wrapped = {f"clip.{key}": value for key, value in state_dict.items() if key not in logits}
        return {**wrapped, **{key: state_dict[key].reshape(1) for key in logits if key in state_dict}}


def unwrap(accelerator, model: torch.nn.Module) -> ContrastiveModel:
    """The ContrastiveModel inside whatever `accelerator.prepare` wrapped it in: DDP, mixed-precision forward, and
    torch.compile (which Accelerate keeps by default). Under FSDP2 it is the (sharded) module itself."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def logit_scale_value(model: ContrastiveModel) -> float:
    """exp(logit_scale) as a number, whole even where the parameter is sharded (an FSDP2 DTensor)."""
    parameter = model.logit_scale.detach()
    parameter = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
    return parameter.exp().item()


def embedding_size(config: dict) -> int:
    """The width D of a model's (B, D) embeddings, from its configuration as a dict (`config.to_dict()`, or a saved
    config.json): CLIP's `projection_dim`; SigLIP has no projection, its text tower's head gives it
    (`projection_size`, the hidden size unless set)."""
    text = config["text_config"]
    return config.get("projection_dim") or text.get("projection_size") or text["hidden_size"]


def nested_embeddings(embeds: torch.Tensor, size: int) -> torch.Tensor:
    """The first `size` dimensions of L2-normalised (N, D) `embeds`, renormalised: (N, size), a Matryoshka-trained
    model's smaller embedding (normalising the truncated raw features gives the same). `embeds` itself when `size`
    is D. Differentiable."""
    return embeds if size >= embeds.shape[-1] else F.normalize(embeds[..., :size], dim=-1)


def enable_gradient_checkpointing(model: CLIPModel) -> None:
    """Both towers' layers recompute their activations in the backward; non-reentrant, so it works under
    `torch.no_grad` passes (exact accumulation's first pass), DDP and frozen inputs."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5's name
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze_parameters(model: CLIPModel, strategy: str, vision_layers: int = 6) -> tuple[int, int]:
    """Apply a freezing strategy in place; returns (trainable, total) parameter counts.

    - "none": everything trains.
    - "vision_layers": the vision embeddings and the first `vision_layers` vision encoder layers are frozen.
    - "backbones": both towers are frozen except their final layer norms; the two projections (SigLIP: the
      towers' heads) and `logit_scale` (and `logit_bias`) train (the reference project's "freeze both backbones"
      row).
    """
    model.requires_grad_(True)
    if strategy == "vision_layers":
        encoder_layers = model.vision_model.encoder.layers
        if vision_layers > len(encoder_layers):
            raise UserError(
                f"--freeze_vision_layers {vision_layers} exceeds the {len(encoder_layers)} vision layers "
                "of this model; pass a smaller number."
            )
        model.vision_model.embeddings.requires_grad_(False)
        if hasattr(model.vision_model, "pre_layrnorm"):  # CLIP's; SigLIP has none
            model.vision_model.pre_layrnorm.requires_grad_(False)
        for layer in encoder_layers[:vision_layers]:
            layer.requires_grad_(False)
    elif strategy == "backbones":
        model.vision_model.requires_grad_(False)
        model.text_model.requires_grad_(False)
        model.vision_model.post_layernorm.requires_grad_(True)
        model.text_model.final_layer_norm.requires_grad_(True)
        for tower in (model.vision_model, model.text_model):  # SigLIP's projections are its towers' heads
            if hasattr(tower, "head"):
                tower.head.requires_grad_(True)
    elif strategy != "none":
        raise UserError(f"Unknown freezing strategy {strategy!r}; use none, vision_layers or backbones.")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _positions_read_grids_on_host() -> bool:
    """Whether this transformers' SigLIP 2 resizes its position embeddings image by image, reading each grid with
    `.tolist()` (up to 5.18): given device grids that is one host sync per image per forward (and a recompile
    per grid under torch.compile), so it gets the loader's host copy. Later versions compute on the grids'
    device, and get the device copy."""
    try:
        return ".tolist()" in inspect.getsource(Siglip2VisionEmbeddings.resize_positional_embeddings)
    except (OSError, TypeError):  # no source (a frozen install): the device copy, correct either way
        return False


POSITIONS_READ_GRIDS_ON_HOST = _positions_read_grids_on_host()


class PixelNormalizer(torch.nn.Module):
    """uint8 (B, H, W, 3) pixels -> normalised float (B, 3, H, W) on the device; SigLIP 2's uint8 patch sequences
    (B, N, P * P * 3), channels fastest, -> normalised float (B, N, P * P * 3).

    The cache stores uint8 (4x smaller than float32); the permute leaves the result channels-last in memory,
    which the patch-embedding convolution likes.
    """

    def __init__(self, image_mean: Iterable[float], image_std: Iterable[float]) -> None:
        super().__init__()
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(list(image_std)).view(1, 3, 1, 1)), persistent=False)
        self.register_buffer("shift", torch.tensor(list(image_mean)).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # In place on the fresh float copy: no further full-size temporaries (BENCHMARKS.md: +16 % pairs/s on CPU).
        if pixels.dim() == 3:  # patch sequences
            out = pixels.to(torch.float32, copy=True)
            out.view(*out.shape[:-1], -1, 3).sub_(self.shift.view(3)).mul_(self.scale.view(3))
            return out
        return pixels.permute(0, 3, 1, 2).to(torch.float32, copy=True).sub_(self.shift).mul_(self.scale)

    def inputs(self, batch: dict) -> dict:
        """A batch's image inputs to `ContrastiveModel.forward`: the normalised pixels (and SigLIP 2's grids, with
        their host copy where this transformers reads grids on the host and the loader sent one: a numpy array,
        which the copies to the device leave alone)."""
        inputs = {"pixel_values": self(batch["pixel_values"])}
        if "spatial_shapes" in batch:
            inputs["spatial_shapes"] = batch["spatial_shapes"]
        if POSITIONS_READ_GRIDS_ON_HOST and batch.get(HOST_GRIDS) is not None:
            inputs["spatial_shapes_on_host"] = batch[HOST_GRIDS]
        return inputs
