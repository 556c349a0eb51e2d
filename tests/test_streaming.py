"""--streaming: WebDataset tar shards read as a stream, split across processes and DataLoader workers."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from accelerate import PartialState
from conftest import with_fresh_state
from launching import CPU_ENV, TORCHRUN, TORCHRUN_2
from PIL import Image
from test_distributed import REPO, free_port, torchrun

from clip_accel.config import DataConfig
from clip_accel.data import (
    StreamingLoader,
    StreamingPairs,
    build_pair_datasets,
    load_raw_splits,
    write_webdataset_shards,
)
from clip_accel.data.preprocess import PairPreprocessor, caption_id
from clip_accel.data.shards import ShardSource, add_tar_member, count_shard_rows, load_stream_split
from clip_accel.tokenizer import build_offline_tokenizer
from clip_accel.trainer import train

BATCH = 4
IMAGE_SIZE = 16


def caption(item: int) -> str:
    return f"item {item} kurta"


def write_shards(
    folder,
    sizes: list[int],
    split: str = "train",
    damaged: dict | None = None,
    first: int = 0,
    key_prefix: str = "",
    tar_format: int = tarfile.DEFAULT_FORMAT,
) -> list:
    """Shards of `sizes` rows (item ids numbered on from `first`): KEY.jpg, KEY.txt and KEY.json each, KEY the
    item's 6 digits after `key_prefix`, in tarfile's `tar_format` (PAX by default). `damaged`: {item: "image"} for
    bytes that are no image, {item: "caption"} for a row without its KEY.txt."""
    os.makedirs(folder, exist_ok=True)
    damaged = damaged or {}
    item, items = first, []
    for shard, size in enumerate(sizes):
        with tarfile.open(os.path.join(folder, f"{split}-{shard:05d}.tar"), "w", format=tar_format) as tar:
            for _ in range(size):
                image = io.BytesIO()
                Image.new("RGB", (24, 20), (item % 256, 40, 200)).save(image, "JPEG")
                members = {"jpg": image.getvalue(), "txt": caption(item).encode()}
                members["json"] = json.dumps({"class_label": f"class{item % 3}"}).encode()
                if damaged.get(item) == "image":
                    members["jpg"] = b"not a jpeg"
                if damaged.get(item) == "caption":
                    del members["txt"]
                if damaged.get(item) == "json":
                    members["json"] = b"{not json"
                for extension, data in members.items():
                    add_tar_member(tar, f"{key_prefix}{item:06d}.{extension}", data)
                items.append(item)
                item += 1
    return items


STREAM_OPTIONS = {
    "streaming": True,
    "image_column": "jpg",
    "caption_column": "txt",
    "label_column": "json.class_label",
    "shuffle_buffer": 8,
}


def stream_config(shards: str, **overrides) -> DataConfig:
    return DataConfig(**{"dataset_name": shards, **STREAM_OPTIONS, **overrides})


TOKENIZER = build_offline_tokenizer([caption(item) for item in range(200)])
CAPTION_IDS = {caption_id(TOKENIZER(caption(item))["input_ids"]): item for item in range(200)}


def streaming_loader(
    shards: str, rank: int = 0, world: int = 1, workers: int = 0, batch: int = BATCH, **overrides
) -> StreamingLoader:
    """Process `rank` of `world`'s loader of batches of `batch` (16 px images)."""
    PartialState(cpu=True)  # (Accelerate's logger needs one)
    config = stream_config(shards, **overrides)
    stream = ShardSource(config).shards("train")
    split = load_stream_split(config, "train", count_shard_rows(config, stream), stream)
    preprocessor = PairPreprocessor(TOKENIZER, IMAGE_SIZE, 77)
    pairs = StreamingPairs(
        split, config, preprocessor, rank, world, seed=0, padding=(TOKENIZER.pad_token_id, None, False)
    )
    return StreamingLoader(pairs, batch, num_workers=workers)


