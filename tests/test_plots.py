"""Tests for clip_accel.plots: the PNGs exist, open, are big enough and actually show something."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image, ImageStat

from clip_accel.plots import plot_recall_bars, plot_training_curves

# Captured from `python scripts/train.py --config recipes/demo.yaml --num_train_epochs 2` (OUTPUT/log_history.json):
# training and evaluation records interleave, and two records can share a step.
REAL_LOG_HISTORY = json.loads("""[
 {"step": 10, "epoch": 1, "loss": 4.1124677658081055, "learning_rate": 0.0008930265473713938,
  "logit_scale": 14.244136810302734},
 {"step": 18, "epoch": 1, "eval_image_to_text_R@1": 0.035, "eval_image_to_text_R@5": 0.165,
  "eval_image_to_text_R@10": 0.245, "eval_image_to_text_mean_rank": 31.54, "eval_image_to_text_median_rank": 24.0,
  "eval_text_to_image_R@1": 0.04, "eval_text_to_image_R@5": 0.21, "eval_text_to_image_R@10": 0.375,
  "eval_text_to_image_mean_rank": 26.62, "eval_text_to_image_median_rank": 17.0, "eval_mean_R@1": 0.0375,
  "eval_num_pairs": 200},
 {"step": 20, "epoch": 2, "loss": 3.475712537765503, "learning_rate": 0.0004762090420881289,
  "logit_scale": 14.23694896697998},
 {"step": 30, "epoch": 2, "loss": 2.934432029724121, "learning_rate": 7.937323358440934e-05,
  "logit_scale": 14.238510131835938},
 {"step": 36, "epoch": 2, "loss": 2.7756099700927734, "learning_rate": 0.0, "logit_scale": 14.240214347839355},
 {"step": 36, "epoch": 2, "eval_image_to_text_R@1": 0.065, "eval_image_to_text_R@5": 0.25,
  "eval_image_to_text_R@10": 0.435, "eval_image_to_text_mean_rank": 19.175, "eval_image_to_text_median_rank": 13.0,
  "eval_text_to_image_R@1": 0.07, "eval_text_to_image_R@5": 0.315, "eval_text_to_image_R@10": 0.465,
  "eval_text_to_image_mean_rank": 18.455, "eval_text_to_image_median_rank": 11.5, "eval_mean_R@1": 0.0675,
  "eval_num_pairs": 200}
]""")


def _fake_log_history(steps: int = 300, eval_every: int = 50) -> list[dict]:
    """A longer run: warmup then cosine decay, falling loss, recall climbing at each evaluation."""
    records = []
    for step in range(10, steps + 1, 10):
        warmup = min(1.0, step / 30)
        lr = 1e-3 * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        records.append(
            {
                "step": step,
                "epoch": step // 100 + 1,
                "loss": 4.2 * math.exp(-step / 150) + 0.3,
                "learning_rate": lr,
                "logit_scale": 14.3 + step / 100,
            }
        )
        if step % eval_every == 0:
            progress = step / steps
            records.append(
                {
                    "step": step,
                    "epoch": step // 100 + 1,
                    "eval_num_pairs": 200,
                    "eval_mean_R@1": 0.0,
                    **{
                        f"eval_{direction}_R@{k}": min(1.0, progress * (0.3 + 0.1 * k))
                        for direction in ("image_to_text", "text_to_image")
                        for k in (1, 5, 10)
                    },
                }
            )
    return records


def _assert_real_png(path: str, min_width: int = 400, min_height: int = 300) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > min_width and image.height > min_height
        extrema = ImageStat.Stat(image.convert("RGB")).extrema
        assert any(low != high for low, high in extrema), "the picture is a single flat colour"


@pytest.mark.parametrize("log_history", [_fake_log_history(), REAL_LOG_HISTORY], ids=["fake", "real"])
def test_training_curves_png(log_history, tmp_path):
    path = str(tmp_path / "nested" / "curves.png")
    assert plot_training_curves(log_history, path) == path
    _assert_real_png(path, min_width=800, min_height=800)  # 8 x 8 in at 120 dpi


@pytest.mark.parametrize(
    "log_history",
    [
        [record for record in _fake_log_history() if "loss" in record],  # evaluation never ran
        [{"step": 1, "epoch": 1, "loss": 4.0, "learning_rate": 1e-3, "logit_scale": 14.3}],  # a single point
        [{"step": 5, "epoch": 1, "eval_image_to_text_R@1": 0.1, "eval_text_to_image_R@1": 0.2}],  # evaluation only
        [],  # a run that stopped before its first log
    ],
    ids=["no-eval", "single-point", "eval-only", "empty"],
)
def test_training_curves_survive_short_runs(log_history, tmp_path):
    _assert_real_png(plot_training_curves(log_history, str(tmp_path / "curves.png")))


def test_recall_bars_png(tmp_path):
    rows = {
        name: {
            f"{direction}_R@{k}": min(1.0, base * k)
            for direction in ("image_to_text", "text_to_image")
            for k in (1, 5, 10)
        }
        for name, base in (("zero-shot", 0.05), ("fine-tuned", 0.2))
    }
    path = str(tmp_path / "bars.png")
    assert plot_recall_bars(rows, path, title="demo") == path
    _assert_real_png(path)
    with Image.open(path) as image:
        assert image.width > 900 and image.height > 450  # 8 x 4 in at 120 dpi


def test_recall_bars_reject_rows_without_recall(tmp_path):
    with pytest.raises(ValueError, match="lacks"):
        plot_recall_bars({"model": {"image_to_text_R@1": 0.5}}, str(tmp_path / "bars.png"))
    with pytest.raises(ValueError, match="empty"):
        plot_recall_bars({}, str(tmp_path / "bars.png"))
