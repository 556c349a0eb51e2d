"""Sharded sources for `--streaming`, read one shard at a time: WebDataset tar shards, and any `datasets` stream;
their rows in the raw schema, the training split's epoch length, the evaluation splits read whole; and WebDataset
shards written from an Indo-fashion-layout folder.

`datasets` resolves where the shards are (a local folder or glob, a Hub repository: `train-*.tar` and so on, per
split). Tar shards are then read here, not through `datasets`' webdataset loader: its Python tar and feature
layers cost ~470 us a row on these machines, against ~14 us for this reader (BENCHMARKS.md section 2), which would
make reading the shards cost as much as decoding their JPEGs. Members are decoded as that loader decodes them
(text, JSON and integer extensions with its own decoders; images left as bytes); pickled members are never loaded.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
from accelerate.logging import get_logger
from datasets.packaged_modules.webdataset.webdataset import DECODERS, IMAGE_EXTENSIONS
from PIL import Image

from ..config import DataConfig, UserError, check_writable_folder
from .indo_fashion import INDO_FASHION_FILES
from .parquet_shards import ParquetShards
from .preprocess import JPEG_QUALITY, encode_jpeg, load_rgb_image, to_rgb
from .remote import ShardUnavailable, is_remote, open_shard, remote_splits
from .retry import DEFAULT_RETRYING, Retrying
from .shard_cache import ShardCache
from .shard_index import (
    count_rows_from,
    count_tar_rows,
    index_beside,
    index_file,
    indexed_counts,
    next_member,
    recorded_in,
    stats_file,
    write_shard_index,
)
from .sources import (
    MORE_CAPTIONS,
    Columns,
    RawSplit,
    Source,
    check_columns,
    class_names,
    first_rows,
    load_arguments,
    local_tar_splits,
    raw_columns,
    raw_row,
)

logger = get_logger(__name__)

# The webdataset loader's decoders for plain data only (its npy/pth/pickle ones could run code from a shard).
SAFE_DECODERS = {
    extension: DECODERS[extension]
    for extension in ("txt", "text", "transcript", "json", "jsn", "cls", "cls2", "index", "inx", "id")
}
SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}  # Indo-fashion split -> shard file prefix


class TarShards:
    """WebDataset tar shards: row k of shard s is the k-th group of members sharing a key (`KEY.jpg`, `KEY.txt`,
    ...), as a dict of extension -> value plus `__key__` and `__url__`."""

    features = None  # (no schema: the members' extensions are the columns)

    def __init__(
        self,
        files: list[str],
        index: str | None = None,
        counts: list[int] | None = None,
        cache: ShardCache | None = None,
        retrying: Retrying = DEFAULT_RETRYING,
    ) -> None:
        self.files = files
        self.index = index  # a shard index naming each shard's rows (`shard_index`), else the one beside them
        self.known_counts = counts  # the rows a remote index gave (data.remote)
        self.cache = cache  # --shard_cache_dir: shards read from the node's copies
        self.retrying = retrying  # how a remote shard's failures are retried (--remote_retry_seconds)
        self.counted = None  # each shard's rows as the pass's slots were cut from them (`expect`)
        self._first = None

    def expect(self, counts: list[int]) -> None:
        """Check each shard's end against `counts` as it is read (the rows a pass's slots were cut from): a shard
        that holds other than its count stops the stream (`rows`)."""
        self.counted = list(counts)

    def prefetch(self, shards: list[int]) -> None:
        """With a shard cache: fetch these shards in the background (a worker's next ones)."""
        if self.cache is not None:
            self.cache.prefetch([self.files[shard] for shard in shards])

    @property
    def num_shards(self) -> int:
        return len(self.files)

    def first_row(self) -> dict:
        """Shard 0's first row (read once), whose members are the shards' columns."""
        if self._first is None:
            self._first = next(self.rows(0, 0, 1, cached=False), {})
        return self._first

    def column_names(self) -> list[str]:
        return [name for name in self.first_row() if not name.startswith("__")]

    def image_column(self, name: str) -> bool:
        return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS

    def rows(self, shard: int, start: int = 0, stop: int | None = None, *, cached: bool = True) -> Iterator[dict]:
        """The shard's rows `start` to `stop` (from the shard cache's copy, if there is a cache and `cached`); the
        rows before `start` are passed over by their headers, their payloads seeked past (not read), and nothing
        after `stop` is read but the next header, where `stop` is the shard's count (`expect`): a shard that
        ends before its count or goes on past it is an error naming the shard, where the count came from and both
        numbers. Long member names come from their PAX or GNU headers (`shard_index.next_member`); a member that
        does not decode becomes an `__errors__` entry of its row (the row is then skipped and counted); a
        truncated shard is an error naming it. A remote shard that is missing or still fails after its retries
        (`retry`) makes its rows left `__errors__` rows marked `__unreachable__` (at least one, where its rows are
        not known: `check_unreachable` counts the shards): skipped and counted as consumed, so every other row of
        the pass is still read once."""
        url = self.files[shard]
        expected = self.counted[shard] if self.counted is not None else None
        at = {"key": None, "row": {}, "index": -1}  # the row being read: its key, members and number
        try:
            opened = self.cache.open(url) if self.cache is not None and cached else open_shard(url, self.retrying)
            with opened as handle:
                yield from self._members(handle, url, start, stop, at, expected)
        except ShardUnavailable as error:
            lost = {"__errors__": [str(error)], "__url__": url, "__unreachable__": str(error)}
            if at["index"] >= start and (stop is None or at["index"] < stop):
                yield {**at["row"], **lost, "__key__": at["key"]}
            elif stop is None:
                yield {**lost, "__key__": f"row {max(at['index'] + 1, start)} on"}
            for missing in range(max(at["index"] + 1, start), stop if stop is not None else 0):
                yield {**lost, "__key__": f"row {missing}"}
            return
        if at["row"]:
            yield {**at["row"], "__key__": at["key"], "__url__": url}

    def _members(
        self, handle, url: str, start: int, stop: int | None, at: dict, expected: int | None
    ) -> Iterator[dict]:
        """The rows `rows` reads, each when the next begins (the last one stays in `at`); `expected`: the shard's
        count, checked at its end."""
        while (member := next_member(handle, url)) is not None:
            size, base, field = member
            if base is not None and base != at["key"]:
                if at["row"]:
                    yield {**at["row"], "__key__": at["key"], "__url__": url}
                at.update(key=base, row={}, index=at["index"] + 1)
                if stop is not None and at["index"] >= stop:
                    if expected is not None and at["index"] >= expected:  # a row past the shard's count
                        handle.seek(size + (-size % 512), os.SEEK_CUR)
                        raise self._count_disagrees(url, expected, count_rows_from(handle, url, at["index"] + 1, base))
                    return
            if base is None or at["index"] < start:  # folders, links; rows before `start`
                handle.seek(size + (-size % 512), os.SEEK_CUR)  # (payloads are padded to whole blocks)
                continue
            value = handle.read(size)
            if len(value) < size or len(handle.read(-size % 512)) < -size % 512:
                raise UserError(f"{url} is truncated (member {base}.{field}): write the shard again or remove it.")
            try:
                at["row"][field] = self._decode(field, value, at["key"])
            except (ValueError, UnicodeDecodeError) as error:
                at["row"].setdefault("__errors__", []).append(f"member {field} does not decode: {error}")
        if expected is not None and at["index"] + 1 != expected:  # (the shard ended: its rows are all counted)
            raise self._count_disagrees(url, expected, at["index"] + 1)

    def _count_disagrees(self, url: str, expected: int, rows: int) -> UserError:
        """The error of a shard that holds `rows` where its count said `expected`, naming where the count came
        from (`counts`) and what to do."""
        index = recorded_in(self.files, self.index)
        if self.known_counts is not None and self.index is None:
            origin = "the shard index beside the remote shards"
            advice = "write it again with `clip-accel index-shards URL --output FILE` and upload it (or pass it as "
            advice += "--shard_index FILE)"
        elif index is not None:
            origin = index
            advice = "write it again with `clip-accel index-shards FOLDER` (or URL --output FILE) after changing shards"
        elif os.path.isfile(stats_file(url)):
            origin = f"{stats_file(url)} (img2dataset's `successes`)"
            advice = (
                "write a shard index from the tar headers with `clip-accel index-shards FOLDER` and pass it as "
                "--shard_index FOLDER/train.shardindex.json"
            )
        else:
            origin, advice = "the count of its tar headers at start-up", "the shard changed while the run read it"
        return UserError(
            f"{url} holds {rows} rows, and {origin} says {expected}: {advice}. (A pass's slots are cut from the "
            "counts: trained on, a wrong one would leave rows out of every epoch or cut slots short.)"
        )

    def _decode(self, field: str, value: bytes, key: str):
        extension = field.rsplit(".", 1)[-1].lower()
        if extension in IMAGE_EXTENSIONS:
            return {"bytes": value, "path": f"{key}.{field}"}
        decoder = SAFE_DECODERS.get(extension)
        return decoder(value) if decoder is not None else value

    def counts(self) -> list[int]:
        """Each shard's rows: from an index or img2dataset's stats files, else from the local shards' headers."""
        if self.known_counts is not None and self.index is None:
            return list(self.known_counts)
        counts = indexed_counts(self.files, self.index)
        if counts is not None:
            return counts
        remote = [url for url in self.files if "://" in url]
        if remote:
            raise UserError(
                f"{remote[0]} and the other remote shards have no shard index: write one with `clip-accel "
                "index-shards` and pass it as --shard_index FILE (or put it beside them), or set --epoch_rows."
            )
        return [count_tar_rows(url) for url in self.files]


class DatasetShards:
    """Any `datasets` stream, read one of its shards (files) at a time; images left encoded."""

    cache = None  # (`datasets` fetches as it reads)

    def __init__(self, stream: datasets.IterableDataset) -> None:
        self.stream = stream

    @property
    def num_shards(self) -> int:
        return self.stream.num_shards

    @property
    def features(self) -> datasets.Features | None:
        return self.stream.features

    def column_names(self) -> list[str]:
        return list(self.stream.features or {})

    def image_column(self, name: str) -> bool:
        return isinstance((self.stream.features or {}).get(name), datasets.Image)

    def prefetch(self, shards: list[int]) -> None:
        """(`datasets` streams fetch as they read.)"""

    def rows(self, shard: int, start: int = 0, stop: int | None = None) -> Iterator[dict]:
        """The shard's rows `start` to `stop` (the rows before `start` are read: a `datasets` stream cannot seek)."""
        # (.iter, not iteration: inside a DataLoader worker a datasets stream would split itself among the workers)
        part = self.stream.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        batches = part.iter(batch_size=64)
        rows = (dict(zip(batch, row, strict=True)) for batch in batches for row in zip(*batch.values(), strict=True))
        yield from itertools.islice(rows, start, stop)

    def counts(self) -> list[int]:
        """Each shard's rows, read once (one column of it)."""
        column = next(iter(self.stream.features or {}), None)
        counts = []
        for shard in range(self.num_shards):
            part = self.stream.shard(num_shards=self.num_shards, index=shard, contiguous=True)
            if column is not None:
                part = part.select_columns([column])
            counts.append(sum(len(next(iter(batch.values()))) for batch in part.iter(batch_size=256)))
        return counts

    @property
    def recorded_rows(self) -> int | None:
        splits = self.stream.info.splits
        recorded = splits.get(self.stream.split) if splits else None
        return recorded.num_examples if recorded is not None and recorded.num_examples else None


class ShardSource(Source):
    """`--dataset_name` as a stream of shards (--streaming): WebDataset tar shards (a local folder, img2dataset's
    included, or a remote location: `remote`) read by `TarShards`, anything else through `datasets` streaming
    (`DatasetShards`). `shards(split)` streams a split; `read(split)` reads one whole (the evaluation splits)."""

    def __init__(self, config: DataConfig, training: bool = False) -> None:
        """`training`: the training split's columns (--extra_caption_templates)."""
        self.config, self.name, self.columns = config, config.dataset_name, Columns.of(config, training)
        self._found = None

    def split_names(self) -> list[str]:
        return list(self._splits())

    def _splits(self) -> dict:
        """{split: its shards}, found once (no shard is read)."""
        if self._found is None:
            self._found = find_shards(self.config)
        return self._found

    def shards(self, split: str) -> TarShards | DatasetShards:
        """The split shard by shard, its columns checked (`check_columns`; tar shards have no schema: their first
        row says which members they hold)."""
        if split not in self._splits():
            raise self.missing_split(split)
        stream = self._splits()[split]
        nested = [name for name in (self.columns.caption, self.columns.label) if name and "." in name]
        columns = stream.column_names()
        if columns:
            check_columns(self.columns, f"{self.name}[{split}]", columns, stream.features, nested)
        return stream

    def read(self, split: str, max_samples: int | None = None) -> RawSplit:
        """A split read whole into memory (an evaluation split: they are small) as a map-style split, so it is
        preprocessed and cached like any other; its fingerprint hashes its rows' bytes."""
        stream = self.shards(split)
        raw, digest = [], hashlib.sha256()
        names = class_names(stream.features, self.columns.label)
        unreachable = {}
        for example in all_rows(stream, max_samples):
            if "__unreachable__" in example:
                unreachable[example["__url__"]] = example["__unreachable__"]
                check_unreachable(unreachable, self.config.max_unreachable_shards)
            row = raw_row(example, self.columns, names)
            raw.append(row)
            image = row["image"]
            if isinstance(image, dict):
                digest.update(image.get("bytes") or str(image.get("path")).encode())
            else:
                digest.update(str(image).encode())
            digest.update(json.dumps([row["caption"], row["label"], *row["more_captions"]]).encode())
        rows = {**raw_columns(raw), "source_row": list(range(len(raw)))}
        features = datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "caption": datasets.Value("string"),
                "label": datasets.Value("string"),
                "problem": datasets.Value("string"),
                "source_row": datasets.Value("int64"),
            }
        )
        if rows["image"] and not isinstance(rows["image"][0], dict):
            features["image"] = datasets.Value("string")
        if "more_captions" in rows:
            features["more_captions"] = MORE_CAPTIONS
        dataset = datasets.Dataset.from_dict(rows, features=features)
        return first_rows(RawSplit(split, dataset, digest.hexdigest()[:32], self.name), max_samples)

    def missing_split(self, split: str) -> UserError:
        error = super().missing_split(split)
        if self._splits() and isinstance(next(iter(self._splits().values())), TarShards):
            return UserError(f"{error} Or name the shards train-*.tar, validation-*.tar, test-*.tar.")
        return error