def read_caption_ids(loader: StreamingLoader, count: int, batches=None) -> list[int]:
    """The item ids of the first `count` batches (or of `batches`), consumed as the training loop does."""
    items = []
    for batch in batches if batches is not None else loader.batches(count):
        loader.taken(batch)
        items += [CAPTION_IDS[value] for value in batch["caption_ids"].tolist()]
    return items


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> tuple[str, list[int]]:
    folder = tmp_path_factory.mktemp("uneven")
    return str(folder), write_shards(folder, [13, 7, 9])


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory) -> tuple[str, list[int]]:
    """64 rows in shards of different sizes, each of which 2 processes split evenly: 32 rows (8 batches) each."""
    folder = tmp_path_factory.mktemp("even")
    return str(folder), write_shards(folder, [20, 12, 16, 16])


def test_two_processes_with_two_workers_see_every_row_once_per_epoch(even_shards):
    shards, items = even_shards
    loaders = [streaming_loader(shards, rank, 2, workers=2) for rank in range(2)]
    assert [len(loader) for loader in loaders] == [8, 8]
    for epoch in range(2):
        seen = [read_caption_ids(loader, 0, loader.epoch(epoch)) for loader in loaders]
        assert sorted(seen[0] + seen[1]) == items, f"epoch {epoch}: a row missed or seen twice"


def test_uneven_shards_give_every_process_as_many_batches_and_no_pair_twice(uneven_shards):
    shards, items = uneven_shards
    # 15 and 14 rows a pass: 14 // 4 = 3 batches per process an epoch, the rows after them left.
    loaders = [streaming_loader(shards, rank, 2, workers=2) for rank in range(2)]
    assert [len(loader) for loader in loaders] == [3, 3]
    trained = set()
    for epoch in range(4):
        seen = [read_caption_ids(loader, 0, loader.epoch(epoch)) for loader in loaders]
        assert [len(set(share)) for share in seen] == [len(share) for share in seen] == [12, 12]
        assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0] + seen[1]) <= set(items)
        trained |= set(seen[0] + seen[1])
    assert len(trained) > 24  # (each pass leaves other rows)


def test_passes_are_shuffled_differently_and_the_same_for_the_same_seed(uneven_shards):
    shards, _ = uneven_shards
    first = read_caption_ids(streaming_loader(shards, workers=2), 7)  # 1 process: 29 // 4 = 7 batches an epoch
    again = read_caption_ids(streaming_loader(shards, workers=2), 7)
    assert first == again
    passes = read_caption_ids(streaming_loader(shards, workers=2), 14)
    assert passes[:28] == first and len(set(passes[28:])) == 28 and passes[28:] != first
    assert first != sorted(first)
    assert read_caption_ids(streaming_loader(shards, shuffle_buffer=0), 7) != first


def test_without_a_buffer_each_pass_reads_the_shards_in_a_new_order(even_shards):
    shards, _ = even_shards
    passes = read_caption_ids(streaming_loader(shards, shuffle_buffer=0), 32)  # 16 batches an epoch
    assert passes[:64] != passes[64:] and sorted(passes[:64]) == sorted(passes[64:])


def test_resume_reads_the_rest_of_the_pass_without_a_pair_twice(uneven_shards):
    shards, items = uneven_shards
    whole = read_caption_ids(streaming_loader(shards, workers=2), 7)
    first = streaming_loader(shards, workers=2)
    head = read_caption_ids(first, 3)
    resumed = streaming_loader(shards, workers=2)
    resumed.load_state_dict([first.state_dict()])
    tail = read_caption_ids(resumed, 0, resumed.epoch(0, done=3))
    assert head == whole[:12]
    assert len(head + tail) == len(set(head + tail)) == 28 and set(tail) <= set(items) - set(head)


