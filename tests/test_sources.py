"""Data sources: the Indo-fashion layout (ours and a hand-made one), any `datasets` folder, and clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from clip_accel.config import DataConfig
from clip_accel.data import load_raw_split
from clip_accel.data.indo_fashion import IndoFashionFolder


def _write_foreign_layout(root) -> None:
    """Indo-fashion as Kaggle ships it, written by hand: key order shuffled, extra keys, large photos of various
    sizes, unicode titles, CRLF line ends and a trailing blank line."""
    for split, file in (("train", "train_data.json"), ("val", "val_data.json"), ("test", "test_data.json")):
        os.makedirs(root / "images" / split)
        lines = []
        for index, (size, colour) in enumerate([((551, 676), "red"), ((320, 240), "blue"), ((400, 400), "green")]):
            Image.new("RGB", size, colour).save(root / "images" / split / f"{index}.jpeg", quality=90)
            lines.append(
                json.dumps(
                    {
                        "class_label": "saree",
                        "brand": "Ṛangrez",
                        "extra": [1, 2],
                        "product_title": f"{colour.title()} Banarasi silk saree – zari border",
                        "image_url": f"https://example.org/{index}.jpg",
                        "image_path": f"images/{split}/{index}.jpeg",
                    },
                    ensure_ascii=False,
                )
            )
        (root / file).write_bytes(("\r\n".join(lines) + "\r\n\r\n").encode())


def test_reads_a_folder_in_the_layout_that_nobody_here_made(tmp_path):
    _write_foreign_layout(tmp_path)
    for split in ("train", "validation", "test"):
        raw = IndoFashionFolder(str(tmp_path)).read(split)
        assert raw.dataset["caption"][0] == "Red Banarasi silk saree – zari border"
        assert raw.dataset["label"] == ["saree"] * 3
        assert raw.dataset["source_row"] == [1, 2, 3]
        assert all(os.path.isfile(path) for path in raw.dataset["image"])


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path):
    _write_foreign_layout(tmp_path)
    content = (tmp_path / "train_data.json").read_bytes()
    (tmp_path / "train_data.json").write_bytes(b"\xef\xbb\xbf" + content)  # UTF-8 BOM, as Windows editors save
    raw = IndoFashionFolder(str(tmp_path)).read("train")
    assert raw.dataset["label"] == ["saree"] * 3 and raw.dataset["source_row"] == [1, 2, 3]


def test_a_line_whose_image_path_is_not_text_is_skipped_as_no_image(tmp_path, demo_dir):
    from clip_accel.data.preprocess import PairPreprocessor
    from clip_accel.tokenizer import build_offline_tokenizer

    _write_foreign_layout(tmp_path)
    lines = (tmp_path / "train_data.json").read_text(encoding="utf-8").splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "image_path": None})
    (tmp_path / "train_data.json").write_text("\n".join(lines), encoding="utf-8")
    raw = IndoFashionFolder(str(tmp_path)).read("train")
    assert raw.dataset["image"][0] is None and raw.dataset["source_row"] == [1, 2, 3]
    tokenizer = build_offline_tokenizer(["red saree"])
    cached = PairPreprocessor(tokenizer, 32, 77)(raw.dataset[:3])
    assert cached["skip_reason"] == ["no image", "", ""]


def test_datasets_source_without_labels_has_none_rather_than_empty_labels(tmp_path):
    _write_imagefolder(tmp_path)
    config = DataConfig(dataset_name="imagefolder", data_files=str(tmp_path), caption_column="text")
    assert load_raw_split(config, "validation", None).dataset["label"] == [None, None]


def test_reads_the_demo_catalogue_through_the_same_reader(demo_dir):
    raw = IndoFashionFolder(demo_dir).read("train")
    first = json.loads(Path(demo_dir, "train_data.json").read_text().splitlines()[0])
    assert len(raw.dataset) == 192
    assert raw.dataset[0]["caption"] == first["product_title"]
    assert raw.dataset[0]["image"] == os.path.join(demo_dir, first["image_path"])


def test_malformed_json_line_names_file_and_line(tmp_path):
    _write_foreign_layout(tmp_path)
    with open(tmp_path / "val_data.json", "a") as handle:
        handle.write('{"image_path": "images/val/9.jpeg", "product_title": \n')
    with pytest.raises(ValueError, match=r"val_data.json, line 5: not valid JSON"):
        IndoFashionFolder(str(tmp_path)).read("validation")


def test_missing_field_names_file_line_and_field(tmp_path):
    _write_foreign_layout(tmp_path)
    (tmp_path / "test_data.json").write_text(json.dumps({"image_path": "images/test/0.jpeg"}) + "\n")
    with pytest.raises(ValueError, match=r"test_data.json, line 1: missing field\(s\) \['product_title'"):
        IndoFashionFolder(str(tmp_path)).read("test")


def test_missing_split_file_or_unknown_split_says_what_is_expected(tmp_path):
    _write_foreign_layout(tmp_path)
    os.remove(tmp_path / "test_data.json")
    with pytest.raises(ValueError, match="test_data.json is missing"):
        IndoFashionFolder(str(tmp_path)).read("test")
    with pytest.raises(ValueError, match="splits train, validation"):
        IndoFashionFolder(str(tmp_path)).read("dev")


def test_fingerprint_follows_image_files_and_sample_limits(tmp_path):
    _write_foreign_layout(tmp_path)
    config = DataConfig(data_dir=str(tmp_path))
    first = load_raw_split(config, "train", None)
    assert load_raw_split(config, "train", None).fingerprint == first.fingerprint
    assert load_raw_split(config, "train", 2).fingerprint != first.fingerprint
    Image.new("RGB", (50, 60), "black").save(tmp_path / "images" / "train" / "1.jpeg")
    assert load_raw_split(config, "train", None).fingerprint != first.fingerprint


def _write_imagefolder(root) -> None:
    for split in ("train", "validation", "test"):
        os.makedirs(root / split)
        with open(root / split / "metadata.jsonl", "w") as metadata:
            for index, colour in enumerate(["red", "blue"]):
                Image.new("RGB", (40, 30), colour).save(root / split / f"{index}.png")
                metadata.write(
                    json.dumps({"file_name": f"{index}.png", "text": f"a {colour} kurta", "category": "kurta"}) + "\n"
                )


def test_any_datasets_folder_with_named_columns(tmp_path):
    _write_imagefolder(tmp_path)
    config = DataConfig(
        dataset_name="imagefolder", data_files=str(tmp_path), caption_column="text", label_column="category"
    )
    raw = load_raw_split(config, "validation", None)
    assert raw.dataset.column_names == ["image", "caption", "label", "problem", "source_row"]
    assert raw.dataset["caption"] == ["a red kurta", "a blue kurta"]
    image = raw.dataset[0]["image"]  # handed over undecoded (bytes or path): we decode ourselves
    assert image["bytes"] or os.path.isfile(image["path"])


def test_datasets_source_with_a_wrong_column_or_split_lists_what_exists(tmp_path):
    _write_imagefolder(tmp_path)
    with pytest.raises(ValueError, match=r"no column\(s\) \['caption'\].*'text'"):
        load_raw_split(DataConfig(dataset_name="imagefolder", data_files=str(tmp_path)), "train", None)
    with pytest.raises(ValueError, match="has no split 'dev'"):
        load_raw_split(
            DataConfig(dataset_name="imagefolder", data_files=str(tmp_path), caption_column="text"), "dev", None
        )


def test_a_caption_template_composes_captions_from_the_lines_fields(tmp_path):
    _write_foreign_layout(tmp_path)
    raw = IndoFashionFolder(str(tmp_path), "{product_title}, by {brand} ({class_label})").read("train")
    assert raw.dataset["caption"][0] == "Red Banarasi silk saree – zari border, by Ṛangrez (saree)"
    assert raw.fingerprint != IndoFashionFolder(str(tmp_path)).read("train").fingerprint
    assert raw.fingerprint != IndoFashionFolder(str(tmp_path), "{product_title} by {brand}").read("train").fingerprint


def test_a_template_naming_a_missing_field_fails_before_anything_is_loaded_naming_the_fields(tmp_path):
    _write_foreign_layout(tmp_path)
    expected = (
        r"train_data.json, line 1: --caption_template names \['colour'\].*its columns are \['brand', 'class_label'"
    )
    with pytest.raises(ValueError, match=expected):
        load_raw_split(DataConfig(data_dir=str(tmp_path), caption_template="{product_title} in {colour}"), "train", 2)


def test_a_null_field_is_written_as_an_empty_string_and_a_template_needs_no_title(tmp_path):
    _write_foreign_layout(tmp_path)
    lines = (tmp_path / "val_data.json").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    records[0]["brand"] = None
    for record in records:
        del record["product_title"]
    (tmp_path / "val_data.json").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    raw = IndoFashionFolder(str(tmp_path), "{class_label} [{brand}]").read("val")
    assert raw.dataset["caption"][:2] == ["saree []", "saree [Ṛangrez]"]


def test_a_template_field_holding_a_list_skips_the_row_never_writes_the_lists_repr(tmp_path):
    _write_foreign_layout(tmp_path)
    lines = (tmp_path / "val_data.json").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    records[0]["brand"] = ["Ṛangrez", "Aangan"]
    (tmp_path / "val_data.json").write_text("\n".join(json.dumps(r) for r in records), encoding="utf-8")
    raw = IndoFashionFolder(str(tmp_path), "{product_title} by {brand}").read("val")
    assert raw.dataset["caption"][0] is None and "[" not in raw.dataset["caption"][1]
    assert raw.dataset["problem"][:2] == ["--caption_template field 'brand' holds a list, not text", None]


def test_a_template_composes_captions_of_a_datasets_source_and_a_missing_column_lists_its_columns(tmp_path):
    _write_imagefolder(tmp_path)
    config = DataConfig(dataset_name="imagefolder", data_files=str(tmp_path), caption_template="{text} ({category})")
    raw = load_raw_split(config, "validation", None)
    assert raw.dataset.column_names == ["image", "caption", "label", "problem", "source_row"]
    assert raw.dataset["caption"] == ["a red kurta (kurta)", "a blue kurta (kurta)"]
    plain = DataConfig(dataset_name="imagefolder", data_files=str(tmp_path), caption_column="text")
    assert raw.fingerprint != load_raw_split(plain, "validation", None).fingerprint
    wrong = DataConfig(dataset_name="imagefolder", data_files=str(tmp_path), caption_template="{title}")
    missing = r"--caption_template names \['title'\], which it does not have; its columns are .*'category'.*'text'"
    with pytest.raises(ValueError, match=missing):
        load_raw_split(wrong, "validation", None)
    with pytest.raises(ValueError, match=r"--caption_template names \['image'\].*not text or numbers"):
        load_raw_split(
            DataConfig(dataset_name="imagefolder", data_files=str(tmp_path), caption_template="{image} {text}"),
            "validation",
            None,
        )


def test_a_line_that_is_not_utf8_names_its_file_and_line_and_u2028_in_a_title_is_no_line_end(tmp_path):
    _write_foreign_layout(tmp_path)
    lines = (tmp_path / "train_data.json").read_bytes().split(b"\r\n")
    record = json.loads(lines[1])
    record["product_title"] = "Blue saree\u2028zari border"  # JSON may hold it as it is
    lines[1] = json.dumps(record, ensure_ascii=False).encode()
    (tmp_path / "train_data.json").write_bytes(b"\r\n".join(lines))
    raw = IndoFashionFolder(str(tmp_path)).read("train")
    assert raw.dataset["caption"][1] == "Blue saree\u2028zari border" and raw.dataset["source_row"] == [1, 2, 3]
    lines[2] = lines[2].replace(b"Green", b"Gr\xe9en")  # Latin-1, not UTF-8
    (tmp_path / "train_data.json").write_bytes(b"\r\n".join(lines))
    with pytest.raises(ValueError, match=r"train_data.json, line 3: not UTF-8 \(byte 0xe9 at column \d+\)"):
        IndoFashionFolder(str(tmp_path)).read("train")


def test_a_datasets_source_skips_null_labels_as_every_source_does_and_names_class_labels(tmp_path):
    from clip_accel.data.preprocess import preprocess_split
    from clip_accel.tokenizer import build_offline_tokenizer

    _write_imagefolder(tmp_path / "meta")
    metadata = tmp_path / "meta" / "validation" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[0]["category"] = None
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(
        dataset_name="imagefolder", data_files=str(tmp_path / "meta"), caption_column="text", label_column="category"
    )
    raw = load_raw_split(config, "validation", None)
    assert raw.dataset["label"] == ["", "kurta"]
    cached = preprocess_split(raw, build_offline_tokenizer(["a red kurta"]), 16, str(tmp_path / "cache"))
    assert cached["skip_reason"] == ["empty class label", ""]
    for split in ("train", "validation", "test"):  # class folders: a ClassLabel column, its cells are indices
        for label in ("kurta", "saree"):
            os.makedirs(tmp_path / "folders" / split / label)
            Image.new("RGB", (20, 20), "red").save(tmp_path / "folders" / split / label / "0.png")
    config = DataConfig(dataset_name="imagefolder", data_files=str(tmp_path / "folders"), caption_template="{label}")
    config = DataConfig(**{**config.__dict__, "label_column": "label"})
    named = load_raw_split(config, "test", None).dataset
    assert named["label"] == ["kurta", "saree"] and named["caption"] == ["kurta", "saree"]
