"""An open_clip model converted to CLIPModel computes what open_clip computes: the same image and text embeddings
(float32, within 1e-5), the same logit scale, the same token ids and the same pixels; the architectures that do not
map are refused with their reason.

Every model is built from open_clip's own config (its `model_configs/NAME.json`), shrunk to 2 layers and 2 heads per
tower while keeping what shapes the computation: patch size, image size, head width, MLP ratio, activation (GELU or
QuickGELU), context length, projection size. Its random weights are all perturbed (LayerNorm scales and biases,
attention biases, logit scale), so a swapped or transposed weight shows. Nothing is downloaded.

open_clip itself is imported from a side folder beside the CPU torch: see open_clip_side.py.
"""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from open_clip_side import import_open_clip
from PIL import Image
from safetensors.torch import save_file

from clip_accel.config import UserError
from clip_accel.model import load_pretrained, save_model_folder
from clip_accel.open_clip_format import (
    check_mappable,
    clip_image_processor,
    clip_tokenizer,
    convert,
    load_checkpoint_file,
)

SUPPORTED = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-bigG-14", "ViT-B-32-quickgelu", "ViT-L-14-336"]
REFUSED = {  # open_clip's config name -> what the refusal must say
    "convnext_base": "timm model 'convnext_base'",
    "MobileCLIP-S1": "timm model 'fastvit_mci1'",
    "coca_ViT-B-32": "CoCa",
    "roberta-ViT-B-32": "Hugging Face model 'roberta-base'",
    "RN50": "ResNet",
    "ViT-B-16-SigLIP": "logit bias",
    "ViT-H-14-CLIPA": "no_ln_pre",
    "ViT-M-16-alt": "ls_init_value",
    "EVA02-B-16": "timm model",
}
CAPTIONS = [
    "a photo of a cat",
    "Café naïve façade — résumé, crème brûlée",
    "emoji 🐱🚀 and CJK 日本語のテキスト, 한국어",
    "  lots   of\twhite\nspace  ",
    "UPPER lower MiXeD, it's they're we've I'm you'll he'd",
    "numbers 12345 3.14 1,000 and punctuation!!! ??? ... ;:-- (brackets) [x] {y} @#$%^*",
    "combining e\u0301 and precomposed é",
    " ".join(f"word{index}" for index in range(100)),  # far more than 77 tokens: truncated
    "x" * 400,
]
# Captions open_clip's cleaning (ftfy.fix_text, html.unescape) rewrites before tokenizing: CLIPTokenizer does not.
CLEANED_BY_OPEN_CLIP = [
    "“Curly quotes” and ‘single’",
    "&amp; html &lt;b&gt;",
    "ﬁ ligature, Ｆｕｌｌwidth",
    "mojibake Ã©",
]


