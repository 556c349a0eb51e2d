"""`clip-accel env`: every field a bug report needs, and never the Hub token."""

from __future__ import annotations

import subprocess
import sys

import accelerate
import torch
import transformers

FIELDS = (
    "clip_accel", "Python", "OS", "torch", "CUDA (torch built with)", "cuDNN", "CPU kernels (ATen capability)",
    "transformers", "accelerate", "datasets", "huggingface_hub", "peft", "GPUs seen", "CUDA_VISIBLE_DEVICES",
    "NCCL_* variables", "Accelerate default config", "Hub cache", "datasets cache", "Hub token",
)  # fmt: skip


def run_env(env: dict) -> str:
    done = subprocess.run([sys.executable, "-m", "clip_accel", "env"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_env_prints_every_field_and_never_the_token(tmp_path):
    token = "hf_DoNotPrintMe0123456789abcdefgh"
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    shown = run_env({**base, "HF_TOKEN": token, "NCCL_DEBUG": "INFO", "CUDA_VISIBLE_DEVICES": "0,1"})
    fields = dict(line[2:].split(": ", 1) for line in shown.splitlines() if line.startswith("- "))
    assert set(FIELDS) <= fields.keys()
    assert token not in shown and token[3:12] not in shown
    assert fields["Hub token"] == "set"
    assert fields["torch"] == torch.__version__ and fields["transformers"] == transformers.__version__
    assert fields["accelerate"] == accelerate.__version__
    assert fields["CPU kernels (ATen capability)"] == torch.backends.cpu.get_cpu_capability()
    assert fields["NCCL_* variables"] == "NCCL_DEBUG=INFO" and fields["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert fields["Hub cache"].startswith(str(tmp_path / "hf"))
    (tmp_path / "hf").mkdir(exist_ok=True)
    assert "Hub token: not set" in run_env(base)  # (no token in HF_HOME either)
