"""ONNX for serving: a trained model's two towers as two ONNX files, run without torch by ONNX Runtime.

`export_onnx` writes, into OUTPUT_DIR/onnx/ (one self-contained folder to copy onto a server):

- `image_model.onnx`: the processor's image outputs in, `image_embeds` (B, D) out. CLIP, SigLIP: `pixel_values`
  (B, 3, H, W) float32. SigLIP 2 (NaFlex): `pixel_values` (B, N, P * P * 3) float32, `pixel_attention_mask`
  (B, N) int32 and `spatial_shapes` (B, 2) int64, each as `processor(images=..., return_tensors="np")` gives it;
- `text_model.onnx`: the tokenizer's outputs in, `text_embeds` (B, D) out: `input_ids` (B, L) int64, and CLIP's
  `attention_mask` (B, L) int64 (SigLIP's tokenizers return none: their text was trained padded to 64 tokens
  without one, so pad to 64 there, as the trainer does);
- the processor's files (`processor.save_pretrained`), so `AutoProcessor.from_pretrained(OUTPUT_DIR/onnx)`
  prepares the inputs on the server;
- with `quantize=True`, `image_model_int8.onnx` and `text_model_int8.onnx`: int8 weights (ONNX Runtime's dynamic
  quantisation: weights stored int8, activations quantised on the fly): 2.6x smaller
  for the demo model (BENCHMARKS.md section 11).

The embeddings are what `get_image_features` / `get_text_features` return: projected, NOT L2-normalised (divide
by the norm before a cosine or a dot product, as the trainer does). The batch axis is dynamic in both files, and
the text's length too.

Exporter: torch's TorchScript exporter (`dynamo=False`) for all three families. The dynamo exporter (torch 2.13's
default) exports CLIP and SigLIP but not SigLIP 2's image tower (no ONNX function for `aten._is_all_true`, the
check transformers makes on the grids), and takes ~10x longer. Tracing records one path through Python control
flow, so the example inputs have padding (texts of two lengths, images whose patches do not fill the sequence)
and every export is checked against torch on them before it is kept.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedModel

from .config import UserError
from .model import SIGLIP2, align_with_trainer, family_of

ONNX_FOLDER = "onnx"
OPSET = 18
IMAGE_FILE, TEXT_FILE = "image_model.onnx", "text_model.onnx"
TOLERANCE = 1e-4  # the most an exported tower's embedding may differ from torch's on the example inputs
INSTALL = 'pip install "clip-accel[onnx]"'


def import_onnx_runtime():
    """onnxruntime, or a UserError saying how to install it (with onnx, which the exporter needs)."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
        import onnxruntime
    except ImportError as error:
        raise UserError(f"Exporting to ONNX needs onnx and onnxruntime ({error}): {INSTALL}.") from error
    return onnxruntime


class ImageTower(torch.nn.Module):
    """`get_image_features(...).pooler_output` with the processor's image outputs as positional inputs."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_attention_mask=None, spatial_shapes=None):
        grids = {} if spatial_shapes is None else {"pixel_attention_mask": pixel_attention_mask}
        grids.update({} if spatial_shapes is None else {"spatial_shapes": spatial_shapes})
        return self.model.get_image_features(pixel_values=pixel_values, **grids).pooler_output


class TextTower(torch.nn.Module):
    """`get_text_features(...).pooler_output` with the tokenizer's outputs as positional inputs."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def serving_inputs(model_config, processor, images: list, texts: list[str]) -> tuple[dict, dict]:
    """(image inputs, text inputs) of PIL `images` and `texts` as the exported files take them: numpy arrays from
    the processor, texts truncated and padded as the trainer pads them (CLIP: to the longest; SigLIP: to 64)."""
    family = family_of(model_config)
    padding = {"padding": "max_length", "max_length": family.pad_to} if family.pad_to else {"padding": True}
    text_inputs = processor.tokenizer(texts, truncation=True, return_tensors="np", **padding)
    return dict(processor(images=images, return_tensors="np")), dict(text_inputs)


