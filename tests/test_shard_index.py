"""Each tar shard's rows known without reading the shards: wids' shard index, img2dataset's stats files, headers."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_streaming import bytes_read, read_caption_ids, stream_config, streaming_loader, write_shards

import clip_accel.data.shards as shards_module
from clip_accel.cli import main
from clip_accel.config import DataConfig
from clip_accel.data import write_webdataset_shards
from clip_accel.data.remote import remote_splits
from clip_accel.data.shard_index import count_tar_rows, indexed_counts, write_shard_index
from clip_accel.data.shards import ShardSource, TarShards, add_tar_member
from clip_accel.data.sources import DatasetSource, local_tar_splits


def no_shard_read(monkeypatch):
    """Counting a shard's headers fails from here on: counts must come from an index or stats files."""

    def refuse(path):
        raise AssertionError(f"{path} was read to count its rows")

    monkeypatch.setattr(shards_module, "count_tar_rows", refuse)


def test_index_shards_writes_wids_index_that_a_stream_counts_from_without_opening_a_shard(tmp_path, monkeypatch):
    folder = str(tmp_path / "shards")
    items = write_shards(folder, [13, 7, 9])
    main(["index-shards", folder])
    index = json.loads((tmp_path / "shards" / "train.shardindex.json").read_text())
    assert index == {
        "wids_version": 1,
        "shardlist": [{"url": f"train-{n:05d}.tar", "nsamples": rows} for n, rows in enumerate([13, 7, 9])],
    }
    no_shard_read(monkeypatch)
    assert ShardSource(stream_config(folder)).shards("train").counts() == [13, 7, 9]
    epoch = read_caption_ids(streaming_loader(folder), 7)  # 29 rows: 7 batches of 4, each row once
    assert len(set(epoch)) == 28 and set(epoch) <= set(items)


def test_an_index_elsewhere_is_passed_as_shard_index_and_a_stale_or_broken_one_is_named(tmp_path, monkeypatch):
    folder = str(tmp_path / "shards")
    write_shards(folder, [5, 6])
    elsewhere = str(tmp_path / "mine" / "train.json")
    os.makedirs(os.path.dirname(elsewhere))
    main(["index-shards", folder, "--output", elsewhere])
    assert not os.path.exists(os.path.join(folder, "train.shardindex.json"))
    with monkeypatch.context() as patch:
        no_shard_read(patch)
        assert ShardSource(stream_config(folder, shard_index=elsewhere)).shards("train").counts() == [5, 6]
    write_shards(folder, [5, 6, 4])  # a shard added after the index was written
    with pytest.raises(ValueError, match=r"does not list 1 of the 3 shards \(e.g. .*/train-00002.tar\).*index-shards"):
        ShardSource(stream_config(folder, shard_index=elsewhere)).shards("train").counts()
    with open(elsewhere, "w") as handle:
        handle.write('{"shardlist": [{"url": "train-00000.tar"}]}')
    with pytest.raises(ValueError, match="is not a readable shard index .*nsamples"):
        ShardSource(stream_config(folder, shard_index=elsewhere)).shards("train").counts()
    with pytest.raises(ValueError, match="--shard_index .* is not a file: write one with `clip-accel index-shards"):
        stream_config(folder, shard_index=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="--shard_index, --shard_cache_dir, .* shape a stream: add --streaming"):
        stream_config(folder, streaming=False, shard_index=elsewhere)


def test_remote_shards_without_an_index_stop_with_the_command_to_write_one():
    message = "have no shard index: write one with `clip-accel index-shards`.*--shard_index"
    with pytest.raises(ValueError, match=message):
        TarShards(["https://example.org/train-00000.tar"]).counts()