def find_shards(config: DataConfig) -> dict[str, TarShards | ParquetShards | DatasetShards]:
    """`--dataset_name`'s splits, shard by shard: WebDataset tar shards read directly (the training split's
    through the shard cache, with --shard_cache_dir), parquet files by row groups, anything else through
    `datasets` streaming."""
    cache, retrying = None, Retrying(config.remote_retry_seconds)
    if config.shard_cache_dir is not None:
        cache = ShardCache(config.shard_cache_dir, int(config.shard_cache_gb * 1e9), retrying)

    def tar_shards(split: str, files: list[str], counts: list[int] | None = None) -> TarShards:
        train = split == config.train_split
        return TarShards(files, config.shard_index if train else None, counts, cache if train else None, retrying)

    if is_remote(config.dataset_name):
        files, counts = remote_splits(config.dataset_name, retrying)
        return {split: tar_shards(split, files[split], counts[split]) for split in files}
    path, name, location = load_arguments(config)
    if path == "webdataset" and isinstance(location.get("data_files"), dict):  # (a local folder of tar shards)
        return {split: tar_shards(split, files) for split, files in location["data_files"].items()}
    builder = datasets.load_dataset_builder(path, name, **location)
    found = builder.config.data_files or {}
    if builder.name == "webdataset":
        return {str(split): tar_shards(str(split), sorted(files)) for split, files in found.items()}
    if cache is not None:
        raise UserError(
            f"--shard_cache_dir keeps WebDataset tar shards, and {config.dataset_name} is no folder or URL of them: "
            "drop --shard_cache_dir (parquet files and `datasets` streams fetch as they read)."
        )
    if builder.name == "parquet":  # (read by row groups: each process its share of a file)
        return {str(split): ParquetShards(sorted(files)) for split, files in found.items()}
    splits = datasets.load_dataset(path, name, streaming=True, **location)
    found = {}
    for split, stream in splits.items():
        if isinstance((stream.features or {}).get(config.image_column), datasets.Image):
            stream = stream.cast_column(config.image_column, datasets.Image(decode=False))
        found[str(split)] = DatasetShards(stream)
    return found


