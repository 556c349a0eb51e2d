"""Where image–caption pairs come from: the Indo-fashion Kaggle layout (read here, and written here for the demo and
the benchmarks), anything `datasets` can load.

Every source yields the same raw schema, so preprocessing has one code path:
`image` (a file path, or a `{"bytes", "path"}` dict), `caption` (str; None when the row has none), `label` (str;
None when the source has no labels, "" when a row's label is empty or null: such a row is skipped and reported),
`problem` (optional; str: why the row is damaged, found when it was read, e.g. a caption that is not text),
`source_row` (int, the row's position in its source, for error reports).

The damaged-row rules for what a source's cells hold are here (`caption_text`, `label_text`), for every kind of
source alike; preprocessing skips a row with a `problem`, no caption, an empty label or an unreadable image.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import datasets
from datasets.data_files import DataFilesDict, get_data_patterns
from PIL import Image

from ..config import DataConfig, template_fields

# The Kaggle download's annotation file per split; its validation split is called "val".
INDO_FASHION_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}
SPLIT_ALIASES = {"validation": "val"}
INDO_FASHION_FIELDS = ("image_path", "product_title", "class_label")
RAW_FEATURES = datasets.Features(
    {
        "image": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "label": datasets.Value("string"),
        "source_row": datasets.Value("int64"),
    }
)
# What a list-valued caption cell gets until several captions per image are supported.
CAPTION_LISTS = (
    "holds a list of captions; several captions per image are not supported yet: pick one caption column (or "
    "field), or write one caption per row"
)


@dataclass(frozen=True)
class RawSplit:
    """One split before preprocessing. `fingerprint` changes whenever the rows or the image files change.
    `source` names where rows come from in error reports: a JSON-lines file (`source_row` = its line number)
    or a dataset name (`source_row` = the row index)."""

    name: str
    dataset: datasets.Dataset
    fingerprint: str
    source: str = ""

    def describe_row(self, source_row: int) -> str:
        return (
            f"{self.source}, line {source_row}"
            if self.source.endswith(".json")
            else f"{self.source}[{self.name}] row {source_row}"
        )


def default_demo_dir() -> str:
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "clip_accel", "demo-v1")


def data_source_dir(config: DataConfig) -> str | None:
    """The Indo-fashion-layout folder this run reads, if any (the demo is written in that layout too)."""
    if config.demo:
        return config.data_dir or default_demo_dir()
    return config.data_dir


def load_raw_split(config: DataConfig, split: str, max_samples: int | None) -> RawSplit:
    folder = data_source_dir(config)
    if folder is not None:
        raw = read_indo_fashion(folder, split, config.caption_template)
    else:
        raw = read_hub_dataset(config, split)
    if max_samples is not None and max_samples < len(raw.dataset):
        fingerprint = _hash(raw.fingerprint, "first", max_samples)
        return RawSplit(split, raw.dataset.select(range(max_samples)), fingerprint, raw.source)
    return raw


def caption_text(value) -> tuple[str | None, str | None]:
    """A source's caption cell as (caption, problem): a string is the caption (an empty one is skipped later as
    "empty caption"); a null, a non-string (a number, an object) or a list of captions is a damaged row, skipped
    with its reason (readers refuse a list where they can name the file and line, or the column)."""
    if isinstance(value, str):
        return value, None
    if value is None:
        return None, "no caption (null)"
    if isinstance(value, list | tuple):
        return None, f"the caption {CAPTION_LISTS}"
    return None, f"caption is not text ({type(value).__name__} {str(value)[:40]!r})"


def label_text(value, names: list[str] | None = None) -> str:
    """A class-label cell as text: a null is "" (the row is skipped as "empty class label", in every source);
    `names`: a `datasets.ClassLabel`'s names, for its integer cells."""
    if value is None:
        return ""
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return str(value).strip()


def compose_caption(template: str, values: dict) -> str:
    """A caption from a `--caption_template` and one row's values of the columns it names (None written as "")."""
    return template.format_map({name: "" if value is None else str(value) for name, value in values.items()})


