"""Tests for clip_accel.data.demo: layout, determinism, idempotence, safety and learnable content."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_accel.data import demo
from clip_accel.data.demo import _BORDERS, _COLOURS, CLASS_LABELS, write_demo_dataset
from clip_accel.data.indo_fashion import IndoFashionFolder

SPLIT_FILES = {"train": "train_data.json", "val": "val_data.json", "test": "test_data.json"}
FIELDS = {"image_url", "image_path", "brand", "product_title", "class_label"}
NOUNS = {
    "blouse": "blouse",
    "dhoti_pants": "dhoti pants",
    "dupattas": "dupatta",
    "gowns": "gown",
    "kurta_men": "kurta",
    "leggings_and_salwars": "salwar",
    "lehenga": "lehenga",
    "mojaris_men": "mojaris",
    "mojaris_women": "mojaris",
    "nehru_jackets": "nehru jacket",
    "palazzos": "palazzos",
    "petticoats": "petticoat",
    "saree": "saree",
    "sherwanis": "sherwani",
    "women_kurta": "kurta",
}
MEN = {"kurta_men", "mojaris_men", "sherwanis", "nehru_jackets"}
SMALL = {"num_train": 6, "num_val": 3, "num_test": 2, "image_size": 32}


def _rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / SPLIT_FILES[split]).read_text(encoding="utf-8").splitlines()]


def _files(root: Path) -> dict[str, int]:
    """Every file under root with its modification time, to see whether anything was rewritten."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _pixels(root: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(root / row["image_path"]).convert("RGB"), dtype=np.int16)


