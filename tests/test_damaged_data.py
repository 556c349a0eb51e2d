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
from clip_accel.data import load_raw_split
from clip_accel.data.preprocess import preprocess_split
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


# The same bad cells in every kind of source: a null caption, a caption that is not text, a null class label.
BAD_CELLS = {1: "no caption (null)", 2: "caption is not text (int '5')", 3: "empty class label"}


def _bad_cell_records(demo_dir: str, count: int = 8) -> list[dict]:
    lines = Path(demo_dir, "train_data.json").read_text().splitlines()[:count]
    records = [{**json.loads(line)} for line in lines]
    for record in records:
        record["image_path"] = os.path.join(demo_dir, record["image_path"])
    records[1]["product_title"] = None
    records[2]["product_title"] = 5
    records[3]["class_label"] = None
    return records


def _read_source(kind: str, records: list[dict], folder: Path):
    from clip_accel.data.shards import ShardSource, add_tar_member

    folder.mkdir()
    if kind == "indo_fashion":
        (folder / "train_data.json").write_text("".join(json.dumps(record) + "\n" for record in records))
        return load_raw_split(DataConfig(data_dir=str(folder)), "train", None)
    if kind == "datasets":  # (a JSON column is one type: the number is the shards' and the folder's case)
        records = [{**record, "product_title": None} if record["product_title"] == 5 else record for record in records]
        (folder / "train.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        config = DataConfig(
            dataset_name="json",
            data_files=str(folder / "train.jsonl"),
            image_column="image_path",
            caption_column="product_title",
            label_column="class_label",
        )
        return load_raw_split(config, "train", None)
    import tarfile

    with tarfile.open(folder / "train-00000.tar", "w") as tar:
        for index, record in enumerate(records):
            add_tar_member(tar, f"{index:04d}.jpg", Path(record["image_path"]).read_bytes())
            add_tar_member(tar, f"{index:04d}.json", json.dumps(record).encode())
    config = DataConfig(
        dataset_name=str(folder),
        streaming=True,
        image_column="jpg",
        caption_column="json.product_title",
        label_column="json.class_label",
    )
    return ShardSource(config).read("train")  # (the training stream's rows pass the same stream_row)


@pytest.mark.parametrize("kind", ["indo_fashion", "datasets", "shards"])
def test_null_or_non_text_captions_and_null_labels_are_skipped_alike_in_every_source(
    kind, demo_dir, offline_tokenizer, tmp_path
):
    raw = _read_source(kind, _bad_cell_records(demo_dir), tmp_path / kind)
    cached = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))
    expected = {**BAD_CELLS, **({2: "no caption (null)"} if kind == "datasets" else {})}
    assert {row: reason for row, reason in enumerate(cached["skip_reason"]) if reason} == expected
    assert "None" not in cached["caption"] and "5" not in cached["caption"]


@pytest.mark.parametrize("kind", ["indo_fashion", "datasets", "shards"])
def test_caption_lists_are_read_by_every_source_and_bad_lists_are_skipped(kind, demo_dir, offline_tokenizer, tmp_path):
    records = _bad_cell_records(demo_dir, 6)
    lists = [["a red kurta", "a kurta in red"], ["a saree"], [], ["a dupatta", " "], ["a lehenga", 3], ["x", "y", "z"]]
    for record, captions in zip(records, lists, strict=True):
        record["product_title"], record["class_label"] = captions, "kurta"
    if kind == "datasets":  # (a JSON column is one type: no number inside a list of text)
        records[4]["product_title"] = ["a lehenga", "3"]
    raw = _read_source(kind, records, tmp_path / kind)
    fourth = "a lehenga" if kind == "datasets" else None
    assert list(raw.dataset["caption"]) == ["a red kurta", "a saree", None, None, fourth, "x"]
    cached = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))
    expected = {2: "empty caption list", 3: "caption 2 of the list is empty"}
    if kind != "datasets":
        expected[4] = "caption 2 of the list is not text (int '3')"
    assert {row: reason for row, reason in enumerate(cached["skip_reason"]) if reason} == expected
    assert cached["caption"][0] == "a red kurta" and cached["more_captions"][0] == ["a kurta in red"]
    assert cached["more_captions"][5] == ["y", "z"] and cached["more_captions"][1] == []
    tokens = offline_tokenizer(["y", "z"], truncation=True, max_length=77)["input_ids"]
    assert cached["more_input_ids"][5] == tokens  # (every caption tokenized once, in the cache)


def test_a_column_that_is_not_text_stops_naming_the_column(demo_dir, tmp_path):
    records = _bad_cell_records(demo_dir)[:1]
    records[0]["product_title"] = 0
    with pytest.raises(ValueError, match=r"--caption_column 'product_title' holds int64, not text.*--caption_template"):
        _read_source("datasets", records, tmp_path / "numbers")


def _without_test_images(demo_dir, tmp_path) -> Path:
    """The demo with its test split's images gone, and 5 of its rows given an empty title: no usable test pair."""
    root = tmp_path / "no-test-images"
    shutil.copytree(demo_dir, root)
    shutil.rmtree(root / "images" / "test")
    rows = [json.loads(line) for line in (root / "test_data.json").read_text().splitlines()]
    for row in rows[:5]:
        row["product_title"] = ""
    (root / "test_data.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_a_split_with_no_usable_pair_says_why_and_training_writes_the_report_first(
    demo_dir, tmp_path, make_configs, tiny_pretrained_dir
):
    from clip_accel.cli import evaluate_main
    from clip_accel.config import UserError

    root = _without_test_images(demo_dir, tmp_path)
    data, model, config = make_configs(data_dir=str(root), num_train_epochs=1, eval_initial_model=False)
    with pytest.raises(UserError) as stopped:
        train(data, model, config)
    report = Path(config.output_dir, "skipped_rows.jsonl")
    message = str(stopped.value)
    assert "Split 'test' has no usable pairs: all 45 rows were skipped" in message
    assert "40 unreadable image: FileNotFoundError; 5 empty caption" in message
    assert "test_data.json, line 1: empty caption" in message and f"listed in {report}" in message
    listed = [json.loads(line) for line in report.read_text().splitlines()]
    assert len([row for row in listed if row["split"] == "test"]) == 45
    with pytest.raises(UserError) as evaluated:  # no output folder: the reasons alone
        evaluate_main.__wrapped__(["--model_name_or_path", tiny_pretrained_dir, "--data_dir", str(root)])
    assert "40 unreadable image: FileNotFoundError; 5 empty caption" in str(evaluated.value)
    assert "skipped_rows.jsonl" not in str(evaluated.value)
