"""`clip-accel env`: what a bug report needs, as `accelerate env` and `transformers env` print it.

Versions (clip_accel, Python, the OS, torch with its CUDA, cuDNN and CPU kernels, and the libraries clip_accel
runs on), the GPUs torch sees and the variables that choose them (`CUDA_VISIBLE_DEVICES`, `NCCL_*`), Accelerate's
default config, the cache folders, and whether a Hub token is set: never the token itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

LIBRARIES = ("transformers", "accelerate", "datasets", "huggingface_hub", "peft", "safetensors", "tokenizers")


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def report() -> dict[str, str]:
    """The report's fields, in the order they print."""
    from accelerate.commands.config import default_config_file
    from huggingface_hub import constants, get_token

    fields = {
        "clip_accel": version_of("clip_accel"),
        "Python": f"{platform.python_version()} ({sys.executable})",
        "OS": f"{platform.platform()} ({platform.machine()})",
        "torch": torch.__version__,
        "CUDA (torch built with)": torch.version.cuda or "none (a CPU build)",
        "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "CPU kernels (ATen capability)": torch.backends.cpu.get_cpu_capability(),
        "CPU": f"{cpu_model()}, {os.cpu_count()} cores",
    }
    fields.update({name: version_of(name) for name in LIBRARIES})
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = [f"{index}: {torch.cuda.get_device_name(index)}" for index in range(count)]
    fields["GPUs seen"] = "; ".join(gpus) if gpus else "none"
    fields["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "(not set)")
    nccl = {name: value for name, value in sorted(os.environ.items()) if name.startswith("NCCL_")}
    fields["NCCL_* variables"] = ", ".join(f"{name}={value}" for name, value in nccl.items()) or "(none set)"
    if os.path.isfile(default_config_file):
        with open(default_config_file) as handle:
            config = handle.read().strip().replace("\n", "; ")
        fields["Accelerate default config"] = f"{default_config_file}: {config}"
    else:
        fields["Accelerate default config"] = f"none ({default_config_file} does not exist)"
    fields["Hub cache"] = constants.HF_HUB_CACHE
    fields["datasets cache"] = os.environ.get("HF_DATASETS_CACHE", os.path.join(constants.HF_HOME, "datasets"))
    fields["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE", "(not set)")
    fields["Hub token"] = "set" if get_token() else "not set"
    return fields


def format_report(fields: dict[str, str]) -> str:
    lines = ["Copy-and-paste the text below in your bug report (it holds no token).", ""]
    return "\n".join(lines + [f"- {name}: {value}" for name, value in fields.items()])
