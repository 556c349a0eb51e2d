"""Streaming (`--streaming`): the training split read as a stream of shards (`shards`), decoded and tokenized in
DataLoader workers, never cached.

How a pass over the stream is split, so that every pair is seen once per pass on any number of processes, and
in which order (`stream_order`: pure functions of a few integers):
- Each shard's rows are counted (an index, stats files, the tar headers or the parquet footers: `shard_index`),
  and the pass's rows, the shards in an order drawn from (seed, pass), are cut into processes x workers
  contiguous slots, as equal as whole rows allow. DataLoader worker w of process p reads slot p * W + w, and only
  it: the shards inside the slot whole, the (at most two) at its ends from or up to a row, the rows before its
  first passed over by their tar headers. A process reads about 1/N of the pass's bytes.
- A worker reads its slot in windows of --shuffle_buffer consecutive rows, each window's rows read from their
  shards once, in order, and handed on in an order drawn from (seed, pass, the window's first row); it decodes
  them in chunks with the cached path's own code (`PairPreprocessor`: the same pixels, token ids and skip rules).
- Each process cuts its batches from the chunks in the order the DataLoader delivers them. Epoch e reads pass e;
  every process takes the same number of batches: as many as the process with the fewest rows fills, or
  `--epoch_rows` // the global batch. The rows after that are left, as a cached epoch leaves its last partial
  batch; a pass that runs short (damaged rows) is topped up from the next one's start.

Resume: each batch carries the stream's position after it (the pass, and per worker how many rows of its slot it
consumed). A resumed run starts each worker at its window and the window's place: nothing consumed is read again.
On another number of processes or workers (`load_state_dict` with every process's position), the rows the pass has left
are intervals computed from those counts (`stream_order.positions_left`: O(slots x window), whatever the pass's
size), cut into the new slots (a later resume adds a segment). `datasets`' own `state_dict` loses the shuffle
buffer's rows on resume (its documentation says so), so it is not used. The batches after a resume are grouped
differently from an uninterrupted run's: the same pairs, not the same batches.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object, send_to_device
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig, UserError
from .loader import HOST_GRIDS, drawn_captions, pad_captions, pair_batch
from .preprocess import CaptionTruncation, PairPreprocessor
from .shard_cache import READ_AHEAD
from .shards import StreamSplit, check_unreachable, where_in_stream
from .skipped_rows import SkippedRows
from .sources import Columns, class_names, raw_columns, raw_row
from .stream_order import ORDER, PassOrder, positions_left, slot_intervals, windows

logger = get_logger(__name__)
STREAM_POSITION = "stream_position"  # the batch key of the stream's position after the batch (a dict)
CHUNK_ROWS = 64  # rows a worker decodes at a time, and pairs it hands over (the loader sets its batch size)


class StreamingPairs(IterableDataset):
    """One process's share of one pass of the stream, as chunks of decoded pairs (see the module docstring).

    `set_pass` before each iteration: the pass, and where each worker resumes in it. The DataLoader's workers are
    persistent (started once: forking them for every pass cost a sixth of a 1,000-row pass), so these go to them
    through shared memory (`share_with_workers`)."""

    truncation = None  # (its captions cut at the text length are counted as read: `StreamingLoader`)

    def __init__(
        self,
        split: StreamSplit,
        config: DataConfig,
        preprocessor: PairPreprocessor,
        rank: int,
        num_processes: int,
        seed: int,
        padding: tuple[int, int | None, bool] = (0, None, False),
    ) -> None:
        self.split = split
        self.padding = padding  # (pad token id, pad_to, pad_left): how the batches' captions are padded
        self.config = config
        self.preprocessor = preprocessor
        self.rank = rank
        self.num_processes = num_processes
        self.seed = seed
        self.pass_index = 0
        self.resume: list[int] | None = None  # per worker, rows of this pass already consumed
        self.segments: dict[int, list] = {}  # a pass resumed on another topology: what each earlier one consumed
        self.shared = None  # [pass, resuming?, resume per worker...] seen by the worker processes
        self.batch_rows = CHUNK_ROWS  # pairs per chunk handed over: the loader's batch size

    @property
    def pairs_per_epoch(self) -> int:
        """An epoch's rows (its bad rows are found as they are read)."""
        return self.split.rows

    def share_with_workers(self, num_workers: int) -> None:
        """Before the DataLoader starts its workers: they read each pass's `set_pass` from shared memory."""
        self.shared = multiprocessing.Array("q", 2 + max(1, num_workers), lock=False)

    def set_pass(self, pass_index: int, resume: list[int] | None) -> None:
        self.pass_index, self.resume = pass_index, resume
        if self.shared is not None:
            self.shared[:] = [pass_index, resume is not None, *(resume or [0] * (len(self.shared) - 2))]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.shared is not None:  # (in a worker: this pass's, set by the main process)
            self.pass_index, resuming, *resume = self.shared[:]
            self.resume = resume if resuming else None
        skip = self.resume[worker] if self.resume else 0
        rows, decoded, usable = [], [], 0
        for position, (example, where) in enumerate(self._rows(worker, workers, skip), start=skip):
            rows.append((position, example, where))
            if len(rows) == self.batch_rows:
                decoded.append(self._decode(rows, worker))
                usable += len(decoded[-1]["positions"])
                rows = []
            if usable >= self.batch_rows:  # a chunk of exactly one batch: the main process passes it on whole
                chunk, rest = _split(_join(decoded), self.batch_rows)  # (no copy unless rows were skipped)
                yield chunk
                decoded, usable = [rest] if len(rest["positions"]) else [], usable - self.batch_rows
        if rows:
            decoded.append(self._decode(rows, worker))
        if decoded:
            yield _join(decoded)

    def _rows(self, worker: int, workers: int, skip: int) -> Iterator[tuple[dict, str]]:
        """This worker's rows of this pass after the first `skip` (module docstring): its slot of the rows the
        pass has left, a window at a time, each window's rows read from their shards in order (every shard once:
        the next window goes on where the last stopped) and handed on in the window's order."""
        order = PassOrder(self.split.shard_rows, self.seed, self.pass_index)
        window, segments = self.config.shuffle_buffer, self.segments.get(self.pass_index, [])
        left = positions_left(order.total, segments, self.seed, self.pass_index, window)
        own = slot_intervals(left, self.rank * workers + worker, self.num_processes * workers)
        reader = _SlotReader(self.split.stream, order, own)
        for positions in windows(own, window, self.seed, self.pass_index, skip):
            read = reader.read(np.sort(positions))
            for position in positions.tolist():
                yield read[position]

    def _decode(self, chunk: list, worker: int) -> dict:
        """Decode and tokenize a chunk of rows; rows with a damaged image or a missing caption or label are left
        out and listed under `skipped` (with --strict the first is an error)."""
        names = class_names(self.split.stream.features, self.config.label_column)
        columns = Columns.of(self.config, training=True)
        raw = [raw_row(example, columns, names) for _, example, _ in chunk]
        cached = self.preprocessor({**raw_columns(raw), "source_row": [position for position, _, _ in chunk]})
        reasons = cached["skip_reason"]
        usable = [index for index, reason in enumerate(reasons) if not reason]
        skipped = [(chunk[i][2], reason) for i, reason in enumerate(reasons) if reason]
        unreachable = {row["__url__"]: row["__unreachable__"] for _, row, _ in chunk if "__unreachable__" in row}
        if skipped and self.config.strict:
            raise UserError(
                f"--strict: {self.split.source}[{self.split.name}] {skipped[0][0]}: {skipped[0][1]}. Fix or remove "
                "the row, or drop --strict to skip bad rows (counted, and listed in skipped_rows.jsonl)."
            )
        shape = self.preprocessor.layout.pixel_shape
        input_ids, caption_ids = [cached["input_ids"][i] for i in usable], [cached["caption_id"][i] for i in usable]
        truncation = self.preprocessor.truncated([cached["caption"][i] for i in usable], input_ids)
        if "more_input_ids" in cached:  # rows with several captions: this pass's draw, keyed by the row's place
            keys = [_row_key(chunk[i][2]) for i in usable]
            counts = [1 + len(cached["more_input_ids"][i]) for i in usable]
            drawn = drawn_captions(self.seed, self.pass_index, keys, counts)
            for index, (i, choice) in enumerate(zip(usable, drawn, strict=True)):
                if choice:
                    input_ids[index] = cached["more_input_ids"][i][choice - 1]
                    caption_ids[index] = cached["more_caption_ids"][i][choice - 1]
            more = [(caption, ids) for i in usable for caption, ids in zip(*_more(cached, i), strict=True)]
            truncation += self.preprocessor.truncated([caption for caption, _ in more], [ids for _, ids in more])
        return {
            "pass": self.pass_index,
            "worker": worker,
            "positions": np.asarray([chunk[i][0] for i in usable], dtype=np.int64),
            # A tensor: from a worker process it travels through shared memory, not pickled
            "pixel_values": torch.from_numpy(
                np.stack([np.asarray(cached["pixel_values"][i]).reshape(shape) for i in usable])
                if usable
                else np.empty((0, *shape), np.uint8)
            ),
            "spatial_shapes": np.asarray([cached["spatial_shapes"][i] for i in usable], np.int64).reshape(-1, 2)
            if "spatial_shapes" in cached
            else None,
            "input_ids": [np.asarray(ids, np.int64) for ids in input_ids],
            "caption_ids": np.asarray(caption_ids, dtype=np.int64),
            "skipped": skipped,
            "unreachable": unreachable,  # {shard url: why}
            "truncated": (truncation.truncated, truncation.captions),  # of every caption of the usable rows
        }


