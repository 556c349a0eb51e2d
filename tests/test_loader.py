"""Batches straight from the cache: same bytes as the rows, padded to the longest caption, bad rows left out."""

from __future__ import annotations

import contextlib
import threading
import time

import datasets
import numpy as np
import pytest
import torch

from clip_accel.data.loader import PairDataset, make_dataloader, prefetched
from clip_accel.data.preprocess import cached_features, caption_id

SIDE = 4
PAD = 99


def _cached(tmp_path, reasons: list[str], chunk_rows: int) -> datasets.Dataset:
    """A cached split written in several Arrow chunks, as the real map writes large splits."""
    rows = {
        "pixel_values": [np.full(SIDE * SIDE * 3, i, np.uint8) for i in range(len(reasons))],
        "input_ids": [list(range(1, 2 + i % 4)) for i in range(len(reasons))],
        "caption": [f"caption {i % 6}" for i in range(len(reasons))],  # rows 6 and 7 repeat rows 0 and 1
        "caption_id": [caption_id([i % 6]) for i in range(len(reasons))],
        "label": ["x"] * len(reasons),
        "source_row": list(range(10, 10 + len(reasons))),
        "skip_reason": reasons,
    }
    dataset = datasets.Dataset.from_dict(rows, features=cached_features(SIDE))
    path = str(tmp_path / "cache.arrow")
    return dataset.map(lambda batch: batch, batched=True, cache_file_name=path, writer_batch_size=chunk_rows)


def test_batches_hold_the_cached_rows_and_skip_bad_ones(tmp_path):
    reasons = ["", "", "unreadable image: OSError", "", "", "", "empty caption", ""]
    pairs = PairDataset(_cached(tmp_path, reasons, chunk_rows=3), pad_token_id=PAD)
    assert len(pairs.pixel_chunks) == 3  # really spans chunks
    assert len(pairs) == 6
    batch = pairs.__getitems__([5, 0, 3])  # usable rows 7, 0, 4
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (3, SIDE, SIDE, 3)
    assert [int(image[0, 0, 0]) for image in batch["pixel_values"]] == [7, 0, 4]
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, PAD, PAD, PAD], [1, PAD, PAD, PAD]]
    # Row 7 repeats row 1's caption (its id, not row 0's); row 6 (skipped) repeated row 0's: it counts no more.
    assert batch["caption_ids"].tolist() == [caption_id([1]), caption_id([0]), caption_id([4])]
    assert pairs.shared_captions() == 2
    assert pairs.skipped_rows() == [
        {"position": 2, "source_row": 12, "reason": "unreadable image: OSError"},
        {"position": 6, "source_row": 16, "reason": "empty caption"},
    ]
    assert pairs.column("caption")[:2] == ["caption 0", "caption 1"]


def test_pixels_are_zero_copy_views_of_the_cache(tmp_path):
    cached = _cached(tmp_path, [""] * 4, chunk_rows=4)
    pairs = PairDataset(cached, pad_token_id=PAD)
    values = cached.data.table.column("pixel_values").chunks[0].flatten()
    assert pairs.pixel_chunks[0].ctypes.data == values.buffers()[1].address + values.offset


def test_single_items_work_for_code_that_indexes(tmp_path):
    pairs = PairDataset(_cached(tmp_path, [""] * 3, chunk_rows=2), pad_token_id=PAD)
    assert int(pairs[2]["pixel_values"][0, 0, 0]) == 2 and pairs[2]["input_ids"].tolist() == [1, 2, 3]


def test_training_loader_drops_the_partial_batch_and_evaluation_keeps_it(tmp_path):
    pairs = PairDataset(_cached(tmp_path, [""] * 10, chunk_rows=4), pad_token_id=PAD)
    train_sizes = [len(b["input_ids"]) for b in make_dataloader(pairs, 4, train=True)]
    eval_batches = list(make_dataloader(pairs, 4, train=False))
    assert train_sizes == [4, 4]
    assert [len(b["input_ids"]) for b in eval_batches] == [4, 4, 2]
    order = [int(image[0, 0, 0]) for b in eval_batches for image in b["pixel_values"]]
    assert order == list(range(10))


def _reading_log(count: int, fail_at: int | None = None):
    """Yields 0..count-1, recording which thread read each one and when."""
    log = []

    def source():
        for index in range(count):
            if index == fail_at:
                raise OSError("disk gone")
            log.append((index, threading.current_thread().name))
            yield index

    return source(), log


def test_prefetched_yields_every_batch_in_order_reading_ahead_in_a_background_thread():
    source, log = _reading_log(6)
    batches = prefetched(source, depth=2)
    assert next(batches) == 0
    time.sleep(0.3)  # the reader fills its queue meanwhile
    assert [index for index, _ in log] == [0, 1, 2, 3]  # the first, 2 queued, 1 waiting to be queued
    assert [0, *batches] == list(range(6))
    # The first read in the caller's thread (an Accelerate loader's start-up collectives stay there).
    assert log[0][1] == threading.current_thread().name
    assert {thread for _, thread in log[1:]} == {"clip_accel-prefetch"}


def test_prefetched_raises_the_readers_error_in_the_consumer():
    source, _ = _reading_log(6, fail_at=3)
    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(source))