def example_inputs(model: PreTrainedModel, processor) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The inputs to trace and check with: two images of opposite aspect ratios (SigLIP 2: patch sequences with
    padding) and two texts of different lengths (CLIP: an attention mask with padding)."""
    images = [Image.new("RGB", (96, 32), (200, 40, 40)), Image.new("RGB", (32, 96), (40, 40, 200))]
    texts = ["a red kurta", "a blue silk saree with a wide silver border and a matching blouse"]
    return serving_inputs(model.config, processor, images, texts)


def export_tower(tower: torch.nn.Module, inputs: dict[str, np.ndarray], output: str, path: str) -> float:
    """Export `tower` (inputs in the processor's order, every axis but the features dynamic) to `path`; returns the
    largest difference between ONNX Runtime's output and torch's on `inputs`."""
    onnxruntime = import_onnx_runtime()
    device = next(tower.parameters()).device
    tensors = {name: torch.from_numpy(value).to(device) for name, value in inputs.items()}
    names = list(tensors)
    axes = {name: {0: "batch"} for name in names}
    if "input_ids" in names:  # text: any length up to the model's positions
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
    with warnings.catch_warnings():
        # Expected, and checked below: the tracer's notes on Python control flow (shape checks; SDPA's causal flag),
        # the TorchScript exporter's deprecation (the dynamo one fails on SigLIP 2), and the note on negative
        # indices in advanced indexing (CLIP pools at a token position: never negative).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            tower,
            tuple(tensors.values()),
            path,
            input_names=names,
            output_names=[output],
            dynamic_axes={**axes, output: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    with torch.no_grad():
        expected = tower(**tensors).float().cpu().numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (exported,) = session.run([output], inputs)
    return float(np.abs(exported - expected).max())


def quantize_file(path: str) -> str:
    """An int8 copy of the ONNX file at `path` (`*_int8.onnx` beside it): weights int8, activations quantised
    per batch at run time (ONNX Runtime's `quantize_dynamic`); returns its path."""
    import_onnx_runtime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.removesuffix(".onnx") + "_int8.onnx"
    quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
    return quantized


def export_onnx(model: PreTrainedModel, processor, output_dir: str, quantize: bool = False) -> dict:
    """Export a CLIPModel, SiglipModel or Siglip2Model and its processor to OUTPUT_DIR/onnx/ (see the module's
    docstring for the files, their inputs and outputs). Returns {"folder", "image_model", "text_model" (paths),
    "max_difference": {"image", "text"} (ONNX Runtime against torch on the example inputs)}, with
    "image_model_int8" and "text_model_int8" when `quantize`.

    The processor and the model's config are aligned with the trainer first (`align_with_trainer`: SigLIP's
    tokenizer then returns no attention mask), as a saved folder is."""
    import_onnx_runtime()
    family = family_of(model.config)
    align_with_trainer(model, processor)
    folder = os.path.join(output_dir, ONNX_FOLDER)
    os.makedirs(folder, exist_ok=True)
    image_inputs, text_inputs = example_inputs(model, processor)
    if family is SIGLIP2 and image_inputs["pixel_attention_mask"].all():
        raise AssertionError("the SigLIP 2 example images must leave padding patches, or tracing drops the mask")
    result = {"folder": folder, "image_model": os.path.join(folder, IMAGE_FILE)}
    result["text_model"] = os.path.join(folder, TEXT_FILE)
    differences = {
        "image": export_tower(ImageTower(model), image_inputs, "image_embeds", result["image_model"]),
        "text": export_tower(TextTower(model), text_inputs, "text_embeds", result["text_model"]),
    }
    for tower, difference in differences.items():
        if not difference <= TOLERANCE:
            raise RuntimeError(f"The exported {tower} tower differs from torch's by {difference:.2e}: a bug to report.")
    result["max_difference"] = differences
    processor.save_pretrained(folder)
    if quantize:
        result["image_model_int8"] = quantize_file(result["image_model"])
        result["text_model_int8"] = quantize_file(result["text_model"])
    return result
