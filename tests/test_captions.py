"""Several captions per image (Flickr30k, COCO): one drawn per row and epoch in training, deterministic and the same
on any number of processes; every caption scored in evaluation by the standard protocol, as clip-benchmark does."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EmbeddedForClipBenchmark, with_fresh_state

from clip_accel.config import DataConfig
from clip_accel.data import PairDataset, load_raw_split, make_dataloader, source_for
from clip_accel.data.loader import drawn_captions
from clip_accel.data.preprocess import caption_id, preprocess_split
from clip_accel.metrics import multi_caption_metrics, retrieval_metrics


def _captions(record: dict, index: int) -> list[str]:
    """1 to 3 captions: the title, then others that name the class (so that they differ from the title)."""
    title, label = record["product_title"], record["class_label"]
    return [title, f"a photo of a {label}, item {index}", f"{label} {index}"][: 1 + index % 3]


def _listed_catalogue(demo_dir: str, root: Path) -> Path:
    """The demo catalogue with a list of captions in every row's product_title."""
    shutil.copytree(demo_dir, root)
    for name in ("train_data.json", "val_data.json", "test_data.json"):
        records = [json.loads(line) for line in (root / name).read_text().splitlines()]
        lines = [json.dumps({**r, "product_title": _captions(r, i)}) for i, r in enumerate(records)]
        (root / name).write_text("".join(line + "\n" for line in lines))
    return root


@pytest.fixture
def listed_cache(demo_dir, offline_tokenizer, tmp_path):
    raw = load_raw_split(DataConfig(data_dir=str(_listed_catalogue(demo_dir, tmp_path / "listed"))), "train", None)
    return preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))


def test_training_draws_one_caption_per_row_and_epoch_the_same_whatever_the_batches(listed_cache, offline_tokenizer):
    pairs = PairDataset(listed_cache, offline_tokenizer.pad_token_id, caption_seed=7)
    ids = [
        [caption_id(t) for t in [first, *more]]
        for first, more in zip(listed_cache["input_ids"], listed_cache["more_input_ids"], strict=True)
    ]
    rows = np.arange(len(pairs))
    seen = []
    for epoch in range(4):
        pairs.set_epoch(epoch)
        whole = pairs.__getitems__(rows)
        # Two processes' halves, in another order: each row gets the same caption.
        parts = (rows[1::2][::-1], rows[::2])
        halves = torch.cat([pairs.__getitems__(part)["caption_ids"] for part in parts]).tolist()
        by_row = dict(zip(np.concatenate(parts).tolist(), halves, strict=True))
        assert [by_row[row] for row in rows] == whole["caption_ids"].tolist()
        choices = drawn_captions(7, epoch, rows, [len(row) for row in ids])
        assert whole["caption_ids"].tolist() == [row[choice] for row, choice in zip(ids, choices, strict=True)]
        for index, choice in enumerate(choices):  # the tokens are the drawn caption's
            drawn = [listed_cache["input_ids"][index], *listed_cache["more_input_ids"][index]][choice]
            assert whole["input_ids"][index, : len(drawn)].tolist() == drawn
        seen.append(choices)
    seen = np.array(seen)
    three = [index for index, row in enumerate(ids) if len(row) == 3]
    assert all(len(set(seen[:, index])) >= 2 for index in three[:20])  # (the draw changes with the epoch)
    assert {0, 1, 2} <= set(seen[:, three].ravel())  # every caption trains
    unseeded = PairDataset(listed_cache, offline_tokenizer.pad_token_id).__getitems__(rows)
    assert unseeded["caption_ids"].tolist() == [row[0] for row in ids]  # (evaluation loaders: the first)


def test_worker_processes_see_each_epochs_draw(listed_cache, offline_tokenizer):
    pairs = PairDataset(listed_cache, offline_tokenizer.pad_token_id, caption_seed=3)
    batches = {}
    for workers in (0, 2):
        loader = make_dataloader(pairs, 16, train=False, num_workers=workers)
        for epoch in (0, 1):
            pairs.set_epoch(epoch)
            batches[workers, epoch] = torch.cat([batch["caption_ids"] for batch in loader])
    assert torch.equal(batches[0, 0], batches[2, 0]) and torch.equal(batches[0, 1], batches[2, 1])
    assert not torch.equal(batches[0, 0], batches[0, 1])


