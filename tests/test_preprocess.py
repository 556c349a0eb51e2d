"""The cached preprocessing pass: uint8 pixels, unpadded tokens, bad rows marked, and a cache that is reused."""

from __future__ import annotations

import io

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from clip_accel.data import preprocess
from clip_accel.data.preprocess import load_rgb_image, preprocess_split
from clip_accel.data.sources import RAW_FEATURES, RawSplit


def _raw(tmp_path, images: list, captions: list[str], name: str = "train") -> RawSplit:
    paths = []
    for index, image in enumerate(images):
        path = tmp_path / f"{name}-{index}.img"
        if isinstance(image, bytes):
            path.write_bytes(image)
        elif image is not None:
            image.save(path, format="PNG" if image.mode in ("P", "RGBA", "L", "I;16") else "JPEG")
        paths.append(str(path))
    rows = {"image": paths, "caption": captions, "label": ["x"] * len(paths), "source_row": list(range(len(paths)))}
    return RawSplit(name, datasets.Dataset.from_dict(rows, features=RAW_FEATURES), f"fp-{name}-{len(paths)}")


def test_pixels_are_uint8_at_model_resolution_and_tokens_unpadded(tmp_path, offline_tokenizer):
    raw = _raw(
        tmp_path,
        [Image.new("RGB", (60, 40), "red"), Image.new("RGB", (40, 90), "blue")],
        ["red striped kurta", " ".join(["red"] * 150)],
    )
    cached = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))
    assert cached.features["pixel_values"].feature.dtype == "uint8"
    first = np.asarray(cached[0]["pixel_values"], dtype=np.uint8).reshape(16, 16, 3)
    assert (np.abs(first.astype(int) - [254, 0, 0]) <= 2).all()
    short, long = cached[0]["input_ids"], cached[1]["input_ids"]
    assert short == offline_tokenizer("red striped kurta")["input_ids"]
    assert len(long) == 77 and long[-1] == offline_tokenizer.eos_token_id
    assert cached["skip_reason"] == ["", ""]


def test_a_second_identical_run_reuses_the_cache_and_decodes_nothing(tmp_path, offline_tokenizer, monkeypatch):
    raw = _raw(tmp_path, [Image.new("RGB", (30, 30), "green")] * 3, ["a", "b", "c"])
    first = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded on a cached run")

    monkeypatch.setattr(preprocess.Image, "open", refuse)
    again = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))
    assert again.cache_files == first.cache_files
    assert again["pixel_values"] == first["pixel_values"]


def test_cache_is_not_reused_when_resolution_tokenizer_or_rows_change(tmp_path, offline_tokenizer):
    from clip_accel.tokenizer import build_offline_tokenizer

    raw = _raw(tmp_path, [Image.new("RGB", (30, 30), "green")] * 2, ["a kurta", "b kurta"])
    base = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache")).cache_files
    other_size = preprocess_split(raw, offline_tokenizer, 8, str(tmp_path / "cache")).cache_files
    other_tokenizer = preprocess_split(raw, build_offline_tokenizer(["zzz"]), 16, str(tmp_path / "cache")).cache_files
    changed_rows = RawSplit(raw.name, raw.dataset, raw.fingerprint + "-edited")
    other_rows = preprocess_split(changed_rows, offline_tokenizer, 16, str(tmp_path / "cache")).cache_files
    assert len({str(files) for files in (base, other_size, other_tokenizer, other_rows)}) == 4


