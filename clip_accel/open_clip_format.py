"""open_clip checkpoints as a transformers CLIPModel: the architectures that map exactly, and a refusal for the rest.

open_clip describes a model by a config dict (`model_configs/NAME.json`, or `model_cfg` in a Hub folder's
`open_clip_config.json`) and its preprocessing by `preprocess_cfg`. A ViT image tower and open_clip's own text
transformer (pre-LayerNorm blocks, fused q/k/v, EOT pooling, a bias-free projection) are CLIPModel's towers under
other names; everything else (timm or ResNet image towers, HF text towers, CoCa, attentional or average pooling,
layer scale, QK-norm and the other attention variants, SigLIP's logit bias) changes the computation, and is refused
with the reason. Nothing here imports open_clip: the BPE vocabulary is read from its installed package's file.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import pickle

import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from .config import UserError

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's names, first preferred
# open_clip's PreprocessCfg defaults (OpenAI's statistics), which a preprocess_cfg overrides field by field.
DEFAULT_PREPROCESS = {
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
    "mode": "RGB",
}
# GPT-2's reversible byte -> character table as open_clip orders it: the printable bytes as themselves, then the
# other 68 bytes as chr(256), chr(257), ...: the first 256 ids.
BYTE_SYMBOLS = [
    *(chr(code) for code in [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]),
    *(chr(256 + index) for index in range(68)),
]
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
CLIP_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer: 256 bytes x2, 48,894 merges, start and end of text
END_OF_TEXT_ID = 49407  # the largest id: open_clip's argmax pooling finds it, CLIPModel's eos pooling too
# Settings whose open_clip default is the only value CLIPModel computes (the config key -> that default).
TOWER_DEFAULTS = {
    "ls_init_value": None,  # layer scale
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
    "act_kwargs": None,
}
VISION_DEFAULTS = {
    **TOWER_DEFAULTS,
    "timm_model_name": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pool_type": "tok",
}
TEXT_DEFAULTS = {
    **TOWER_DEFAULTS,
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "proj_bias": False,
    "proj_type": "linear",
    "tokenizer_kwargs": None,  # another caption cleaning or a token reduction: other ids
    "vocab_size": CLIP_VOCAB_SIZE,
}


def check_mappable(model_cfg: dict, name: str = "this open_clip model") -> None:
    """Raise a UserError naming the first feature of `model_cfg` that CLIPModel cannot compute."""

    def refuse(why: str) -> UserError:
        return UserError(f"{name} cannot become a CLIPModel: {why}. Start from a ViT CLIP with open_clip's text tower.")

    if model_cfg.get("multimodal_cfg") is not None:
        raise refuse("it is a CoCa model (a captioning decoder beside the towers)")
    if model_cfg.get("init_logit_bias") is not None:
        raise UserError(
            f"{name} cannot become a CLIPModel: it has a logit bias (a SigLIP model on a timm image tower, not "
            "converted). Start from a transformers SigLIP checkpoint instead (e.g. google/siglip-base-patch16-224), "
            "which clip_accel trains as SiglipModel."
        )
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        raise refuse(f"its image tower is the timm model {vision['timm_model_name']!r} (ConvNeXt, FastViT, ...)")
    if isinstance(vision.get("layers"), list | tuple):
        raise refuse("its image tower is a ResNet")
    if text.get("hf_model_name"):
        raise refuse(f"its text tower is the Hugging Face model {text['hf_model_name']!r}")
    for tower, settings, defaults in (("image", vision, VISION_DEFAULTS), ("text", text, TEXT_DEFAULTS)):
        if settings.get("block_type") == "default":  # the plain block, named
            settings = {**settings, "block_type": None}
        for key, default in defaults.items():
            if settings.get(key, default) != default:
                raise refuse(f"its {tower} tower sets {key}={settings[key]!r} (only {key}={default!r} maps)")
        if set(settings.get("norm_kwargs") or {}) - {"eps"}:
            raise refuse(f"its {tower} tower's LayerNorm takes {settings['norm_kwargs']} (CLIPModel: eps only)")
    if text.get("pool_type", "argmax") not in ("argmax", "eos") or (
        text.get("pool_type") == "eos" and text.get("eos_id") != END_OF_TEXT_ID
    ):
        raise refuse(f"its text tower pools by {text.get('pool_type')!r} (CLIPModel pools at the end-of-text token)")
    image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 16)
    if isinstance(image_size, list | tuple) and len(set(image_size)) > 1:
        raise refuse(f"its images are not square ({image_size})")
    if isinstance(patch_size, list | tuple) and len(set(patch_size)) > 1:
        raise refuse(f"its patches are not square ({patch_size})")


def _square(size) -> int:
    return size[0] if isinstance(size, list | tuple) else size


def clip_config(model_cfg: dict, name: str = "this open_clip model") -> CLIPConfig:
    """The CLIPConfig of an open_clip model config (refused with a UserError where it does not map)."""
    check_mappable(model_cfg, name)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    vision_width, text_width = vision.get("width", 768), text.get("width", 512)
    return CLIPConfig(
        projection_dim=model_cfg["embed_dim"],
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),  # as open_clip sizes its MLP
            "num_hidden_layers": vision.get("layers", 12),
            "num_attention_heads": vision_width // vision.get("head_width", 64),
            "image_size": _square(vision.get("image_size", 224)),
            "patch_size": _square(vision.get("patch_size", 16)),
            "hidden_act": act,
            "layer_norm_eps": (vision.get("norm_kwargs") or {}).get("eps", 1e-5),
            "projection_dim": model_cfg["embed_dim"],
        },
        text_config={
            "vocab_size": text.get("vocab_size", CLIP_VOCAB_SIZE),
            "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text.get("layers", 12),
            "num_attention_heads": text.get("heads", 8),
            "max_position_embeddings": text.get("context_length", 77),
            "hidden_act": act,
            "layer_norm_eps": (text.get("norm_kwargs") or {}).get("eps", 1e-5),
            "projection_dim": model_cfg["embed_dim"],
            "bos_token_id": END_OF_TEXT_ID - 1,
            "eos_token_id": END_OF_TEXT_ID,
            "pad_token_id": END_OF_TEXT_ID,
        },
    )


# open_clip's (CLIP layout: text at the top, CustomTextCLIP's under `text.`) -> CLIPModel's names of the weights both
# hold as they are; the projections hold transposed (PROJECTIONS), and q/k/v fused (fused_attention_names).
WEIGHT_NAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' name
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}  # x @ proj
BLOCK_NAMES = {  # in each residual block / CLIPEncoderLayer, for .weight and .bias
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _blocks(config: CLIPConfig):
    """(open_clip's block prefix, CLIPModel's layer prefix) of every layer of both towers."""
    for source, target, tower_config in (
        ("visual.transformer", "vision_model.encoder", config.vision_config),
        ("transformer", "text_model.encoder", config.text_config),
    ):
        for index in range(tower_config.num_hidden_layers):
            yield f"{source}.resblocks.{index}", f"{target}.layers.{index}"


def weight_names(config: CLIPConfig) -> dict[str, str]:
    """open_clip's name -> CLIPModel's of every weight held as it is (all but projections, q/k/v, logit_scale)."""
    names = dict(WEIGHT_NAMES)
    for block, layer in _blocks(config):
        for open_clip_name, clip_name in BLOCK_NAMES.items():
            for part in ("weight", "bias"):
                names[f"{block}.{open_clip_name}.{part}"] = f"{layer}.{clip_name}.{part}"
    return names


def fused_attention_names(config: CLIPConfig) -> dict[str, tuple[str, str, str]]:
    """nn.MultiheadAttention's fused `in_proj_weight`/`in_proj_bias` -> CLIPModel's (q, k, v) projections, in the
    order open_clip stacks them."""
    return {
        f"{block}.attn.in_proj_{part}": tuple(f"{layer}.self_attn.{name}_proj.{part}" for name in "qkv")
        for block, layer in _blocks(config)
        for part in ("weight", "bias")
    }


def clip_state_dict(state_dict: dict, config: CLIPConfig) -> dict[str, torch.Tensor]:
    """An open_clip CLIP's (or CustomTextCLIP's, text under `text.`) state dict under CLIPModel's names."""
    state_dict = {key.removeprefix("text."): value for key, value in state_dict.items()}
    converted = {clip: state_dict[open_clip] for open_clip, clip in weight_names(config).items()}
    # open_clip multiplies x @ proj: nn.Linear holds proj.T
    converted.update({clip: state_dict[open_clip].T for open_clip, clip in PROJECTIONS.items()})
    for open_clip, clips in fused_attention_names(config).items():
        converted.update(zip(clips, state_dict[open_clip].chunk(3), strict=True))
    converted["logit_scale"] = state_dict["logit_scale"].reshape(())
    return {key: value.contiguous() for key, value in converted.items()}


