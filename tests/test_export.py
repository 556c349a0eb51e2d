"""`clip-accel export OUTPUT --format open_clip|onnx [--quantize]`: the files land beside the transformers ones and
`clip-accel push` takes them along. The formats themselves are tested against their clients in
tests/test_open_clip_export.py (open_clip) and tests/test_onnx_export.py (ONNX Runtime)."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_open_clip_source import open_clip_folder

from clip_accel.cli import export_main
from clip_accel.hub import _files_to_push
from clip_accel.open_clip_source import converted_folder

ONNX_FILES = [f"onnx/{tower}_model{kind}.onnx" for tower in ("image", "text") for kind in ("", "_int8")]


def test_onnx_towers_and_int8_copies_are_written_into_onnx_and_pushed(tiny_pretrained_dir, tmp_path):
    folder = shutil.copytree(tiny_pretrained_dir, tmp_path / "model")
    before = set(_files_to_push(str(folder)))
    export_main([str(folder), "--format", "onnx", "--quantize"])
    pushed = set(_files_to_push(str(folder)))
    assert set(ONNX_FILES) <= pushed - before
    assert {"onnx/processor_config.json", "onnx/tokenizer.json"} <= pushed - before  # the processor, for the server
    assert before <= pushed


def test_open_clip_files_land_beside_the_transformers_ones_with_open_clips_weights(tmp_path):
    reference, _ = open_clip_folder(tmp_path / "open_clip")
    folder = shutil.copytree(converted_folder(str(tmp_path / "open_clip")), tmp_path / "model")
    export_main([str(folder), "--format", "open_clip"])
    assert {"open_clip_config.json", "open_clip_model.safetensors", "config.json"} <= set(_files_to_push(str(folder)))
    weights = load_file(folder / "open_clip_model.safetensors")
    expected = {key: value for key, value in reference.state_dict().items() if key != "attn_mask"}
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], value) for key, value in expected.items())


def test_what_open_clip_cannot_express_is_refused_before_any_file_is_written(tiny_pretrained_dir, tmp_path, capsys):
    folder = shutil.copytree(tiny_pretrained_dir, tmp_path / "model")

    def error_of(*options: str) -> str:
        with pytest.raises(SystemExit) as exited:  # a UserError: one line, status 2
            export_main([str(folder), *options])
        assert exited.value.code == 2
        return capsys.readouterr().err.splitlines()[-1]

    refused = error_of("--format", "open_clip", "--format", "onnx")  # the demo model's own small vocabulary
    assert re.search(r"cannot be saved in open_clip's format: its text tower has \d+ token embeddings", refused)
    assert not (folder / "open_clip_config.json").exists() and not (folder / "onnx").exists()
    quantized = error_of("--format", "open_clip", "--quantize")
    assert "--quantize makes int8 copies of the ONNX files: add --format onnx" in quantized
