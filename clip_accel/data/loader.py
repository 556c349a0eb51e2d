"""Fast batches from the preprocessing cache.

Reading the cache item by item through `ds[i]` and a collate function runs at ~1-2K images/s on these machines:
slower than one GPU trains. Instead we take zero-copy numpy views of the memory-mapped Arrow columns and fetch a
whole batch with one fancy-index per chunk (~40K images/s), through the DataLoader's `__getitems__` hook.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TypeVar

import datasets
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .preprocess import decode_jpeg, jpeg_shape

T = TypeVar("T")
HOST_GRIDS = "spatial_shapes_on_host"  # the batch key of SigLIP 2's grids kept on the host (a numpy array)


class PairDataset(Dataset):
    """The usable (image, caption) pairs of a preprocessed split, served a batch at a time.

    Rows whose `skip_reason` is set are left out; `skipped_rows()` lists them for the report. A row with several
    captions (the cache's `more_*` columns) is served with its first, or, given `caption_seed` (training), with
    the one `drawn_captions` picks for the epoch set by `set_epoch`.
    """

    def __init__(
        self,
        cached: datasets.Dataset,
        pad_token_id: int,
        pad_to: int | None = None,
        pad_left: bool = False,
        caption_seed: int | None = None,
    ) -> None:
        if cached._indices is not None:
            cached = cached.flatten_indices()
        table = cached.data.table
        self.cached = cached
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to  # SigLIP: every caption padded to this length (its text tower pools the last position)
        self.pad_left = pad_left  # the tokenizer's padding side (SigLIP 2's pads on the left)
        reasons = np.asarray(table.column("skip_reason").to_pylist(), dtype=object)
        self.rows = np.flatnonzero(reasons == "")
        self.skip_reasons = reasons
        pixel_chunks = table.column("pixel_values").chunks
        self.chunk_starts = np.cumsum([0] + [len(chunk) for chunk in pixel_chunks])
        pixel_type = table.schema.field("pixel_values").type
        # The compact cache (--cache_format jpeg): (offsets, bytes) per chunk, decoded per batch.
        self.jpeg_chunks = None
        if pa.types.is_binary(pixel_type) or pa.types.is_large_binary(pixel_type):
            self.jpeg_chunks = [_binary_chunk_arrays(chunk) for chunk in pixel_chunks]
            self.pixel_chunks = None
            self.pixel_shape = self._decoded_shape()
        else:
            # flatten() honours a chunk's slice offset; to_numpy(zero_copy_only=True) refuses to copy silently.
            self.pixel_shape = _pixel_shape(pixel_type)
            self.pixel_chunks = [_fixed_values(chunk).reshape(len(chunk), *self.pixel_shape) for chunk in pixel_chunks]
        # SigLIP 2's patch sequences come with each image's grid of patches (rows, columns).
        self.grid_chunks = (
            [_fixed_values(chunk).reshape(len(chunk), 2) for chunk in table.column("spatial_shapes").chunks]
            if "spatial_shapes" in table.column_names
            else None
        )
        self.token_chunks = [_list_chunk_arrays(chunk) for chunk in table.column("input_ids").chunks]
        self.caption_ids = table.column("caption_id").to_numpy()  # (rows,) int64: 8 bytes a row, held in memory
        # The other captions: their token ids per chunk (row -> captions -> tokens), their caption ids flat.
        self.more_token_chunks, self.more_starts, self.more_caption_ids = None, None, None
        if "more_caption_ids" in table.column_names:
            self.more_token_chunks = [_nested_chunk_arrays(c) for c in table.column("more_input_ids").chunks]
            self.more_starts, self.more_caption_ids = _flat_lists(table.column("more_caption_ids"))
        self.caption_seed = caption_seed if self.more_caption_ids is not None else None
        self.epoch = 0
        self.truncation = None  # the captions cut at the text length (`CaptionTruncation`, set by build_pair_datasets)

    @property
    def draws_captions(self) -> bool:
        """Whether a batch depends on the epoch (a caption drawn per row): worker processes must then be made
        anew each epoch, after `set_epoch`."""
        return self.caption_seed is not None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption_counts(self) -> np.ndarray:
        """(rows,) how many captions each cached row has."""
        if self.more_starts is None:
            return np.ones(len(self.caption_ids), np.int64)
        return 1 + np.diff(self.more_starts)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def pairs_per_epoch(self) -> int:
        return len(self)

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        return {name: tensor[0] for name, tensor in self.__getitems__([position]).items()}

    def __getitems__(self, positions) -> dict[str, torch.Tensor]:
        """A batch: `pixel_values` uint8 (B, *pixel_shape) (with SigLIP 2's patches, `spatial_shapes` int64 (B, 2)
        too, and the same as a numpy array under `HOST_GRIDS`), `input_ids` int64 (B, L) padded to the longest
        caption, and `caption_ids` int64 (B,) (equal captions, equal ids: the loss's positives).

        Padding uses the pad token (CLIP's end-of-text); the text tower is causal and pools at the first
        end-of-text token, so padding to the batch's longest caption instead of 77 changes no output. SigLIP's pools
        the last position and attends to padding: there every caption is padded to `pad_to` (64), as it was
        trained, on the tokenizer's side.
        """
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        chunk_ids = np.searchsorted(self.chunk_starts, rows, side="right") - 1
        offsets = rows - self.chunk_starts[chunk_ids]
        pixels = np.empty((len(rows), *self.pixel_shape), dtype=np.uint8)
        grids = np.empty((len(rows), 2), dtype=np.int64)
        captions = []
        for chunk_id in np.unique(chunk_ids):
            where = np.flatnonzero(chunk_ids == chunk_id)
            if self.jpeg_chunks is None:
                pixels[where] = self.pixel_chunks[chunk_id][offsets[where]]
            else:
                starts, data = self.jpeg_chunks[chunk_id]
                for index, offset in zip(where, offsets[where], strict=True):
                    decode_jpeg(data[starts[offset] : starts[offset + 1]], pixels[index])
            if self.grid_chunks is not None:
                grids[where] = self.grid_chunks[chunk_id][offsets[where]]
        drawn = np.zeros(len(rows), np.int64)  # which caption of each row: 0 is the first
        if self.caption_seed is not None:
            drawn = drawn_captions(self.caption_seed, self.epoch, rows, self.caption_counts()[rows])
        caption_ids = self.caption_ids[rows]
        for index, (chunk_id, offset, choice) in enumerate(zip(chunk_ids, offsets, drawn, strict=True)):
            captions.append(self._caption_tokens(chunk_id, offset, choice))
            if choice:
                caption_ids[index] = self.more_caption_ids[self.more_starts[rows[index]] + choice - 1]
        input_ids = pad_captions(captions, self.pad_token_id, self.pad_to, self.pad_left)
        return pair_batch(pixels, input_ids, caption_ids, grids if self.grid_chunks is not None else None)

    def _decoded_shape(self) -> tuple[int, ...]:
        """The compact cache's image shape, from its first usable row (a skipped row holds no image)."""
        if not len(self.rows):
            return (0, 0, 3)
        chunk_id, offset = self._place(int(self.rows[0]))
        starts, data = self.jpeg_chunks[chunk_id]
        return jpeg_shape(data[starts[offset] : starts[offset + 1]])

    def distinct_captions(self) -> tuple[CaptionDataset, np.ndarray, np.ndarray]:
        """Every caption of the usable rows, for evaluation: a `CaptionDataset` holding each distinct caption (by
        caption id) once, and for each caption of the split (first the rows' first captions in loader order,
        then the other captions row by row) the index of its distinct caption and the position of its row.

        Identical captions then share one embedding and tie exactly (embedded in different batches, padded to
        different lengths, their embeddings differ in the last bits, and the tie rule would be decided by that),
        and a catalogue with repeated titles embeds each title once."""
        ids, owners = list(self.caption_ids[self.rows]), list(range(len(self.rows)))
        places = [self._place(row) for row in self.rows]
        tokens = [self._caption_tokens(chunk_id, offset, 0) for chunk_id, offset in places]
        counts = self.caption_counts()
        for position, (row, place) in enumerate(zip(self.rows, places, strict=True)):
            for choice in range(1, counts[row]):
                ids.append(self.more_caption_ids[self.more_starts[row] + choice - 1])
                tokens.append(self._caption_tokens(*place, choice))
                owners.append(position)
        _, first, index = np.unique(np.asarray(ids, np.int64), return_index=True, return_inverse=True)
        padding = (self.pad_token_id, self.pad_to, self.pad_left)
        distinct = CaptionDataset([tokens[i] for i in first], *padding)
        return distinct, index.reshape(-1).astype(np.int64), np.asarray(owners, np.int64)

    def _place(self, row: int) -> tuple[int, int]:
        """A cached row's chunk and its offset in it."""
        chunk_id = int(np.searchsorted(self.chunk_starts, row, side="right") - 1)
        return chunk_id, int(row - self.chunk_starts[chunk_id])

    def _caption_tokens(self, chunk_id: int, offset: int, choice: int) -> np.ndarray:
        """The token ids of a row's caption number `choice` (0: its first; then its other captions in order)."""
        if choice == 0:
            starts, values = self.token_chunks[chunk_id]
            return values[starts[offset] : starts[offset + 1]]
        row_starts, caption_starts, values = self.more_token_chunks[chunk_id]
        caption = row_starts[offset] + choice - 1
        return values[caption_starts[caption] : caption_starts[caption + 1]]

    def column(self, name: str) -> list:
        """A cached column (e.g. `caption`, `label`) for the usable rows, in loader order."""
        values = self.cached.data.table.column(name).to_pylist()  # one conversion, not one lookup per row
        return [values[row] for row in self.rows]

    def shared_captions(self) -> int:
        """How many usable pairs have a caption that another usable pair also has."""
        _, inverse, counts = np.unique(self.caption_ids[self.rows], return_inverse=True, return_counts=True)
        return int((counts[inverse] > 1).sum())

    def skipped_rows(self) -> list[dict]:
        skipped = np.flatnonzero(self.skip_reasons != "")
        sources = self.cached.data.table.column("source_row").to_numpy()
        return [
            {"position": int(row), "source_row": int(sources[row]), "reason": str(self.skip_reasons[row])}
            for row in skipped
        ]


class CaptionDataset(Dataset):
    """Captions alone (token-id arrays), served a batch at a time as `input_ids`, padded as `PairDataset` pads."""

    draws_captions = False

    def __init__(self, tokens: list[np.ndarray], pad_token_id: int, pad_to: int | None, pad_left: bool) -> None:
        self.tokens, self.padding = tokens, (pad_token_id, pad_to, pad_left)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitems__(self, positions) -> dict[str, torch.Tensor]:
        captions = [self.tokens[position] for position in positions]
        return {"input_ids": torch.from_numpy(pad_captions(captions, *self.padding))}


def drawn_captions(seed: int, epoch: int, rows, counts) -> np.ndarray:
    """Which of its `counts` captions each row trains with in `epoch` (0 is the first): uniform, and a pure
    function of (seed, epoch, row), so the same on any number of processes and workers and after a resume."""
    rows, counts = np.asarray(rows, np.int64), np.asarray(counts, np.int64)
    key = _splitmix64(_splitmix64(np.full(len(rows), seed, np.uint64)) ^ np.uint64(epoch))
    return (_splitmix64(key ^ rows.astype(np.uint64)) % counts.astype(np.uint64)).astype(np.int64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's step on a uint64 array (wrapping arithmetic): a well-mixed hash of each value."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def pad_captions(captions: list, pad_token_id: int, pad_to: int | None, pad_left: bool) -> np.ndarray:
    """Token-id arrays -> int64 (B, L): padded to the longest caption, or to `pad_to` (SigLIP), on the tokenizer's
    side; see `PairDataset.__getitems__`."""
    length = pad_to or max(len(c) for c in captions)
    input_ids = np.full((len(captions), length), pad_token_id, dtype=np.int64)
    for index, caption in enumerate(captions):
        if pad_left:
            input_ids[index, length - len(caption) :] = caption
        else:
            input_ids[index, : len(caption)] = caption
    return input_ids


def pair_batch(
    pixels: np.ndarray, input_ids: np.ndarray, caption_ids: np.ndarray, grids: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """The batch every loader hands the step (see `PairDataset.__getitems__`); `grids`: SigLIP 2's, else None."""
    batch = {
        "pixel_values": torch.from_numpy(pixels),
        "input_ids": torch.from_numpy(input_ids),
        "caption_ids": torch.from_numpy(caption_ids),
    }
    if grids is None:
        return batch
    # The grids twice: as a tensor (moved to the device, for the attention mask) and as a numpy array, which
    # the copy to the device leaves on the host (see model.POSITIONS_READ_GRIDS_ON_HOST).
    return {**batch, "spatial_shapes": torch.from_numpy(grids), HOST_GRIDS: grids.copy()}


def _pixel_shape(column_type: pa.DataType) -> tuple[int, ...]:
    """The per-row pixel shape of the cache's fixed-size `pixel_values` column: (S, S, 3) images stored flat, or
    (patches, patch values) stored nested (SigLIP 2)."""
    if pa.types.is_fixed_size_list(column_type.value_type):
        return (column_type.list_size, column_type.value_type.list_size)
    side = int(round((column_type.list_size // 3) ** 0.5))
    return (side, side, 3)


def _fixed_values(chunk: pa.FixedSizeListArray) -> np.ndarray:
    """The innermost values of a (nested) fixed-size list chunk, zero-copy."""
    while pa.types.is_fixed_size_list(chunk.type):
        chunk = chunk.flatten()
    return chunk.to_numpy(zero_copy_only=True)


def _nested_chunk_arrays(chunk: pa.ListArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row offsets, caption offsets, token ids) of a list<list<int32>> chunk: row r's captions are
    row_offsets[r] .. row_offsets[r + 1] - 1, caption c's tokens values[caption_offsets[c] : caption_offsets[c + 1]]."""
    captions = chunk.values
    return chunk.offsets.to_numpy(), captions.offsets.to_numpy(), captions.values.to_numpy(zero_copy_only=True)


def _flat_lists(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, values) of a list<int64> column over all its chunks: row r's values are
    values[starts[r] : starts[r + 1]]."""
    parts, starts, total = [], [np.zeros(1, np.int64)], 0
    for chunk in column.chunks:
        offsets = chunk.offsets.to_numpy()
        parts.append(chunk.values.to_numpy()[offsets[0] : offsets[-1]])
        starts.append(offsets[1:] - offsets[0] + total)
        total += int(offsets[-1] - offsets[0])
    return np.concatenate(starts).astype(np.int64), np.concatenate(parts) if parts else np.empty(0, np.int64)


def _binary_chunk_arrays(chunk: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, bytes) of a binary chunk, zero-copy: row i's bytes are bytes[offsets[i] : offsets[i + 1]]."""
    _, offsets, data = chunk.buffers()
    width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
    return offsets, np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)


def _list_chunk_arrays(chunk: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of a list<int32> chunk; offsets index into values, and already include any slice."""
    return chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=True)


def _batch_as_is(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`__getitems__` already returns a batch; the default collate would copy every tensor once more."""
    return batch


def make_dataloader(
    dataset: PairDataset | CaptionDataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    device: torch.device | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    """Training loaders shuffle (or follow `sampler`'s order) and drop the last partial batch: a short or padded
    contrastive batch changes the number of negatives, and padding duplicates would become false negatives.

    `device`: where the batches go. For a CUDA device they are pinned (page-locked), so the copy does not block
    the host; for any other (a CPU run on a GPU host included) nothing is pinned and no CUDA context is made."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train,
        num_workers=num_workers,
        collate_fn=_batch_as_is,
        pin_memory=device is not None and device.type == "cuda",
        persistent_workers=num_workers > 0 and not dataset.draws_captions,  # (else forked anew each epoch)
    )


class CopyStream:
    """On CUDA, the host-to-device copies of prefetched batches on a stream of their own, so they overlap the
    compute on the default stream instead of queueing behind it.

    Lifetimes, made explicit: each batch's copies are followed by an event (`copied`), and the consumer's stream
    waits for that event before it touches the batch (`hand_over`), which also marks the batch's device tensors as
    used on the consumer's stream (`record_stream`), so the caching allocator does not hand their memory to a
    later copy while a step still reads them. The pinned host buffers they were copied from are freed when the
    copy has been issued; torch's caching host allocator records each non-blocking copy's stream and reuses a
    freed pinned block only after that copy has finished, and every batch is read into new buffers (PairDataset
    allocates them per batch), so no pinned buffer is ever overwritten while a copy reads it.
    """

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device)

    @staticmethod
    def for_device(device: torch.device | None) -> CopyStream | None:
        return CopyStream(device) if device is not None and device.type == "cuda" else None

    @contextmanager
    def reading(self) -> Iterator[None]:
        """The reader thread's context: copies issued inside it go to the copy stream. The device first: a new
        thread's current device is 0, and entering then leaving a stream of device k from there would end on
        device 0 (on another process's GPU, a CUDA context of its own)."""
        with torch.cuda.device(self.stream.device), torch.cuda.stream(self.stream):
            yield

    def copied(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def hand_over(self, batch: T, copied: torch.cuda.Event) -> T:
        consumer = torch.cuda.current_stream(self.stream.device)
        consumer.wait_event(copied)
        for tensor in _tensors(batch):
            if tensor.is_cuda:
                tensor.record_stream(consumer)
        return batch


def _tensors(batch) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, list | tuple):
        for value in batch:
            yield from _tensors(value)


def prefetched(batches: Iterable[T], depth: int = 2, copy_stream: CopyStream | None = None) -> Iterator[T]:
    """`batches`, read up to `depth` ahead by a background thread: while one batch trains, the next is gathered
    from the cache, pinned and copied to the device (Accelerate's non-blocking copy, on `copy_stream` where one
    is given: `CopyStream.for_device`), so the GPU does not wait for the host between steps. Worker processes
    would copy every batch between processes (BENCHMARKS.md).

    The first batch is read in the calling thread: starting an Accelerate loader synchronises RNG states across
    processes, and collectives stay on the thread that issues all the others. An error while reading is raised
    here; leaving the loop early stops the thread (after the batch it is reading).
    """
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            with copy_stream.reading() if copy_stream is not None else nullcontext():
                for batch in iterator:
                    copied = copy_stream.copied() if copy_stream is not None else None
                    if not hand_over((batch, copied, None)):
                        return
            hand_over((end, None, None))
        except BaseException as error:  # handed to the consumer, raised there
            hand_over((end, None, error))

    reader = threading.Thread(target=read, name="clip_accel-prefetch", daemon=True)
    reader.start()
    try:
        yield first
        while True:
            batch, copied, error = ready.get()
            if error is not None:
                raise error
            if batch is end:
                return
            yield batch if copy_stream is None else copy_stream.hand_over(batch, copied)
    finally:
        stop.set()
        reader.join()