@pytest.mark.parametrize(
    ("before", "after", "cached"),
    [
        ((4, 0), (2, 0), False),
        ((2, 0), (1, 0), False),
        ((1, 0), (2, 0), False),
        ((1, 2), (1, 0), False),
        ((2, 2), (4, 0), False),
        ((2, 2), (1, 0), True),
    ],
    ids=["4->2", "2->1", "1->2", "2 workers->0", "2x2->4", "2x2->1 with a shard cache"],
)
def test_a_pass_resumes_on_another_number_of_processes_and_workers_with_every_row_once(
    even_shards, before, after, cached, tmp_path
):
    # The batch of all processes stays 8; 3 of the epoch's 8 batches are read on `before` (processes, workers),
    # the rest on `after`: the epoch's 64 rows are each trained once, and every resumed process gets its 5 batches.
    shards, items = even_shards
    (processes, workers), (resumed_processes, resumed_workers) = before, after
    options = {"shard_cache_dir": str(tmp_path / "cache")} if cached else {}
    first = [streaming_loader(shards, rank, processes, workers, 8 // processes, **options) for rank in range(processes)]
    head = [item for loader in first for item in read_caption_ids(loader, 3)]
    positions = [loader.state_dict() for loader in first]
    tail = []
    for rank in range(resumed_processes):
        loader = streaming_loader(shards, rank, resumed_processes, resumed_workers, 8 // resumed_processes, **options)
        loader.load_state_dict(positions)
        mine = read_caption_ids(loader, 0, loader.epoch(0, done=3))
        assert len(mine) == 5 * 8 // resumed_processes
        tail += mine
    assert sorted(head + tail) == items


def test_an_elastic_resume_is_refused_where_the_processes_stood_in_different_passes(even_shards):
    # (--epoch_rows no longer matters: every stream is counted, so every pass is replayed from its counts.)
    shards, items = even_shards
    first = [streaming_loader(shards, rank, 2, epoch_rows=64) for rank in range(2)]
    head = [item for loader in first for item in read_caption_ids(loader, 3)]
    positions = [loader.state_dict() for loader in first]
    resumed = streaming_loader(shards, 0, 1, batch=8, epoch_rows=64)
    resumed.load_state_dict(positions)
    assert sorted(head + read_caption_ids(resumed, 0, resumed.epoch(0, done=3))) == items
    positions[1] = {**positions[1], "pass": 1}
    with pytest.raises(ValueError, match="stood in different passes.*resume on 2 processes with --dataloader_num_work"):
        streaming_loader(shards, 0, 1, batch=8, epoch_rows=64).load_state_dict(positions)


def test_damaged_rows_are_skipped_and_counted_and_strict_stops_at_the_first(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [6, 6], damaged={2: "image", 7: "caption", 9: "json"})
    loader = streaming_loader(shards)  # 12 rows: 3 batches an epoch, of a pass of 9 usable rows
    seen = read_caption_ids(loader, 0, loader.epoch(0))
    assert not {2, 7, 9} & set(seen)
    assert set(seen[:9]) == set(range(12)) - {2, 7, 9}
    assert loader.borrowed == 1  # the epoch's last 3 pairs from the next pass
    reasons = dict(loader.skipped)
    assert sorted(reasons) == [f"train-0000{item // 6}.tar key {item:06d}" for item in (2, 7, 9)]
    assert reasons["train-00000.tar key 000002"].startswith("unreadable image")
    assert reasons["train-00001.tar key 000007"] == "no caption (null)"
    assert reasons["train-00001.tar key 000009"].startswith("member json does not decode")
    with pytest.raises(ValueError, match="--strict: .* key 000002: unreadable image"):
        read_caption_ids(streaming_loader(shards, strict=True, shuffle_buffer=0), 1)


def test_skipped_rows_are_logged_one_line_each_up_to_ten_then_at_powers_of_ten(tmp_path, caplog):
    shards = str(tmp_path / "shards")
    write_shards(shards, [60, 60], damaged=dict.fromkeys(range(0, 120, 2), "image"))  # 60 of 120 rows
    loader = streaming_loader(shards)
    with caplog.at_level("WARNING"):
        read_caption_ids(loader, 0, loader.epoch(0))
    lines = [record.getMessage() for record in caplog.records if " skipped: " in record.getMessage()]
    assert len(loader.skipped) == 60 and len(lines) == 10  # (every row still counted and reported)
    assert "further ones are counted at 100, 1,000" in lines[-1]


def test_a_stream_s_skipped_rows_are_kept_beside_its_checkpoint_not_in_it(tmp_path):
    from clip_accel.data.skipped_rows import ledger_path

    shards = str(tmp_path / "shards")
    write_shards(shards, [12, 12], damaged={1: "image", 5: "image", 14: "caption", 22: "image"})
    ledger = ledger_path(str(tmp_path / "out"), 0)
    loader = streaming_loader(shards, shuffle_buffer=0)
    loader.skipped.ledger = ledger
    read_caption_ids(loader, 2)  # 2 batches of 4: rows 0-9, with 1 and 5 skipped
    (position,) = [loader.state_dict()]
    assert "skipped" not in position and set(loader.skipped) == {
        "train-00000.tar key 000001",
        "train-00000.tar key 000005",
    }
    resumed = streaming_loader(shards, shuffle_buffer=0)
    resumed.skipped.ledger = ledger
    resumed.load_state_dict([position])
    assert resumed.skipped == loader.skipped  # (read back from the ledger)
    read_caption_ids(resumed, 0, resumed.epoch(0, done=2))
    assert len(resumed.skipped) == 4


def test_streamed_pairs_are_the_cached_pairs(tmp_path, demo_dir, accelerator):
    """Shards written from an Indo-fashion folder stream the same pixels, token ids and labels as its cache."""
    shards = str(tmp_path / "shards")
    for split in ("train", "val", "test"):
        write_webdataset_shards(demo_dir, shards, split, rows_per_shard=50)
    tokenizer = build_offline_tokenizer(["a women's red kurta"] * 2)
    cached = build_pair_datasets(
        accelerator,
        DataConfig(data_dir=demo_dir, cache_dir=str(tmp_path / "cache")),
        load_raw_splits(accelerator, DataConfig(data_dir=demo_dir)),
        tokenizer,
        IMAGE_SIZE,
    )
    config = stream_config(shards, cache_dir=str(tmp_path / "cache"), shuffle_buffer=0, epoch_rows=192)
    raw = load_raw_splits(accelerator, config)
    streamed = build_pair_datasets(accelerator, config, raw, tokenizer, IMAGE_SIZE)
    assert isinstance(streamed["train"], StreamingPairs)
    assert streamed["validation"].column("label") == cached["validation"].column("label")
    for role in ("validation", "test"):
        every = list(range(len(cached[role])))
        assert np.array_equal(
            streamed[role].__getitems__(every)["pixel_values"], cached[role].__getitems__(every)["pixel_values"]
        )
    batch = next(StreamingLoader(streamed["train"], 8).batches(1))
    by_caption = {value: row for row, value in enumerate(cached["train"].caption_ids)}
    rows = [by_caption[value] for value in batch["caption_ids"].tolist()]
    expected = cached["train"].__getitems__(rows)
    assert np.array_equal(batch["pixel_values"], expected["pixel_values"])
    assert np.array_equal(batch["input_ids"], expected["input_ids"])


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def make_stream_configs(make_configs, demo_shards):
    """`make_configs` (conftest) for a run streamed from the demo's shards with 2 workers; keywords override."""

    def build(**overrides) -> tuple:
        stream = {"data_dir": None, "dataset_name": demo_shards, **STREAM_OPTIONS, "dataloader_num_workers": 2}
        return make_configs(**{**stream, **overrides})

    return build


def test_a_streamed_run_trains_and_resumes_mid_epoch_where_its_checkpoint_left_the_stream(
    make_stream_configs, tmp_path
):
    configs = make_stream_configs(checkpointing_steps=2, save_total_limit=0)
    result = with_fresh_state(train, *configs)
    training = result.metrics["training"]
    assert training["optimizer_steps"] == 12 and training["train_pairs"] == 192  # 192 // 32 = 6 steps an epoch
    assert training["skipped_rows"]["train"] == 0
    checkpoints = tmp_path / "out" / "checkpoints"
    state = json.loads((checkpoints / "step-0000004" / "trainer_state.json").read_text())
    (position,) = state["stream"]
    assert position["pass"] == 0 and sum(position["consumed"]) == 4 * 32
    # Resume at step 4: the epoch's last 2 batches come from where the stream stood, not from its start.
    resumed = make_stream_configs(
        checkpointing_steps=2, save_total_limit=0, resume_from_checkpoint=str(checkpoints / "step-0000004")
    )
    shutil.rmtree(checkpoints / "step-0000006")
    result = with_fresh_state(train, *resumed)
    assert result.metrics["training"]["optimizer_steps"] == 12
    state = json.loads((checkpoints / "step-0000006" / "trainer_state.json").read_text())
    assert sum(state["stream"][0]["consumed"]) == 6 * 32 and state["epoch"] == 1


def test_a_streamed_run_written_with_two_workers_resumes_with_none(make_stream_configs, tmp_path):
    configs = make_stream_configs(checkpointing_steps=2, save_total_limit=0, num_train_epochs=1)
    with_fresh_state(train, *configs)
    checkpoints = tmp_path / "out" / "checkpoints"
    shutil.rmtree(checkpoints / "step-0000004")
    resumed = make_stream_configs(
        checkpointing_steps=2,
        save_total_limit=0,
        num_train_epochs=1,
        dataloader_num_workers=0,
        resume_from_checkpoint=str(checkpoints / "step-0000002"),
    )
    result = with_fresh_state(train, *resumed)
    assert result.metrics["training"]["optimizer_steps"] == 6
    (position,) = json.loads((checkpoints / "step-0000004" / "trainer_state.json").read_text())["stream"]
    (segment,) = position["segments"]  # 2 steps read by 2 workers, then 2 more by the process alone
    assert len(segment["consumed"][0]) == 2 and sum(segment["consumed"][0]) == 2 * 32
    assert position["consumed"] == [2 * 32]


def test_a_stream_resumes_only_from_the_same_shards_and_shuffle(make_stream_configs, demo_shards, tmp_path):
    shards = str(tmp_path / "shards")
    shutil.copytree(demo_shards, shards)
    options = {"dataset_name": shards, "checkpointing_steps": 2, "save_total_limit": 0, "num_train_epochs": 1}
    with_fresh_state(train, *make_stream_configs(**options))
    checkpoint = str(tmp_path / "out" / "checkpoints" / "step-0000002")
    with pytest.raises(ValueError, match=r"--shuffle_buffer 8 -> 4"):
        with_fresh_state(train, *make_stream_configs(**options, shuffle_buffer=4, resume_from_checkpoint=checkpoint))
    # A checkpoint of another order (an earlier clip_accel's): its position would name other rows.
    state_file = os.path.join(checkpoint, "trainer_state.json")
    state = json.loads(Path(state_file).read_text())
    Path(state_file).write_text(
        json.dumps(
            {**state, "settings": {**state["settings"], "stream": {**state["settings"]["stream"], "order": "buffer-0"}}}
        )
    )
    with pytest.raises(ValueError, match=r"the order clip_accel reads a stream in \(the checkpoint's is an earlier"):
        with_fresh_state(train, *make_stream_configs(**options, resume_from_checkpoint=checkpoint))
    Path(state_file).write_text(json.dumps(state))
    # Another shard's content under train-00002.tar's name and row count (48): the position would name other rows.
    shutil.move(os.path.join(shards, "train-00002.tar"), os.path.join(shards, "kept"))
    shutil.copy(os.path.join(shards, "train-00001.tar"), os.path.join(shards, "train-00002.tar"))
    with pytest.raises(ValueError, match=r"the content of the stream's shard train-00002.tar \(its size or its first"):
        with_fresh_state(train, *make_stream_configs(**options, resume_from_checkpoint=checkpoint))
    shutil.move(os.path.join(shards, "kept"), os.path.join(shards, "train-00002.tar"))
    shutil.copy(os.path.join(shards, "train-00003.tar"), os.path.join(shards, "train-00004.tar"))
    os.remove(os.path.join(shards, "train.shardindex.json"))
    with pytest.raises(ValueError, match=r"the stream's shards \(4 -> 5; added train-00004.tar\)"):
        with_fresh_state(train, *make_stream_configs(**options, resume_from_checkpoint=checkpoint))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"streaming": True, "data_dir": "."}, "--streaming reads --dataset_name"),
        ({"dataset_name": "x", "epoch_rows": 10}, "add --streaming"),
        ({"dataset_name": "x", "streaming": True, "max_train_samples": 10}, "set --epoch_rows"),
        ({"dataset_name": "x", "streaming": True, "cache_format": "jpeg"}, "drop --cache_format"),
    ],
)
def test_streaming_options_that_cannot_apply_fail_with_what_to_change(options, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**options)


