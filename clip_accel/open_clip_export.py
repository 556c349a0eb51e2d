"""A CLIPModel written in open_clip's own format, beside the transformers files: the inverse of open_clip_format.

open_clip reads a folder (`create_model_and_transforms("local-dir:FOLDER")`) or a Hub repo (`"hf-hub:org/name"`)
through two files, as its `push_to_hf_hub` writes them: `open_clip_config.json` (`{"model_cfg": ...,
"preprocess_cfg": ...}`) and `open_clip_model.safetensors` (open_clip CLIP's state dict). Neither name is one that
transformers writes, so both sets live in one folder. Only what open_clip's built-in CLIP computes exactly is
written: a CLIPModel (a LoRA-adapted one merged, as the output folder holds it) with CLIP's BPE tokenizer, GELU or
QuickGELU in both towers, and an image processor that resizes and crops as open_clip's evaluation transform does;
anything else is refused with the reason. Nothing here imports open_clip.
"""

from __future__ import annotations

import json
import math
import os

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

from .config import UserError
from .lora import has_lora, merged_state_dict
from .open_clip_format import (
    CLIP_VOCAB_SIZE,
    CONFIG_FILE,
    END_OF_TEXT_ID,
    PROJECTIONS,
    RESAMPLE,
    WEIGHT_FILES,
    fused_attention_names,
    weight_names,
)

# A caption and the ids open_clip's SimpleTokenizer gives it (start, words, punctuation, digits, an accent, end): a
# tokenizer that agrees here and has 49,408 tokens is CLIP's BPE vocabulary.
PROBE_CAPTION = "A photo of a cat, 42 Cafés!"
PROBE_IDS = [49406, 320, 1125, 539, 320, 2368, 267, 275, 273, 3471, 20507, 256, 49407]
LEGACY_EOS_ID = 2  # transformers' CLIP configs from before eos_token_id was set: pooled at the largest id, as open_clip
DEFAULT_NORM_EPS = 1e-5  # open_clip's nn.LayerNorm unless norm_kwargs says otherwise


def _refuse(why: str) -> UserError:
    return UserError(f"This model cannot be saved in open_clip's format: {why}.")


def open_clip_model_cfg(config: CLIPConfig) -> dict:
    """open_clip's `model_cfg` of a CLIPModel's config: its built-in CLIP with these widths, depths and heads."""
    vision, text = config.vision_config, config.text_config
    if vision.hidden_act != text.hidden_act:
        raise _refuse(
            f"its image tower uses {vision.hidden_act} and its text tower {text.hidden_act} (open_clip's quick_gelu "
            "setting holds for both)"
        )
    if vision.hidden_act not in ("gelu", "quick_gelu"):
        raise _refuse(f"its activation is {vision.hidden_act!r} (open_clip's CLIP has gelu or quick_gelu)")
    if text.vocab_size != CLIP_VOCAB_SIZE:
        raise _refuse(f"its text tower has {text.vocab_size} token embeddings (open_clip's CLIP: {CLIP_VOCAB_SIZE})")
    if text.eos_token_id not in (END_OF_TEXT_ID, LEGACY_EOS_ID):
        raise _refuse(f"its text tower pools at token {text.eos_token_id} (open_clip: the end of text, id 49407)")
    if vision.num_channels != 3:
        raise _refuse(f"its images have {vision.num_channels} channels (open_clip's preprocessing gives RGB)")
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": vision.hidden_act == "quick_gelu",
        "vision_cfg": {
            "image_size": vision.image_size,
            "layers": vision.num_hidden_layers,
            "width": vision.hidden_size,
            "head_width": vision.hidden_size // vision.num_attention_heads,
            "mlp_ratio": _mlp_ratio(vision, "image"),
            "patch_size": vision.patch_size,
            **_norm_kwargs(vision),
        },
        "text_cfg": {
            "context_length": text.max_position_embeddings,
            "vocab_size": text.vocab_size,
            "width": text.hidden_size,
            "heads": text.num_attention_heads,
            "layers": text.num_hidden_layers,
            "mlp_ratio": _mlp_ratio(text, "text"),
            **_norm_kwargs(text),
        },
    }


def _mlp_ratio(tower_config, tower: str) -> float:
    """The mlp_ratio from which open_clip sizes the MLP back to intermediate_size (`int(width * mlp_ratio)`)."""
    width, size = tower_config.hidden_size, tower_config.intermediate_size
    ratio = size / width
    if int(width * ratio) != size:  # rounded down below the integer: the next float up lands on it
        ratio = math.nextafter(ratio, math.inf)
    if int(width * ratio) != size:
        raise _refuse(f"no mlp_ratio gives its {tower} tower's MLP of {size} from width {width}")
    return ratio


def _norm_kwargs(tower_config) -> dict:
    eps = tower_config.layer_norm_eps
    return {} if eps == DEFAULT_NORM_EPS else {"norm_kwargs": {"eps": eps}}


