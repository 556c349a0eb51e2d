"""A CLIPModel saved in open_clip's format loads in open_clip itself (`local-dir:` and `hf-hub:`) with the same
weights (open_clip loads them strictly), the same embeddings (float32, within 1e-5), the same pixels and CLIP's
tokenizer at the same context length; what open_clip's built-in CLIP cannot express is refused with the reason.

The models are test_open_clip_format's: open_clip's own configs shrunk to 2 layers and 2 heads, every weight
perturbed, converted to CLIPModel, then written back. open_clip is imported from its side folder (open_clip_side.py).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_clip_config, tiny_siglip_values, train_on_demo
from hub_server import FakeHub
from open_clip_side import import_open_clip
from PIL import Image
from safetensors.torch import load_file, save_file
from test_open_clip_format import CAPTIONS, SUPPORTED, crop_shift, largest_differences, perturbed, photos, shrunk
from transformers import CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel

from clip_accel.config import ModelConfig, UserError
from clip_accel.lora import add_lora
from clip_accel.model import load_pretrained, save_model_folder
from clip_accel.open_clip_export import PROBE_CAPTION, PROBE_IDS, save_open_clip_files
from clip_accel.open_clip_format import WEIGHT_FILES, clip_tokenizer, convert

PREPROCESS = {  # the architectures exported with another preprocessing than OpenAI's (shortest edge, bicubic)
    "ViT-B-16": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"},
    "ViT-B-32-quickgelu": {"resize_mode": "squash", "interpolation": "bilinear"},
}
CASES = [(name, {}) for name in SUPPORTED] + [("ViT-B-32", {"context_length": 32})]


def converted(name: str, image_size: int | None = None, **text_cfg):
    """(open_clip, its model_cfg, the perturbed open_clip model, the CLIPModel and processor converted from it)."""
    open_clip = import_open_clip()
    model_cfg = shrunk(open_clip.get_model_config(name))
    model_cfg["text_cfg"].update(text_cfg)
    if image_size:
        model_cfg["vision_cfg"]["image_size"] = image_size
    torch.manual_seed(0)
    reference = perturbed(open_clip.CLIP(**model_cfg))
    model, processor = convert(model_cfg, reference.state_dict(), PREPROCESS.get(name), name=name)
    return open_clip, model_cfg, reference, model, processor


def assert_pixels_equal(processor, preprocess, image_size: int, resize_mode: str) -> None:
    """open_clip's evaluation transform gives the processor's pixels on every photo; after a shortest-edge resize,
    on the overlap where torchvision's centre crop starts a pixel later (test_open_clip_format.crop_shift)."""
    for photo in photos():
        pixels, expected = processor(images=photo, return_tensors="pt")["pixel_values"][0], preprocess(photo)
        assert pixels.shape == expected.shape == (3, image_size, image_size)
        rows, columns = crop_shift(photo, image_size) if resize_mode == "shortest" else (0, 0)
        overlap = pixels[:, rows:, columns:] - expected[:, : image_size - rows, : image_size - columns]
        assert overlap.abs().max().item() < 1e-5, photo.size


@pytest.mark.parametrize(("name", "text_cfg"), CASES, ids=[f"{name}{'-context-32' * bool(t)}" for name, t in CASES])
def test_open_clip_loads_the_saved_folder_as_the_model_it_came_from(name, text_cfg, tmp_path):
    """open_clip → CLIPModel → save_model_folder + save_open_clip_files → `open_clip.create_model_and_transforms(
    "local-dir:FOLDER")`: open_clip's weights come back bit for bit (loaded strictly), its embeddings equal
    CLIPModel's, its preprocessing gives the processor's pixels, its tokenizer is CLIP's at the same length."""
    open_clip, model_cfg, reference, model, processor = converted(name, **text_cfg)
    folder = tmp_path / "model"
    save_model_folder(model, processor, str(folder))
    transformers_files = set(os.listdir(folder))
    written = save_open_clip_files(model, processor, str(folder))

    assert [os.path.basename(path) for path in written] == ["open_clip_config.json", WEIGHT_FILES[0]]
    assert set(os.listdir(folder)) == transformers_files | {"open_clip_config.json", WEIGHT_FILES[0]}
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")  # load_state_dict(strict)
    assert type(loaded) is open_clip.CLIP
    expected = reference.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    differing = [key for key, value in loaded.eval().state_dict().items() if not torch.equal(value, expected[key])]
    assert not differing, differing

    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    assert tokenizer.context_length == processor.tokenizer.model_max_length == model_cfg["text_cfg"]["context_length"]
    image_size = model_cfg["vision_cfg"]["image_size"]
    image_difference, text_difference = largest_differences(loaded, model, processor, tokenizer, image_size)
    assert image_difference < 1e-5 and text_difference < 1e-5, (image_difference, text_difference)
    assert loaded.logit_scale.item() == model.logit_scale.item()
    resize_mode = PREPROCESS.get(name, {}).get("resize_mode", "shortest")
    assert_pixels_equal(processor, preprocess, image_size, resize_mode)


