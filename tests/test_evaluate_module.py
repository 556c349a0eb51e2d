"""The `evaluate` module in evaluate_modules/retrieval_recall loads offline and gives clip_accel.metrics' numbers."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

evaluate = pytest.importorskip("evaluate", reason="the evaluate module needs: pip install 'clip-accel[evaluate]'")

from clip_accel.metrics import retrieval_metrics  # noqa: E402

MODULE_DIR = Path(__file__).resolve().parents[1] / "evaluate_modules" / "retrieval_recall"


def _pairs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated, un-normalised float32 pairs so ranks spread out and normalisation matters."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, d, generator=generator) * 3
    texts = images + 2.5 * torch.randn(n, d, generator=generator)
    return images, texts


@pytest.fixture(scope="module")
def recall_metric():
    return evaluate.load(str(MODULE_DIR))


def test_compute_matches_clip_accel(recall_metric):
    images, texts = _pairs(40, 8, seed=0)
    got = recall_metric.compute(image_embeds=images.tolist(), text_embeds=texts.tolist())
    expected = retrieval_metrics(F.normalize(images, dim=-1), F.normalize(texts, dim=-1))
    assert got == expected
    assert "image_to_text_R@10" in got and 0.0 < got["image_to_text_R@1"] < 1.0


def test_add_batch_over_several_batches_matches_one_shot(recall_metric):
    images, texts = _pairs(53, 16, seed=1)
    for start in range(0, 53, 10):  # the last batch is short, as a real evaluation's is
        recall_metric.add_batch(
            image_embeds=images[start : start + 10].numpy(), text_embeds=texts[start : start + 10].numpy()
        )
    got = recall_metric.compute(ks=(1, 3, 100))
    expected = retrieval_metrics(F.normalize(images, dim=-1), F.normalize(texts, dim=-1), ks=(1, 3, 100))
    assert got == expected and got["text_to_image_R@100"] == 1.0


def test_embeddings_are_normalised_inside(recall_metric):
    # Text 1 is a longer copy of text 0's direction: by raw dot product image 0 would rank text 1 first.
    images = [[1.0, 0.0], [0.0, 1.0]]
    texts = [[1.0, 0.0], [10.0, 1.0]]
    got = recall_metric.compute(image_embeds=images, text_embeds=texts, ks=(1,))
    assert got["image_to_text_R@1"] == 1.0


def test_missing_clip_accel_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "clip_accel.metrics", None)  # as if clip-accel were not installed
    with pytest.raises(ImportError, match="pip install clip-accel"):
        runpy.run_path(str(MODULE_DIR / "retrieval_recall.py"))