def _size(size, key: str):
    """A SizeDict's (or an older processor's plain dict's) entry."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def open_clip_preprocess_cfg(image_processor, image_size: int) -> dict:
    """open_clip's `preprocess_cfg` of a CLIP image processor: its evaluation transform resizes the shortest edge to
    the model's image size and crops the centre square ("shortest"), or squashes the image to the square ("squash"),
    then normalises; the processor must do one of these at `image_size`."""
    square = (image_size, image_size)
    size, crop = image_processor.size, image_processor.crop_size if image_processor.do_center_crop else None
    crop_square = crop is None or (_size(crop, "height"), _size(crop, "width")) == square
    if image_processor.do_resize and _size(size, "shortest_edge") == image_size and crop is not None and crop_square:
        resize_mode = "shortest"
    elif image_processor.do_resize and (_size(size, "height"), _size(size, "width")) == square and crop_square:
        resize_mode = "squash"
    else:
        described = f"resizes to {_described(size) if image_processor.do_resize else 'nothing'}"
        raise _refuse(
            f"its image processor {described} and crops {_described(crop) if crop else 'nothing'}, where open_clip "
            f"resizes the shortest edge to {image_size} and crops the centre {image_size}x{image_size}, or squashes "
            f"to {image_size}x{image_size}"
        )
    interpolations = {resample: name for name, resample in RESAMPLE.items()}
    try:
        interpolation = interpolations[Image.Resampling(image_processor.resample)]
    except (KeyError, ValueError, TypeError):
        raise _refuse(
            f"its image processor resamples with {image_processor.resample!r} (open_clip: {' or '.join(RESAMPLE)})"
        ) from None
    if not image_processor.do_rescale or image_processor.rescale_factor != 1 / 255:
        raise _refuse("its image processor does not scale pixels to [0, 1] by 1/255, as open_clip's ToTensor does")
    normalize = image_processor.do_normalize
    return {
        "mean": list(image_processor.image_mean) if normalize else [0.0, 0.0, 0.0],
        "std": list(image_processor.image_std) if normalize else [1.0, 1.0, 1.0],
        "interpolation": interpolation,
        "resize_mode": resize_mode,
    }


def _described(size) -> str:
    items = size.items() if isinstance(size, dict) else vars(size).items()
    return str({key: value for key, value in items if value is not None})


def check_tokenizer(tokenizer) -> None:
    """open_clip's CLIP tokenizes with its SimpleTokenizer (CLIP's BPE vocabulary): the processor's must give the
    same ids."""
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise _refuse(
            f"its tokenizer has {len(tokenizer)} tokens, not CLIP's BPE vocabulary of {CLIP_VOCAB_SIZE} that "
            "open_clip's CLIP tokenizes with"
        )
    ids = tokenizer(PROBE_CAPTION)["input_ids"]
    if ids != PROBE_IDS:
        raise _refuse(
            f"its tokenizer gives {PROBE_CAPTION!r} the ids {ids}, open_clip's CLIP tokenizer {PROBE_IDS} (not CLIP's "
            "BPE vocabulary)"
        )


def open_clip_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """CLIPModel's weights under open_clip CLIP's names (its state dict, which holds no attn_mask: a buffer open_clip
    builds itself). A LoRA-adapted model's adapters are merged into its weights."""
    weights = model.state_dict()
    if has_lora(model):
        weights = merged_state_dict(model, weights)
    tensors = {open_clip: weights[clip] for open_clip, clip in weight_names(model.config).items()}
    tensors.update({open_clip: weights[clip].T for open_clip, clip in PROJECTIONS.items()})
    for open_clip, clips in fused_attention_names(model.config).items():
        tensors[open_clip] = torch.cat([weights[clip] for clip in clips])
    tensors["logit_scale"] = weights["logit_scale"]
    return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}


def save_open_clip_files(model: CLIPModel, processor, folder: str) -> list[str]:
    """Write open_clip_config.json and open_clip_model.safetensors into `folder` (made if missing; a saved model
    folder keeps its transformers files) so that open_clip loads `local-dir:FOLDER`, or the Hub repo the folder is
    pushed to, with these weights, this preprocessing and CLIP's tokenizer at this context length. Returns the paths
    written. A UserError says what open_clip's built-in CLIP cannot express (before anything is written)."""
    if not isinstance(model, CLIPModel):
        raise _refuse(
            f"it is a {type(model).__name__}, not a CLIPModel (SigLIP models are built in open_clip from a timm "
            "image tower, which this export does not write; a peft-wrapped model: merge_and_unload() it first)"
        )
    model_cfg = open_clip_model_cfg(model.config)
    preprocess_cfg = open_clip_preprocess_cfg(processor.image_processor, model.config.vision_config.image_size)
    check_tokenizer(processor.tokenizer)
    tensors = open_clip_state_dict(model)

    os.makedirs(folder, exist_ok=True)
    config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHT_FILES[0])
    with open(config_path, "w") as handle:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, handle, indent=2)
    save_file(tensors, weights_path)
    return [config_path, weights_path]