def test_any_caption_recall_equals_clip_benchmarks_on_the_same_embeddings(clip_benchmark):
    generator = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 6, (61,), generator=generator)
    owners = torch.repeat_interleave(torch.arange(61), counts)
    images = torch.nn.functional.normalize(torch.randn(61, 16, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(images[owners] + torch.randn(len(owners), 16, generator=generator), dim=-1)
    model = EmbeddedForClipBenchmark(texts)
    captions = [[str(j) for j in torch.nonzero(owners == i).flatten().tolist()] for i in range(61)]
    batches = [(images[start : start + 8], captions[start : start + 8]) for start in range(0, 61, 8)]
    retrieval = clip_benchmark.zeroshot_retrieval
    theirs = retrieval.evaluate(model, batches, model.tokenize, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = multi_caption_metrics(images, texts, owners, chunk_size=16)  # (tiles smaller than the split)
    assert ours["num_captions"] == len(owners) > 61
    for k in (1, 5, 10):  # theirs are float32 means
        assert ours[f"image_to_text_R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-6)
        assert ours[f"text_to_image_R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-6)
    assert 0.05 < ours["image_to_text_R@1"] < 0.95 and 0.05 < ours["text_to_image_R@1"] < 0.95  # (not trivial)
    one = multi_caption_metrics(images, texts[:61], torch.arange(61))  # one caption each: the usual figures
    assert one == {**retrieval_metrics(images, texts[:61]), "num_captions": 61}


def test_caption_lists_stream_one_drawn_caption_per_row_never_the_lists_text(demo_dir, offline_tokenizer, tmp_path):
    from accelerate import PartialState

    from clip_accel.data import StreamingLoader, StreamingPairs
    from clip_accel.data.preprocess import PairPreprocessor
    from clip_accel.data.shards import ShardSource, add_tar_member, count_shard_rows, load_stream_split

    records = [json.loads(line) for line in Path(demo_dir, "train_data.json").read_text().splitlines()[:48]]
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        with tarfile.open(folder / f"train-{shard:05d}.tar", "w") as tar:
            for index in range(shard * 24, shard * 24 + 24):
                record = {**records[index], "product_title": _captions(records[index], index)}
                add_tar_member(tar, f"{index:04d}.jpg", Path(demo_dir, record["image_path"]).read_bytes())
                add_tar_member(tar, f"{index:04d}.json", json.dumps(record).encode())
    config = DataConfig(
        dataset_name=str(folder), streaming=True, image_column="jpg", caption_column="json.product_title"
    )
    PartialState(cpu=True)  # (Accelerate's logger needs one)
    stream = ShardSource(config).shards("train")
    split = load_stream_split(config, "train", count_shard_rows(config, stream), stream)
    allowed = {
        caption_id(ids): index
        for index in range(48)
        for ids in offline_tokenizer(_captions(records[index], index), truncation=True)["input_ids"]
    }
    drawn = []
    for epoch in range(3):
        pairs = StreamingPairs(split, config, PairPreprocessor(offline_tokenizer, 16, 77), 0, 1, seed=0)
        loader = StreamingLoader(pairs, 8)
        ids = []
        for batch in loader.epoch(epoch):
            loader.taken(batch)
            ids += batch["caption_ids"].tolist()
        assert len(ids) == 48 and all(i in allowed for i in ids)  # (a list's repr would be no caption of the row)
        drawn.append(sorted(ids))
    assert len({tuple(ids) for ids in drawn}) > 1  # another caption in another epoch


def test_training_and_evaluate_score_every_caption(demo_dir, make_configs, tmp_path):
    from clip_accel.embedding import embed
    from clip_accel.evaluation import evaluate_folder
    from clip_accel.results import format_results_table
    from clip_accel.trainer import train

    listed = _listed_catalogue(demo_dir, tmp_path / "listed")
    data, model, config = make_configs(data_dir=str(listed), num_train_epochs=1)
    result = with_fresh_state(train, data, model, config)
    test = result.metrics["test"]
    lists = [json.loads(line)["product_title"] for line in (listed / "test_data.json").read_text().splitlines()]
    captions = sum(len(titles) for titles in lists)
    assert test["num_pairs"] == 45 and test["num_captions"] == captions > 45
    assert "identical_caption_match" not in test
    again = with_fresh_state(evaluate_folder, config.output_dir, data)
    assert {k: again[k] for k in test if "R@" in k} == {k: test[k] for k in test if "R@" in k}
    embedded = with_fresh_state(embed, config.output_dir, data)  # (each image with its first caption)
    assert embedded.captions == [titles[0] for titles in lists]
    assert f"| model | 45 ({captions} captions) |" in format_results_table({"model": test})  # (the card's table)


def test_extra_caption_templates_join_the_training_rows_captions_only(demo_dir, make_configs, tmp_path):
    from clip_accel.trainer import train

    data = DataConfig(data_dir=demo_dir, extra_caption_templates=["a photo of a {class_label}", "{brand}"])
    val_rows = load_raw_split(data, "val", None)
    training = source_for(data, training=True).read("train")
    first = json.loads(Path(demo_dir, "train_data.json").read_text().splitlines()[0])
    assert training.dataset["caption"][0] == first["product_title"]
    assert training.dataset["more_captions"][0] == [f"a photo of a {first['class_label']}", first["brand"]]
    assert "more_captions" not in val_rows.dataset.column_names  # (evaluation: the first caption only)
    assert training.fingerprint != source_for(DataConfig(data_dir=demo_dir), training=True).read("train").fingerprint
    with pytest.raises(ValueError, match=r"line 1: --extra_caption_templates names \[.colour.\]"):
        source_for(DataConfig(data_dir=demo_dir, extra_caption_templates=["{colour}"]), training=True).read("train")
    with pytest.raises(ValueError, match=r"--caption_template 'a \{class_label': "):
        DataConfig(data_dir=demo_dir, extra_caption_templates=["a {class_label"])
    result = with_fresh_state(train, *make_configs(extra_caption_templates=["a photo of a {class_label}"]))
    assert result.metrics["test"]["num_pairs"] == 45 and "num_captions" not in result.metrics["test"]
    assert result.metrics["training"]["train_pairs_sharing_a_caption"] > 0  # (the class prompts are shared)
