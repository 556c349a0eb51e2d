"""The one-command table sweep, on the demo data with the tiny model (what CI runs)."""

from __future__ import annotations

import subprocess


def test_smoke_sweep_writes_results_with_every_row_zero_shot_and_a_picture(tmp_path, console_script):
    runs, cwd = tmp_path / "runs", tmp_path / "cwd"
    cwd.mkdir()
    extra = ["--max_train_samples", "256", "--max_eval_samples", "64", "--num_train_epochs", "1"]
    command = [console_script("clip-accel"), "reproduce", "--smoke", "--output_dir", str(runs), "--", *extra]
    command += ["--cache_dir", str(tmp_path / "cache")]
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    text = (runs / "RESULTS.md").read_text()
    for name in (
        "Zero-shot (starting model)",
        "Freeze first 6 vision layers",
        "Freeze both backbones",
        "Unfreeze all",
        "clip_accel proposal",
    ):
        assert f"| {name}" in text, name
    assert "ZS top-1" in text and "accelerate launch --cpu" in text and "-m clip_accel train" in text
    assert (runs / "results_recall.png").stat().st_size > 10_000
    assert list(cwd.iterdir()) == [], "the sweep writes only under --output_dir"
    # A finished sweep is reused, not rerun.
    again = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stderr.count("already finished") == 4