def _more(cached: dict, row: int) -> tuple[list, list]:
    """Row `row`'s other captions and their token ids."""
    return cached["more_captions"][row], cached["more_input_ids"][row]


def _row_key(where: str) -> int:
    """A row's place in the stream (`where_in_stream`: its shard file and key) as a signed 64-bit number, the same
    whatever process or worker reads the row."""
    return int.from_bytes(hashlib.blake2b(where.encode(), digest_size=8).digest(), "little", signed=True)


class StreamingLoader:
    """Batches of `batch_size` pairs, epoch e's from pass e of the stream (module docstring); `len()` is an epoch's
    batches, the same on every process. Not handed to `accelerator.prepare`: each process already reads only its
    own rows, and the batches are moved to `device` here (pinned first on CUDA)."""

    def __init__(
        self,
        pairs: StreamingPairs,
        batch_size: int,
        *,
        num_workers: int = 0,
        device: torch.device | None = None,
        ledger: str | None = None,
    ) -> None:
        self.pairs = pairs
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.batches_per_epoch = epoch_batches(pairs.split, batch_size, pairs.num_processes)
        if self.batches_per_epoch == 0:
            raise UserError(
                f"An epoch of {pairs.split.rows} rows is less than one batch of all processes "
                f"({batch_size} x {pairs.num_processes}): raise --epoch_rows or lower --per_device_train_batch_size."
            )
        # The position after the last batch the training loop consumed (`taken`), or restored (`load_state_dict`).
        self.position = {"pass": 0, "consumed": [0] * max(1, num_workers), "segments": []}
        self.restored = False
        self.skipped = SkippedRows(f"{pairs.split.source}[{pairs.split.name}]", ledger)  # (kept beside checkpoints)
        self.unreachable: dict[str, str] = {}  # every shard met unreachable so far: url -> why
        self.borrowed = 0  # epochs topped up from the next pass because a pass ran short (damaged rows)
        self.truncated = [0, 0]  # (captions cut at the text length, captions) read so far (a row read again, again)
        self.loader = None  # the DataLoader over `pairs`, made on first use

    def __len__(self) -> int:
        return self.batches_per_epoch

    def load_state_dict(self, positions: list[dict]) -> None:
        """Continue from a checkpoint's positions (every process's `state_dict()`). On the processes and workers
        that wrote them, each process goes on where it stood; on others (an elastic resume: the batch of all
        processes kept), the rows the pass has left are cut into this topology's slots (module docstring)."""
        workers = max(1, self.num_workers)
        for position in positions:  # (the report is the union of every process's)
            self.skipped.update(position.get("skipped", {}))  # (a checkpoint written before the ledger)
            self.unreachable.update(position.get("unreachable", {}))
        # Every process's counts go on at the first (the report is their sum, on any topology).
        counts = [position.get("truncated", [0, 0]) for position in positions] if self.pairs.rank == 0 else []
        self.truncated = [sum(count[0] for count in counts), sum(count[1] for count in counts)]
        self.skipped.read_back()
        if len(positions) == self.pairs.num_processes and all(len(p["consumed"]) == workers for p in positions):
            position = positions[self.pairs.rank]
            segments = position.get("segments", [])
            self.position = {"pass": position["pass"], "consumed": list(position["consumed"]), "segments": segments}
        else:
            self.position = self._elastic(positions)
        self.pairs.segments = {self.position["pass"]: self.position["segments"]}
        self.restored = True

    def _elastic(self, positions: list[dict]) -> dict:
        """The position on this topology of a pass other processes or workers read part of."""
        passes = sorted({position["pass"] for position in positions})
        old_workers = len(positions[0]["consumed"])
        was = f"{len(positions)} processes x {old_workers} DataLoader workers"
        if len(passes) > 1:
            raise UserError(
                f"The checkpoint's stream was read by {was}, and its processes stood in different passes, so its "
                f"pass cannot be replayed on another topology: resume on {len(positions)} processes with "
                f"--dataloader_num_workers {old_workers if old_workers > 1 else 0}."
            )
        segments = [*positions[0].get("segments", []), {"consumed": [list(p["consumed"]) for p in positions]}]
        logger.info(f"The stream resumes pass {passes[0]}, read so far by {was}, on this launch's processes")
        return {"pass": passes[0], "consumed": [0] * max(1, self.num_workers), "segments": segments}

    # The training-data interface (`data.training_data`): what the loop asks of a stream.
    @property
    def pairs_per_epoch(self) -> int:
        return self.pairs.split.rows

    shared_captions = None  # (a stream is not read ahead to count them)

    def taken(self, batch: dict) -> None:
        """The loop took `batch`: the position it carries is where the next checkpoint resumes (batches are read
        ahead of the loop)."""
        self.position = batch.pop(STREAM_POSITION)

    def identity(self) -> dict:
        """The stream's shards, their rows, what identifies their content (`shard_identity`) and the order it is
        read in, which a checkpointed position refers to (`checkpoint.resume_settings`)."""
        split = self.pairs.split
        files = getattr(split.stream, "files", None)
        names = [os.path.basename(name) for name in files] if files is not None else []
        names = names or [str(shard) for shard in range(len(split.shard_rows))]
        identity = {"shards": names, "rows": split.shard_rows, "order": ORDER}
        if split.signatures is not None:
            identity["content"] = split.signatures
        return identity

    def skip_report(self, accelerator, output_dir: str) -> int:
        """Every process's skipped training rows, in OUTPUT/skipped_rows.jsonl; their count (`SkippedRows.report`)."""
        return self.skipped.report(accelerator, output_dir, self.pairs.split.name)

    def caption_truncation(self, accelerator) -> CaptionTruncation:
        """The captions cut at the text length among those every process read (a row read in two passes counts
        twice; a resumed run goes on from its checkpoint's counts), summed over the processes: call it on every
        process."""
        counts = gather_object([self.truncated])
        total = [sum(count[0] for count in counts), sum(count[1] for count in counts)]
        return CaptionTruncation(*total, self.pairs.preprocessor.max_length)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of this process's stream: the position after the last batch taken, the shards
        met unreachable so far (the rows skipped are in its ledger) and the truncated-caption counts."""
        return {**self.position, "unreachable": dict(self.unreachable), "truncated": list(self.truncated)}

    def epoch(self, epoch: int, done: int = 0) -> Iterator[dict]:
        """Epoch `epoch`'s batches after the first `done` (a resumed run's; the stream restarts at its restored
        position), on the device. They come from pass `epoch`; the rows after its last full batch are left, as a
        cached epoch leaves its last partial batch. A pass that runs short (rows skipped as damaged) is topped up
        from the start of the next one, logged."""
        # A run resumed mid-epoch goes on from the restored position (in this pass, or the next if it had run short).
        start = self.position if self.restored and done else {"pass": epoch, "consumed": None}
        self.restored = False
        position = {
            "pass": start["pass"],
            "consumed": list(start["consumed"] or [0] * max(1, self.num_workers)),
            "segments": start.get("segments", []),
        }
        batches = self._cut(position, start["consumed"])
        for _ in range(len(self) - done):
            batch = next(batches)
            if self.device is not None:
                if self.device.type == "cuda":
                    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                batch = send_to_device(batch, self.device, non_blocking=True, skip_keys=[HOST_GRIDS, STREAM_POSITION])
            yield batch
        batches.close()  # the pass's remaining rows are not read; its workers stop

    def __iter__(self) -> Iterator[dict]:
        return self.epoch(self.position["pass"])

    def batches(self, count: int) -> Iterator[dict]:
        """The first `count` batches, epoch after epoch from the first (benchmarks and tests read the stream so)."""
        epoch = 0
        while count > 0:
            for batch in itertools.islice(self.epoch(epoch), count):
                count -= 1
                yield batch
            epoch += 1

    def _cut(self, position: dict, resume: list | None) -> Iterator[dict]:
        """Batches cut from the chunks of pass `position["pass"]` (resumed per worker at `resume`), then of the
        passes after it; `position` moves past each batch's pairs."""
        pending: deque = deque()  # [chunk, first unused index]
        waiting = 0
        pass_index = position["pass"]
        while True:
            loader = self._loader()  # (its workers' shared memory first, then what they read from it)
            self.pairs.set_pass(pass_index, resume)
            produced = 0  # usable pairs this pass gave
            for chunk in loader:
                self.unreachable.update(chunk["unreachable"])
                check_unreachable(self.unreachable, self.pairs.config.max_unreachable_shards)
                produced += len(chunk["positions"])
                for where, reason in chunk["skipped"]:
                    self.skipped.add(where, reason)
                self.truncated = [have + new for have, new in zip(self.truncated, chunk["truncated"], strict=True)]
                pending.append([chunk, 0])
                waiting += len(chunk["positions"])
                while waiting >= self.batch_size:
                    batch = self._take(pending, self.batch_size, position)
                    waiting -= self.batch_size
                    yield batch
            if not produced and waiting == 0:
                raise UserError(
                    f"{self.pairs.split.source}[{self.pairs.split.name}]: pass {pass_index} gave process "
                    f"{self.pairs.rank} no usable pair ({len(self.skipped)} rows skipped, e.g. "
                    f"{next(iter(self.skipped.items()), ('-', '-'))}); check --image_column/--caption_column/"
                    "--label_column and the shards."
                )
            logger.warning(
                f"Pass {pass_index} of the stream ran out before the epoch's {len(self)} batches on process "
                f"{self.pairs.rank} (rows skipped as damaged, or fewer rows than --epoch_rows / the recorded count "
                "gives it): the epoch is topped up from the next pass.",
                main_process_only=False,
            )
            pass_index, resume = pass_index + 1, None
            self.borrowed += 1

    def _loader(self) -> DataLoader:
        if self.loader is None:
            self.pairs.batch_rows = self.batch_size
            if self.num_workers:
                self.pairs.share_with_workers(self.num_workers)
            self.loader = DataLoader(
                self.pairs,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_as_is,
                persistent_workers=self.num_workers > 0,
            )
        return self.loader

    def _take(self, pending: deque, count: int, position: dict) -> dict:
        """`count` pairs off the front of `pending` as a batch; `position` moves past them."""
        pixels, grids, captions, caption_ids = [], [], [], []
        if (
            pending[0][1] == 0
            and len(pending[0][0]["positions"]) == count
            and pending[0][0]["pass"] == position["pass"]
        ):
            chunk = pending.popleft()[0]  # a whole chunk of one batch (the usual case): no copy
            position["consumed"][chunk["worker"]] = int(chunk["positions"][-1]) + 1
            pixels, grids = (
                [chunk["pixel_values"]],
                [chunk["spatial_shapes"]] if chunk["spatial_shapes"] is not None else [],
            )
            captions, caption_ids, count = chunk["input_ids"], [chunk["caption_ids"]], 0
        while count:
            entry = pending[0]
            chunk, start = entry
            end = min(start + count, len(chunk["positions"]))
            if end > start:
                if chunk["pass"] != position["pass"]:  # (a pass topped up from the next: its own slots)
                    position.update(
                        {"pass": chunk["pass"], "consumed": [0] * len(position["consumed"]), "segments": []}
                    )
                position["consumed"][chunk["worker"]] = int(chunk["positions"][end - 1]) + 1
                pixels.append(chunk["pixel_values"][start:end])
                if chunk["spatial_shapes"] is not None:
                    grids.append(chunk["spatial_shapes"][start:end])
                captions.extend(chunk["input_ids"][start:end])
                caption_ids.append(chunk["caption_ids"][start:end])
                count -= end - start
            entry[1] = end
            if end == len(chunk["positions"]):
                pending.popleft()
        input_ids = pad_captions(captions, *self.pairs.padding)
        pixels = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
        batch = pair_batch(
            pixels.numpy(), input_ids, np.concatenate(caption_ids), np.concatenate(grids) if grids else None
        )
        return {**batch, STREAM_POSITION: {**position, "consumed": list(position["consumed"])}}


