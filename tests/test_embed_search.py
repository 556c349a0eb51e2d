"""clip-accel embed and search: a split or an image folder to an embeddings file; text/image queries against it."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import user_error
from launching import CPU_ENV, TORCHRUN_2
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from clip_accel.cli import embed_main, search_main
from clip_accel.embedding import load_embeddings
from clip_accel.search import QueryEncoder, search, top_k

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _embed(argv):
    try:
        embed_main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, tiny_pretrained_dir, demo_dir):
    """The demo test split embedded with the tiny trained model, in both formats."""
    root = tmp_path_factory.mktemp("embed")
    common = ["--model_name_or_path", tiny_pretrained_dir, "--data_dir", demo_dir, "--cache_dir", str(root / "cache")]
    for name in ("emb.parquet", "emb.safetensors"):
        _embed([*common, "--split", "test", "--output_file", str(root / name)])
    return root


def test_both_formats_hold_the_same_rows_ids_and_vectors(embedded, demo_dir):
    parquet, safetensors = (
        load_embeddings(str(embedded / "emb.parquet")),
        load_embeddings(str(embedded / "emb.safetensors")),
    )
    assert len(parquet) == 45 and parquet.ids[0] == "images/test/0.jpeg"
    assert parquet.ids == safetensors.ids and parquet.captions == safetensors.captions
    assert parquet.labels == safetensors.labels and None not in parquet.labels
    assert torch.equal(parquet.image_embeds, safetensors.image_embeds)
    assert torch.equal(parquet.text_embeds, safetensors.text_embeds)
    with open(os.path.join(demo_dir, "test_data.json")) as handle:
        rows = [json.loads(line) for line in handle]
    assert parquet.captions == [row["product_title"] for row in rows]


def test_the_vectors_are_what_from_pretrained_and_the_processor_give(embedded, tiny_pretrained_dir, demo_dir):
    stored = load_embeddings(str(embedded / "emb.parquet"))
    model, processor = (
        CLIPModel.from_pretrained(tiny_pretrained_dir),
        CLIPProcessor.from_pretrained(tiny_pretrained_dir),
    )
    images = [Image.open(os.path.join(demo_dir, path)) for path in stored.ids[:6]]
    inputs = processor(text=stored.captions[:6], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(stored.image_embeds[:6], out.image_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stored.text_embeds[:6], out.text_embeds, rtol=1e-4, atol=1e-5)


def test_each_caption_finds_its_own_image_in_the_top_5_at_the_rate_r_at_5_says(embedded, tiny_pretrained_dir):
    stored = load_embeddings(str(embedded / "emb.parquet"))
    queries = QueryEncoder(tiny_pretrained_dir).texts(stored.captions)
    torch.testing.assert_close(queries, stored.text_embeds, rtol=1e-4, atol=1e-5)
    hits = search(stored, queries, k=5)
    found = sum(row in [hit.row for hit in row_hits] for row, row_hits in enumerate(hits)) / len(stored)
    with open(os.path.join(tiny_pretrained_dir, "eval_results.json")) as handle:
        recall = json.load(handle)["test"]["text_to_image_R@5"]
    assert 0 < recall < 1 and found == pytest.approx(recall, abs=1 / len(stored) + 1e-9)


def test_chunked_top_k_is_the_exact_top_k():
    generator = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(1000, 16, generator=generator), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(7, 16, generator=generator), dim=1)
    scores, index = top_k(rows, queries, 10, chunk_rows=64)
    expected_scores, expected_index = (queries @ rows.T).topk(10, dim=1)
    assert torch.equal(index, expected_index) and torch.allclose(scores, expected_scores)


def test_search_command_prints_hits_and_draws_a_contact_sheet(embedded, demo_dir, capsys):
    image = os.path.join(demo_dir, "images", "test", "3.jpeg")
    sheet, found = embedded / "sheet.png", embedded / "hits.json"
    argv = [str(embedded / "emb.parquet"), "--text", "red saree", "--image", image, "--top_k", "3"]
    search_main([*argv, "--contact_sheet", str(sheet), "--output_file", str(found)])
    printed = capsys.readouterr().out
    assert "query: red saree" in printed and len(re.findall(r"^ +\d\. \d\.\d{4}  images/test/", printed, re.M)) == 6
    results = json.loads(found.read_text())
    assert results[1]["hits"][0]["id"] == "images/test/3.jpeg"  # an image finds itself first
    with Image.open(sheet) as drawn:
        assert drawn.size[1] > 2 * 128


def test_an_image_folder_embeds_its_images_and_skips_a_broken_file(tmp_path, tiny_pretrained_dir, demo_dir, caplog):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for index, name in enumerate(("a.jpeg", "sub/b.jpeg")):
        Image.open(os.path.join(demo_dir, "images", "test", f"{index}.jpeg")).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "photos.safetensors"
    caplog.set_level("WARNING")
    _embed(["--model_name_or_path", tiny_pretrained_dir, "--image_folder", str(folder), "--output_file", str(out)])
    stored = load_embeddings(str(out))
    assert stored.ids == ["a.jpeg", "sub/b.jpeg"] and stored.text_embeds is None
    assert "1 rows left out" in caplog.text and "broken.png" in caplog.text
    with pytest.raises(ValueError, match="no text embeddings"):
        search(stored, stored.image_embeds[:1], against="text")


def test_bad_embed_and_search_requests_say_what_to_change(tmp_path, tiny_pretrained_dir, capsys):
    assert re.search(
        "name it \\*.parquet or \\*.safetensors",
        user_error(
            capsys,
            embed_main,
            ["--model_name_or_path", tiny_pretrained_dir, "--demo", "--output_file", str(tmp_path / "x.npy")],
        ),
    )
    with pytest.raises(SystemExit):
        search_main([str(tmp_path / "missing.parquet")])
    assert "give at least one query" in capsys.readouterr().err
    assert re.search(
        "does not exist: write it first",
        user_error(capsys, search_main, [str(tmp_path / "missing.parquet"), "--text", "saree"]),
    )


def test_search_and_evaluate_name_what_is_wrong_before_the_work(embedded, demo_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from clip_accel.cli import evaluate_main

    error = user_error(capsys, search_main, [str(tmp_path / "some.log"), "--text", "saree"])
    assert re.search(r"some.log is not an embeddings file: name the \*.parquet", error), error
    assert "--output_file" not in error.split(":")[1]
    query = [str(embedded / "emb.parquet"), "--text", "red saree"]
    assert re.search(
        r"--contact_sheet '.*' is a folder", user_error(capsys, search_main, [*query, "--contact_sheet", str(tmp_path)])
    )
    assert "query: red saree" not in capsys.readouterr().out  # stopped before the search
    search_main([*query, "--contact_sheet", str(tmp_path / "new" / "sheet.png")])  # a missing folder is made
    assert (tmp_path / "new" / "sheet.png").stat().st_size > 0
    table = pq.read_table(embedded / "emb.parquet")  # embedded with a folder since moved away
    moved = table.replace_schema_metadata({"clip_accel_model": str(tmp_path / "moved-away")})
    pq.write_table(moved, tmp_path / "moved.parquet")
    with pytest.raises(SystemExit):
        search_main([str(tmp_path / "moved.parquet"), "--text", "saree"])
    assert "moved-away, which no longer exists: name where it is now with --model_name_or_path" in (
        capsys.readouterr().err
    )
    assert re.search(
        r"holds no config.json, so it is not a model folder",
        user_error(capsys, evaluate_main, ["--model_name_or_path", demo_dir, "--data_dir", demo_dir]),
    )


@pytest.mark.slow
def test_two_processes_write_the_same_file_as_one(embedded, tiny_pretrained_dir, demo_dir, tmp_path):
    out = tmp_path / "two.parquet"
    command = [*TORCHRUN_2, "scripts/embed.py", "--model_name_or_path", tiny_pretrained_dir, "--data_dir", demo_dir]
    command += ["--per_device_eval_batch_size", "8", "--cache_dir", str(tmp_path / "cache"), "--output_file", str(out)]
    result = subprocess.run(command, cwd=REPO, env=CPU_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_embeddings(str(embedded / "emb.parquet")), load_embeddings(str(out))
    assert two.ids == one.ids and two.captions == one.captions  # 45 rows over 2 x 8: the repeated ones dropped
    torch.testing.assert_close(two.image_embeds, one.image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.text_embeds, one.text_embeds, rtol=1e-5, atol=1e-6)


def test_a_file_moved_with_its_data_folder_still_searches_and_draws_its_images(
    tmp_path, tiny_pretrained_dir, demo_dir, monkeypatch
):
    """The file holds no absolute path: images relative to the data folder, that folder relative to the file's own,
    and the model as given (here a folder named relative to the working folder)."""
    import shutil

    import pyarrow.parquet as pq
    from PIL import ImageOps

    monkeypatch.chdir(os.path.dirname(tiny_pretrained_dir))
    model = os.path.basename(tiny_pretrained_dir)
    here = tmp_path / "here"
    shutil.copytree(demo_dir, here / "catalogue")
    names = ("emb.parquet", "emb.safetensors")
    for name in names:
        argv = ["--model_name_or_path", model, "--data_dir", str(here / "catalogue"), "--split", "test"]
        _embed([*argv, "--cache_dir", str(tmp_path / "cache"), "--output_file", str(here / "out" / name)])
    written = pq.read_table(here / "out" / "emb.parquet")
    assert str(tmp_path) not in str(written.schema.metadata) and str(tmp_path) not in str(written.to_pylist())
    assert written.column("image")[0].as_py() == "images/test/0.jpeg"
    shutil.move(here, tmp_path / "elsewhere")  # the file and its data, moved together
    for name in names:
        stored = load_embeddings(str(tmp_path / "elsewhere" / "out" / name))
        assert stored.model == model  # as the user gave it
        assert stored.images[3] == str(tmp_path / "elsewhere" / "catalogue" / "images" / "test" / "3.jpeg")
        sheet, found = tmp_path / f"{name}.png", tmp_path / f"{name}.json"
        query = [
            "--image",
            stored.images[3],
            "--top_k",
            "2",
            "--contact_sheet",
            str(sheet),
            "--output_file",
            str(found),
        ]
        search_main([str(tmp_path / "elsewhere" / "out" / name), *query])
        first = json.loads(found.read_text())[0]["hits"][0]
        assert first["id"] == "images/test/3.jpeg" and first["image"] == stored.images[3]
        with Image.open(sheet) as drawn, Image.open(stored.images[3]) as image:  # the hit's thumbnail, drawn
            thumbnail = ImageOps.contain(image.convert("RGB"), (128, 128))
            cell = drawn.convert("RGB").crop((152, 8, 152 + thumbnail.width, 8 + thumbnail.height))
            assert cell.tobytes() == thumbnail.tobytes()


def test_a_file_written_with_absolute_image_paths_still_reads(embedded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(embedded / "emb.parquet")
    stored = load_embeddings(str(embedded / "emb.parquet"))
    old = table.set_column(table.column_names.index("image"), "image", pa.array(stored.images))
    old = old.replace_schema_metadata({"clip_accel_model": stored.model})  # (no image folder recorded)
    pq.write_table(old, tmp_path / "old.parquet")
    assert load_embeddings(str(tmp_path / "old.parquet")).images == stored.images
    assert all(os.path.isabs(image) and os.path.isfile(image) for image in stored.images)


def test_embed_dim_writes_the_leading_dims_renormalised_and_search_cuts_its_queries_alike(
    embedded, tiny_pretrained_dir, demo_dir, caplog, capsys
):
    import pyarrow.parquet as pq

    out = embedded / "emb-8.parquet"
    common = [
        "--model_name_or_path",
        tiny_pretrained_dir,
        "--data_dir",
        demo_dir,
        "--cache_dir",
        str(embedded / "cache"),
    ]
    caplog.set_level("WARNING")
    _embed([*common, "--split", "test", "--dim", "8", "--output_file", str(out)])
    assert "was not trained at 8 dimensions (--matryoshka_dims not set)" in caplog.text
    full, small = load_embeddings(str(embedded / "emb.parquet")), load_embeddings(str(out))
    assert small.dim == 8 and pq.read_schema(out).metadata[b"clip_accel_dim"] == b"8" and full.dim == 16
    torch.testing.assert_close(small.image_embeds, torch.nn.functional.normalize(full.image_embeds[:, :8], dim=1))
    torch.testing.assert_close(small.text_embeds, torch.nn.functional.normalize(full.text_embeds[:, :8], dim=1))
    queries = QueryEncoder(tiny_pretrained_dir).texts(small.captions[:10])  # the model's full 16 dimensions
    hits = search(small, queries, k=5)
    scores, expected = top_k(small.image_embeds, torch.nn.functional.normalize(queries[:, :8], dim=1), 5)
    assert [[hit.row for hit in row_hits] for row_hits in hits] == expected.tolist()
    torch.testing.assert_close(torch.tensor([[hit.score for hit in row_hits] for row_hits in hits]), scores)  # cosines
    assert re.search(
        "--dim 32: this model's embeddings have 16 dimensions; give a size from 1 to 16",
        user_error(capsys, _embed, [*common, "--dim", "32", "--output_file", str(embedded / "x.parquet")]),
    )
