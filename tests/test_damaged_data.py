"""A catalogue with every kind of damage: bad rows are skipped, counted and listed; good rows are untouched."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from clip_accel.config import DataConfig
from clip_accel.data.preprocess import preprocess_split
from clip_accel.data.sources import load_raw_split
from clip_accel.trainer import train

SKIPPED = {
    0: "unreadable image",
    1: "unreadable image",
    2: "unreadable image",
    3: "unreadable image",
    4: "unreadable image",
    10: "unreadable image",
    11: "empty caption",
    12: "empty caption",
    14: "empty class label",
    15: "empty class label",
}
CONVERTED = {5: "L", 6: "P", 7: "RGBA", 8: "CMYK", 9: "I;16"}
FIRST_GOOD = 16


def _damage(root) -> None:
    images = root / "images" / "train"
    rows = [json.loads(line) for line in (root / "train_data.json").read_text().splitlines()]
    os.remove(images / "0.jpeg")
    (images / "1.jpeg").write_bytes(b"")
    (images / "2.jpeg").write_bytes((images / "2.jpeg").read_bytes()[:100])
    (images / "3.jpeg").write_bytes(bytes(range(256)) * 8)
    (images / "4.jpeg").write_text("this is not an image")
    for row, mode in CONVERTED.items():
        original = Image.open(images / f"{row}.jpeg").convert("RGB")
        converted = (
            original.convert("L").convert("I").point(lambda v: v * 256).convert("I;16")
            if mode == "I;16"
            else original.convert(mode)
        )
        buffer = io.BytesIO()
        converted.save(buffer, format="JPEG" if mode == "CMYK" else "PNG")
        (images / f"{row}.jpeg").write_bytes(buffer.getvalue())
    Image.new("RGB", (1100, 1100), "red").save(images / "10.jpeg", format="PNG")  # over the bomb limit below
    rows[11]["product_title"] = ""
    rows[12]["product_title"] = "   \t "
    rows[13]["product_title"] = " ".join(["embroidered silk saree"] * 120)  # far past 77 tokens: truncated, kept
    rows[14]["class_label"] = ""
    rows[15]["class_label"] = "  "
    (root / "train_data.json").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def damaged_dir(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # so a 1100 x 1100 image counts as a bomb
    root = tmp_path / "damaged"
    shutil.copytree(demo_dir, root)
    _damage(root)
    return root


def test_training_completes_and_the_counts_are_exact(damaged_dir, make_configs):
    data, model, config = make_configs(data_dir=str(damaged_dir), num_train_epochs=1, eval_initial_model=False)
    result = train(data, model, config)
    assert result.metrics["training"]["skipped_rows"] == {"train": len(SKIPPED), "validation": 0, "test": 0}
    assert result.metrics["training"]["pairs"]["train"] == 192 - len(SKIPPED)
    report = [json.loads(line) for line in Path(config.output_dir, "skipped_rows.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit(", line ", 1)[1], r["reason"].split(":")[0]) for r in report] == [
        (str(row + 1), reason) for row, reason in SKIPPED.items()
    ]
    assert all(r["where"].startswith(str(damaged_dir / "train_data.json")) and r["split"] == "train" for r in report)
    assert report[0]["image"] == str(damaged_dir / "images" / "train" / "0.jpeg")


def test_good_rows_are_unaffected_and_other_modes_are_converted(damaged_dir, demo_dir, offline_tokenizer, tmp_path):
    def cached(folder):
        raw = load_raw_split(DataConfig(data_dir=str(folder)), "train", None)
        return preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))

    clean, damaged = cached(demo_dir), cached(damaged_dir)
    assert damaged["pixel_values"][FIRST_GOOD:] == clean["pixel_values"][FIRST_GOOD:]
    assert damaged["input_ids"][FIRST_GOOD:] == clean["input_ids"][FIRST_GOOD:]
    reasons = damaged["skip_reason"]
    assert all(reasons[row] == "" for row in CONVERTED) and reasons[13] == ""
    assert len(damaged["input_ids"][13]) == 77


def test_strict_mode_stops_at_the_first_bad_row_naming_file_line_and_reason(damaged_dir, make_configs):
    data, model, config = make_configs(data_dir=str(damaged_dir), strict=True)
    with pytest.raises(ValueError, match=r"--strict: .*train_data.json, line 1: unreadable image.*0.jpeg"):
        train(data, model, config)