class _SlotReader:
    """A slot's rows, read from its shards in position order: each shard opened once, from the first row the slot
    needs to the last, the next window's rows taken where the last window's stopped."""

    def __init__(self, stream, order: PassOrder, own: np.ndarray) -> None:
        self.stream, self.order = stream, order
        self.ends = own[:, 1] if len(own) else np.empty(0, np.int64)
        bounds = np.concatenate([own[:, 0], own[:, 1] - 1]) if len(own) else np.empty(0, np.int64)
        self.places = np.unique(np.searchsorted(order.starts, bounds, side="right") - 1)  # (the shards it touches)
        self.shard, self.rows, self.next_row, self.stop = None, None, 0, 0

    def read(self, positions: np.ndarray) -> dict[int, tuple[dict, str]]:
        """{position: (example, where)} of ascending `positions`."""
        read = {}
        for shard, first, end in self.order.runs(positions):
            base = int(self.order.starts[self.order.place(shard)])
            wanted = set((positions[(positions >= base + first) & (positions < base + end)] - base).tolist())
            if shard != self.shard or first < self.next_row:
                self._open(shard, first)
            while self.next_row < end:
                example = next(self.rows)
                index, self.next_row = self.next_row, self.next_row + 1
                if index in wanted:
                    read[base + index] = (example, where_in_stream(example, shard, index))
            if self.next_row == self.stop:  # (the reader's end: where it is the shard's, its count is checked)
                for _ in self.rows:
                    pass
        return read

    def _open(self, shard: int, first: int) -> None:
        """Shard `shard`'s rows from `first` up to the last this slot reads (where that is the shard's last, its
        count is checked at its end: `TarShards.expect`)."""
        place = self.order.place(shard)
        base, after = int(self.order.starts[place]), int(self.order.starts[place + 1])
        reaching = min(int(np.searchsorted(self.ends, after, side="left")), len(self.ends) - 1)
        stop = min(after, int(self.ends[reaching])) - base  # (the slot's interval reaching past this shard's end)
        following = [int(self.order.shards[p]) for p in self.places[self.places > place][:READ_AHEAD].tolist()]
        self.stream.prefetch(following)
        self.shard, self.rows, self.next_row, self.stop = shard, iter(self.stream.rows(shard, first, stop)), first, stop


