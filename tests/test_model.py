"""Model loading, freezing strategies and on-device normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPModel

from clip_accel.config import ModelConfig, TrainConfig
from clip_accel.data.preprocess import load_rgb_image
from clip_accel.loss import contrastive_loss
from clip_accel.model import ContrastiveModel, PixelNormalizer, freeze_parameters, load_model_and_processor
from clip_accel.optim import build_optimizer

CAPTIONS = ["red striped kurta", "blue silk saree", "black checked sherwani", "green plain dupatta"]


def _train_steps(model: CLIPModel, steps: int = 3) -> None:
    optimizer = build_optimizer(model, TrainConfig(learning_rate=1e-2, weight_decay=0.1))
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pixels = torch.randn(4, 3, 32, 32, generator=generator)
        input_ids = torch.randint(0, 500, (4, 6), generator=generator)
        input_ids[:, -1] = 2  # the config's eos id
        out = model(input_ids=input_ids, pixel_values=pixels)
        contrastive_loss(out.image_embeds, out.text_embeds, model.logit_scale).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("strategy", ["none", "vision_layers", "backbones"])
def test_frozen_parameters_stay_bit_identical_and_trainable_ones_move(strategy):
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config())
    trainable, total = freeze_parameters(model, strategy, vision_layers=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train_steps(model)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) and total >= trainable > 0
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, before[name]), f"{name} is frozen but changed"
        else:
            assert not torch.equal(parameter, before[name]), f"{name} should train"
    expectations = {
        "none": lambda: not frozen,
        "vision_layers": lambda: (
            "vision_model.encoder.layers.0.mlp.fc1.weight" in frozen
            and "vision_model.embeddings.patch_embedding.weight" in frozen
            and "vision_model.encoder.layers.1.mlp.fc1.weight" not in frozen
            and not any("text" in n for n in frozen)
        ),
        "backbones": lambda: (
            {n for n, _ in model.named_parameters()} - frozen
            == {
                "logit_scale",
                "visual_projection.weight",
                "text_projection.weight",
                "vision_model.post_layernorm.weight",
                "vision_model.post_layernorm.bias",
                "text_model.final_layer_norm.weight",
                "text_model.final_layer_norm.bias",
            }
        ),
    }
    assert expectations[strategy]()


def test_freezing_more_layers_than_exist_says_so():
    with pytest.raises(ValueError, match="exceeds the 2 vision layers"):
        freeze_parameters(CLIPModel(tiny_clip_config()), "vision_layers", vision_layers=3)


def test_weight_decay_skips_biases_norms_and_logit_scale():
    model = ContrastiveModel(CLIPModel(tiny_clip_config()))  # what the trainer optimizes
    decay_group, no_decay_group = build_optimizer(model, TrainConfig(weight_decay=0.2)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in no_decay_group["params"]}
    assert decay_group["weight_decay"] == 0.2 and no_decay_group["weight_decay"] == 0.0
    assert "logit_scale" in no_decay and "clip.text_model.final_layer_norm.weight" in no_decay
    assert all(names[id(p)].endswith("weight") for p in decay_group["params"])


def test_from_scratch_model_matches_its_offline_tokenizer(tiny_model_config_path):
    model, processor = load_model_and_processor(ModelConfig(scratch_config=tiny_model_config_path), lambda: CAPTIONS)
    tokenizer = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert processor.image_processor.crop_size["height"] == model.config.vision_config.image_size == 32


def test_bundled_preset_loads_and_unknown_preset_lists_the_choices():
    model, _ = load_model_and_processor(ModelConfig(scratch_config="clip-tiny"), lambda: CAPTIONS)
    assert model.config.vision_config.image_size == 64
    with pytest.raises(ValueError, match="clip-tiny"):
        load_model_and_processor(ModelConfig(scratch_config="clip-huge"), lambda: CAPTIONS)


def test_cached_uint8_plus_device_normalisation_matches_the_clip_image_processor(tmp_path):
    # Users run CLIPProcessor at inference: training must see the same pixels (PNG here; the JPEG case below).
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 9, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 120 x 90
    path = tmp_path / "photo.png"
    Image.fromarray(smooth).save(path)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    expected = processor(Image.open(path), return_tensors="pt")["pixel_values"]
    cached = torch.from_numpy(load_rgb_image(str(path), 32).copy())[None]
    ours = PixelNormalizer(processor.image_mean, processor.image_std)(cached)
    assert ours.shape == expected.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_evaluation_pixels_of_a_large_jpeg_are_exactly_the_clip_image_processors(tmp_path):
    # A photo over twice the model's resolution: libjpeg's draft decode would downscale it while decoding. The
    # evaluation path decodes in full and gives CLIPProcessor's pixels; the training path's draft decode does not.
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (40, 30, 3)).astype(np.float32)
    photo = np.kron(coarse, np.ones((20, 20, 1)))[:, :, :] + rng.normal(0, 12, (800, 600, 3))
    path = tmp_path / "large.jpeg"
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(path, quality=92)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    expected = processor(Image.open(path), return_tensors="pt")["pixel_values"]
    normalise = PixelNormalizer(processor.image_mean, processor.image_std)

    def pixels(draft: bool) -> torch.Tensor:
        return normalise(torch.from_numpy(load_rgb_image(str(path), 64, draft=draft).copy())[None])

    torch.testing.assert_close(pixels(draft=False), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(pixels(draft=True), expected, atol=1e-5, rtol=0)