def shrunk(model_cfg: dict, layers: int = 2, heads: int = 2) -> dict:
    """open_clip's config with `layers` blocks and `heads` heads per tower; head width and everything else kept."""
    model_cfg = copy.deepcopy(model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    vision.update(layers=layers, width=heads * vision.get("head_width", 64))
    text.update(layers=layers, width=heads * text["width"] // text["heads"], heads=heads)
    return model_cfg


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value (LayerNorms start at 1/0 and attention biases at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def open_clip_and_converted(name: str, **text_cfg):
    open_clip = import_open_clip()
    model_cfg = shrunk(open_clip.get_model_config(name))
    model_cfg["text_cfg"].update(text_cfg)
    torch.manual_seed(0)
    reference = perturbed(open_clip.CLIP(**model_cfg))
    model, processor = convert(model_cfg, reference.state_dict(), name=name)
    return open_clip, model_cfg, reference, model, processor


def largest_differences(reference, model, processor, tokenizer, image_size: int) -> tuple[float, float]:
    """max |difference| of (image embeddings, text embeddings) between open_clip and CLIPModel, unnormalised."""
    pixels = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = processor.tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
        return (
            (image - reference.encode_image(pixels)).abs().max().item(),
            (text - reference.encode_text(tokenizer(CAPTIONS))).abs().max().item(),
        )


@pytest.mark.parametrize("name", SUPPORTED)
def test_converted_model_embeds_as_open_clip_does(name):
    open_clip, model_cfg, reference, model, processor = open_clip_and_converted(name)
    image_size = model_cfg["vision_cfg"]["image_size"]
    tokenizer = open_clip.get_tokenizer(name)
    image_difference, text_difference = largest_differences(reference, model, processor, tokenizer, image_size)
    assert image_difference < 1e-5 and text_difference < 1e-5, (image_difference, text_difference)
    assert model.logit_scale.item() == reference.logit_scale.item()
    expected_act = "quick_gelu" if "quickgelu" in name else "gelu"
    assert model.config.vision_config.hidden_act == model.config.text_config.hidden_act == expected_act


def test_a_shorter_context_length_carries_over():
    open_clip, model_cfg, reference, model, processor = open_clip_and_converted("ViT-B-32", context_length=32)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    assert model.config.text_config.max_position_embeddings == processor.tokenizer.model_max_length == 32
    assert max(largest_differences(reference, model, processor, tokenizer, 224)) < 1e-5


def test_truncated_captions_pool_at_the_same_end_of_text_token():
    """Over-long captions end in end-of-text at the last position in both tokenizers (open_clip overwrites the last
    token; CLIPTokenizer truncates before adding it)."""
    open_clip = import_open_clip()
    tokens = clip_tokenizer()(CAPTIONS[-2:], padding="max_length", truncation=True)["input_ids"]
    assert [row[-1] for row in tokens] == [49407, 49407]
    assert tokens == open_clip.get_tokenizer("ViT-B-32")(CAPTIONS[-2:]).tolist()


@pytest.mark.parametrize("context_length", [77, 32])
def test_token_ids_equal_open_clips(context_length):
    """Equal ids wherever the attention mask is 1; CLIPTokenizer pads with end-of-text where open_clip pads with 0,
    which the mask and end-of-text pooling make irrelevant (the embedding tests feed both paddings)."""
    open_clip = import_open_clip()
    expected = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)(CAPTIONS)
    tokens = clip_tokenizer(context_length)(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    mask = tokens["attention_mask"].bool()
    assert tokens["input_ids"].shape == expected.shape
    assert torch.equal(tokens["input_ids"][mask], expected[mask]) and (expected[~mask] == 0).all()


def test_captions_open_clip_cleans_tokenize_equal_once_cleaned():
    """The one gap: open_clip runs ftfy.fix_text and html.unescape over each caption; CLIPTokenizer does not. The
    ids differ on such captions, and agree once the caption is cleaned as open_clip cleans it."""
    open_clip = import_open_clip()
    expected = open_clip.get_tokenizer("ViT-B-32")(CLEANED_BY_OPEN_CLIP)
    tokenizer = clip_tokenizer()

    def ids(captions):
        return tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]

    cleaned = [open_clip.tokenizer.basic_clean(caption) for caption in CLEANED_BY_OPEN_CLIP]
    assert torch.equal(ids(cleaned).where(expected != 0, 0), expected)
    assert all(
        not torch.equal(row, expected_row)
        for row, expected_row in zip(ids(CLEANED_BY_OPEN_CLIP), expected, strict=True)
    )


def photos() -> list[Image.Image]:
    """Smooth gradients with noise, landscape, portrait, square, smaller than the model's input, and odd sizes."""
    generator = np.random.default_rng(0)
    images = []
    for width, height in [(640, 480), (480, 640), (224, 224), (100, 60), (1000, 333), (301, 257), (225, 1200)]:
        ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
        pixels = ramp * np.array([1.0, 0.6, 0.3]) + generator.normal(0, 20, (height, width, 3))
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
    images.append(images[0].convert("L"))  # a greyscale photo: both convert it to RGB
    return images


def crop_shift(photo: Image.Image, image_size: int) -> tuple[int, int]:
    """(rows, columns) by which torchvision's centre crop starts later than CLIPImageProcessor's after the
    shortest-edge resize: torchvision rounds the offset half to even (`int(round(d / 2))`), transformers floors it
    (`d // 2`), so they part by one pixel where the overshoot d is 3 modulo 4. CLIPImageProcessor cannot express it."""
    width, height = photo.size
    short, long = min(width, height), max(width, height)
    resized_long = int(image_size * long / short)  # both libraries size the long edge so
    overshoot = resized_long - image_size
    shift = int(round(overshoot / 2)) - overshoot // 2
    return (shift, 0) if height > width else (0, shift)


@pytest.mark.parametrize(
    ("preprocess_cfg", "image_size"),
    [
        ({}, 224),
        ({}, 336),
        ({"resize_mode": "squash", "interpolation": "bilinear"}, 224),
        ({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear"}, 256),
    ],
    ids=["openai-224", "openai-336", "squash-bilinear-224", "half-mean-std-bilinear-256"],
)
def test_processor_pixels_equal_open_clips_transform(preprocess_cfg, image_size):
    """Equal pixels for every photo, except the one-pixel crop shift of `crop_shift` (the 301x257 photo at 256):
    there the processor's pixels are open_clip's moved by one row or column, equal on the overlap."""
    open_clip = import_open_clip()
    settings = {**open_clip.transform.PreprocessCfg().__dict__, **preprocess_cfg, "size": image_size}
    transform = open_clip.transform.image_transform_v2(open_clip.transform.PreprocessCfg(**settings), is_train=False)
    processor = clip_image_processor(preprocess_cfg, image_size)
    shifted = []
    for photo in photos():
        pixels = processor(images=photo, return_tensors="pt")["pixel_values"][0]
        expected = transform(photo)
        assert pixels.shape == expected.shape == (3, image_size, image_size)
        rows, columns = crop_shift(photo, image_size) if settings["resize_mode"] == "shortest" else (0, 0)
        if rows or columns:
            shifted.append(photo.size)
        overlap = pixels[:, rows:, columns:] - expected[:, : image_size - rows, : image_size - columns]
        assert overlap.abs().max().item() < 1e-5, photo.size
    assert shifted == ([(301, 257)] if image_size == 256 else [])


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unmappable_architectures_are_refused_with_the_reason(name):
    open_clip = import_open_clip()
    with pytest.raises(UserError, match=f"{name} cannot become a CLIPModel: .*{re.escape(REFUSED[name])}"):
        check_mappable(open_clip.get_model_config(name), name)


@pytest.mark.parametrize(
    ("text_cfg", "reason"),
    [({"pool_type": "last"}, "pools by 'last'"), ({"no_causal_mask": True}, "no_causal_mask=True")],
)
def test_a_text_tower_clip_model_cannot_express_is_refused(text_cfg, reason):
    open_clip = import_open_clip()
    model_cfg = open_clip.get_model_config("ViT-B-32")
    model_cfg["text_cfg"].update(text_cfg)
    with pytest.raises(UserError, match=re.escape(reason)):
        check_mappable(model_cfg, "ViT-B-32")


@pytest.mark.parametrize("weights_file", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
def test_load_pretrained_converts_a_folder_open_clip_wrote(weights_file, tmp_path):
    """--model_name_or_path FOLDER: a folder as open_clip's push_to_hf_hub writes it (open_clip_config.json with
    model_cfg and preprocess_cfg, and the weights under either of its names) loads as a converted CLIPModel."""
    open_clip = import_open_clip()
    model_cfg = shrunk(open_clip.get_model_config("ViT-B-16-quickgelu"))
    reference = perturbed(open_clip.CLIP(**model_cfg))
    preprocess_cfg = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}
    settings = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(settings))
    tensors = {key: value.contiguous() for key, value in reference.state_dict().items()}
    if weights_file.endswith(".safetensors"):
        save_file(tensors, tmp_path / weights_file)
    else:
        torch.save(tensors, tmp_path / weights_file)

    model, processor = load_pretrained(str(tmp_path))
    tokenizer = open_clip.get_tokenizer("ViT-B-16-quickgelu")
    assert max(largest_differences(reference, model, processor, tokenizer, 224)) < 1e-5
    assert model.config.text_config.hidden_act == "quick_gelu" and model.dtype == torch.float32
    assert list(processor.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert processor.image_processor.resample == Image.Resampling.BILINEAR


def test_an_open_clip_folder_without_weights_or_of_an_unmappable_model_says_so(tmp_path):
    open_clip = import_open_clip()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("RN50")}))
    with pytest.raises(UserError, match="no weights: it needs one of open_clip_model.safetensors"):
        load_pretrained(str(tmp_path))
    save_file({"logit_scale": torch.zeros(())}, tmp_path / "open_clip_model.safetensors")
    with pytest.raises(UserError, match="cannot become a CLIPModel: its image tower is a ResNet"):
        load_pretrained(str(tmp_path))


def test_a_converted_model_saved_loads_back_without_open_clip(tmp_path):
    """Converted once: save_model_folder writes a plain CLIP folder that load_pretrained (CLIPModel, AutoProcessor)
    reads back with the same embeddings, token ids and preprocessing."""
    open_clip = import_open_clip()
    model_cfg = shrunk(open_clip.get_model_config("ViT-B-32"))
    model_cfg["text_cfg"]["context_length"] = 32
    reference = perturbed(open_clip.CLIP(**model_cfg))
    model, processor = convert(model_cfg, reference.state_dict(), {"interpolation": "bilinear"})
    save_model_folder(model, processor, str(tmp_path / "converted"))

    loaded, loaded_processor = load_pretrained(str(tmp_path / "converted"))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    assert max(largest_differences(reference, loaded, loaded_processor, tokenizer, 224)) < 1e-5
    assert loaded_processor.tokenizer(CAPTIONS).input_ids == processor.tokenizer(CAPTIONS).input_ids
    assert loaded_processor.tokenizer.model_max_length == 32
    photo = photos()[5]
    assert torch.equal(
        loaded_processor(images=photo, return_tensors="pt")["pixel_values"],
        processor(images=photo, return_tensors="pt")["pixel_values"],
    )


def test_the_plain_block_named_default_is_accepted_and_another_caption_cleaning_refused():
    open_clip = import_open_clip()
    model_cfg = open_clip.get_model_config("ViT-B-32")
    model_cfg["vision_cfg"]["block_type"] = model_cfg["text_cfg"]["block_type"] = "default"
    check_mappable(model_cfg, "ViT-B-32")
    model_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": "whitespace"}
    with pytest.raises(UserError, match="tokenizer_kwargs="):
        check_mappable(model_cfg, "ViT-B-32")


def test_a_checkpoint_open_clips_training_wrote_converts_by_its_architecture_name(tmp_path):
    """epoch_N.pt as open_clip's training saves it (DDP's `module.` prefix, epoch, optimizer state) with the
    architecture's name: open_clip's own config, at full size (ViT-S-32, the smallest plain ViT)."""
    open_clip = import_open_clip()
    reference = perturbed(open_clip.create_model("ViT-S-32"))
    state_dict = {f"module.{key}": value for key, value in reference.state_dict().items()}
    torch.save({"epoch": 32, "name": "run", "state_dict": state_dict, "optimizer": {}}, tmp_path / "epoch_32.pt")

    model, processor = load_checkpoint_file(str(tmp_path / "epoch_32.pt"), "ViT-S-32")
    assert max(largest_differences(reference, model, processor, open_clip.get_tokenizer("ViT-S-32"), 224)) < 1e-5
    with pytest.raises(UserError, match="open_clip has no architecture 'ViT-Q-99'"):
        load_checkpoint_file(str(tmp_path / "epoch_32.pt"), "ViT-Q-99")
