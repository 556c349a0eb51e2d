"""clip_accel.onnx_export: ONNX Runtime runs the exported towers as torch does, for each family."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_clip_config, tiny_siglip2_values, tiny_siglip_values
from PIL import Image
from transformers import AutoProcessor

from clip_accel.config import ModelConfig, UserError
from clip_accel.model import family_of, load_model_and_processor
from clip_accel.onnx_export import export_onnx

CAPTIONS = [
    "Women's red striped cotton kurta with gold border",
    "Men's black checked sherwani, maroon trim",
    "Blue polka dot silk saree for women with silver border by Kesar Lane",
    "Green lehenga",
    "Yellow dupatta with a printed floral pattern and tassels",
    "Kurta",
]
VALUES = {
    "clip": lambda: json.loads(tiny_clip_config().to_json_string()),
    "siglip": tiny_siglip_values,
    "siglip2": tiny_siglip2_values,
}
# The least cosine between an int8 file's embedding and the float file's (measured on tiny fresh models: >= 0.9993).
INT8_COSINE = 0.99


@pytest.fixture(scope="module", params=sorted(VALUES))
def exported(request, tmp_path_factory):
    """(model, processor, export_onnx's result) of a tiny fresh model of each family, exported with int8 copies."""
    root = tmp_path_factory.mktemp(request.param)
    (root / "config.json").write_text(json.dumps(VALUES[request.param]()))
    model, processor = load_model_and_processor(ModelConfig(scratch_config=str(root / "config.json")), lambda: CAPTIONS)
    return model.eval(), processor, export_onnx(model, processor, str(root / "out"), quantize=True)


def client_inputs(processor, family, count: int) -> tuple[dict, dict]:
    """(image inputs, text inputs) of `count` pairs as a serving client makes them: images of several sizes, texts
    of several lengths (padded as the trainer pads them)."""
    rng = np.random.default_rng(count)
    sizes = [(40 + 16 * (index % 3), 64 - 8 * index) for index in range(count)]
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for height, width in sizes]
    padding = {"padding": "max_length", "max_length": family.pad_to} if family.pad_to else {"padding": True}
    texts = processor.tokenizer(CAPTIONS[-count:], truncation=True, return_tensors="np", **padding)
    return dict(processor(images=images, return_tensors="np")), dict(texts)


def sessions(result: dict, suffix: str = "") -> tuple:
    import onnxruntime

    return tuple(
        onnxruntime.InferenceSession(result[f"{tower}_model{suffix}"], providers=["CPUExecutionProvider"])
        for tower in ("image", "text")
    )


def torch_embeddings(model, image_inputs: dict, text_inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    tensors = {name: torch.from_numpy(value) for name, value in {**image_inputs, **text_inputs}.items()}
    with torch.no_grad():
        images = model.get_image_features(**{k: v for k, v in tensors.items() if k in image_inputs}).pooler_output
        texts = model.get_text_features(**{k: v for k, v in tensors.items() if k in text_inputs}).pooler_output
    return images.numpy(), texts.numpy()


@pytest.mark.parametrize("count", [2, 5])
def test_onnx_runtime_embeds_as_torch_does_at_any_batch_size(exported, count):
    model, processor, result = exported
    image_inputs, text_inputs = client_inputs(processor, family_of(model.config), count)
    if "attention_mask" in text_inputs:  # CLIP: the mask is honoured, not traced away
        assert not text_inputs["attention_mask"].all()
    if "pixel_attention_mask" in image_inputs:  # SigLIP 2: padding patches, grids of several shapes
        assert (
            not image_inputs["pixel_attention_mask"].all()
            and len(np.unique(image_inputs["spatial_shapes"], axis=0)) > 1
        )
    image_session, text_session = sessions(result)
    (image_embeds,) = image_session.run(["image_embeds"], image_inputs)
    (text_embeds,) = text_session.run(["text_embeds"], text_inputs)
    expected_images, expected_texts = torch_embeddings(model, image_inputs, text_inputs)
    assert image_embeds.shape == expected_images.shape and text_embeds.shape == expected_texts.shape
    np.testing.assert_allclose(image_embeds, expected_images, atol=1e-4, rtol=0)
    np.testing.assert_allclose(text_embeds, expected_texts, atol=1e-4, rtol=0)
    assert not np.allclose(np.linalg.norm(image_embeds, axis=-1), 1.0)  # projected, not normalised


@pytest.mark.parametrize("exported", ["clip"], indirect=True)  # (SigLIP's text is always padded to 64 tokens)
def test_clip_text_of_another_length_embeds_as_torch_does(exported):
    model, processor, result = exported
    assert not family_of(model.config).pad_to
    for texts in (CAPTIONS[:1], CAPTIONS):
        text_inputs = dict(processor.tokenizer(texts, padding=True, return_tensors="np"))
        (text_embeds,) = sessions(result)[1].run(["text_embeds"], text_inputs)
        with torch.no_grad():
            tensors = {name: torch.from_numpy(value) for name, value in text_inputs.items()}
            expected = model.get_text_features(**tensors).pooler_output.numpy()
        np.testing.assert_allclose(text_embeds, expected, atol=1e-4, rtol=0)


def test_the_processor_files_load_back_and_prepare_the_same_inputs(exported):
    model, processor, result = exported
    loaded = AutoProcessor.from_pretrained(result["folder"])
    family = family_of(model.config)
    assert type(loaded) is type(processor)
    image_inputs, text_inputs = client_inputs(processor, family, 3)
    loaded_images, loaded_texts = client_inputs(loaded, family, 3)
    assert loaded_images.keys() == image_inputs.keys() and loaded_texts.keys() == text_inputs.keys()
    for name in image_inputs:
        np.testing.assert_array_equal(loaded_images[name], image_inputs[name])
    for name in text_inputs:
        np.testing.assert_array_equal(loaded_texts[name], text_inputs[name])
    assert [i.name for i in sessions(result)[1].get_inputs()] == list(text_inputs)


def test_the_int8_files_embed_close_to_the_float_ones(exported):
    model, processor, result = exported
    image_inputs, text_inputs = client_inputs(processor, family_of(model.config), 5)
    for float_session, int8_session, inputs in zip(
        sessions(result), sessions(result, "_int8"), (image_inputs, text_inputs), strict=True
    ):
        (expected,) = float_session.run(None, inputs)
        (quantized,) = int8_session.run(None, inputs)
        cosine = (expected * quantized).sum(-1) / np.linalg.norm(expected, axis=-1) / np.linalg.norm(quantized, axis=-1)
        assert cosine.min() > INT8_COSINE, cosine


def test_a_missing_onnxruntime_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(UserError, match=r'pip install "clip-accel\[onnx\]"'):
        export_onnx(None, None, str(tmp_path))
    assert not (tmp_path / "onnx").exists()