@dataclass(frozen=True)
class StreamSplit:
    """The training split as a stream: `stream` yields the source's rows (images as encoded bytes); `rows` is an
    epoch's rows (`--epoch_rows`, the recorded count, or counted once)."""

    name: str
    stream: TarShards | DatasetShards
    rows: int
    source: str
    shard_rows: list[int] | None = None  # each shard's rows (a pass's order is cut from them)
    signatures: list[str | None] | None = None  # what identifies each shard's content (`shard_identity`)

    @property
    def rows_per_epoch(self) -> int:
        return self.rows


def index_shards(
    location: str, output: str | None = None, retrying: Retrying = DEFAULT_RETRYING
) -> list[tuple[str, str, int, int]]:
    """Write the shard index of each split of a folder or remote location of tar shards (the splits named by
    `shards_by_split`), from their tar headers (payloads seeked past: Range requests when remote): beside local
    shards as SPLIT.shardindex.json (train, validation, test: where a remote stream looks for them), or the training
    split's at `output` (needed for a remote one); remote failures retried by `retrying`. Returns (index, split,
    shards, rows) per index."""
    if is_remote(location):
        if output is None:
            raise UserError(f"{location} is remote: write its index to a local file with --output FILE.")
        splits = remote_splits(location, retrying)[0]
    else:
        splits = local_tar_splits(location)
        if splits is None:
            raise UserError(f"{location!r} is not a folder holding .tar shards")
    if output is None:  # (before any shard is read)
        advice = "write the index elsewhere with --output FILE, and pass that file as --shard_index"
        check_writable_folder(location, "the shard folder", advice)
    else:
        check_writable_folder(os.path.dirname(os.path.abspath(output)), "--output's folder")
    written = []
    for split, shards in splits.items():
        if output is not None and split != "train":
            continue
        path = output or index_beside(shards, split) or index_file(location, split)
        counts = [count_tar_rows(shard, lambda url: open_shard(url, retrying)) for shard in shards]
        write_shard_index(path, shards, counts)
        written.append((path, split, len(shards), sum(counts)))
    return written


