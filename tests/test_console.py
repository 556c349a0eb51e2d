"""A quiet, readable console: at the default level one line per checkpoint and per evaluation, and one progress bar
(loss, LR, pairs/s, time left) where a terminal is attached, plain lines where not; `--log_level debug` brings
back Accelerate's and transformers' own lines and bars."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE_LINES = ("Saving current state", "Model weights saved", "Optimizer state saved", "Random states saved")


def train(tmp_path, demo_dir, model_config, *options, terminal=False) -> str:
    """`scripts/train.py` for 2 epochs of 6 steps (a checkpoint after the first); what it wrote to stderr (and
    stdout)."""
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--data_dir", demo_dir, "--scratch_config"]
    command += [model_config, "--num_train_epochs", "2", "--per_device_train_batch_size", "32", "--logging_steps", "2"]
    command += ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--overwrite_output_dir"]
    command += ["--no_eval_initial_model", *options]
    env = {key: value for key, value in os.environ.items() if not key.startswith("TQDM_")}
    if not terminal:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # (tqdm draws nothing at 0 columns)
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=child, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert process.wait(timeout=300) == 0, b"".join(chunks)[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_without_a_terminal_plain_lines_and_one_per_checkpoint(tmp_path, demo_dir, tiny_model_config_path):
    shown = train(tmp_path, demo_dir, tiny_model_config_path)
    assert not [line for line in ACCELERATE_LINES if line in shown]
    assert "Writing model shards" not in shown and "Training:" not in shown  # (no bar without a terminal)
    assert shown.count("Saved checkpoint") == 2 and shown.count(": validation ") == 2  # (each epoch end)
    assert "step 2/12 epoch 0.33: loss" in shown  # the plain line a bar would show
    debug = train(tmp_path, demo_dir, tiny_model_config_path, "--log_level", "debug")
    assert all(line in debug for line in ACCELERATE_LINES) and "Writing model shards" in debug


@pytest.mark.slow
def test_in_a_terminal_one_bar_with_loss_lr_and_pairs_per_second(tmp_path, demo_dir, tiny_model_config_path):
    shown = train(tmp_path, demo_dir, tiny_model_config_path, terminal=True)
    assert "Training:" in shown and "pairs/s" in shown and "loss " in shown and ", lr " in shown
    assert "step 2/12 epoch" not in shown  # (the bar says it)
    assert "Writing model shards" not in shown and not [line for line in ACCELERATE_LINES if line in shown]
    assert shown.count("Saved checkpoint") == 2