def epoch_batches(split: StreamSplit, batch_size: int, num_processes: int) -> int:
    """An epoch's batches per process: its rows (`--epoch_rows`, else a pass's) over the global batch. (For a pass,
    that is as many as the process with the fewest rows fills: process p's are the p-th of `num_processes` equal
    runs, the fewest floor(rows / N), and floor(floor(rows / N) / B) = floor(rows / (N x B)).)"""
    return split.rows // (batch_size * num_processes)


def _as_is(chunk: dict) -> dict:
    return chunk


def _join(chunks: list[dict]) -> dict:
    """Consecutive chunks of one worker's pass as one."""
    if len(chunks) == 1:
        return chunks[0]
    grids = [chunk["spatial_shapes"] for chunk in chunks if chunk["spatial_shapes"] is not None]
    return {
        "pass": chunks[0]["pass"],
        "worker": chunks[0]["worker"],
        "positions": np.concatenate([chunk["positions"] for chunk in chunks]),
        "pixel_values": torch.cat([chunk["pixel_values"] for chunk in chunks]),
        "spatial_shapes": np.concatenate(grids) if grids else None,
        "input_ids": [ids for chunk in chunks for ids in chunk["input_ids"]],
        "caption_ids": np.concatenate([chunk["caption_ids"] for chunk in chunks]),
        "skipped": [row for chunk in chunks for row in chunk["skipped"]],
        "unreachable": {url: why for chunk in chunks for url, why in chunk["unreachable"].items()},
        "truncated": tuple(np.sum([chunk["truncated"] for chunk in chunks], axis=0).tolist()),
    }


def _split(chunk: dict, count: int) -> tuple[dict, dict]:
    """A chunk's first `count` pairs (and its skipped rows, unreachable shards and truncated captions), and the
    rest."""
    head, rest = dict(chunk), {**chunk, "skipped": [], "unreachable": {}, "truncated": (0, 0)}
    for name in ("positions", "pixel_values", "spatial_shapes", "input_ids", "caption_ids"):
        if chunk[name] is not None:
            head[name], rest[name] = chunk[name][:count], chunk[name][count:]
    return head, rest
