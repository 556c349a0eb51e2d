"""Where image–caption pairs come from: one interface (`Source`) that each kind of source implements, in its own
file: an Indo-fashion folder (`indo_fashion`), anything `datasets` loads (`DatasetSource`, here), a stream of
shards (`shards`). `source_for` picks the kind a configuration names.

Every source yields the same raw schema, so preprocessing has one code path:
`image` (a file path, or a `{"bytes", "path"}` dict), `caption` (str; None when the row has none; of a list of
captions, the first), `more_captions` (the list's other captions; the column only where some row has them),
`label` (str; None when the source has no labels, "" when a row's label is empty or null: skipped and reported),
`problem` (optional; str: why the row is damaged, found when it was read, e.g. a caption that is not text),
`source_row` (int, the row's position in its source, for error reports).

A source's own rows become that schema in one function, for every kind alike: `raw_row` (the caption template
applied, the damaged-row rules of `caption_texts` and `label_text`); the columns the options name are checked in
one (`check_columns`). Preprocessing then skips a row with a `problem`, no caption, an empty label or an
unreadable image.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import datasets

from ..config import DataConfig, UserError, template_fields
from .shard_index import shards_by_split

RAW_FEATURES = datasets.Features(
    {
        "image": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "label": datasets.Value("string"),
        "source_row": datasets.Value("int64"),
    }
)
# The other captions of a row whose caption cell is a list (Flickr30k, COCO): `more_captions`.
MORE_CAPTIONS = datasets.List(datasets.Value("string"))


@dataclass(frozen=True)
class RawSplit:
    """One split before preprocessing. `fingerprint` changes whenever the rows or the image files change.
    `source` names where rows come from in error reports: a JSON-lines file (`source_row` = its line number)
    or a dataset name (`source_row` = the row index)."""

    name: str
    dataset: datasets.Dataset
    fingerprint: str
    source: str = ""
    # A stand-in (`data.SplitOutline`): as many empty rows, on a process that only opens the preprocessing cache
    # another process wrote from the rows themselves.
    read_elsewhere: bool = False

    @property
    def rows_per_epoch(self) -> int:
        return len(self.dataset)

    def captions(self) -> list[str]:
        """Every caption of the split (a row's other captions too), e.g. to learn a tokenizer from."""
        more = self.dataset["more_captions"] if "more_captions" in self.dataset.column_names else []
        return [*self.dataset["caption"], *(caption for captions in more for caption in captions or [])]

    def describe_row(self, source_row: int) -> str:
        return (
            f"{self.source}, line {source_row}"
            if self.source.endswith(".json")
            else f"{self.source}[{self.name}] row {source_row}"
        )


@dataclass(frozen=True)
class Columns:
    """Which of a source's columns hold the image, the caption (or, with `template`, the columns it is composed
    from) and the class label (None: the source has none). A name may be COLUMN.FIELD, a field of a JSON column."""

    image: str
    caption: str
    label: str | None
    template: str | None = None
    extra_templates: tuple[str, ...] = ()  # a training split's more captions (--extra_caption_templates)

    @classmethod
    def of(cls, config: DataConfig, training: bool = False) -> Columns:
        """The columns --image_column, --caption_column (or --caption_template) and --label_column name; for the
        training split (`training`), with --extra_caption_templates."""
        extra = tuple(config.extra_caption_templates) if training else ()
        return cls(config.image_column, config.caption_column, config.label_column, config.caption_template, extra)

    @property
    def caption_fields(self) -> tuple[str, ...]:
        """The columns the caption is read from: the template's, else the caption column; then the extra
        templates'."""
        fields = template_fields(self.template) if self.template is not None else (self.caption,)
        extra = [name for template in self.extra_templates for name in template_fields(template)]
        return tuple(dict.fromkeys([*fields, *extra]))

    def named(self) -> list[str]:
        """Every column the options name, the image's first."""
        return [self.image, *self.caption_fields, *([self.label] if self.label is not None else [])]

    def signature(self) -> list[str]:
        """What of these columns shapes the captions beyond the rows (for the split's fingerprint)."""
        return [*([] if self.template is None else [self.template]), *self.extra_templates]


class Source(ABC):
    """One kind of source (module docstring). `name` names it in messages; `columns` are the columns its rows are
    read from. A split is read whole (`read`: map-style, for the preprocessing cache) or, by the kinds that can,
    shard by shard (`shards`, for --streaming)."""

    name: str
    columns: Columns

    @abstractmethod
    def split_names(self) -> list[str]:
        """The splits it has."""

    @abstractmethod
    def read(self, split: str, max_samples: int | None = None) -> RawSplit:
        """The split's first `max_samples` rows (all by default) in the raw schema."""

    def shards(self, split: str):
        """The split shard by shard (`shards.TarShards` or `shards.DatasetShards`)."""
        raise UserError(f"{self.name} cannot be streamed: drop --streaming.")

    def missing_split(self, split: str) -> UserError:
        return UserError(
            f"{self.name} has no split {split!r}; it has {sorted(self.split_names())}. Set "
            "--train_split/--validation_split/--test_split accordingly."
        )


def raw_row(record: dict, columns: Columns, class_names: list[str] | None = None) -> dict:
    """One row of a source (its columns' values) in the raw schema (`image`, `caption`, `label`, `problem`), by
    the rules every kind of source shares: the caption composed by the template (a null value written as "") or
    read from its column (`caption_texts`), the label as text (`label_text`; `class_names`: a ClassLabel's names),
    and a row already damaged when read (`__errors__`: a member that did not decode) keeping that reason first."""
    problem = (record.get("__errors__") or [None])[0]
    if columns.template is not None:
        caption, template_problem = _composed(columns.template, record)
        problem, more = problem or template_problem, []
    else:
        captions, caption_problem = caption_texts(_column_value(record, columns.caption))
        caption, more = (captions[0], captions[1:]) if captions else (None, [])
        problem = problem or caption_problem
    for template in columns.extra_templates if caption is not None else ():
        extra, extra_problem = _composed(template, record)
        more, problem = [*more, *([extra] if extra is not None else [])], problem or extra_problem
    label = None
    if columns.label is not None:  # a row without its label: skipped as "empty class label"
        label = label_text(_column_value(record, columns.label), class_names)
    image = _column_value(record, columns.image)
    return {"image": image, "caption": caption, "more_captions": more, "label": label, "problem": problem}


def raw_columns(rows: list[dict], names=("image", "caption", "label", "problem")) -> dict[str, list]:
    """`raw_row`s as columns: `names`, and `more_captions` where some row has several captions."""
    columns = {name: [row[name] for row in rows] for name in names}
    if any(row["more_captions"] for row in rows):
        columns["more_captions"] = [row["more_captions"] for row in rows]
    return columns


def _composed(template: str, record: dict) -> tuple[str | None, str | None]:
    """(caption, problem) of a template over one row: None and why where a field it names is missing, or holds
    a list or an object (whose Python repr would otherwise be the caption)."""
    fields = template_fields(template)
    missing = [name for name in fields if not _has_column(record, name)]
    if missing:
        return None, f"no {missing} for --caption_template"
    values = {name: _column_value(record, name) for name in fields}
    nested = [name for name in fields if isinstance(values[name], list | tuple | dict)]
    if nested:
        return None, f"--caption_template field {nested[0]!r} holds a {type(values[nested[0]]).__name__}, not text"
    return compose_caption(template, values), None


def _column_value(record: dict, name: str):
    """A column's value, or a JSON column's field named COLUMN.FIELD (None when the row lacks it)."""
    if name in record:
        return record[name]
    column, _, key = name.partition(".")
    value = record.get(column)
    return value.get(key) if isinstance(value, dict) else None


def _has_column(record: dict, name: str) -> bool:
    column, _, key = name.partition(".")
    return name in record or (isinstance(record.get(column), dict) and key in record[column])


def default_demo_dir() -> str:
    return os.path.join(datasets.config.HF_DATASETS_CACHE, "clip_accel", "demo-v1")


def data_source_dir(config: DataConfig) -> str | None:
    """The Indo-fashion-layout folder this run reads, if any (the demo is written in that layout too)."""
    if config.demo:
        return config.data_dir or default_demo_dir()
    return config.data_dir


def first_rows(raw: RawSplit, max_samples: int | None) -> RawSplit:
    """A split's first `max_samples` rows (all of them with None)."""
    if max_samples is None or max_samples >= len(raw.dataset):
        return raw
    fingerprint = _hash(raw.fingerprint, "first", max_samples)
    return RawSplit(raw.name, raw.dataset.select(range(max_samples)), fingerprint, raw.source)


def caption_texts(value) -> tuple[list[str], str | None]:
    """A source's caption cell as (captions, problem): a string is one caption (an empty one is skipped later as
    "empty caption"), a list of strings several (one drawn per epoch in training, all scored in evaluation);
    a null, a non-string (a number, an object), an empty list or a list holding a non-string or an empty string
    is a damaged row, skipped with its reason."""
    if isinstance(value, str):
        return [value], None
    if value is None:
        return [], "no caption (null)"
    if isinstance(value, list | tuple):
        if not value:
            return [], "empty caption list"
        for item, caption in enumerate(value, start=1):
            if not isinstance(caption, str):
                return [], f"caption {item} of the list is not text ({type(caption).__name__} {str(caption)[:40]!r})"
            if not caption.strip():
                return [], f"caption {item} of the list is empty"
        return list(value), None
    return [], f"caption is not text ({type(value).__name__} {str(value)[:40]!r})"


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
        raise UserError(f"{folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
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
    """A local folder's tar shards by split (`shard_index.shards_by_split`, as remote shards are named), whatever
    lies beside them: img2dataset writes `NNNNN_stats.json` (and `NNNNN.parquet`) next to each `NNNNN.tar`, from
    which `datasets` would infer a JSON (or parquet) dataset. None when `folder` is no local folder or holds no tar
    file."""
    if not os.path.isdir(folder):
        return None
    shards = []  # (listed here: datasets' pattern globbing took 1.7 s for 1,000 shards)
    for root, folders, names in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith((".", "_")))
        shards += [
            os.path.join(root, name) for name in names if name.endswith(".tar") and not name.startswith((".", "_"))
        ]
    return shards_by_split(sorted(shards), folder) if shards else None


class DatasetSource(Source):
    """Anything `datasets.load_dataset` loads (`--dataset_name`, with `--data_files`), read whole."""

    def __init__(self, config: DataConfig, training: bool = False) -> None:
        """`training`: the training split's columns (--extra_caption_templates)."""
        self.config, self.name, self.columns = config, config.dataset_name, Columns.of(config, training)
        self._splits = None

    def split_names(self) -> list[str]:
        return list(self._load())

    def _load(self) -> datasets.DatasetDict:
        if self._splits is None:
            path, name, location = load_arguments(self.config)
            self._splits = datasets.load_dataset(path, name, **location)
        return self._splits

    def read(self, split: str, max_samples: int | None = None) -> RawSplit:
        """The split in the raw schema: its captions and labels read (no image: the image column is handed over
        as it is, encoded) and made raw by `raw_row`."""
        if split not in self._load():
            raise self.missing_split(split)
        dataset, columns = self._load()[split], self.columns
        if any("." in name and name not in dataset.column_names for name in columns.named()):
            dataset = dataset.flatten()  # a JSON column's fields as COLUMN.FIELD columns (json.class_label)
        check_columns(columns, f"{self.name}[{split}]", dataset.column_names, dataset.features)
        if isinstance(dataset.features[columns.image], datasets.Image):
            # We decode ourselves (draft-mode JPEG, per-row error handling); hand over the encoded bytes.
            dataset = dataset.cast_column(columns.image, datasets.Image(decode=False))
        text = dataset.select_columns(sorted(set(columns.named()[1:]))).to_dict()
        for name in text:  # a class-label column's names, not its indices
            if (labels := class_names(dataset.features, name)) is not None:
                text[name] = [label_text(value, labels) for value in text[name]]
        raw = [raw_row({name: cells[row] for name, cells in text.items()}, columns) for row in range(len(dataset))]
        images = dataset.select_columns([columns.image])
        if columns.image != "image":
            images = images.rename_column(columns.image, "image")
        for name, cells in raw_columns(raw, ("caption", "label", "problem")).items():
            feature = MORE_CAPTIONS if name == "more_captions" else datasets.Value("string")
            images = images.add_column(name, cells, feature=feature)
        images = images.add_column("source_row", list(range(len(images))))
        fingerprint = _hash(images._fingerprint, *columns.signature())
        return first_rows(RawSplit(split, images, fingerprint, self.name), max_samples)


def class_names(features, column: str | None) -> list[str] | None:
    """The names of a `datasets.ClassLabel` column (its cells are their indices), else None."""
    feature = (features or {}).get(column) if column is not None else None
    return feature.names if isinstance(feature, datasets.ClassLabel) else None


def check_columns(columns: Columns, where: str, column_names, features=None, nested=()) -> None:
    """Every column the options name is one of the source's `column_names` (a name in `nested` may be
    COLUMN.FIELD of a JSON column); with `features`, a template names text or number columns only and the caption
    column holds text. `where` names the split (or file and line) in the message."""
    caption_fields = columns.caption_fields
    missing = [
        column
        for column in columns.named()
        if column not in column_names and not (column in nested and column.split(".", 1)[0] in column_names)
    ]
    templated = columns.template is not None or columns.extra_templates
    if missing and templated and not [name for name in missing if name not in caption_fields]:
        named = [name for name in missing if columns.template and name in template_fields(columns.template)]
        option = "--caption_template" if named else "--extra_caption_templates"
        raise UserError(
            f"{where}: {option} names {missing}, which it does not have; its columns are "
            f"{sorted(column_names)}. Use those names in the template (e.g. '{{product_title}}, by {{brand}}')."
        )
    if missing:
        options = "--image_column/" + ("--caption_template" if columns.template else "--caption_column")
        raise UserError(
            f"{where} has no column(s) {missing}; its columns are {list(column_names)}. Set {options}/--label_column."
        )
    if not features:
        return
    if columns.template is not None:
        not_text = [
            name for name in caption_fields if not isinstance(features[name], datasets.Value | datasets.ClassLabel)
        ]
        if not_text:
            raise UserError(
                f"--caption_template names {not_text}, which hold {[str(features[n]) for n in not_text]}, not text "
                "or numbers; a caption is composed from text, number and class-label columns only."
            )
    elif (caption := features.get(columns.caption)) is not None:
        _check_caption_feature(columns, where, caption)


def _check_caption_feature(columns: Columns, where: str, feature) -> None:
    """The caption column holds text, or lists of text (several captions per image)."""
    where = f"{where}: --caption_column {columns.caption!r}"
    if isinstance(feature, datasets.List | datasets.LargeList | datasets.Sequence | list):
        feature = feature[0] if isinstance(feature, list) else feature.feature
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise UserError(
            f"{where} holds {kind}, not text. Name the column that holds the captions, or compose captions from "
            f"columns with --caption_template (e.g. '{{{columns.caption}}}' writes each value as text)."
        )


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]
