"""Captions past the text tower's 77 tokens: the truncated ones counted (cached splits, streams, the run's summary)
and --text_positions N, Long-CLIP's stretched text positions."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import datasets
import pytest
import torch
import torch.nn.functional as F
from accelerate import PartialState
from conftest import tiny_clip_config, train_on_demo
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

from clip_accel.config import DataConfig, ModelConfig, UserError
from clip_accel.data import StreamingLoader, StreamingPairs
from clip_accel.data.preprocess import PairPreprocessor, cached_truncation, preprocess_split
from clip_accel.data.shards import ShardSource, add_tar_member, count_shard_rows, load_stream_split
from clip_accel.data.sources import RAW_FEATURES, RawSplit
from clip_accel.model import ContrastiveModel, load_model_and_processor, save_model_folder
from clip_accel.text_positions import stretched_positions
from clip_accel.tokenizer import build_offline_tokenizer
from clip_accel.zero_shot import embed_texts

WORDS = ["red", "kurta", "silk", "saree", "gold", "border", "cotton", "blue"]
TOKENIZER = build_offline_tokenizer([" ".join(WORDS)] * 4)


def words(count: int, start: int = 0) -> str:
    """A caption of `count` words (each one token of TOKENIZER, plus start and end of text)."""
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count))


def long_clip_reference(table: torch.Tensor) -> torch.Tensor:
    """Long-CLIP's stretch as its model/longclip.py `load()` writes it out (lines 230-246, commit 3966af9)."""
    length, dim = table.shape
    keep_len = 20
    new = torch.zeros([4 * length - 3 * keep_len, dim], dtype=table.dtype)
    for i in range(keep_len):
        new[i] = table[i]
    for i in range(length - 1 - keep_len):
        new[4 * i + keep_len] = table[i + keep_len]
        new[4 * i + 1 + keep_len] = 3 * table[i + keep_len] / 4 + 1 * table[i + 1 + keep_len] / 4
        new[4 * i + 2 + keep_len] = 2 * table[i + keep_len] / 4 + 2 * table[i + 1 + keep_len] / 4
        new[4 * i + 3 + keep_len] = 1 * table[i + keep_len] / 4 + 3 * table[i + 1 + keep_len] / 4
    for k in range(4):
        new[4 * length - 3 * keep_len - 4 + k] = table[length - 1] + k * (table[length - 1] - table[length - 2]) / 4
    return new