def test_a_lora_adapted_model_is_written_merged(tmp_path):
    """A model with LoRA adapters in it (as clip_accel trains one) is written as the merged weights the output
    folder holds: open_clip computes what the adapted model computes."""
    open_clip, _, reference, model, processor = converted("ViT-B-32")
    add_lora(model, ModelConfig(lora_rank=4, lora_target_modules="q_proj,v_proj,fc1"))
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if ".lora_B." in parameter_name:  # (lora_B starts at zero: the adapters would add nothing)
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    save_open_clip_files(model.eval(), processor, str(tmp_path))
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    assert max(largest_differences(loaded, model, processor, tokenizer, 224)) < 1e-5
    assert min(largest_differences(reference, model, processor, tokenizer, 224)) > 1e-3  # the adapters count


def test_the_probe_caption_has_open_clips_ids():
    """The ids save_open_clip_files checks a tokenizer against are open_clip's (and open_clip_format's tokenizer's)."""
    open_clip = import_open_clip()
    expected = open_clip.tokenizer.SimpleTokenizer()([PROBE_CAPTION])[0]
    assert expected[: len(PROBE_IDS)].tolist() == PROBE_IDS and not expected[len(PROBE_IDS) :].any()
    assert clip_tokenizer()(PROBE_CAPTION)["input_ids"] == PROBE_IDS


@pytest.fixture(scope="module")
def exportable():
    """(CLIPModel, processor) that save_open_clip_files writes: each refusal test changes one thing in a copy."""
    _, _, _, model, processor = converted("ViT-B-32")
    return model, processor


def swapped_ids_tokenizer() -> CLIPTokenizer:
    """CLIP's vocabulary and merges, 49,408 tokens, with two words' ids swapped."""
    tokenizer = clip_tokenizer()
    vocab = tokenizer.get_vocab()
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    return CLIPTokenizer(vocab=vocab, merges=[tuple(merge) for merge in merges])


def set_both_activations(model, act: str) -> None:
    model.config.vision_config.hidden_act = model.config.text_config.hidden_act = act