def write_img2dataset_shard(folder: str, shard: int, rows: int, first: int) -> None:
    """`NNNNN.tar` with `KEY.jpg`, `KEY.txt` and `KEY.json` per sample, `NNNNN.parquet` and `NNNNN_stats.json`
    beside it, as img2dataset writes them (keys are the shard number and the sample's, 9 digits)."""
    name = os.path.join(folder, f"{shard:05d}")
    with tarfile.open(f"{name}.tar", "w") as tar:
        for row in range(rows):
            key, item = f"{shard:05d}{row:04d}", first + row
            image = io.BytesIO()
            Image.new("RGB", (24, 20), (item % 256, 40, 200)).save(image, "JPEG")
            meta = {"url": f"https://example.org/{item}.jpg", "key": key, "status": "success"}
            members = {"jpg": image.getvalue(), "txt": f"item {item} kurta".encode()}
            members["json"] = json.dumps({**meta, "class_label": f"class{item % 3}"}).encode()
            for extension, data in members.items():
                add_tar_member(tar, f"{key}.{extension}", data)
    pq.write_table(pa.table({"key": [f"{shard:05d}{row:04d}" for row in range(rows)]}), f"{name}.parquet")
    with open(f"{name}_stats.json", "w") as handle:
        json.dump({"count": rows + 1, "successes": rows, "failed_to_download": 1}, handle)


def test_an_img2dataset_folder_streams_as_it_is_counted_from_its_stats_files(tmp_path, monkeypatch):
    # `datasets` infers a JSON (or parquet) dataset from such a folder; the tars are what trains.
    folder = str(tmp_path / "img2dataset")
    os.makedirs(folder)
    for shard, (rows, first) in enumerate([(9, 0), (7, 9)]):
        write_img2dataset_shard(folder, shard, rows, first)
    assert local_tar_splits(folder) == {"train": [os.path.join(folder, f"{n:05d}.tar") for n in range(2)]}
    no_shard_read(monkeypatch)
    assert ShardSource(stream_config(folder)).shards("train").counts() == [9, 7]
    assert sorted(read_caption_ids(streaming_loader(folder), 4)) == list(range(16))
    # And cached, not streamed: the same folder read through `datasets` (as WebDataset shards).
    config = DataConfig(dataset_name=folder, image_column="jpg", caption_column="txt", label_column="json.class_label")
    train = DatasetSource(config).read("train").dataset
    assert sorted(train["caption"]) == sorted(f"item {item} kurta" for item in range(16))


def test_header_counts_skip_the_payloads(tmp_path):
    # 12 rows of 200 KB noise images: the count reads each member's header, not the images.
    folder = tmp_path / "big"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    path = str(folder / "train-00000.tar")
    with tarfile.open(path, "w") as tar:
        for row in range(12):
            image = io.BytesIO()
            Image.fromarray(np.roll(noise, row, axis=0)).save(image, "PNG")
            add_tar_member(tar, f"{row:06d}.png", image.getvalue())
            add_tar_member(tar, f"{row:06d}.txt", b"a caption")
    before = bytes_read()
    assert count_tar_rows(path) == 12
    read = bytes_read() - before
    assert read < os.path.getsize(path) / 20, (read, os.path.getsize(path))


def test_written_shards_carry_their_index_and_a_null_title_is_no_caption(tmp_path, demo_dir):
    data = tmp_path / "catalogue"
    data.mkdir()
    os.symlink(os.path.join(demo_dir, "images"), data / "images")
    for name in ("val_data.json", "test_data.json"):
        shutil.copy(os.path.join(demo_dir, name), data / name)
    lines = (Path(demo_dir) / "train_data.json").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines[:10]]
    records[3]["product_title"] = None
    (data / "train_data.json").write_text("".join(json.dumps(record) + "\n" for record in records))
    out = str(tmp_path / "shards")
    paths = write_webdataset_shards(str(data), out, "train", rows_per_shard=4)
    assert indexed_counts(paths) == [count_tar_rows(path) for path in paths] == [4, 4, 2]
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert "00000003.jpg" in names and "00000003.txt" not in names  # (it used to hold the text "None")


def refuse_writes_in(folder, monkeypatch):
    """`folder` read-only: its mode, and where the tests run as root (whom a mode does not stop), the refusal a
    read-only mount gives everyone."""
    import tempfile

    import clip_accel.config as config_module

    os.chmod(folder, 0o555)
    mkstemp = tempfile.mkstemp

    def refusing(*args, dir=None, **kwargs):
        if os.path.realpath(dir) == os.path.realpath(folder):
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(config_module.tempfile, "mkstemp", refusing)