def test_bad_rows_are_marked_with_a_reason_and_good_rows_kept(tmp_path, offline_tokenizer):
    good = Image.new("RGB", (30, 30), "red")
    truncated = io.BytesIO()
    good.save(truncated, format="JPEG")
    raw = _raw(
        tmp_path,
        [good, b"", b"not an image at all", truncated.getvalue()[:40], None, good],
        ["ok", "empty file", "text file", "truncated", "missing file", "   "],
    )
    reasons = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))["skip_reason"]
    assert reasons[0] == ""
    assert all(reason.startswith("unreadable image") for reason in reasons[1:5]), reasons
    assert reasons[5] == "empty caption"


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_other_image_modes_are_converted_to_rgb_not_dropped(tmp_path, mode):
    colour = (200, 30, 30)
    image = Image.new("RGB", (20, 24), colour)
    if mode == "I;16":  # 16-bit greyscale: 8-bit grey value g stored as g * 256
        image = image.convert("L").convert("I").point(lambda value: value * 256).convert("I;16")
        colour = (Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0)),) * 3
    elif mode == "L":
        image = image.convert("L")
        colour = (image.getpixel((0, 0)),) * 3
    else:
        image = image.convert(mode)
    path = tmp_path / "img.tiff"
    image.save(path)
    pixels = load_rgb_image(str(path), 8)
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - colour).max() <= 8, pixels[0, 0]  # palette dithering moves a few levels


def test_transparency_becomes_white_as_in_clip_processor(tmp_path):
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 5, 10))
    image.save(tmp_path / "cutout.png")
    pixels = load_rgb_image(str(tmp_path / "cutout.png"), 10)
    assert pixels[0, 9].tolist() == [255, 255, 255] and pixels[0, 0].tolist() == [0, 0, 255]


def test_training_keeps_the_fast_jpeg_decode_and_evaluation_splits_get_exact_pixels(
    monkeypatch, demo_dir, offline_tokenizer, tmp_path
):
    from accelerate import Accelerator

    import clip_accel.data as data
    from clip_accel.config import DataConfig

    drafts = {}
    real = data.preprocess_split

    def recording(raw, *args, draft=True, **kwargs):
        drafts[raw.name] = draft
        return real(raw, *args, draft=draft, **kwargs)

    monkeypatch.setattr(data, "preprocess_split", recording)
    config = DataConfig(data_dir=demo_dir, cache_dir=str(tmp_path / "cache"))
    accelerator = Accelerator(cpu=True)
    raw = data.load_raw_splits(accelerator, config)
    data.build_pair_datasets(accelerator, config, raw, offline_tokenizer, 16)
    assert drafts == {raw["train"].name: True, raw["validation"].name: False, raw["test"].name: False}


def test_each_caption_template_gets_its_own_cache_with_its_captions_and_caption_ids(tmp_path, demo_dir):
    from clip_accel.config import DataConfig
    from clip_accel.data import load_raw_split
    from clip_accel.data.preprocess import caption_id
    from clip_accel.tokenizer import build_offline_tokenizer

    templates = (None, "{product_title}, by {brand}", "{product_title} ({class_label})")
    raws = {t: load_raw_split(DataConfig(data_dir=demo_dir, caption_template=t), "test", 6) for t in templates}
    # One tokenizer for all: only the template tells the caches apart.
    tokenizer = build_offline_tokenizer([c for raw in raws.values() for c in raw.dataset["caption"]])
    caches = {}
    for template, raw in raws.items():
        captions = list(raw.dataset["caption"])
        cached = preprocess_split(raw, tokenizer, 16, str(tmp_path / "cache"))
        assert list(cached["caption"]) == captions
        assert list(cached["input_ids"]) == tokenizer(captions, truncation=True, max_length=77)["input_ids"]
        assert list(cached["caption_id"]) == [caption_id(ids) for ids in cached["input_ids"]]
        caches[template] = cached.cache_files[0]["filename"]
    assert len(set(caches.values())) == 3