def open_clip_package_file(*parts: str) -> str:
    """A file open_clip ships (its BPE merges, its model configs), found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "Converting an open_clip model needs files open_clip ships: pip install --no-deps open_clip_torch (with "
            "its dependencies it brings a torchvision that, beside a CPU build of torch, fails to import and takes "
            "transformers' image processors with it)."
        )
    return os.path.join(spec.submodule_search_locations[0], *parts)


def open_clip_bpe_file() -> str:
    return open_clip_package_file("bpe_simple_vocab_16e6.txt.gz")


def open_clip_model_config(model_name: str) -> dict:
    """open_clip's own config of the architecture `model_name` (its `model_configs/NAME.json`)."""
    path = open_clip_package_file("model_configs", f"{model_name}.json")
    if not os.path.isfile(path):
        raise UserError(f"open_clip has no architecture {model_name!r} (no {path}): name one of its model_configs.")
    with open(path) as file:
        return json.load(file)


def clip_tokenizer(context_length: int = 77, bpe_file: str | None = None) -> CLIPTokenizer:
    """CLIPTokenizer with open_clip's vocabulary and ids (built as its SimpleTokenizer builds them), truncating to
    `context_length` with the end-of-text token last, as open_clip does. It pads with end-of-text (open_clip pads
    with 0; the attention mask and end-of-text pooling make the embeddings equal). It does not run open_clip's
    caption cleaning (ftfy.fix_text, html.unescape): captions that cleaning changes tokenize differently."""
    merges = _merges(bpe_file or open_clip_bpe_file())
    tokens = [*BYTE_SYMBOLS, *(symbol + "</w>" for symbol in BYTE_SYMBOLS), *("".join(pair) for pair in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


@functools.lru_cache(maxsize=2)
def _merges(bpe_file: str) -> list[tuple[str, str]]:
    with gzip.open(bpe_file, "rt", encoding="utf-8") as lines:
        # open_clip reads lines 1..48,894 (line 0 is a header): 49,408 ids less 2 x 256 byte symbols and 2 specials
        return [tuple(line.split()) for line in lines.read().split("\n")[1 : 49152 - 256 - 2 + 1]]


def clip_image_processor(preprocess_cfg: dict, image_size: int) -> CLIPImageProcessorPil:
    """open_clip's evaluation transform as a (PIL) CLIPImageProcessor: resize (shortest edge, then centre crop; or
    squash to a square), the interpolation, mean and std of `preprocess_cfg` over open_clip's defaults. One gap:
    torchvision rounds the centre crop's offset half to even, transformers floors it (one pixel apart where the
    resized edge overshoots by 3 modulo 4)."""
    settings = {**DEFAULT_PREPROCESS, **preprocess_cfg}
    if settings["interpolation"] not in RESAMPLE:
        raise UserError(f"open_clip's {settings['interpolation']!r} interpolation has no CLIPImageProcessor twin.")
    if settings["mode"] != "RGB":
        raise UserError(f"open_clip preprocessing in image mode {settings['mode']!r}: only RGB maps.")
    common = {
        "resample": RESAMPLE[settings["interpolation"]],
        "image_mean": list(settings["mean"]),
        "image_std": list(settings["std"]),
        "do_convert_rgb": True,
    }
    if settings["resize_mode"] == "shortest":
        size = {"shortest_edge": image_size}
        return CLIPImageProcessorPil(size=size, crop_size={"height": image_size, "width": image_size}, **common)
    if settings["resize_mode"] == "squash":
        return CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False, **common)
    raise UserError(
        f"open_clip's {settings['resize_mode']!r} resize mode (pad to a square) has no CLIPImageProcessor twin."
    )


def convert(
    model_cfg: dict, state_dict: dict, preprocess_cfg: dict | None = None, name: str = "this open_clip model"
) -> tuple[CLIPModel, CLIPProcessor]:
    """(CLIPModel in float32 with the open_clip weights, CLIPProcessor with its tokenizer and preprocessing)."""
    config = clip_config(model_cfg, name)
    model = CLIPModel(config)
    weights = {key: value.float() for key, value in clip_state_dict(state_dict, config).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise UserError(f"{name}'s weights do not fit its config: missing {missing}, unexpected {unexpected}.")
    processor = CLIPProcessor(
        image_processor=clip_image_processor(preprocess_cfg or {}, config.vision_config.image_size),
        tokenizer=clip_tokenizer(config.text_config.max_position_embeddings),
    )
    return model.eval(), processor


def is_open_clip_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_FILE))