def test_leaving_a_prefetched_loop_early_stops_its_thread():
    source, log = _reading_log(1000)
    for index in prefetched(source, depth=2):
        if index == 1:
            break
    assert not [thread for thread in threading.enumerate() if thread.name == "clip_accel-prefetch"]
    assert len(log) < 10
    assert list(prefetched(iter([]))) == []


@pytest.mark.parametrize("device, pinned", [(None, False), ("cpu", False), ("cuda", True)])
def test_batches_are_pinned_for_a_cuda_run_only_whatever_the_host_has(tmp_path, monkeypatch, device, pinned):
    # A CPU run on a GPU host (ACCELERATE_USE_CPU=1) must neither pin nor make a CUDA context.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pairs = PairDataset(_cached(tmp_path, [""] * 4, chunk_rows=4), pad_token_id=PAD)
    device = torch.device(device) if device else None
    assert make_dataloader(pairs, 2, train=False, device=device).pin_memory is pinned


class _RecordingCopyStream:
    """CopyStream's protocol on CPU: which thread reads inside the copy stream, and what the consumer waits for."""

    def __init__(self) -> None:
        self.log = []

    @contextlib.contextmanager
    def reading(self):
        self.log.append(("reading", threading.current_thread().name))
        yield

    def copied(self):
        self.log.append(("copied",))
        return len(self.log) - 1  # stands for the event recorded after this batch's copies

    def hand_over(self, batch, copied):
        self.log.append(("hand_over", batch, copied))
        return batch


def test_each_prefetched_batch_is_handed_over_only_after_its_own_copies():
    stream = _RecordingCopyStream()

    def source():  # reading a batch from an Accelerate loader issues its copies
        for index in range(4):
            stream.log.append(("read", index))
            yield index

    assert list(prefetched(source(), copy_stream=stream)) == [0, 1, 2, 3]
    log = stream.log
    # Batch 0 is read and copied in the caller's thread, on its own stream: nothing to wait for. Batches 1.. are
    # read inside the copy stream, in the reader thread.
    assert log[:2] == [("read", 0), ("reading", "clip_accel-prefetch")]
    for batch in (1, 2, 3):
        read = log.index(("read", batch))
        (handed,) = [position for position, entry in enumerate(log) if entry[:2] == ("hand_over", batch)]
        event = log[handed][2]  # the event the consumer waited for: recorded right after this batch's read
        assert read < event < handed and log[event][0] == "copied" and log[read + 1] == log[event]


def test_batches_held_by_the_consumer_are_never_overwritten_by_the_reader(tmp_path):
    # The reader reads ahead into new buffers every time: a batch still in use (or still being copied from, on
    # a GPU) keeps its contents while later batches are read.
    pairs = PairDataset(_cached(tmp_path, [""] * 12, chunk_rows=4), pad_token_id=PAD)
    loader = make_dataloader(pairs, 2, train=False)
    held = []
    for batch in prefetched(loader, depth=2):
        held.append((batch, {name: tensor.clone() for name, tensor in batch.items()}))
    pointers = [tensor.data_ptr() for batch, _ in held for tensor in batch.values()]
    assert len(set(pointers)) == len(pointers), "a buffer was handed out twice"
    for batch, contents in held:
        assert all(torch.equal(batch[name], contents[name]) for name in contents)


def test_the_compact_cache_is_decoded_in_worker_processes_to_the_same_batches(tmp_path, demo_dir):
    from clip_accel.config import DataConfig
    from clip_accel.data import load_raw_split
    from clip_accel.data.loader import make_dataloader
    from clip_accel.data.preprocess import preprocess_split
    from clip_accel.tokenizer import build_offline_tokenizer

    raw = load_raw_split(DataConfig(data_dir=demo_dir), "test", 20)
    tokenizer = build_offline_tokenizer(list(raw.dataset["caption"]))
    cached = preprocess_split(raw, tokenizer, 16, str(tmp_path / "cache"), cache_format="jpeg")
    pairs = PairDataset(cached, tokenizer.pad_token_id)
    assert pairs.pixel_shape == (16, 16, 3) and pairs.pixel_chunks is None
    here, workers = (list(make_dataloader(pairs, 8, train=False, num_workers=n)) for n in (0, 2))
    assert len(here) == len(workers) == 3
    for mine, theirs in zip(here, workers, strict=True):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name


def test_a_large_binary_compact_cache_reads_the_same(tmp_path, demo_dir):
    import pyarrow as pa

    from clip_accel.config import DataConfig
    from clip_accel.data import load_raw_split
    from clip_accel.data.preprocess import preprocess_split
    from clip_accel.tokenizer import build_offline_tokenizer

    raw = load_raw_split(DataConfig(data_dir=demo_dir), "test", 12)
    tokenizer = build_offline_tokenizer(list(raw.dataset["caption"]))
    cached = preprocess_split(raw, tokenizer, 16, str(tmp_path / "cache"), cache_format="jpeg")
    large = cached.cast_column("pixel_values", datasets.Value("large_binary"))
    assert pa.types.is_large_binary(large.data.table.schema.field("pixel_values").type)
    batches = [
        PairDataset(c, tokenizer.pad_token_id).__getitems__(list(range(12)))["pixel_values"] for c in (cached, large)
    ]
    assert torch.equal(*batches)