@pytest.mark.slow
def test_two_launched_processes_split_the_shards_exactly_and_train(
    even_shards, demo_shards, tiny_model_config_path, tmp_path
):
    shards, items = even_shards
    torchrun("tests/streaming_worker.py", shards, str(tmp_path))
    per_process = json.loads((tmp_path / "streamed.json").read_text())
    assert [process["batches"] for process in per_process] == [8, 8]
    for epoch in range(2):
        assert sorted(per_process[0]["epochs"][epoch] + per_process[1]["epochs"][epoch]) == items
    for process in per_process:  # resumed after 3 batches: the same pairs as the uninterrupted epoch
        assert sorted(process["resumed"]) == sorted(process["epochs"][0])
    options = {
        "dataset_name": demo_shards,
        "streaming": "true",
        "image_column": "jpg",
        "caption_column": "txt",
        "label_column": "json.class_label",
        "scratch_config": tiny_model_config_path,
        "output_dir": tmp_path / "out",
        "cache_dir": tmp_path / "cache",
        "num_train_epochs": 2,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 16,
        "dataloader_num_workers": 2,
        "learning_rate": 2e-3,
    }
    torchrun("scripts/train.py", *[str(part) for name, value in options.items() for part in (f"--{name}", value)])
    training = json.loads((tmp_path / "out" / "eval_results.json").read_text())["training"]
    assert training["num_processes"] == 2 and training["optimizer_steps"] == 2 * 192 // 32


