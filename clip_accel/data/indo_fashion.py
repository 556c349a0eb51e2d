"""The Indo-fashion Kaggle layout as a source (`IndoFashionFolder`): `{train,val,test}_data.json` (JSON lines with
`image_path`, `product_title`, `class_label`, `brand`, ...) and the images under `images/{train,val,test}/`; and
the writer of that layout (the demo catalogue and the benchmarks' data use it)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import partial

import datasets
from PIL import Image

from ..config import UserError
from .sources import (
    MORE_CAPTIONS,
    RAW_FEATURES,
    Columns,
    RawSplit,
    Source,
    _hash,
    _image_files_signature,
    check_columns,
    first_rows,
    raw_columns,
    raw_row,
)

# The Kaggle download's annotation file per split; its validation split is called "val".
INDO_FASHION_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}
SPLIT_ALIASES = {"validation": "val"}
INDO_FASHION_FIELDS = ("image_path", "product_title", "class_label")


class IndoFashionFolder(Source):
    """A folder in the Indo-fashion Kaggle layout. Captions are the titles, or composed from each line's fields by
    `caption_template` (e.g. "{product_title}, by {brand}").

    A line that is not valid JSON or lacks a required field (one the template names included) is an error naming
    the file and line: a broken annotation file is a problem to fix, not data to skip. Image problems are found
    later, per row."""

    def __init__(self, folder: str, caption_template: str | None = None, extra_templates=()) -> None:
        self.folder, self.name = folder, folder
        self.columns = Columns("image_path", "product_title", "class_label", caption_template, tuple(extra_templates))

    def split_names(self) -> list[str]:
        return list(INDO_FASHION_FILES)

    def read(self, split: str, max_samples: int | None = None) -> RawSplit:
        file_name = INDO_FASHION_FILES.get(SPLIT_ALIASES.get(split, split))
        if file_name is None:
            raise UserError(f"Indo-fashion has the splits train, validation (val) and test; got {split!r}.")
        path = os.path.join(self.folder, file_name)
        if not os.path.isfile(path):
            raise UserError(
                f"{path} is missing: --data_dir must hold train_data.json, val_data.json and "
                "test_data.json as in the Indo-fashion Kaggle download."
            )
        rows, source_rows = [], []
        with open(path, "rb") as handle:
            content = handle.read()
        # Split on the bytes' own line ends: str.splitlines would also cut at U+2028 and other separators, which a
        # JSON string may hold as they are. A byte-order mark (Windows editors write one) is not part of line 1.
        for line_number, line in enumerate(content.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
            if not line.strip():
                continue
            record = _parse_line(_decode_line(line, path, line_number), path, line_number, self.columns)
            row = raw_row(record, self.columns)
            image = row["image"]  # (not text: skipped as "no image")
            row["image"] = os.path.join(self.folder, image) if isinstance(image, str) else None
            rows.append(row)
            source_rows.append(line_number)
        columns = {**raw_columns(rows), "source_row": source_rows}
        features = {**RAW_FEATURES, "problem": datasets.Value("string")}
        if "more_captions" in columns:
            features["more_captions"] = MORE_CAPTIONS
        dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        signature = _hash(
            hashlib.sha256(content).hexdigest(),
            _image_files_signature([image for image in columns["image"] if image is not None]),
            *self.columns.signature(),
        )
        return first_rows(RawSplit(split, dataset, signature, path), max_samples)


def write_indo_fashion_split(
    folder: str | os.PathLike[str],
    split: str,
    make_item: Callable[[int], tuple[dict, Image.Image]],
    count: int,
    *,
    map_items: Callable = map,
    **jpeg_options,
) -> None:
    """Write `count` items in the Kaggle layout: images/{split}/{index}.jpeg and the split's JSON-lines file.

    `make_item(index)` returns (the row's fields other than image_path, the image). `map_items` may be a process
    pool's map (then `make_item` must pickle); `jpeg_options` go to `Image.save` (quality, subsampling).
    """
    os.makedirs(os.path.join(folder, "images", split), exist_ok=True)
    lines = map_items(partial(_write_item, str(folder), split, make_item, jpeg_options), range(count))
    with open(os.path.join(folder, INDO_FASHION_FILES[split]), "w", encoding="utf-8") as handle:
        handle.write("".join(lines))


def _write_item(folder: str, split: str, make_item: Callable, jpeg_options: dict, index: int) -> str:
    fields, image = make_item(index)
    image_path = f"images/{split}/{index}.jpeg"
    image.save(os.path.join(folder, image_path), format="JPEG", **jpeg_options)
    return json.dumps({"image_path": image_path, **fields}, ensure_ascii=False) + "\n"


def _decode_line(line: bytes, path: str, line_number: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}, line {line_number}: not UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1}). "
            "Save the file as UTF-8, or fix or delete that line."
        ) from None


def _parse_line(line: str, path: str, line_number: int, columns: Columns) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{path}, line {line_number}: not valid JSON ({error.msg}). Fix or delete that line.") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}.")
    required = INDO_FASHION_FIELDS if columns.template is None else ("image_path", "class_label")
    missing = [name for name in required if name not in record]
    if missing:
        raise UserError(f"{path}, line {line_number}: missing field(s) {missing}; every line needs {list(required)}.")
    check_columns(columns, f"{path}, line {line_number}", record)  # (the fields a template names)
    return record
