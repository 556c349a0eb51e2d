"""--lora_rank: adapters through peft; the output folder a merged plain CLIPModel, adapter/ the adapter alone."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from accelerate.state import AcceleratorState
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor

from clip_accel.evaluation import evaluate_folder
from clip_accel.hub import _files_to_push
from clip_accel.trainer import train

LORA = {"lora_rank": 4, "lora_alpha": 8.0, "learning_rate": 1e-2, "eval_initial_model": False}


@pytest.fixture(scope="module")
def lora_run(make_configs_module):
    # Exact accumulation over 2 micro-batches, as the issue asks LoRA to work with. No later evaluation counts as an
    # improvement (min_delta 1), so the best model is epoch 1's and the final figures must come from reloading it.
    options = {"num_train_epochs": 2, "gradient_accumulation_steps": 2, "early_stopping_min_delta": 1.0}
    configs = make_configs_module(**LORA, **options)
    try:
        return configs, train(*configs)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def make_configs_module(tmp_path_factory, demo_dir, tiny_pretrained_dir):
    from clip_accel.config import DataConfig, ModelConfig, TrainConfig

    root = tmp_path_factory.mktemp("lora")

    def build(**options):
        return (
            DataConfig(data_dir=demo_dir, cache_dir=str(root / "cache")),
            ModelConfig(model_name_or_path=tiny_pretrained_dir, **{k: v for k, v in options.items() if "lora" in k}),
            TrainConfig(
                output_dir=str(root / options.pop("name", "out")),
                per_device_train_batch_size=16,
                per_device_eval_batch_size=32,
                seed=0,
                **{k: v for k, v in options.items() if "lora" not in k and k != "name"},
            ),
        )

    return build


def _embeddings(model, processor, demo_dir):
    from PIL import Image

    with open(os.path.join(demo_dir, "test_data.json")) as handle:
        rows = [json.loads(line) for line in handle][:6]
    images = [Image.open(os.path.join(demo_dir, row["image_path"])) for row in rows]
    inputs = processor(text=[row["product_title"] for row in rows], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    return out.image_embeds, out.text_embeds


def test_only_the_adapted_layers_change_and_the_merged_folder_has_no_adapter_keys(lora_run, tiny_pretrained_dir):
    configs, _ = lora_run
    start = load_file(os.path.join(tiny_pretrained_dir, "model.safetensors"))
    merged = load_file(os.path.join(configs[2].output_dir, "model.safetensors"))
    assert merged.keys() == start.keys()
    changed = {name for name in start if not torch.equal(start[name], merged[name])}
    adapted = {n for n in start if any(f".{layer}." in n for layer in ("q_proj", "k_proj", "v_proj", "out_proj"))}
    assert changed == {n for n in adapted if n.endswith(".weight")}  # biases, MLPs, logit_scale untouched


def test_merged_folder_embeds_exactly_as_the_starting_model_plus_the_adapter(lora_run, tiny_pretrained_dir, demo_dir):
    configs, _ = lora_run
    output_dir = configs[2].output_dir
    processor = CLIPProcessor.from_pretrained(output_dir)
    merged = CLIPModel.from_pretrained(output_dir)
    with open(os.path.join(output_dir, "adapter", "adapter_config.json")) as handle:
        adapter_config = json.load(handle)
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == tiny_pretrained_dir
    adapted = PeftModel.from_pretrained(
        CLIPModel.from_pretrained(tiny_pretrained_dir), os.path.join(output_dir, "adapter")
    )
    for ours, theirs in zip(
        _embeddings(merged, processor, demo_dir), _embeddings(adapted, processor, demo_dir), strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    start = _embeddings(CLIPModel.from_pretrained(tiny_pretrained_dir), processor, demo_dir)
    assert not torch.allclose(start[0], _embeddings(merged, processor, demo_dir)[0], atol=1e-3)


@pytest.mark.learning
def test_final_figures_are_those_of_the_merged_folder(lora_run):
    configs, result = lora_run
    assert result.metrics["training"]["best_step"] < result.metrics["training"]["optimizer_steps"]
    again = evaluate_folder(configs[2].output_dir, configs[0])
    for key in ("image_to_text_R@1", "text_to_image_R@5", "zero_shot_top1"):
        assert again[key] == pytest.approx(result.metrics["test"][key], abs=1e-9), key


def test_trainable_counts_are_logged_and_the_adapter_is_pushed(lora_run, caplog, make_configs_module):
    configs, _ = lora_run
    names = _files_to_push(configs[2].output_dir)
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "model.safetensors"} <= set(names)
    from clip_accel.trainer import _shut_down, prepare_run

    caplog.set_level("INFO")
    run = prepare_run(*make_configs_module(**LORA, name="count"))
    _shut_down(run)
    AcceleratorState._reset_state(reset_partial_state=True)
    # 2 towers x 2 layers x 4 projections x rank 4 x (32 in + 32 out)
    assert f"Trainable parameters: {2 * 2 * 4 * 4 * 64:,} of " in caplog.text and "LoRA rank 4" in caplog.text


def test_a_resumed_lora_run_is_bit_identical(make_configs_module):
    options = {**LORA, "max_steps": 4, "checkpointing_steps": 2, "eval_steps": 4, "early_stopping_patience": 0}
    weights = []
    try:
        for resume in (None, "latest"):
            configs = make_configs_module(**options, name="resume", resume_from_checkpoint=resume)
            train(*configs)
            weights.append(load_file(os.path.join(configs[2].output_dir, "adapter", "adapter_model.safetensors")))
            AcceleratorState._reset_state(reset_partial_state=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) == 32
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lora_target_modules": "q_proj,query"}, r"\['query'\] name no linear layer"),
        ({"lora_dropout": 0.1, "gradient_accumulation_steps": 2}, "dropout would draw other masks"),
    ],
)
def test_bad_lora_options_fail_before_training(make_configs_module, options, message):
    try:
        with pytest.raises(ValueError, match=message):
            train(*make_configs_module(**{**LORA, **options}, name="bad"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_lora_with_freezing_or_from_scratch_fails_at_start_up():
    from clip_accel.config import ModelConfig

    with pytest.raises(ValueError, match="drop --freeze backbones"):
        ModelConfig(lora_rank=4, freeze="backbones")
    with pytest.raises(ValueError, match="adapts a pretrained model"):
        ModelConfig(lora_rank=4, scratch_config="clip-tiny")


def test_a_full_run_into_a_lora_runs_folder_leaves_no_stale_adapter(lora_run, make_configs_module, tmp_path):
    import shutil

    configs, _ = lora_run
    reused = tmp_path / "reused"
    shutil.copytree(configs[2].output_dir, reused, ignore=shutil.ignore_patterns("checkpoints"))
    full = make_configs_module(max_steps=1, eval_initial_model=False, overwrite_output_dir=True)
    try:
        train(full[0], full[1], replace(full[2], output_dir=str(reused)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (reused / "adapter").exists()
    assert not any(name.startswith("adapter") for name in _files_to_push(str(reused)))