@pytest.mark.slow
def test_a_stream_s_evaluation_split_is_sent_to_the_other_processes_without_its_images(
    demo_shards, tiny_pretrained_dir, tmp_path
):
    # The main process reads the test split whole; the others are sent what opens its preprocessing cache (a
    # few KB), not its rows: the test shard's JPEGs alone are ~20x that. 2 processes (one cache), and 2 one-process
    # "nodes" with caches of their own (each node's first process reads the split itself), score as 1 does.
    import stream_eval_worker

    def launched(name: str) -> dict:
        return json.loads((tmp_path / f"{name}.json").read_text())

    model, output = tiny_pretrained_dir, str(tmp_path / "one.json")
    with_fresh_state(stream_eval_worker.main, model, demo_shards, str(tmp_path / "cache1"), output, 1)
    two = [model, demo_shards, str(tmp_path / "cache2"), str(tmp_path / "two.json"), "2"]
    torchrun("tests/stream_eval_worker.py", *two)
    port, nodes = free_port(), []
    for rank in (0, 1):
        node = ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]
        args = [model, demo_shards, str(tmp_path / f"node{rank}-cache"), str(tmp_path / "nodes.json"), "2"]
        command = [*TORCHRUN, *node, "--master_port", str(port), "tests/stream_eval_worker.py", *args]
        nodes.append(subprocess.Popen(command, cwd=REPO, env=CPU_ENV, stderr=subprocess.PIPE, text=True))
    logs = [process.communicate(timeout=300)[1] for process in nodes]
    assert [process.returncode for process in nodes] == [0, 0], [log[-3000:] for log in logs]
    one, two, two_nodes = launched("one"), launched("two"), launched("nodes")
    assert two["metrics"] == one["metrics"] and two_nodes["metrics"] == one["metrics"]
    images = os.path.getsize(os.path.join(demo_shards, "test-00000.tar"))
    for run in (one, two, two_nodes):
        assert 0 < max(run["broadcast_bytes"]) < 4096 < images / 20, (run["broadcast_bytes"], images)
    assert list((tmp_path / "node1-cache").glob("test-*.arrow"))  # (the second node's own preprocessing)