def check_unreachable(unreachable: dict[str, str], limit: int) -> None:
    """Stop when more shards stayed unreachable ({url: why}) than --max_unreachable_shards allows."""
    if len(unreachable) > limit:
        count = f"{len(unreachable)} shard{'s' if len(unreachable) > 1 else ''}"
        raise UserError(
            f"{count} stayed unreachable (more than --max_unreachable_shards {limit}), e.g. "
            f"{next(iter(unreachable.values()))}. Check the shards and the server, or raise --max_unreachable_shards "
            "to go on without them (their rows skipped, counted and listed in skipped_rows.jsonl)."
        )


def where_in_stream(example: dict, shard: int, index: int) -> str:
    """A row's place in error reports: its shard file and key (WebDataset), else its shard and row there."""
    if "__key__" in example:
        return f"{os.path.basename(str(example.get('__url__', '')))} key {example['__key__']}"
    return f"shard {shard} row {index}"


def load_stream_split(
    config: DataConfig,
    split: str,
    counted: list[int],
    stream: TarShards | DatasetShards | None = None,
    signatures: list[str | None] | None = None,
) -> StreamSplit:
    """The stream (`stream` when already open) with each shard's rows `counted` (`count_shard_rows`: a pass's
    order is cut from them) and an epoch's rows: --epoch_rows, else a pass's; `signatures`: its shards'
    (`shard_identity`), which a checkpoint keeps."""
    stream = stream if stream is not None else ShardSource(config, training=True).shards(split)
    if isinstance(stream, TarShards):  # (each shard's end checked against its count as it is read)
        stream.expect(counted)
    rows = config.epoch_rows if config.epoch_rows is not None else sum(counted)
    return StreamSplit(split, stream, rows, config.dataset_name, list(counted), signatures)