def test_the_compact_cache_holds_one_small_jpeg_per_image_close_to_the_uint8_pixels(tmp_path, offline_tokenizer):
    from clip_accel.data.loader import PairDataset

    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(90, 160, (50, 40, 3), dtype=np.uint8)).filter(ImageFilter.SMOOTH_MORE)]
    photos += [Image.new("RGB", (40, 60), "blue"), b"not an image", Image.new("RGB", (60, 40), "red")]
    raw = _raw(tmp_path, photos, ["a kurta", "a saree", "a broken file", "a red kurta"])
    uint8 = preprocess_split(raw, offline_tokenizer, 32, str(tmp_path / "cache"))
    compact = preprocess_split(raw, offline_tokenizer, 32, str(tmp_path / "cache"), cache_format="jpeg")
    assert compact.cache_files != uint8.cache_files
    assert compact.features["pixel_values"].dtype == "binary" and compact["pixel_values"][2] == b""
    assert compact["skip_reason"] == uint8["skip_reason"] and compact["skip_reason"][2].startswith("unreadable")
    assert all(len(data) < 32 * 32 * 3 / 2 for data in compact["pixel_values"])
    pairs = {
        name: PairDataset(cached, offline_tokenizer.pad_token_id) for name, cached in (("u", uint8), ("j", compact))
    }
    assert len(pairs["j"]) == len(pairs["u"]) == 3
    batches = {name: dataset.__getitems__([0, 1, 2]) for name, dataset in pairs.items()}
    assert batches["j"]["pixel_values"].shape == batches["u"]["pixel_values"].shape == (3, 32, 32, 3)
    error = (batches["j"]["pixel_values"].int() - batches["u"]["pixel_values"].int()).abs().float().mean()
    assert 0 < error < 3
    assert torch.equal(batches["j"]["input_ids"], batches["u"]["input_ids"])


def test_the_compact_cache_refuses_siglip2_patch_sequences(tmp_path, offline_tokenizer):
    raw = _raw(tmp_path, [Image.new("RGB", (30, 30), "green")], ["a kurta"])
    layout = preprocess.ImageLayout("patches", patch_size=8, max_num_patches=16)
    with pytest.raises(ValueError, match="--cache_format jpeg stores square images"):
        preprocess_split(raw, offline_tokenizer, layout, str(tmp_path / "cache"), cache_format="jpeg")


def test_captions_the_text_tower_cannot_tell_apart_share_a_caption_id(tmp_path, offline_tokenizer):
    # The tokenizer lowercases and folds whitespace, and truncation keeps the first 77 tokens: these read the same
    # to the model, so the loss must not make one of them a negative of the other's image.
    long = " ".join(["red"] * 100)
    captions = ["Red striped kurta", "red  striped   KURTA", long, long + " saree", "red striped saree"]
    raw = _raw(tmp_path, [Image.new("RGB", (30, 30), "green")] * len(captions), captions)
    ids = preprocess_split(raw, offline_tokenizer, 16, str(tmp_path / "cache"))["caption_id"]
    assert ids[0] == ids[1] and ids[2] == ids[3] and len({ids[0], ids[2], ids[4]}) == 3


@pytest.mark.slow
def test_ctrl_c_during_a_multi_process_pass_exits_130_with_one_line_and_leaves_no_temporary_file(tmp_path, demo_dir):
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from launching import CPU_ENV, ROOT

    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(demo_dir, data)
    # Every training row shows one large noisy PNG (no draft decode): a pass of minutes, interrupted in its first.
    noise = np.random.default_rng(0).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(data / "large.png")
    rows = [json.loads(line) for line in (data / "train_data.json").read_text().splitlines()]
    (data / "train_data.json").write_text(
        "".join(json.dumps({**row, "image_path": "large.png"}) + "\n" for row in rows * 10)
    )
    command = [sys.executable, "-m", "clip_accel", "train", "--data_dir", str(data), "--scratch_config", "clip-tiny"]
    command += ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(cache), "--preprocessing_num_workers", "2"]
    with open(tmp_path / "log", "w") as log:  # (a terminal's Ctrl-C reaches the whole process group)
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=CPU_ENV,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 120
        while not (cache.is_dir() and any(name.startswith("tmp") for name in os.listdir(cache))):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(1)  # the workers are writing the cache
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=60)
    output = (tmp_path / "log").read_text()
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "TimeoutError" not in output
    assert len([line for line in output.splitlines() if "Interrupted" in line]) == 1
    assert not [name for name in os.listdir(cache) if name.startswith("tmp")]