@pytest.mark.slow
def test_a_start_up_failure_on_one_process_stops_every_process_with_its_message(demo_shards, tmp_path):
    options = {"dataset_name": demo_shards, **STREAM_OPTIONS, "scratch_config": "clip-tiny"}
    options |= {"output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache"}
    args = [str(part) for name, value in options.items() for part in (f"--{name}", value)]
    command = [*TORCHRUN_2, "tests/startup_failure.py", *args]
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and time.monotonic() - start < 120
    message = "this node cannot read the shard index"
    assert f"Process 1 stopped at start-up: ValueError: {message}" in result.stderr  # process 0's own words
    assert f"ValueError: {message}" in result.stderr.replace(f"start-up: ValueError: {message}", "")  # process 1's
    env = {**CPU_ENV, "FAIL_AS": "UserError"}  # a user error: one line, by the main process, no traceback of ours
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = f"clip-accel train: error: Process 1 stopped at start-up: UserError: {message}"
    assert result.returncode != 0 and result.stderr.count(message) == 1 and line in result.stderr, result.stderr


def test_a_streamed_model_folder_evaluates_to_its_own_figures_and_has_a_card(
    make_stream_configs, demo_shards, tmp_path
):
    """`clip-accel evaluate` on the shards (read through datasets' webdataset loader, map-style) gives the test
    figures the streamed run measured on its own reading of them; the card is written as for any run."""
    from clip_accel.cli import main as cli_main
    from clip_accel.cli import train_and_publish

    configs = make_stream_configs(accumulation="exact", gradient_accumulation_steps=2)
    result = with_fresh_state(train_and_publish, *configs)
    assert result.metrics["training"]["optimizer_steps"] == 2 * 3  # 6 batches an epoch, 2 per exact step
    card = (tmp_path / "out" / "README.md").read_text()
    assert "demo-shards" in card  # the dataset, named after the shards' folder
    output = tmp_path / "evaluated.json"
    with_fresh_state(
        cli_main,
        [
            "evaluate",
            *("--model_name_or_path", str(tmp_path / "out"), "--dataset_name", demo_shards),
            *("--image_column", "jpg", "--caption_column", "txt", "--label_column", "json.class_label"),
            *("--cache_dir", str(tmp_path / "cache2"), "--output_file", str(output)),
        ],
    )
    evaluated = json.loads(output.read_text())
    for name in ("image_to_text_R@1", "text_to_image_R@5", "zero_shot_top1"):
        assert evaluated[name] == pytest.approx(result.metrics["test"][name], abs=1e-6)


