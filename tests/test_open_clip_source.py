"""An open_clip model named by --model_name_or path (a folder open_clip wrote, `hf-hub:ORG/NAME`, a checkpoint file
with --open_clip_model) is converted once into the cache, keyed by the checkpoint's bytes, and read from there after.

The models come from open_clip's own configs, shrunk, as in tests/test_open_clip_format.py (tests/open_clip_side.py
explains how open_clip is imported). conftest.py points CLIP_ACCEL_CACHE at a fresh folder for the session; the
tests that count conversions point it at their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_on_demo
from hub_server import FakeHub
from open_clip_side import SIDE_FOLDER, import_open_clip
from safetensors.torch import save_file
from test_open_clip_format import largest_differences, perturbed, shrunk
from transformers import CLIPModel

import clip_accel.open_clip_source
from clip_accel.config import ModelConfig, UserError
from clip_accel.model import load_pretrained
from clip_accel.open_clip_format import convert
from clip_accel.open_clip_source import SOURCE_FILE, converted_folder
from clip_accel.options import parse_config

ROOT = Path(__file__).resolve().parent.parent


def open_clip_folder(folder: Path, name: str = "ViT-B-32", seed: int = 0, image_size: int | None = None):
    """(open_clip's model, its settings) written to `folder` as open_clip's push_to_hf_hub writes it."""
    open_clip = import_open_clip()
    model_cfg = shrunk(open_clip.get_model_config(name))
    if image_size:
        model_cfg["vision_cfg"]["image_size"] = image_size
    torch.manual_seed(seed)
    reference = perturbed(open_clip.CLIP(**model_cfg), seed)
    settings = {"model_cfg": model_cfg, "preprocess_cfg": {"interpolation": "bilinear"}}
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(settings))
    tensors = {key: value.contiguous() for key, value in reference.state_dict().items()}
    save_file(tensors, folder / "open_clip_model.safetensors")
    return reference, settings


def conversions(cache: Path) -> list[Path]:
    return sorted(path.parent for path in cache.glob(f"open_clip/*/{SOURCE_FILE}"))


def test_a_folder_is_converted_once_and_then_read_from_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIP_ACCEL_CACHE", str(cache))
    reference, _ = open_clip_folder(tmp_path / "model")
    model, processor = load_pretrained(str(tmp_path / "model"))
    [converted] = conversions(cache)
    assert json.loads((converted / SOURCE_FILE).read_text())["source"] == str(tmp_path / "model")
    tokenizer = import_open_clip().get_tokenizer("ViT-B-32")
    assert max(largest_differences(reference, model, processor, tokenizer, 224)) < 1e-5

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(clip_accel.open_clip_source, "convert", no_conversion)
    (tmp_path / "model").rename(tmp_path / "moved")  # the same bytes under another path: the same conversion
    again, _ = load_pretrained(str(tmp_path / "moved"))
    assert all(torch.equal(again.state_dict()[key], value) for key, value in model.state_dict().items())
    assert conversions(cache) == [converted]


def test_changed_weights_are_converted_again(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLIP_ACCEL_CACHE", str(cache))
    open_clip_folder(tmp_path / "model", seed=0)
    first, _ = load_pretrained(str(tmp_path / "model"))
    weights = tmp_path / "model" / "open_clip_model.safetensors"
    open_clip_folder(tmp_path / "other", seed=1)
    weights.write_bytes((tmp_path / "other" / "open_clip_model.safetensors").read_bytes())  # same path, new bytes
    second, _ = load_pretrained(str(tmp_path / "model"))
    assert len(conversions(cache)) == 2
    assert not torch.equal(first.logit_scale, second.logit_scale)


def test_a_checkpoint_file_is_converted_by_its_architecture_from_the_command_line(tmp_path):
    open_clip = import_open_clip()
    reference = perturbed(open_clip.create_model("ViT-S-32"))
    state_dict = {f"module.{key}": value for key, value in reference.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state_dict}, tmp_path / "epoch_3.pt")
    _, model_config, _ = parse_config(
        ["--demo", "--model_name_or_path", str(tmp_path / "epoch_3.pt"), "--open_clip_model", "ViT-S-32"]
    )
    model, processor = load_pretrained(model_config.model_name_or_path, model_config.open_clip_model)
    assert max(largest_differences(reference, model, processor, open_clip.get_tokenizer("ViT-S-32"), 224)) < 1e-5

    with pytest.raises(UserError, match="needs its architecture, --open_clip_model NAME"):
        load_pretrained(str(tmp_path / "epoch_3.pt"))
    with pytest.raises(UserError, match="names the architecture of a checkpoint file .* is not a file"):
        load_pretrained(str(tmp_path), "ViT-S-32")
    with pytest.raises(UserError, match="--open_clip_model ViT-S-32 and --scratch_config clip-tiny exclude each other"):
        parse_config(["--demo", "--open_clip_model", "ViT-S-32", "--scratch_config", "clip-tiny"])


DOWNLOAD = """
import json, sys
from transformers.utils.import_utils import is_torchvision_available
is_torchvision_available()  # decided before open_clip's side folder (with its torchvision) is findable
sys.path.append(sys.argv[2])  # open_clip's BPE vocabulary file, which a conversion reads
from clip_accel.model import load_pretrained
from clip_accel.open_clip_source import converted_folder
model, _ = load_pretrained(sys.argv[1])
print(json.dumps({"folder": converted_folder(sys.argv[1]), "logit_scale": model.logit_scale.item()}))
"""


def test_an_open_clip_repo_on_the_hub_is_downloaded_by_its_hf_hub_name(tmp_path):
    """`hf-hub:ORG/NAME`, as open_clip names Hub models: its open_clip_config.json and weights come down through
    transformers' Hub client (a fake Hub here: the environment a subprocess gets, as tests/test_hub.py explains)."""
    reference, settings = open_clip_folder(tmp_path / "model")
    files = {name: (tmp_path / "model" / name).read_bytes() for name in os.listdir(tmp_path / "model")}
    env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_OFFLINE"}
    env.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"), CLIP_ACCEL_CACHE=str(tmp_path / "cache"))
    with FakeHub(token="hf_test") as hub:
        hub.add_repo("laion/tiny-clip", files, repo_type="model")
        env.update(HF_ENDPOINT=hub.url)
        command = [sys.executable, "-c", DOWNLOAD]
        found = subprocess.run(
            [*command, "hf-hub:laion/tiny-clip", str(SIDE_FOLDER)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        missing = subprocess.run(
            [*command, "hf-hub:laion/nothing", str(SIDE_FOLDER)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert found.returncode == 0, found.stderr[-3000:]
    printed = json.loads(found.stdout.splitlines()[-1])
    assert printed["logit_scale"] == pytest.approx(reference.logit_scale.item())
    expected, _ = convert(settings["model_cfg"], reference.state_dict(), settings["preprocess_cfg"])
    downloaded = CLIPModel.from_pretrained(printed["folder"])
    for key, value in expected.state_dict().items():
        assert torch.equal(downloaded.state_dict()[key], value), key
    assert missing.returncode != 0 and "clip_accel.config.UserError: hf-hub:laion/nothing" in missing.stderr


@pytest.mark.slow
def test_the_demo_trains_from_an_open_clip_folder_as_from_its_converted_clip_folder(tmp_path, demo_dir):
    """`clip-accel train --model_name_or_path FOLDER` on an open_clip folder trains, and to the same figures as a run
    from the converted CLIP folder: the same history, test figures and saved weights. 64-pixel images keep it short."""
    folder = tmp_path / "open_clip"
    reference, _ = open_clip_folder(folder, "ViT-B-32-quickgelu", image_size=64)
    schedule = {"num_train_epochs": 1, "per_device_train_batch_size": 64, "per_device_eval_batch_size": 100, "seed": 0}
    runs = {}
    for name, start in (("open_clip", str(folder)), ("converted", None)):
        start = start or converted_folder(str(folder))  # (written by the first run)
        model = ModelConfig(model_name_or_path=start)
        (_, _, train_config), result = train_on_demo(tmp_path, demo_dir, model, name, **schedule, learning_rate=1e-3)
        runs[name] = (Path(train_config.output_dir), result)
    (from_open_clip, result), (from_converted, converted_result) = runs["open_clip"], runs["converted"]
    assert [entry["step"] for entry in result.history if "loss" in entry][-1] > 0
    assert result.history == converted_result.history
    figures = [json.loads((out / "eval_results.json").read_text()) for out in (from_open_clip, from_converted)]
    assert figures[0]["test"] == figures[1]["test"] and figures[0]["initial"] == figures[1]["initial"]
    saved = CLIPModel.from_pretrained(from_open_clip)
    assert saved.config.text_config.hidden_act == "quick_gelu" and saved.config.vision_config.image_size == 64
    assert not torch.equal(saved.logit_scale, torch.tensor(reference.logit_scale.item()))  # it trained
    other = CLIPModel.from_pretrained(from_converted).state_dict()
    assert all(torch.equal(other[key], value) for key, value in saved.state_dict().items())