def test_a_read_only_shard_folder_or_cache_folder_is_named_with_what_to_do(tmp_path, monkeypatch, capsys):
    from conftest import user_error

    folder = tmp_path / "shards"
    write_shards(str(folder), [5, 5])
    refuse_writes_in(folder, monkeypatch)
    error = user_error(capsys, main, ["index-shards", str(folder)])
    assert "cannot be written (Permission denied): write the index elsewhere with --output FILE" in error
    main(["index-shards", str(folder), "--output", str(tmp_path / "train.shardindex.json")])  # the way out works
    assert json.loads((tmp_path / "train.shardindex.json").read_text())["shardlist"]
    cache = tmp_path / "cache"
    cache.mkdir()
    refuse_writes_in(cache, monkeypatch)
    with pytest.raises(ValueError, match=r"--shard_cache_dir '.*/cache' cannot be written .*node's own disk"):
        streaming_loader(str(folder), shard_cache_dir=str(cache))


# datasets' split keywords (datasets.data_files.SPLIT_KEYWORDS), as shard name prefixes
SPLIT_PREFIXES = {
    "train": ["train", "training"],
    "validation": ["validation", "valid", "dev", "val"],
    "test": ["test", "testing", "eval", "evaluation"],
}


def test_a_local_folder_and_remote_shards_name_their_splits_alike_by_datasets_keywords(tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    for prefix in [prefix for prefixes in SPLIT_PREFIXES.values() for prefix in prefixes]:
        write_shards(str(folder), [1], split=prefix)
    local = local_tar_splits(str(folder))
    main(["index-shards", str(folder)])  # one index per split, named after it: training-* and train-* together
    assert sorted(name for name in os.listdir(folder) if name.endswith(".json")) == [
        f"{split}.shardindex.json" for split in ("test", "train", "validation")
    ]
    no_shard_read(monkeypatch)
    assert ShardSource(stream_config(str(folder))).shards("train").counts() == [1, 1]
    prefixes = ",".join(prefix for prefixes in SPLIT_PREFIXES.values() for prefix in prefixes)
    remote = remote_splits("https://host/data/{" + prefixes + "}-00000.tar")[0]
    for found in (local, remote):
        by_split = {
            split: sorted(shard.rsplit("/", 1)[1].split("-")[0] for shard in shards) for split, shards in found.items()
        }
        assert by_split == {split: sorted(prefixes) for split, prefixes in SPLIT_PREFIXES.items()}
    # Folders below the location name a split too (the file name first), and several patterns share their folder.
    pattern = "https://host/data/{train,dev}/shard-{0..1}.tar::https://host/data/eval/shard-0.tar"
    assert {split: len(urls) for split, urls in remote_splits(pattern)[0].items()} == {
        "train": 2,
        "validation": 2,
        "test": 1,
    }
    found = remote_splits("s3://bucket/data/{training/validation-0,training/train-0}.tar")[0]
    assert found == {
        "validation": ["s3://bucket/data/training/validation-0.tar"],
        "train": ["s3://bucket/data/training/train-0.tar"],
    }


def test_shards_naming_no_split_are_training_data_alone_and_an_error_beside_named_ones(tmp_path):
    # img2dataset's 00000.tar, 00001.tar: the training split, local or remote.
    assert list(remote_splits("https://host/data/{00000..00001}.tar")[0]) == ["train"]
    folder = tmp_path / "shards"
    write_shards(str(folder), [2], split="train")
    write_shards(str(folder), [2], split="holdout")  # neither trained on nor dropped in silence
    for where, read in ((str(folder), local_tar_splits), ("https://host/{train,holdout}-00000.tar", remote_splits)):
        with pytest.raises(ValueError, match=r"holdout-00000.tar names no split .*train-\*.tar, validation-\*.tar"):
            read(where)


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_members_with_long_names_are_counted_and_read_in_pax_and_gnu_tars(tmp_path, tar_format):
    # Python's tarfile writes a name over 100 characters in a PAX header (its default) or a GNU long-name one.
    folder = str(tmp_path / "shards")
    long = f"{'k' * 60}/{'n' * 50}-"  # (members named KEY.jpg: 120 characters, the key with its folder)
    items = write_shards(folder, [40, 8], key_prefix=long, tar_format=tar_format)
    main(["index-shards", folder])
    index = json.loads((tmp_path / "shards" / "train.shardindex.json").read_text())
    assert [entry["nsamples"] for entry in index["shardlist"]] == [40, 8]
    stream = ShardSource(stream_config(folder)).shards("train")
    assert stream.column_names() == ["jpg", "txt", "json"] and stream.first_row()["__key__"] == f"{long}000000"
    assert sorted(read_caption_ids(streaming_loader(folder), 12)) == items  # 48 rows: 12 batches of 4


def test_a_tar_header_kind_the_reader_does_not_take_is_named(tmp_path):
    folder = tmp_path / "shards"
    write_shards(str(folder), [3], tar_format=tarfile.GNU_FORMAT)
    path = folder / "train-00000.tar"
    data = bytearray(path.read_bytes())
    data[156:157] = b"S"  # (the first member made a GNU sparse file, which holds its data in pieces)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00000.tar: the member at byte 0 is a GNU sparse file \('S'\)"):
        count_tar_rows(str(path))
    with pytest.raises(ValueError, match=r"GNU sparse file \('S'\), which clip_accel's tar reader does not take"):
        next(TarShards([str(path)]).rows(0))


def set_index_count(index: Path, shard: int, rows: int) -> None:
    """Make the shard index say `rows` for its `shard`-th shard."""
    written = json.loads(index.read_text())
    written["shardlist"][shard]["nsamples"] = rows
    index.write_text(json.dumps(written))


@pytest.mark.parametrize("says", [9, 14], ids=["too-low", "too-high"])
def test_an_index_count_that_disagrees_with_its_shard_stops_the_stream_naming_both(tmp_path, says):
    # Slots are cut from the index's counts: a wrong one trained some rows twice or never, "0 skipped".
    folder = tmp_path / "shards"
    write_shards(str(folder), [12, 8])
    main(["index-shards", str(folder)])
    set_index_count(folder / "train.shardindex.json", 0, says)
    loader = streaming_loader(str(folder))
    message = rf"train-00000.tar holds 12 rows, and .*/train.shardindex.json says {says}: .*`clip-accel index-shards"
    with pytest.raises(ValueError, match=message):
        read_caption_ids(loader, 2 * len(loader))


def test_img2dataset_successes_that_disagree_with_the_shard_stop_the_stream_naming_the_stats_file(tmp_path):
    folder = tmp_path / "img2dataset"
    folder.mkdir()
    for shard, (rows, first) in enumerate([(9, 0), (7, 9)]):
        write_img2dataset_shard(str(folder), shard, rows, first)
    (folder / "00001_stats.json").write_text(json.dumps({"count": 8, "successes": 5}))
    loader = streaming_loader(str(folder))
    message = r"00001.tar holds 7 rows, and .*/00001_stats.json \(img2dataset's `successes`\) says 5: .*--shard_index"
    with pytest.raises(ValueError, match=message):
        read_caption_ids(loader, 2 * len(loader))


def test_shards_of_one_name_in_two_folders_are_counted_each_by_its_own_path(tmp_path, monkeypatch):
    # partA/train-00000.tar and partB/train-00000.tar: an index keyed by base name gave one's count to both.
    folder = tmp_path / "shards"
    items = write_shards(str(folder / "partA"), [5]) + write_shards(str(folder / "partB"), [11], first=5)
    write_shard_index(str(folder / "partA" / "train.shardindex.json"), [str(folder / "partA" / "train-00000.tar")], [5])
    assert ShardSource(stream_config(str(folder))).shards("train").counts() == [5, 11]  # (partA's index: not all)
    main(["index-shards", str(folder)])
    index = json.loads((folder / "train.shardindex.json").read_text())
    urls = [(entry["url"], entry["nsamples"]) for entry in index["shardlist"]]
    assert urls == [("partA/train-00000.tar", 5), ("partB/train-00000.tar", 11)]
    no_shard_read(monkeypatch)
    assert ShardSource(stream_config(str(folder))).shards("train").counts() == [5, 11]  # the index beside them all
    given = stream_config(str(folder), shard_index=str(folder / "train.shardindex.json"))
    assert ShardSource(given).shards("train").counts() == [5, 11]
    assert sorted(read_caption_ids(streaming_loader(str(folder)), 4)) == items