def load_checkpoint_file(path: str, model_name: str) -> tuple[CLIPModel, CLIPProcessor]:
    """Convert a checkpoint open_clip's training wrote (`epoch_N.pt`: its `state_dict`, under `module.` when trained
    with DDP) or a bare state dict, of open_clip's architecture `model_name`, with open_clip's default preprocessing."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as error:
        raise UserError(
            f"{path} is not a checkpoint open_clip's training saves (a TorchScript archive, such as OpenAI's own "
            f"ViT-B-32.pt, is not read): {error}"
        ) from error
    state_dict = checkpoint.get("state_dict", checkpoint)
    state_dict = {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in state_dict.items()}
    return convert(open_clip_model_config(model_name), state_dict, name=model_name)


def read_folder(folder: str) -> tuple[str, str]:
    """(open_clip_config.json, the weights file) of a folder as open_clip's push_to_hf_hub writes it."""
    weights = [os.path.join(folder, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not weights:
        raise UserError(f"{folder} holds {CONFIG_FILE} but no weights: it needs one of {', '.join(WEIGHT_FILES)}.")
    return os.path.join(folder, CONFIG_FILE), weights[0]


def load_weights(path: str) -> dict:
    """The state dict in open_clip's weights file (safetensors, or a pickled state dict read weights-only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