def test_the_stretched_table_is_long_clips():
    table = torch.randn(77, 32)
    stretched = stretched_positions(table, 248)
    assert stretched.shape == (248, 32)
    assert torch.equal(stretched[:20], table[:20])  # the first 20 kept as trained
    assert torch.equal(stretched[20:245:4], table[20:77])  # every 4th position from 20 is an old one
    torch.testing.assert_close(stretched, long_clip_reference(table), rtol=0, atol=1e-6)
    # the last three lie past position 76, along its last step
    torch.testing.assert_close(stretched[-1], table[76] + 0.75 * (table[76] - table[75]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    """A tiny pretrained CLIP folder with 77 text positions and TOKENIZER."""
    folder = str(tmp_path_factory.mktemp("clip77"))
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(vocab_size=len(TOKENIZER), eos_token_id=TOKENIZER.eos_token_id))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    save_model_folder(model, CLIPProcessor(image_processor=image_processor, tokenizer=TOKENIZER), folder)
    return folder


def stretched(folder: str, positions: int = 248):
    return load_model_and_processor(ModelConfig(model_name_or_path=folder, text_positions=positions), lambda: [])


def text_embeds(model: CLIPModel, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.get_text_features(input_ids=torch.tensor([input_ids])).pooler_output[0]


def test_a_stretched_folder_loads_back_with_its_positions_and_reads_long_captions(clip_folder, tmp_path):
    original = CLIPModel.from_pretrained(clip_folder)
    model, processor = stretched(clip_folder)
    table = original.text_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(model.text_model.embeddings.position_embedding.weight, stretched_positions(table, 248))
    assert model.text_model.embeddings.position_ids.shape == (1, 248)
    save_model_folder(model, processor, str(tmp_path / "long"))
    loaded, loaded_processor = (
        CLIPModel.from_pretrained(tmp_path / "long"),
        AutoProcessor.from_pretrained(tmp_path / "long"),
    )
    assert loaded.config.text_config.max_position_embeddings == 248
    assert loaded_processor.tokenizer.model_max_length == 248
    long_ids = loaded_processor.tokenizer(words(148), truncation=True)["input_ids"]
    assert len(long_ids) == 150  # not cut at 77
    torch.testing.assert_close(text_embeds(loaded, long_ids), text_embeds(model, long_ids), rtol=0, atol=0)
    # The caption read whole is another text than its first 77 tokens.
    truncated = TOKENIZER(words(148), truncation=True, max_length=77)["input_ids"]
    assert not torch.allclose(text_embeds(loaded, long_ids), text_embeds(loaded, truncated), atol=1e-4)
    # A folder already at 248 positions is left as it is (training on, resuming).
    again, _ = stretched(str(tmp_path / "long"))
    assert torch.equal(
        again.text_model.embeddings.position_embedding.weight, loaded.text_model.embeddings.position_embedding.weight
    )


def test_prompts_and_search_queries_are_read_to_the_stretched_length(clip_folder):
    model, processor = stretched(clip_folder)
    long_ids = processor.tokenizer(words(148), truncation=True)["input_ids"]
    for tower in (model, ContrastiveModel(model)):  # as search and zero-shot evaluation call it
        with torch.no_grad():
            read = embed_texts(tower, processor.tokenizer, [words(148)], torch.device("cpu"))[0]
        torch.testing.assert_close(F.normalize(read, dim=0), F.normalize(text_embeds(model, long_ids), dim=0))


def test_text_positions_refuses_siglip_and_fewer_positions(clip_folder, tiny_siglip_config_path):
    with pytest.raises(UserError, match="SigLIP's text tower was trained on texts padded to 64"):
        load_model_and_processor(ModelConfig(scratch_config=tiny_siglip_config_path, text_positions=128), lambda: [])
    with pytest.raises(UserError, match="fewer than the model's 77 text positions"):
        stretched(clip_folder, 64)
    with pytest.raises(UserError, match="--text_positions must be 0"):
        ModelConfig(text_positions=-1)


def raw_split(tmp_path, captions: list[str], more: list[list[str]] | None = None) -> RawSplit:
    image = tmp_path / "image.png"
    Image.new("RGB", (20, 20), "red").save(image)
    rows = {"image": [str(image)] * len(captions), "caption": captions, "label": ["x"] * len(captions)}
    rows["source_row"] = list(range(len(captions)))
    features = RAW_FEATURES
    if more is not None:
        rows["more_captions"] = more
        features = datasets.Features({**RAW_FEATURES, "more_captions": datasets.List(datasets.Value("string"))})
    return RawSplit("train", datasets.Dataset.from_dict(rows, features=features), f"fp-long-{len(captions)}")


def test_a_cached_split_counts_every_truncated_caption_even_on_a_cache_hit(tmp_path):
    # 75 words: 77 tokens, the most that fit, so not truncated; 76 words and more are.
    captions = [words(3), words(75), words(76), words(148, 1)]
    more = [[words(200)], [], [words(2), words(90)], [words(10)]]
    raw = raw_split(tmp_path, captions, more)
    cached = preprocess_split(raw, TOKENIZER, 16, str(tmp_path / "cache"))
    counts = cached_truncation(cached, TOKENIZER, 77)
    assert (counts.truncated, counts.captions) == (4, 8)  # every caption of a row, the `more_*` ones too
    again = preprocess_split(raw, TOKENIZER, 16, str(tmp_path / "cache"))
    assert again.cache_files == cached.cache_files
    assert cached_truncation(again, TOKENIZER, 77) == counts
    assert counts.describe("train", "--text_positions 248 keeps up to 248") == (
        "train: 4 of 8 captions longer than 77 tokens were truncated (--text_positions 248 keeps up to 248)"
    )


def test_with_248_positions_a_150_token_caption_is_cached_whole_in_a_cache_of_its_own(clip_folder, tmp_path):
    raw = raw_split(tmp_path, [words(3), words(148)])
    short = preprocess_split(raw, TOKENIZER, 16, str(tmp_path / "cache"))
    assert cached_truncation(short, TOKENIZER, 77).truncated == 1
    _, processor = stretched(clip_folder)
    long = preprocess_split(raw, processor.tokenizer, 16, str(tmp_path / "cache"), max_length=248)
    assert long.cache_files != short.cache_files  # another fingerprint: the token ids differ
    assert len(long[1]["input_ids"]) == 150
    assert cached_truncation(long, processor.tokenizer, 248).truncated == 0


def write_caption_shard(folder: str, captions: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(os.path.join(folder, "train-00000.tar"), "w") as tar:
        for item, caption in enumerate(captions):
            image = io.BytesIO()
            Image.new("RGB", (24, 20), (item, 40, 200)).save(image, "JPEG")
            add_tar_member(tar, f"{item:06d}.jpg", image.getvalue())
            add_tar_member(tar, f"{item:06d}.txt", caption.encode())
            add_tar_member(tar, f"{item:06d}.json", json.dumps({"class_label": "a"}).encode())


def test_a_stream_counts_the_captions_it_truncates_as_it_reads_them_and_keeps_the_count_in_its_checkpoint(tmp_path):
    state = PartialState(cpu=True)
    captions = [words(100) if item % 3 == 0 else words(5) for item in range(8)]  # 3 long of 8
    write_caption_shard(str(tmp_path / "shards"), captions)
    config = DataConfig(
        dataset_name=str(tmp_path / "shards"),
        streaming=True,
        image_column="jpg",
        caption_column="txt",
        label_column="json",
        shuffle_buffer=0,
    )
    stream = ShardSource(config).shards("train")
    split = load_stream_split(config, "train", count_shard_rows(config, stream), stream)

    def loader() -> StreamingLoader:
        preprocessor = PairPreprocessor(TOKENIZER, 16, 77)
        pairs = StreamingPairs(split, config, preprocessor, 0, 1, seed=0, padding=(TOKENIZER.pad_token_id, None, False))
        return StreamingLoader(pairs, 4)

    first = loader()
    for batch in first.epoch(0):
        first.taken(batch)
    counts = first.caption_truncation(state)
    assert (counts.truncated, counts.captions, counts.max_length) == (3, 8, 77)
    resumed = loader()
    resumed.load_state_dict([first.state_dict()])
    assert resumed.caption_truncation(state) == counts


@pytest.fixture(scope="module")
def long_demo_dir(tmp_path_factory, demo_dir) -> str:
    """The demo catalogue with every third training title 100 words long."""
    folder = str(tmp_path_factory.mktemp("long-demo") / "indo-fashion-demo")
    shutil.copytree(demo_dir, folder)
    path = os.path.join(folder, "train_data.json")
    with open(path) as handle:
        rows = [json.loads(line) for line in handle]
    for index, row in enumerate(rows):
        if index % 3 == 0:
            row["product_title"] = f"{row['product_title']} {words(100)}"
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def test_a_run_logs_and_reports_its_truncated_captions_and_trains_with_stretched_positions(
    tiny_pretrained_dir, long_demo_dir, tmp_path, caplog
):
    caplog.set_level("INFO")
    schedule = {"num_train_epochs": 1, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 32}
    _, result = train_on_demo(
        tmp_path, long_demo_dir, ModelConfig(model_name_or_path=tiny_pretrained_dir), "at77", **schedule, seed=0
    )
    counts = result.metrics["training"]["truncated_captions"]
    assert counts["train"] == {"truncated": 64, "captions": 192, "max_tokens": 77}
    assert counts["test"]["truncated"] == 0
    assert "train: 64 of 192 captions longer than 77 tokens were truncated (--text_positions 248" in caplog.text
    model = ModelConfig(model_name_or_path=tiny_pretrained_dir, text_positions=248)
    _, result = train_on_demo(tmp_path, long_demo_dir, model, "at248", **schedule, seed=0, eval_initial_model=False)
    assert result.metrics["training"]["truncated_captions"]["train"] == {
        "truncated": 0,
        "captions": 192,
        "max_tokens": 248,
    }
    saved = CLIPModel.from_pretrained(tmp_path / "at248")
    assert saved.config.text_config.max_position_embeddings == 248
    assert AutoProcessor.from_pretrained(tmp_path / "at248").tokenizer.model_max_length == 248
