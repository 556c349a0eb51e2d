"""Data: sources -> one cached preprocessing pass -> fast pair batches. `load_raw_splits` then `build_pair_datasets`."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import datasets
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object

from ..config import DataConfig, UserError
from ..tokenizer import MAX_TEXT_TOKENS
from .demo import write_demo_dataset
from .hard_negatives import NeighbourSampler
from .indo_fashion import IndoFashionFolder
from .loader import CopyStream, PairDataset, make_dataloader, prefetched
from .preprocess import CaptionTruncation, ImageLayout, PairPreprocessor, as_layout, cached_truncation, preprocess_split
from .shard_identity import shard_signatures
from .shards import (
    ShardSource,
    StreamSplit,
    count_shard_rows,
    load_stream_split,
    stream_captions,
    write_webdataset_shards,
)
from .sources import DatasetSource, RawSplit, Source, data_source_dir, read_image_folder
from .streaming import STREAM_POSITION, StreamingLoader, StreamingPairs
from .training_data import CachedTrainingData, training_data

__all__ = [
    "CachedTrainingData",
    "CaptionTruncation",
    "CopyStream",
    "ImageLayout",
    "NeighbourSampler",
    "PairDataset",
    "RawSplit",
    "STREAM_POSITION",
    "Source",
    "StreamSplit",
    "StreamingLoader",
    "StreamingPairs",
    "build_pair_datasets",
    "check_strict",
    "load_raw_split",
    "load_raw_splits",
    "make_dataloader",
    "prefetched",
    "read_image_folder",
    "skipped_rows",
    "source_for",
    "stream_captions",
    "write_skip_report",
    "training_captions",
    "training_data",
    "write_webdataset_shards",
]

logger = get_logger(__name__)
ROLES = ("train", "validation", "test")


def split_names(config: DataConfig) -> dict[str, str]:
    return {"train": config.train_split, "validation": config.validation_split, "test": config.test_split}


def preprocessing_cache_dir(config: DataConfig) -> str:
    return config.cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "clip_accel", "preprocessed")


def source_for(config: DataConfig, training: bool = False) -> Source:
    """The kind of source `config` names: an Indo-fashion folder (or the demo), a stream of shards (--streaming),
    or anything `datasets` loads; `training`: read as the training split (--extra_caption_templates)."""
    folder = data_source_dir(config)
    if folder is not None:
        return IndoFashionFolder(folder, config.caption_template, config.extra_caption_templates if training else ())
    return ShardSource(config, training) if config.streaming else DatasetSource(config, training)


def load_raw_split(config: DataConfig, split: str, max_samples: int | None = None) -> RawSplit:
    """One split of `config`'s source, whole, in the raw schema (its first `max_samples` rows)."""
    return source_for(config).read(split, max_samples)


def load_raw_splits(
    accelerator: Accelerator, config: DataConfig, roles=ROLES, *, per_node: bool = False
) -> dict[str, RawSplit]:
    """Read the requested roles' rows (no image is decoded here); writes the demo catalogue on first use: once,
    or once per node with `per_node` (each node's disk has its own copy)."""
    if config.streaming:  # (not one process after another: the count is broadcast)
        return _load_streamed_splits(accelerator, config, roles, per_node)
    with accelerator.local_main_process_first() if per_node else accelerator.main_process_first():
        if config.demo:
            write_demo_dataset(data_source_dir(config))
        names, sources = split_names(config), {False: source_for(config), True: source_for(config, training=True)}
        return {
            role: sources[role == "train"].read(
                names[role], config.max_train_samples if role == "train" else config.max_eval_samples
            )
            for role in roles
        }


@dataclass(frozen=True)
class SplitOutline:
    """What a process that never reads a split needs to open the preprocessing cache written from it: the split's
    name, fingerprint, source, rows and columns (a few KB, whatever its images weigh)."""

    name: str
    fingerprint: str
    source: str
    rows: int
    features: datasets.Features

    @classmethod
    def of(cls, raw: RawSplit) -> SplitOutline:
        return cls(raw.name, raw.fingerprint, raw.source, len(raw.dataset), raw.dataset.features)

    def stand_in(self) -> RawSplit:
        """The split as empty rows, for `preprocess_split` to open its cache by (`RawSplit.read_elsewhere`)."""
        empty = datasets.Dataset.from_dict({name: [None] * self.rows for name in self.features}, features=self.features)
        return RawSplit(self.name, empty, self.fingerprint, self.source, read_elsewhere=True)

    def same(self, raw: RawSplit) -> RawSplit:
        """`raw`, read on another node, checked to be the split the main process read."""
        if raw.fingerprint != self.fingerprint:
            raise UserError(
                f"{self.source}[{self.name}] holds other rows on this node than on the main process's: give every "
                "node the same shards."
            )
        return raw