REFUSALS = {  # a change to (model, processor) -> what the refusal says
    "swapped-ids": (
        lambda model, processor: setattr(processor, "tokenizer", swapped_ids_tokenizer()),
        "its tokenizer gives 'A photo of a cat, 42 Cafés!' the ids [49406, 320, 1125, 539, 320, 1929,",
    ),
    "one-tower-quick-gelu": (
        lambda model, processor: setattr(model.config.vision_config, "hidden_act", "quick_gelu"),
        "its image tower uses quick_gelu and its text tower gelu",
    ),
    "relu": (lambda model, processor: set_both_activations(model, "relu"), "its activation is 'relu'"),
    "crop-after-a-larger-resize": (
        lambda model, processor: setattr(processor.image_processor, "size", {"shortest_edge": 256}),
        "resizes to {'shortest_edge': 256} and crops {'height': 224, 'width': 224}, where open_clip resizes the "
        "shortest edge to 224",
    ),
    "non-square-crop": (
        lambda model, processor: setattr(processor.image_processor, "crop_size", {"height": 224, "width": 200}),
        "crops {'height': 224, 'width': 200}",
    ),
    "no-resize": (
        lambda model, processor: setattr(processor.image_processor, "do_resize", False),
        "its image processor resizes to nothing",
    ),
    "nearest": (
        lambda model, processor: setattr(processor.image_processor, "resample", Image.Resampling.NEAREST),
        "resamples with <Resampling.NEAREST: 0> (open_clip: bicubic or bilinear)",
    ),
    "unscaled": (
        lambda model, processor: setattr(processor.image_processor, "do_rescale", False),
        "does not scale pixels to [0, 1]",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_open_clips_clip_cannot_express_is_refused_with_the_reason(case, exportable, tmp_path):
    model, processor = copy.deepcopy(exportable)
    change, reason = REFUSALS[case]
    change(model, processor)
    with pytest.raises(UserError, match=f"cannot be saved in open_clip's format: .*{re.escape(reason)}"):
        save_open_clip_files(model, processor, str(tmp_path))
    assert os.listdir(tmp_path) == []  # refused before anything is written


def test_a_tiny_model_and_tokenizer_and_siglip_are_refused(exportable, offline_tokenizer, tmp_path):
    model, processor = copy.deepcopy(exportable)
    processor.tokenizer = offline_tokenizer
    with pytest.raises(UserError, match=rf"its tokenizer has {len(offline_tokenizer)} tokens, not CLIP's BPE"):
        save_open_clip_files(model, processor, str(tmp_path))
    tiny = CLIPModel(tiny_clip_config(vocab_size=len(offline_tokenizer)))
    with pytest.raises(UserError, match=rf"its text tower has {len(offline_tokenizer)} token embeddings"):
        save_open_clip_files(tiny, processor, str(tmp_path))
    siglip = SiglipModel(SiglipConfig(**{k: v for k, v in tiny_siglip_values().items() if k != "model_type"}))
    with pytest.raises(UserError, match="it is a SiglipModel, not a CLIPModel .*timm image tower"):
        save_open_clip_files(siglip, processor, str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_model_fine_tuned_from_open_clip_goes_back_to_open_clip_with_its_new_weights(tmp_path, demo_dir):
    """open_clip folder → `clip-accel train --model_name_or_path FOLDER` (1 epoch, 64-pixel images) → the output
    folder, loaded as `clip-accel export` loads it, written in open_clip's format → open_clip computes the
    fine-tuned model's embeddings, not the starting model's."""
    open_clip, model_cfg, reference, _, _ = converted("ViT-B-32-quickgelu", image_size=64)
    start = tmp_path / "open_clip"
    start.mkdir()
    (start / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file({key: value.contiguous() for key, value in reference.state_dict().items()}, start / WEIGHT_FILES[0])
    schedule = {"num_train_epochs": 1, "per_device_train_batch_size": 64, "per_device_eval_batch_size": 100}
    configs, _ = train_on_demo(tmp_path, demo_dir, ModelConfig(model_name_or_path=str(start)), **schedule, seed=0)
    output_dir = configs[2].output_dir

    trained, processor = load_pretrained(output_dir)
    save_open_clip_files(trained, processor, output_dir)
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{output_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{output_dir}")
    assert max(largest_differences(loaded, trained.eval(), processor, tokenizer, 64)) < 1e-5
    assert min(largest_differences(reference, trained, processor, tokenizer, 64)) > 1e-3  # it trained
    assert_pixels_equal(processor, preprocess, 64, "shortest")
    written = load_file(os.path.join(output_dir, WEIGHT_FILES[0]))
    assert torch.equal(written["logit_scale"], trained.logit_scale.detach())


# Run with HF_ENDPOINT at the fake Hub (huggingface_hub reads it at import): pushes FOLDER as REPO, loads
# `hf-hub:REPO` in open_clip and writes its embeddings of test_open_clip_format's inputs to OUT.
HUB_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[4])
import torch
from huggingface_hub import HfApi
from open_clip_side import import_open_clip
from safetensors.torch import save_file
from test_open_clip_format import CAPTIONS
folder, repo, out = sys.argv[1:4]
HfApi().create_repo(repo)
HfApi().upload_folder(folder_path=folder, repo_id=repo)
open_clip = import_open_clip()
model, _, preprocess = open_clip.create_model_and_transforms(f"hf-hub:{repo}")
tokenizer = open_clip.get_tokenizer(f"hf-hub:{repo}")
pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    save_file({"image": model.eval().encode_image(pixels), "text": model.encode_text(tokenizer(CAPTIONS))}, out)
print(json.dumps({"context_length": tokenizer.context_length, "preprocess": model.visual.preprocess_cfg}))
"""


def test_open_clip_loads_the_folder_pushed_to_the_hub(tmp_path):
    """`create_model_and_transforms("hf-hub:user/NAME")` downloads open_clip_config.json and the weights of a
    folder pushed to a (fake, local) Hub beside the transformers files, and embeds as the CLIPModel does."""
    _, _, _, model, processor = converted("ViT-B-16")
    folder = tmp_path / "model"
    save_model_folder(model, processor, str(folder))
    save_open_clip_files(model, processor, str(folder))
    token = "hf_fakeTokenForTheseTests0123456789"
    with FakeHub(token=token) as hub:
        env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"))
        tests = str(Path(__file__).parent)
        command = [sys.executable, "-c", HUB_CHECK, str(folder), "user/open-clip", str(tmp_path / "out"), tests]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        downloaded = {entry["path"] for entry in hub.downloads if entry["repo"] == "user/open-clip"}
    assert {"open_clip_config.json", WEIGHT_FILES[0]} <= downloaded and "model.safetensors" not in downloaded
    report, embeddings = json.loads(result.stdout.strip().splitlines()[-1]), load_file(tmp_path / "out")
    assert report["context_length"] == 77 and report["preprocess"]["interpolation"] == "bilinear"
    tokens = processor.tokenizer(CAPTIONS, padding="max_length", truncation=True, return_tensors="pt")
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    assert (embeddings["image"] - image).abs().max() < 1e-5 and (embeddings["text"] - text).abs().max() < 1e-5
