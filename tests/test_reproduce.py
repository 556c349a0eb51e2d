"""The one-command table sweep, on the demo data with the tiny model (what CI runs)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_sweep_writes_results_with_every_row_zero_shot_and_a_picture(tmp_path):
    results = tmp_path / "RESULTS.md"
    command = [
        sys.executable,
        "scripts/reproduce_table.py",
        "--smoke",
        "--output_dir",
        str(tmp_path / "runs"),
        "--results_file",
        str(results),
        "--",
        "--max_train_samples",
        "256",
        "--max_eval_samples",
        "64",
        "--num_train_epochs",
        "1",
        "--cache_dir",
        str(tmp_path / "cache"),
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    text = results.read_text()
    for name in (
        "Zero-shot (starting model)",
        "Freeze first 6 vision layers",
        "Freeze both backbones",
        "Unfreeze all",
        "clip_accel proposal",
    ):
        assert f"| {name}" in text, name
    assert "ZS top-1" in text and "accelerate launch --config_file accelerate_configs/cpu.yaml" in text
    assert (tmp_path / "results_recall.png").stat().st_size > 10_000
    # A finished sweep is reused, not rerun.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("already finished") == 4