def _load_streamed_splits(accelerator: Accelerator, config: DataConfig, roles, per_node: bool) -> dict:
    """--streaming: the evaluation splits read whole and the training split's shards' rows counted and content
    identified (`shard_identity`), once, on the main process; the others are sent those and
    each evaluation split's `SplitOutline`, by which they open the cache the main process preprocesses it into (the
    rows, images included, would be pickled to every process, and under NCCL through each device's memory).
    With `per_node` (node-local caches) each node's first process reads the evaluation splits too, for its node's
    cache. Then every process opens its stream of the training split. Whatever one process fails on here, every
    process stops with its message (`_together`): none waits for a process that is gone."""
    names = split_names(config)
    read, opened = {}, {}  # the main process's evaluation splits and stream of the training split: read once

    source = ShardSource(config)

    def read_on_main() -> tuple:
        read.update({role: source.read(names[role], config.max_eval_samples) for role in roles if role != "train"})
        outlines = {role: SplitOutline.of(raw) for role, raw in read.items()}
        if "train" not in roles:
            return outlines, None, None
        stream = opened["train"] = ShardSource(config, training=True).shards(names["train"])
        files = getattr(stream, "files", None)  # (tar and parquet shards: what a checkpoint's resume compares)
        return outlines, count_shard_rows(config, stream), _signatures(files) if files is not None else None

    outlines, counted, signatures = from_main(accelerator, read_on_main)
    reads_too = per_node and accelerator.is_local_main_process  # (a node of its own writes its own cache)

    def open_splits() -> dict:
        splits = {}
        for role, outline in outlines.items():
            if role in read:
                splits[role] = read[role]
            elif reads_too:
                splits[role] = outline.same(source.read(names[role], config.max_eval_samples))
            else:
                splits[role] = outline.stand_in()
        if "train" in roles:
            splits["train"] = load_stream_split(config, names["train"], counted, opened.get("train"), signatures)
        return splits

    return _together(accelerator, open_splits)


def _signatures(files: list[str]) -> list[str | None]:
    """What identifies each shard's content (`shard_identity`), logged with the seconds it took."""
    start = time.perf_counter()
    signatures = shard_signatures(files)
    logger.info(f"{len(files)} shards' sizes and first blocks read in {time.perf_counter() - start:.1f} s")
    return signatures


def from_main(accelerator: Accelerator, work):
    """`work()` on the main process, its result sent to the others (read once, not per process); where it fails,
    every process stops with its message (`_together`). The result is pickled whole to every process (under NCCL
    through each device's memory): keep it small."""
    shared = [_together(accelerator, work if accelerator.is_main_process else lambda: None)]
    broadcast_object_list(shared)
    return shared[0]


def _together(accelerator: Accelerator, work):
    """`work()` on every process, then a check that all succeeded: where one failed, the others stop too, with
    its message ("process 1 stopped at start-up: ..."), and it with its own error."""
    try:
        result, failure = work(), None
    except Exception as error:  # (any: every process must reach the gather)
        result, failure = None, error
    message = None if failure is None else (isinstance(failure, UserError), f"{type(failure).__name__}: {failure}")
    messages = gather_object([message]) if accelerator.num_processes > 1 else [message]
    if failure is not None:
        raise failure
    for rank, message in enumerate(messages):
        if message is not None:
            users, text = message  # a user error stays one on every process: the main process then prints it
            raise (UserError if users else RuntimeError)(f"Process {rank} stopped at start-up: {text}")
    return result


def build_pair_datasets(
    accelerator: Accelerator,
    config: DataConfig,
    raw_splits: dict[str, RawSplit],
    tokenizer,
    layout: ImageLayout | int,
    *,
    train_image_size: int | None = None,
    per_node: bool = False,
    require_captions: bool = True,
    family=None,
    text_length: int | None = None,
    seed: int = 0,
    report_dir: str | None = None,
) -> dict[str, PairDataset | StreamingPairs]:
    """Preprocess (or reuse the cache of) each split, in the family's `layout` (an int: CLIP's at that side; the
    training split at `train_image_size` when given: larger, for augmentation's random crops). The main process
    goes first so the others only read; with `per_node` (node-local caches) each node's first process does.
    `family` (`model.Family`; default CLIP's rules): the text length and SigLIP's fixed padding, on the
    tokenizer's side; `text_length`, the model's own text length where it differs (`model.text_length`: a CLIP
    with --text_positions). Each cached split's `truncation` counts the captions cut at that length (a stream
    counts them as it reads, `StreamingLoader.caption_truncation`). A streamed split (`StreamSplit`) becomes
    `StreamingPairs` (shuffled by `seed`), not cached.
    A split with no usable pair stops the run, its reasons in the message; `report_dir` gets skipped_rows.jsonl
    first."""
    layout = as_layout(layout)
    pad_to = family.pad_to if family is not None else None
    max_length = text_length or (family.text_length if family is not None else MAX_TEXT_TOKENS)
    # (CLIP pools at the first end-of-text token, which padding on the left would put first: always right.)
    pad_left = pad_to is not None and tokenizer.padding_side == "left"
    cache_dir = preprocessing_cache_dir(config)
    pairs = {}
    for role, raw in raw_splits.items():
        if isinstance(raw, StreamSplit):  # decoded on the fly by the same code, in the loader's workers
            preprocessor = PairPreprocessor(
                tokenizer, layout.resized(train_image_size), min(tokenizer.model_max_length, max_length)
            )
            pairs[role] = StreamingPairs(
                raw,
                config,
                preprocessor,
                accelerator.process_index,
                accelerator.num_processes,
                seed,
                (tokenizer.pad_token_id, pad_to, pad_left),
            )
            continue
        with accelerator.local_main_process_first() if per_node else accelerator.main_process_first():
            # Evaluation splits get the processor's exact pixels; training keeps the faster JPEG decode.
            train = role == "train"
            cached = preprocess_split(
                raw,
                tokenizer,
                layout.resized(train_image_size) if train else layout,
                cache_dir,
                config.preprocessing_num_workers,
                draft=train,
                require_captions=require_captions,
                max_length=max_length,
                cache_format=config.cache_format if train else "uint8",  # evaluation keeps the exact pixels
            )
        # (training draws one of a row's captions per epoch, deterministic in the seed; evaluation scores them all)
        pairs[role] = PairDataset(cached, tokenizer.pad_token_id, pad_to, pad_left, seed if train else None)
        pairs[role].truncation = cached_truncation(cached, tokenizer, min(tokenizer.model_max_length, max_length))
        if len(pairs[role]) == 0:
            report = None
            if report_dir is not None and accelerator.is_main_process:  # the report first, then the error
                write_skip_report(
                    {r: d for r, d in pairs.items() if isinstance(d, PairDataset)}, raw_splits, report_dir
                )
                report = os.path.join(report_dir, "skipped_rows.jsonl")
            raise UserError(no_usable_pairs(pairs[role], raw, report))
    return pairs