@pytest.mark.parametrize("kind", ["parquet", "json"])
def test_any_datasets_stream_is_split_the_same_way(tmp_path, kind):
    """Parquet files (read by row groups, `ParquetShards`) and a source `datasets` streams itself (JSON lines,
    images as files: `DatasetShards`), one shard each file: every row once per epoch over 2 processes, damaged
    rows skipped, columns checked."""
    import datasets

    folder = tmp_path / kind
    folder.mkdir()
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("string")}
    )
    for shard, items in enumerate([range(0, 10), range(10, 16)]):
        rows = {"image": [], "caption": [], "label": []}
        for item in items:
            image = io.BytesIO()
            Image.new("RGB", (24, 20), (item, 40, 200)).save(image, "JPEG")
            data = image.getvalue() if item != 3 else b"broken"
            if kind == "json":
                (folder / f"{item}.jpg").write_bytes(data)
            rows["image"].append(str(folder / f"{item}.jpg") if kind == "json" else {"bytes": data, "path": None})
            rows["caption"].append(caption(item))
            rows["label"].append(f"class{item % 3}")
        if kind == "json":
            lines = [json.dumps(dict(zip(rows, row, strict=True))) for row in zip(*rows.values(), strict=True)]
            (folder / f"train-{shard:05d}.jsonl").write_text("\n".join(lines) + "\n")
        else:
            dataset = datasets.Dataset.from_dict(rows, features=features)
            dataset.to_parquet(str(folder / f"train-{shard:05d}.parquet"))
    options = {"data_files": str(folder), "image_column": "image", "caption_column": "caption", "label_column": "label"}
    loaders = [streaming_loader(kind, rank, 2, **options) for rank in range(2)]
    shards = loaders[0].pairs.split.stream
    assert type(shards).__name__ == ("ParquetShards" if kind == "parquet" else "DatasetShards")
    assert [len(loader) for loader in loaders] == [2, 2]  # 8 rows each, 4 a batch
    seen = [read_caption_ids(loader, 0, loader.epoch(0)) for loader in loaders]
    assert 3 not in seen[0] + seen[1] and len(set(seen[0] + seen[1])) == 16 - 1
    assert [where for loader in loaders for where in loader.skipped] == ["shard 0 row 3"]
    with pytest.raises(ValueError, match="no column.*'text'"):
        streaming_loader(kind, caption_column="text", data_files=str(folder))


def test_one_large_parquet_file_is_read_by_row_groups_each_process_its_share(tmp_path):
    # One file of 8 row groups of 8 rows (64 px noise PNGs) on 4 processes: each reads the groups its quarter of
    # the rows lies in (about 1/4 of the file, at most a group more at each end), and every row once.
    import pyarrow as pa
    import pyarrow.parquet as pq

    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    images, captions = [], []
    for item in range(64):
        image = io.BytesIO()
        Image.fromarray(np.roll(noise, item, axis=1)).save(image, "PNG")
        images.append({"bytes": image.getvalue(), "path": None})
        captions.append(caption(item))
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": images, "caption": captions}), path, row_group_size=8)
    seen, size = [], os.path.getsize(path)
    for rank in range(4):
        options = {"image_column": "image", "caption_column": "caption", "label_column": None}
        loader = streaming_loader("parquet", rank, 4, data_files=str(path), **options)
        before = bytes_read()
        seen += read_caption_ids(loader, 0, loader.epoch(0))
        read = bytes_read() - before
        assert read <= size / 4 + 2 * size / 8, (rank, read, size)
    assert sorted(seen) == list(range(64))