def count_shard_rows(config: DataConfig, stream: TarShards | DatasetShards) -> list[int]:
    """Each shard's rows: a tar shard's from its index, img2dataset's stats or its headers (`shard_index`); a
    `datasets` stream's read once (no image decoded). Logged with the seconds it took."""
    start = time.perf_counter()
    counts = stream.counts()
    logger.info(
        f"{config.dataset_name}[{config.train_split}]: {sum(counts)} rows in {len(counts)} shards, counted in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return counts


def all_rows(stream, limit: int | None = None) -> Iterator[dict]:
    """A sharded source's rows, shard after shard, the first `limit` of them."""
    rows = (row for shard in range(stream.num_shards) for row in stream.rows(shard))
    return itertools.islice(rows, limit)


def stream_captions(split: StreamSplit, config: DataConfig, limit: int = 10_000) -> list[str]:
    """The first `limit` captions of a stream (a tokenizer learned from scratch, for tiny test models)."""
    columns = Columns.of(config, training=True)
    rows = [raw_row(example, columns) for example in all_rows(split.stream, limit)]
    return [caption for row in rows for caption in [row["caption"] or "", *row["more_captions"]]]


def write_webdataset_shards(
    data_dir: str,
    output_dir: str,
    split: str = "train",
    rows_per_shard: int = 1000,
    image_size: int | None = None,
    crop: bool = False,
) -> list[str]:
    """One Indo-fashion split (`train`, `val`, `test`) as WebDataset tar shards `{train,validation,test}-NNNNN.tar`:
    per row `KEY.jpg`, `KEY.txt` (the title) and `KEY.json` (the line's other fields: class_label, brand, ...).
    Read them with `--dataset_name OUTPUT --streaming --image_column jpg --caption_column txt --label_column
    json.class_label`. `image_size`: each image's shortest side resized to it (bicubic, JPEG quality 95), as
    img2dataset writes shards, so a stream decodes small JPEGs; with `crop`, then cut to the centre square as
    CLIPProcessor cuts it (the compact cache's crop: the stream's own resize and crop then change nothing, but the
    shards fit only that resolution). None keeps the image files' bytes as they are. A row whose title is not text
    gets no `KEY.txt` (it is skipped as "no caption" when read). The shards' index (`shard_index`) is written beside
    them. Returns the shard paths."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(data_dir, INDO_FASHION_FILES[split]), encoding="utf-8-sig") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    paths, counts = [], []
    for first in range(0, len(records), rows_per_shard):
        path = os.path.join(output_dir, f"{SPLIT_FILES[split]}-{first // rows_per_shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for index, record in enumerate(records[first : first + rows_per_shard], start=first):
                fields = {name: value for name, value in record.items() if name != "image_path"}
                image = _shard_image(os.path.join(data_dir, record["image_path"]), image_size, crop)
                title = record.get("product_title")
                members = {"jpg": image, **({"txt": title.encode()} if isinstance(title, str) else {})}
                members["json"] = json.dumps(fields, ensure_ascii=False).encode()
                for extension, data in members.items():
                    add_tar_member(tar, f"{index:08d}.{extension}", data)
        paths.append(path)
        counts.append(len(records[first : first + rows_per_shard]))
    write_shard_index(index_file(output_dir, SPLIT_FILES[split]), paths, counts)
    return paths


def _shard_image(path: str, image_size: int | None, crop: bool) -> bytes:
    if crop and image_size is not None:
        return encode_jpeg(load_rgb_image(path, image_size))
    with open(path, "rb") as handle:
        data = handle.read()
    if image_size is None:
        return data
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (image_size, image_size))
        image = to_rgb(image)
        scale = image_size / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