def no_usable_pairs(dataset: PairDataset, raw: RawSplit, report: str | None) -> str:
    """Why a split has no usable pair: the count per reason, the first rows' own reasons, and the report's path."""
    rows = skipped_rows(dataset, raw)
    kinds = Counter(": ".join(row["reason"].split(": ")[:2]) for row in rows)  # (not each file's own name)
    counted = "; ".join(f"{count} {kind}" for kind, count in kinds.most_common())
    first = "; ".join(f"{row['where']}: {row['reason']} (image {row['image']!r})" for row in rows[:3])
    listed = f" Every skipped row is listed in {report}." if report else ""
    return (
        f"Split {raw.name!r} has no usable pairs: all {len(raw.dataset)} rows were skipped ({counted}). "
        f"The first: {first}.{listed}"
    )


def skipped_rows(dataset: PairDataset, raw: RawSplit) -> list[dict]:
    """Every row of a split left out, with where it came from and why."""
    rows = []
    for skipped in dataset.skipped_rows():
        position = skipped["position"]
        image = raw.dataset[position]["image"]
        rows.append(
            {
                "split": raw.name,
                "where": raw.describe_row(skipped["source_row"]),
                "image": image if isinstance(image, str) else (image or {}).get("path"),
                "reason": skipped["reason"],
            }
        )
    return rows


def check_strict(pairs: dict, raw_splits: dict[str, RawSplit]) -> None:
    """--strict: the first bad row of a cached split is an error instead of a skip (a stream's workers stop at its
    first bad row themselves)."""
    for role, dataset in _cached(pairs).items():
        for row in skipped_rows(dataset, raw_splits[role])[:1]:
            raise UserError(
                f"--strict: {row['where']}: {row['reason']} (image {row['image']}). Fix or remove "
                "the row, or drop --strict to skip bad rows and list them in skipped_rows.jsonl."
            )


def write_skip_report(pairs: dict, raw_splits: dict[str, RawSplit], output_dir: str) -> dict:
    """Write every skipped row of the cached splits with its reason to OUTPUT/skipped_rows.jsonl; log one summary
    line per split. Returns the count per role. (A stream's rows are found as they are read: its training data's
    `skip_report` appends them at the end.)"""
    counts = {}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "skipped_rows.jsonl"), "w") as report:
        for role, dataset in _cached(pairs).items():
            skipped = skipped_rows(dataset, raw_splits[role])
            counts[role] = len(skipped)
            for row in skipped:
                report.write(json.dumps(row) + "\n")
            total = len(raw_splits[role].dataset)
            logger.info(
                f"{role} split {raw_splits[role].name!r}: {len(dataset)} pairs used, {len(skipped)} of "
                f"{total} rows skipped" + (" (see skipped_rows.jsonl)" if skipped else "")
            )
    return counts


def _cached(pairs: dict) -> dict[str, PairDataset]:
    return {role: split for role, split in pairs.items() if isinstance(split, PairDataset)}


def training_captions(accelerator: Accelerator, raw, config: DataConfig):
    """A function giving the training split's captions (what a tokenizer built from scratch learns from): a
    cached split's all, a stream's first ones, read on the main process and sent to the others."""
    if isinstance(raw, StreamSplit):
        return lambda: from_main(accelerator, lambda: stream_captions(raw, config))
    return raw.captions