def read_indo_fashion(data_dir: str, split: str, caption_template: str | None = None) -> RawSplit:
    """Read `{train,val,test}_data.json` (JSON lines) from a folder in the Indo-fashion Kaggle layout. Captions
    are the titles, or composed from each line's fields by `caption_template` (e.g. "{product_title}, by {brand}").

    A line that is not valid JSON or lacks a required field (one the template names included) is an error naming
    the file and line: a broken annotation file is a problem to fix, not data to skip. Image problems are found
    later, per row.
    """
    file_name = INDO_FASHION_FILES.get(SPLIT_ALIASES.get(split, split))
    if file_name is None:
        raise ValueError(f"Indo-fashion has the splits train, validation (val) and test; got {split!r}.")
    path = os.path.join(data_dir, file_name)
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} is missing: --data_dir must hold train_data.json, val_data.json and "
            "test_data.json as in the Indo-fashion Kaggle download."
        )
    features = datasets.Features({**RAW_FEATURES, "problem": datasets.Value("string")})
    rows = {name: [] for name in features}
    caption_fields = template_fields(caption_template) if caption_template is not None else ()
    with open(path, "rb") as handle:
        content = handle.read()
    # Split on the bytes' own line ends: str.splitlines would also cut at U+2028 and other separators, which a
    # JSON string may hold as they are. A byte-order mark (Windows editors write one) is not part of line 1.
    for line_number, line in enumerate(content.removeprefix(b"\xef\xbb\xbf").splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_line(_decode_line(line, path, line_number), path, line_number, caption_fields)
        rows["image"].append(os.path.join(data_dir, record["image_path"]))
        if caption_template is None:
            if isinstance(record["product_title"], list):
                raise ValueError(f"{path}, line {line_number}: product_title {CAPTION_LISTS}.")
            caption, problem = caption_text(record["product_title"])
        else:
            caption = compose_caption(caption_template, {name: record[name] for name in caption_fields})
            problem = None
        rows["caption"].append(caption)
        rows["problem"].append(problem)
        rows["label"].append(label_text(record["class_label"]))
        rows["source_row"].append(line_number)
    dataset = datasets.Dataset.from_dict(rows, features=features)
    signature = _hash(
        hashlib.sha256(content).hexdigest(),
        _image_files_signature(rows["image"]),
        *([] if caption_template is None else [caption_template]),
    )
    return RawSplit(split, dataset, signature, path)


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
        raise ValueError(
            f"{path}, line {line_number}: not UTF-8 (byte {line[error.start]:#04x} at column {error.start + 1}). "
            "Save the file as UTF-8, or fix or delete that line."
        ) from None


def _parse_line(line: str, path: str, line_number: int, caption_fields: tuple[str, ...] = ()) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}, line {line_number}: not valid JSON ({error.msg}). Fix or delete that line."
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}, line {line_number}: expected a JSON object, got {type(record).__name__}.")
    required = INDO_FASHION_FIELDS if not caption_fields else ("image_path", "class_label")
    missing = [name for name in required if name not in record]
    if missing:
        raise ValueError(f"{path}, line {line_number}: missing field(s) {missing}; every line needs {list(required)}.")
    missing = [name for name in caption_fields if name not in record]
    if missing:
        raise ValueError(
            f"{path}, line {line_number}: --caption_template names {missing}, which this line does not have; its "
            f"fields are {sorted(record)}. Use those names in the template (e.g. '{{product_title}}, by {{brand}}')."
        )
    return record


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_image_folder(folder: str) -> RawSplit:
    """Every image file under `folder` (recursively, in sorted order) as a split without captions or labels
    (`caption` empty: preprocess it with `require_captions=False`); `source_row` is the file's position."""
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_SUFFIXES)
    )
    if not paths:
        raise ValueError(f"{folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
    rows = {"image": paths, "caption": [""] * len(paths), "label": [None] * len(paths)}
    dataset = datasets.Dataset.from_dict({**rows, "source_row": list(range(len(paths)))}, features=RAW_FEATURES)
    return RawSplit("images", dataset, _hash("image-folder", _image_files_signature(paths)), folder)


def _image_files_signature(paths: list[str]) -> str:
    """Size and modification time of every image, so a fixed or replaced image file invalidates the cache."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}:missing\n".encode())
    return digest.hexdigest()


def load_arguments(config: DataConfig) -> tuple[str, str | None, dict]:
    """(path, name, keywords) of `datasets.load_dataset` for `--dataset_name`: `--data_files` as a folder
    (data_dir) or files/a glob (data_files); a local folder of tar shards as WebDataset shards."""
    if config.data_files is not None:
        where = "data_dir" if os.path.isdir(config.data_files) else "data_files"
        return config.dataset_name, config.dataset_config_name, {where: config.data_files}
    shards = local_tar_splits(config.dataset_name)
    if shards is not None:
        return "webdataset", None, {"data_files": shards}
    return config.dataset_name, config.dataset_config_name, {}


def local_tar_splits(folder: str) -> dict[str, list[str]] | None:
    """A local folder's tar shards by split (named as `datasets` names them: train-*, validation-*, test-*; a name
    without a split's is training data), whatever lies beside them: img2dataset writes `NNNNN_stats.json` (and
    `NNNNN.parquet`) next to each `NNNNN.tar`, from which `datasets` would infer a JSON (or parquet) dataset. None
    when `folder` is no local folder or holds no tar file."""
    if not os.path.isdir(folder):
        return None
    patterns = get_data_patterns(folder)
    files = DataFilesDict.from_patterns(patterns, base_path=folder, allowed_extensions=[".tar"])
    splits = {str(split): sorted(found) for split, found in files.items() if found}
    return splits or None


def read_hub_dataset(config: DataConfig, split: str) -> RawSplit:
    """Load any `datasets` source and rename its columns to the raw schema."""
    path, name, location = load_arguments(config)
    splits = datasets.load_dataset(path, name, **location)
    if split not in splits:
        raise ValueError(
            f"{config.dataset_name} has no split {split!r}; it has {sorted(splits)}. "
            "Set --train_split/--validation_split/--test_split accordingly."
        )
    dataset = splits[split]
    template = config.caption_template
    wanted = source_columns(config)
    if any("." in name and name not in dataset.column_names for name in wanted):
        dataset = dataset.flatten()  # a JSON column's fields as COLUMN.FIELD columns (json.class_label)
    check_source_columns(config, split, dataset.column_names, dataset.features)
    caption_fields = template_fields(template) if template is not None else ()
    captions = None
    if template is not None:  # text columns only: read once, composed here (the cache key follows the template)
        columns = dataset.select_columns(list(caption_fields)).to_dict()
        for name in caption_fields:  # a class-label column's names, not its indices
            if (labels := class_names(dataset.features, name)) is not None:
                columns[name] = [label_text(value, labels) for value in columns[name]]
        captions = [
            compose_caption(template, {name: columns[name][row] for name in caption_fields})
            for row in range(len(dataset))
        ]
    if isinstance(dataset.features[config.image_column], datasets.Image):
        # We decode ourselves (draft-mode JPEG, per-row error handling); hand over the encoded bytes.
        dataset = dataset.cast_column(config.image_column, datasets.Image(decode=False))
    names = class_names(dataset.features, config.label_column)
    dataset = dataset.select_columns(list(wanted)).rename_columns(wanted)
    if captions is not None:
        dataset = dataset.add_column("caption", captions, feature=datasets.Value("string"))
    labels = [None] * len(dataset)
    if "label" in dataset.column_names:  # text, the same rules as every source's (a null label is skipped)
        labels = [label_text(value, names) for value in dataset["label"]]
        dataset = dataset.remove_columns("label")
    dataset = dataset.add_column("label", labels, feature=datasets.Value("string"))
    dataset = dataset.add_column("source_row", list(range(len(dataset))))
    fingerprint = _hash(dataset._fingerprint, *([] if template is None else [template]))
    return RawSplit(split, dataset, fingerprint, config.dataset_name)


def class_names(features, column: str | None) -> list[str] | None:
    """The names of a `datasets.ClassLabel` column (its cells are their indices), else None."""
    feature = (features or {}).get(column) if column is not None else None
    return feature.names if isinstance(feature, datasets.ClassLabel) else None


def source_columns(config: DataConfig) -> dict[str, str]:
    """The source's columns read as the raw schema's: {source column: raw name} (the caption's when no template)."""
    wanted = {config.image_column: "image"}
    if config.caption_template is None:
        wanted[config.caption_column] = "caption"
    if config.label_column is not None:
        wanted[config.label_column] = "label"
    return wanted


def check_source_columns(config: DataConfig, split: str, column_names: list[str], features, nested=()) -> None:
    """Every column the options name exists (a name in `nested` may be COLUMN.FIELD of a JSON column), and a
    template names text or number columns only."""
    template = config.caption_template
    caption_fields = template_fields(template) if template is not None else ()
    missing = [
        column
        for column in [*source_columns(config), *caption_fields]
        if column not in column_names and not (column in nested and column.split(".", 1)[0] in column_names)
    ]
    if missing:
        options = "--image_column/" + ("--caption_template" if template else "--caption_column") + "/--label_column"
        raise ValueError(
            f"{config.dataset_name}[{split}] has no column(s) {missing}; its columns are "
            f"{list(column_names)}. Set {options}."
        )
    not_text = [
        name
        for name in caption_fields
        if features and not isinstance(features[name], datasets.Value | datasets.ClassLabel)
    ]
    if not_text:
        raise ValueError(
            f"--caption_template names {not_text}, which hold {[str(features[n]) for n in not_text]}, not text "
            "or numbers; a caption is composed from text, number and class-label columns only."
        )
    caption = features.get(config.caption_column) if features and template is None else None
    if caption is not None:
        _check_caption_feature(config, split, caption)


def _check_caption_feature(config: DataConfig, split: str, feature) -> None:
    """The caption column holds text (a list of captions is refused until several per image are supported)."""
    where = f"{config.dataset_name}[{split}]: --caption_column {config.caption_column!r}"
    if isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence | list):
        raise ValueError(f"{where} {CAPTION_LISTS}.")
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise ValueError(
            f"{where} holds {kind}, not text. Name the column that holds the captions, or compose captions from "
            f"columns with --caption_template (e.g. '{{{config.caption_column}}}' writes each value as text)."
        )


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]
