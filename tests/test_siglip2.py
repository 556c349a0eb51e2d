"""SigLIP 2 (NaFlex): chosen from the checkpoint's config, images cached as its processor cuts them (aspect ratio
kept, patch sequences with their grid), text padded as its tokenizer pads, trained with the sigmoid loss."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_siglip2_values, train_on_demo, with_fresh_state
from PIL import Image
from transformers import AutoProcessor, Siglip2Config, Siglip2Model
from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

from clip_accel.cli import train_and_publish
from clip_accel.config import DataConfig, ModelConfig, TrainConfig
from clip_accel.data.preprocess import ImageLayout, naflex_size
from clip_accel.embedding import embed
from clip_accel.model import SIGLIP2, family_of, freeze_parameters, image_layout, load_model_and_processor

CAPTIONS = ["a red kurta with a gold border", "a blue silk saree", "men's black sherwani"] * 4


def _values_path(tmp_path: Path, **vision) -> str:
    values = tiny_siglip2_values()
    values["vision_config"].update(vision)
    path = tmp_path / "siglip2.json"
    path.write_text(json.dumps(values))
    return str(path)


@pytest.mark.parametrize("height", [1, 15, 48, 333, 1000])
@pytest.mark.parametrize("width", [1, 16, 48, 77, 4000])
def test_naflex_sizes_are_the_processors(height, width):
    for patch_size, max_num_patches in ((16, 256), (14, 64), (16, 1024)):
        assert naflex_size(height, width, patch_size, max_num_patches) == get_image_size_for_max_num_patches(
            height, width, patch_size, max_num_patches
        )


def test_a_siglip2_config_picks_the_family_its_processor_and_tokenizer(tmp_path):
    model, processor = load_model_and_processor(ModelConfig(scratch_config=_values_path(tmp_path)), lambda: CAPTIONS)
    assert family_of(model.config) is SIGLIP2 and isinstance(model, Siglip2Model)
    assert image_layout(model, processor) == ImageLayout("patches", patch_size=16, max_num_patches=256)
    # The tokenizer a SigLIP 2 folder always loads (Siglip2Tokenizer), learned from the captions.
    assert type(processor.tokenizer).__name__ == "Siglip2Tokenizer" and processor.tokenizer.model_max_length == 64
    with torch.no_grad():
        assert model.logit_scale.item() == pytest.approx(np.log(10.0)) and model.logit_bias.item() == -10.0
    with pytest.raises(ValueError, match="patch_size 16"):
        load_model_and_processor(ModelConfig(scratch_config=_values_path(tmp_path, patch_size=8)), lambda: CAPTIONS)
    processor.image_processor.patch_size = 14
    processor.images_kwargs = {}  # else the processor's own default (16) wins, as in a processor call
    with pytest.raises(ValueError, match="14-pixel patches"):
        image_layout(model, processor)


@pytest.fixture(scope="module")
def siglip2_run(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("siglip2")
    return train_on_demo(
        root,
        demo_dir,
        ModelConfig(scratch_config=_values_path(root)),
        # As SigLIP from scratch: the prior (the bias) first, then pairs. 288 steps of 16 gain mean R@1 +0.17-0.19
        # and R@5 +0.29-0.49 on an AMD EPYC (AVX2) with its native, avx2 and default kernels. 14 epochs (168 steps)
        # gained R@5 +0.39 on Intel AVX-512 but only +0.11 on that AMD machine: the margin was the CPU's.
        num_train_epochs=24,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        learning_rate=3e-3,
        warmup_ratio=0.1,
        seed=0,
        early_stopping_patience=0,
    )


@pytest.mark.learning
def test_a_tiny_siglip2_trains_from_scratch_and_beats_its_starting_model(siglip2_run):
    _, result = siglip2_run
    initial, final = result.metrics["initial"]["test"], result.metrics["test"]
    assert final["mean_R@1"] > initial["mean_R@1"] + 0.05
    for direction in ("image_to_text", "text_to_image"):
        assert final[f"{direction}_R@5"] > initial[f"{direction}_R@5"] + 0.2, direction
    assert result.model.__class__ is Siglip2Model


def _processor_embeddings(output_dir: str, images: list[Image.Image], texts: list[str] | None = None):
    """What a user gets from the saved folder: Siglip2Model + AutoProcessor, the documented call."""
    model, processor = Siglip2Model.from_pretrained(output_dir), AutoProcessor.from_pretrained(output_dir)
    if texts is None:
        inputs = processor(images=images, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(model.get_image_features(**inputs).pooler_output, dim=-1), inputs
    inputs = processor(text=texts, images=images, padding="max_length", max_length=64, return_tensors="pt")
    inputs.pop("attention_mask", None)
    with torch.no_grad():
        out = model(**inputs)
    return (F.normalize(out.image_embeds, dim=-1), F.normalize(out.text_embeds, dim=-1)), inputs


def test_the_saved_folder_embeds_with_its_own_processor_as_in_the_trainer(siglip2_run, demo_dir, tmp_path):
    configs, _ = siglip2_run
    output_dir = configs[2].output_dir
    assert json.loads(Path(output_dir, "config.json").read_text())["model_type"] == "siglip2"
    ours = with_fresh_state(embed, output_dir, DataConfig(data_dir=demo_dir, cache_dir=configs[0].cache_dir))
    images = [Image.open(os.path.join(demo_dir, path)) for path in ours.ids[:6]]
    (image_embeds, text_embeds), inputs = _processor_embeddings(output_dir, images, ours.captions[:6])
    assert not inputs["input_ids"][:, -1].eq(0).all()  # padded on the left, as its tokenizer pads
    torch.testing.assert_close(ours.image_embeds[:6], image_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.text_embeds[:6], text_embeds, rtol=1e-4, atol=1e-5)
    card = Path(output_dir, "README.md").read_text()
    assert "Siglip2Model.from_pretrained" in card and 'padding="max_length"' in card and "- siglip2" in card

    # Photos of other shapes keep their aspect ratio: each its own grid of patches, padded to 256.
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, (height, width) in enumerate([(50, 90), (200, 60), (33, 300)]):
        pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    photos = with_fresh_state(embed, output_dir, image_folder=str(folder), cache_dir=str(tmp_path / "cache"))
    expected, inputs = _processor_embeddings(output_dir, [Image.open(folder / name) for name in photos.ids])
    assert inputs["spatial_shapes"].tolist() == [[12, 21], [28, 9], [5, 46]]
    torch.testing.assert_close(photos.image_embeds, expected, rtol=1e-4, atol=1e-5)


def test_augmentation_is_refused_for_patch_sequences(tmp_path, demo_dir):
    configs = (
        DataConfig(data_dir=demo_dir, cache_dir=str(tmp_path / "cache"), augment=True),
        ModelConfig(scratch_config=_values_path(tmp_path)),
        TrainConfig(output_dir=str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=8),
    )
    with pytest.raises(ValueError, match="Drop --augment"):
        with_fresh_state(train_and_publish, *configs)


def test_freezing_backbones_keeps_siglip2_heads_and_logits_trainable():
    model = Siglip2Model(Siglip2Config(**{k: v for k, v in tiny_siglip2_values().items() if k != "model_type"}))
    freeze_parameters(model, "backbones")
    trainable = {".".join(name.split(".")[:2]) for name, weight in model.named_parameters() if weight.requires_grad}
    expected = {"text_model.final_layer_norm", "text_model.head", "vision_model.post_layernorm", "vision_model.head"}
    assert trainable == expected | {"logit_scale", "logit_bias"}
    freeze_parameters(model, "vision_layers", vision_layers=1)
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    assert frozen and all(name.startswith("vision_model.") for name in frozen)
    assert all(".embeddings." in name or ".layers.0." in name for name in frozen)


@pytest.mark.parametrize("read_on_host", [False, True])
def test_a_transformers_that_reads_grids_on_the_host_gets_the_loaders_host_copy(monkeypatch, read_on_host):
    # Up to transformers 5.18 the position embeddings are resized image by image from `grid.tolist()`: device
    # grids would cost one host sync per image per forward. The attention mask still comes from the device copy.
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    import clip_accel.model as model_module
    from clip_accel.data.loader import HOST_GRIDS
    from clip_accel.model import ContrastiveModel, PixelNormalizer

    torch.manual_seed(0)
    values = {key: value for key, value in tiny_siglip2_values(patch_size=4).items() if key != "model_type"}
    model = ContrastiveModel(Siglip2Model(Siglip2Config(**values))).eval()
    grids = np.array([[4, 4], [2, 7], [1, 16]], dtype=np.int64)
    batch = {
        "pixel_values": torch.randint(0, 256, (3, 16, 48), dtype=torch.uint8),
        "spatial_shapes": torch.from_numpy(grids.copy()),
        HOST_GRIDS: grids,
    }
    seen, resize = [], Siglip2VisionEmbeddings.resize_positional_embeddings

    def recording_resize(positional_embeddings, spatial_shapes, max_length):
        seen.append(spatial_shapes)
        return resize(positional_embeddings, spatial_shapes, max_length)

    monkeypatch.setattr(Siglip2VisionEmbeddings, "resize_positional_embeddings", staticmethod(recording_resize))
    normalizer = PixelNormalizer([0.5] * 3, [0.5] * 3)
    monkeypatch.setattr(model_module, "POSITIONS_READ_GRIDS_ON_HOST", False)
    with torch.no_grad():
        expected = model(**normalizer.inputs(batch))[0]
    monkeypatch.setattr(model_module, "POSITIONS_READ_GRIDS_ON_HOST", read_on_host)
    inputs = normalizer.inputs(batch)
    # Handed over as numpy, not as a tensor: DDP and FSDP2 copy every tensor input of a forward to the device.
    assert isinstance(inputs.get("spatial_shapes_on_host", grids), np.ndarray)
    with torch.no_grad():
        image_embeds = model(**inputs)[0]
    host = seen[-1].data_ptr() == grids.ctypes.data
    assert host is read_on_host and seen[-1].tolist() == grids.tolist()
    torch.testing.assert_close(image_embeds, expected, rtol=0, atol=0)


def test_the_grids_are_read_on_the_host_exactly_for_a_per_image_resize(monkeypatch):
    from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

    from clip_accel.model import _positions_read_grids_on_host

    def per_image(positional_embeddings, spatial_shapes, max_length):  # the shape of transformers <= 5.18's loop
        for index in range(spatial_shapes.shape[0]):
            height, width = spatial_shapes[index].tolist()
        return positional_embeddings

    monkeypatch.setattr(Siglip2VisionEmbeddings, "resize_positional_embeddings", staticmethod(per_image))
    assert _positions_read_grids_on_host()