def test_a_streamed_run_under_fsdp1_stops_at_start_up(even_shards):
    from types import SimpleNamespace

    from clip_accel.launch import check_streaming_launch

    fsdp1 = SimpleNamespace(is_fsdp2=False, distributed_type=SimpleNamespace(value="FSDP"))
    with pytest.raises(ValueError, match="under FSDP2 .*fsdp_version: 2"):
        check_streaming_launch(fsdp1, stream_config(even_shards[0]))
    check_streaming_launch(fsdp1, DataConfig(dataset_name="x"))  # a cached split is refused elsewhere, if at all
    fsdp2 = SimpleNamespace(is_fsdp2=True, distributed_type=SimpleNamespace(value="FSDP"))
    check_streaming_launch(fsdp2, stream_config(even_shards[0]))  # (trained like DDP: tests/test_fsdp.py)


@pytest.mark.parametrize("variant", ["siglip", "siglip2", "augment"])
def test_streaming_trains_every_model_family_and_with_augmentation(
    variant, make_stream_configs, tiny_model_config_path, tiny_siglip_config_path, tmp_path
):
    """SigLIP (square images, captions padded to 64), SigLIP 2 (patch sequences and their grids) and --augment
    (training images decoded larger, cropped on the device) from a stream: one epoch, then the usual evaluation."""
    from conftest import tiny_siglip2_values

    model_config = {"siglip": tiny_siglip_config_path, "augment": tiny_model_config_path}.get(variant)
    if variant == "siglip2":
        model_config = str(tmp_path / "siglip2.json")
        (tmp_path / "siglip2.json").write_text(json.dumps(tiny_siglip2_values()))
    augment = {"augment": True, "augment_flip": True} if variant == "augment" else {}
    configs = make_stream_configs(scratch_config=model_config, num_train_epochs=1, **augment)
    result = with_fresh_state(train, *configs)
    assert result.metrics["training"]["optimizer_steps"] == 192 // 32
    assert 0 <= result.metrics["test"]["image_to_text_R@1"] <= 1


def test_a_stream_with_no_usable_row_stops_with_what_to_check_and_a_truncated_shard_is_named(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [4, 4], damaged=dict.fromkeys(range(8), "image"))
    with pytest.raises(ValueError, match="no usable pair .* check --image_column"):
        read_caption_ids(streaming_loader(shards), 1)
    good = str(tmp_path / "good")
    write_shards(good, [8])
    path = os.path.join(good, "train-00000.tar")
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="train-00000.tar is truncated"):
        streaming_loader(good)


def test_each_process_reads_only_its_share_of_the_shards_bytes(tmp_path):
    # 8 shards of 6 rows of 64 px noise (~12 KB a row) on 4 processes: a pass's rows are cut into 4 contiguous
    # runs, so a process reads a quarter of the bytes, plus at most the two shards its run starts and ends in.
    folder = tmp_path / "noise"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for shard in range(8):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for item in range(shard * 6, shard * 6 + 6):
                image = io.BytesIO()
                Image.fromarray(np.roll(noise, item, axis=1)).save(image, "PNG")
                add_tar_member(tar, f"{item:06d}.png", image.getvalue())
                add_tar_member(tar, f"{item:06d}.txt", caption(item).encode())
    sizes = [os.path.getsize(path) for path in folder.iterdir()]
    seen = []
    for rank in range(4):
        loader = streaming_loader(str(folder), rank, 4, image_column="png", label_column=None)
        before = bytes_read()
        seen += read_caption_ids(loader, 0, loader.epoch(0))
        read = bytes_read() - before
        assert read <= sum(sizes) / 4 + 2 * max(sizes), (rank, read, sum(sizes))
    assert sorted(seen) == list(range(48))  # 12 rows (3 batches) each, every row once


def bytes_read() -> int:
    """Bytes this process has read from files so far (Linux)."""
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])