def test_layout_matches_indo_fashion(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    assert write_demo_dataset(root, **SMALL) == root
    assert len(CLASS_LABELS) == len(set(CLASS_LABELS)) == 15
    for split, count in {"train": 6, "val": 3, "test": 2}.items():
        rows = _rows(root, split)
        assert len(rows) == count
        for index, row in enumerate(rows):
            assert set(row) == FIELDS and all(isinstance(value, str) and value for value in row.values())
            assert row["image_path"] == f"images/{split}/{index}.jpeg"
            assert re.fullmatch(r"https://example\.com/demo/\S+\.jpeg", row["image_url"])
            assert row["class_label"] in CLASS_LABELS
            with Image.open(root / row["image_path"]) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["test", "train", "val"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"], "no staging folder may be left behind"


def test_project_reader_reads_it(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "demo", **SMALL)
    raw = IndoFashionFolder(str(root)).read("val")
    assert len(raw.dataset) == 3
    assert raw.dataset["caption"] == [row["product_title"] for row in _rows(root, "val")]
    assert all(Path(path).is_file() for path in raw.dataset["image"])


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a, b = write_demo_dataset(tmp_path / "a", **SMALL), write_demo_dataset(tmp_path / "b", **SMALL)
    c = write_demo_dataset(tmp_path / "c", **SMALL, seed=1)
    for split, name in SPLIT_FILES.items():
        assert (a / name).read_bytes() == (b / name).read_bytes()
        for row in _rows(a, split):
            assert np.array_equal(_pixels(a, row), _pixels(b, row))
    assert (a / "train_data.json").read_bytes() != (c / "train_data.json").read_bytes()
    assert any(not np.array_equal(_pixels(a, row), _pixels(c, row)) for row in _rows(a, "train"))


def test_items_do_not_depend_on_other_counts(tmp_path: Path) -> None:
    a = write_demo_dataset(tmp_path / "a", **SMALL)
    b = write_demo_dataset(tmp_path / "b", **{**SMALL, "num_train": 9})
    assert (a / "val_data.json").read_bytes() == (b / "val_data.json").read_bytes()
    assert _rows(b, "train")[:6] == _rows(a, "train")


def test_second_call_is_noop_and_new_arguments_rewrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_demo_dataset(tmp_path / "demo", **SMALL)
    before = _files(root)
    with monkeypatch.context() as patch:
        patch.setattr(demo, "write_indo_fashion_split", lambda *a, **k: pytest.fail("a complete dataset was rewritten"))
        assert write_demo_dataset(str(root), **SMALL) == root
    assert _files(root) == before
    write_demo_dataset(root, **{**SMALL, "num_train": 4})
    assert len(_rows(root, "train")) == 4
    assert not (root / "images" / "train" / "5.jpeg").exists(), "the old dataset must be replaced, not merged"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_replaces_empty_folder_and_outdated_marker(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_rows(write_demo_dataset(empty, **SMALL), "test")) == 2
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / ".clip_accel_demo.json").write_text("{not json")
    (stale / "train_data.json").write_text("half written\n")
    write_demo_dataset(stale, **SMALL)
    assert len(_rows(stale, "train")) == 6


def test_refuses_unrelated_folder_and_leaves_it_untouched(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and is not a demo dataset"):
        write_demo_dataset(root, **SMALL)
    assert [p.name for p in root.iterdir()] == ["notes.txt"] and (root / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        write_demo_dataset(tmp_path / "afile", **SMALL)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"num_train": 0}, "num_train must be an integer >= 1"),
        ({"num_val": -3}, "num_val must be an integer >= 1"),
        ({"num_test": 2.5}, "num_test must be an integer >= 1"),
        ({"image_size": 8}, "image_size must be an integer >= 16"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_invalid_arguments_raise(tmp_path: Path, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_demo_dataset(tmp_path / "demo", **{**SMALL, **bad})
    assert not (tmp_path / "demo").exists()


def test_titles_name_the_drawn_attributes(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "demo", num_train=300, num_val=1, num_test=1, image_size=16)
    rows = _rows(root, "train")
    assert {row["class_label"] for row in rows} == set(CLASS_LABELS)
    for row in rows:
        title = row["product_title"].lower()
        words = set(re.findall(r"[a-z]+", title))
        assert len([c for c in _COLOURS if c in words]) == 1, title
        assert len([b for b in _BORDERS if b in words]) == 1, title
        assert NOUNS[row["class_label"]] in title, title
        assert ("men" in words) == (row["class_label"] in MEN), title  # "women" is a different word
        assert len(title.split()) < 25
    assert len({row["product_title"] for row in rows}) > 250, "titles should rarely repeat"


def test_plain_items_are_painted_in_their_title_colour(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "demo", num_train=80, num_val=1, num_test=1)
    checked = 0
    for row in _rows(root, "train"):
        words = set(re.findall(r"[a-z]+", row["product_title"].lower()))
        if "plain" not in words or row["class_label"].startswith("mojaris"):
            continue  # shoes are small enough for the border band to outweigh the fill
        named = next(c for c in _COLOURS if c in words)
        pixels = _pixels(root, row).reshape(-1, 1, 3)
        refs = np.array(list(_COLOURS.values()), dtype=np.int16).reshape(1, -1, 3)
        close = (np.linalg.norm(pixels - refs, axis=2) < 45).sum(axis=0)
        assert list(_COLOURS)[int(close.argmax())] == named, row["product_title"]
        checked += 1
    assert checked >= 10


def test_shared_titles_give_that_share_of_items_a_repeated_title_with_another_photo(tmp_path: Path) -> None:
    plain = write_demo_dataset(tmp_path / "plain", num_train=400, num_val=2, num_test=2, image_size=32)
    shared = write_demo_dataset(
        tmp_path / "shared", num_train=400, num_val=2, num_test=2, image_size=32, shared_titles=0.3
    )
    titles = [row["product_title"] for row in _rows(shared, "train")]
    repeated = [index for index, title in enumerate(titles) if titles.count(title) > 1]
    assert 0.25 <= len(repeated) / len(titles) <= 0.4
    pairs = [index for index in repeated if index % 2 and titles[index] == titles[index - 1]]
    assert len(pairs) > 40
    rows = _rows(shared, "train")
    for index in pairs[:10]:  # the same product (title, class, brand), another photo of it
        assert (
            rows[index]["class_label"] == rows[index - 1]["class_label"]
            and rows[index]["brand"] == rows[index - 1]["brand"]
        )
        assert not np.array_equal(_pixels(shared, rows[index]), _pixels(shared, rows[index - 1]))
    # The even items are the plain demo's, byte for byte; so is every item at the default share.
    assert _rows(shared, "train")[::2] == _rows(plain, "train")[::2]
    assert (shared / "images/train/4.jpeg").read_bytes() == (plain / "images/train/4.jpeg").read_bytes()
