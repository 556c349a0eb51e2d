"""Every accelerate config in accelerate_configs/ loads with Accelerate's own loader, so none rots; launches
clip_accel does not run (DeepSpeed, FSDP) stop at start-up."""

from __future__ import annotations

import dataclasses
import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from conftest import tiny_clip_config, tiny_siglip_values
from transformers import CLIPModel, SiglipConfig, SiglipModel

from clip_accel.config import UserError
from clip_accel.launch import check_fsdp_layers
from clip_accel.trainer import train

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = sorted(glob.glob("accelerate_configs/*.yaml"))
EXPECTED = {
    "cpu": "NO",
    "single_gpu": "NO",
    "multi_gpu": "MULTI_GPU",
    "multi_node": "MULTI_GPU",
    "fsdp": "FSDP",
}


def test_all_documented_configs_exist():
    assert {path.split("/")[-1].removesuffix(".yaml") for path in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_with_only_known_keys(path):
    config = load_config_from_file(path)
    name = path.split("/")[-1].removesuffix(".yaml")
    assert config.distributed_type.value == EXPECTED[name]
    known = {field.name for field in dataclasses.fields(ClusterConfig)}
    with open(path) as handle:
        assert set(yaml.safe_load(handle)) <= known


FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 1
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: CLIPEncoderLayer
num_machines: 1
num_processes: 2
mixed_precision: 'no'
"""


@pytest.mark.slow
def test_an_fsdp1_launch_stops_at_start_up_asking_for_fsdp2(tmp_path, demo_dir):
    (tmp_path / "fsdp.yaml").write_text(FSDP_CONFIG)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp.yaml")]
    command += ["scripts/train.py", "--data_dir", demo_dir, "--scratch_config", "clip-tiny"]
    command += ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "clip_accel runs FSDP version 2 only" in result.stderr and "fsdp_version: 2" in result.stderr
    assert not (tmp_path / "cache").exists()


def test_a_deepspeed_launch_stops_at_start_up(make_configs, monkeypatch, tmp_path):
    # What `accelerate launch` sets for a DeepSpeed config (its launcher refuses earlier when deepspeed is missing).
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    data, model, config = make_configs()
    with pytest.raises(UserError, match="clip_accel does not run under DeepSpeed"):  # (one line, status 2)
        train(data, model, config)
    assert not os.path.exists(data.cache_dir)


@pytest.mark.slow
def test_the_readme_cpu_launch_trains_the_demo(tmp_path):
    # README's first command and the launch table's first row, shortened: one process from cpu.yaml.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml"]
    command += ["scripts/train.py", "--config", "demo", "--output_dir", str(tmp_path / "out")]
    command += ["--num_train_epochs", "1", "--max_train_samples", "256", "--max_eval_samples", "64"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Processes: 1 (NO) on cpu; mixed precision: no" in result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_an_fsdp_config_wrapping_another_familys_layers_is_refused_naming_the_right_class(monkeypatch):
    # What `accelerate launch` sets from accelerate_configs/fsdp.yaml (CLIP's layer class), for a SigLIP model.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "CLIPEncoderLayer")
    siglip = SiglipModel(SiglipConfig(**{k: v for k, v in tiny_siglip_values().items() if k != "model_type"}))
    with pytest.raises(ValueError, match="fsdp_transformer_layer_cls_to_wrap: SiglipEncoderLayer"):
        check_fsdp_layers(siglip)
    check_fsdp_layers(CLIPModel(tiny_clip_config()))  # the class it names is there
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_fsdp_layers(siglip)  # not an FSDP launch


def test_fsdp2_with_node_local_output_folders_is_refused_at_start_up(make_configs, monkeypatch):
    # Two nodes with their own disks under FSDP2: only the first would hold each checkpoint's .metadata.
    from accelerate import Accelerator

    import clip_accel.startup

    monkeypatch.setattr(clip_accel.startup, "storage_is_shared", lambda accelerator, folder: False)
    monkeypatch.setattr(Accelerator, "is_fsdp2", property(lambda self: True))
    with pytest.raises(ValueError, match="FSDP2 with a node-local --output_dir"):
        train(*make_configs())
    monkeypatch.undo()
    monkeypatch.setattr(clip_accel.startup, "storage_is_shared", lambda accelerator, folder: False)
    data, model, config = make_configs(max_steps=1, eval_initial_model=False)
    assert train(data, model, config).metrics["training"]["optimizer_steps"] == 1, "DDP keeps whole checkpoints"
