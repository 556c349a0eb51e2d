"""`clip-accel export OUTPUT --format open_clip|onnx`: a trained folder for the clients that do not read
transformers' files, written beside them (the names never overlap, so one Hub repo serves every client)."""

from __future__ import annotations

import logging
import os

from .config import UserError
from .model import load_pretrained
from .onnx_export import export_onnx
from .open_clip_export import save_open_clip_files

logger = logging.getLogger(__name__)

FORMATS = ("open_clip", "onnx")
ONNX_FILES = ("image_model", "text_model", "image_model_int8", "text_model_int8")  # export_onnx's keys


def export_folder(folder: str, formats: list[str], quantize: bool = False) -> list[str]:
    """Write each of `formats` for the model saved in `folder` (a `clip-accel train` output or any CLIP folder);
    returns the files written. open_clip: open_clip_config.json and open_clip_model.safetensors in `folder`; onnx:
    FOLDER/onnx/ (with int8 copies when `quantize`)."""
    if quantize and "onnx" not in formats:
        raise UserError("--quantize makes int8 copies of the ONNX files: add --format onnx.")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise UserError(f"{folder} holds no config.json: name a trained model's folder (a `clip-accel train` output).")
    model, processor = load_pretrained(folder)
    written = []
    if "open_clip" in formats:
        written += save_open_clip_files(model, processor, folder)
    if "onnx" in formats:
        exported = export_onnx(model, processor, folder, quantize=quantize)
        written += [exported[key] for key in ONNX_FILES if key in exported]
        logger.info(
            "ONNX towers and the processor written to %s (largest difference from torch: image %.1e, text %.1e)",
            exported["folder"],
            exported["max_difference"]["image"],
            exported["max_difference"]["text"],
        )
    return written
