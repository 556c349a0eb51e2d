"""What a finished (or improving) run writes into OUTPUT/: the model, the result files and the pictures."""

from __future__ import annotations

import json
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .evaluation import format_results_table
from .model import unwrap_clip
from .plots import plot_recall_bars, plot_training_curves

logger = get_logger(__name__)


def save_model(accelerator: Accelerator, model: torch.nn.Module, processor, output_dir: str) -> None:
    """save_pretrained (safetensors) + processor into output_dir. Written to a temporary folder first and moved
    into place file by file, so a crash mid-save leaves the previous best model readable."""
    state_dict = accelerator.get_state_dict(model)  # every process: FSDP/DeepSpeed gather here
    # A compiled model's keys carry torch.compile's wrapper prefix; the saved CLIPModel must not.
    state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
    if accelerator.is_main_process:
        staging = os.path.join(output_dir, ".staging-model")
        os.makedirs(staging, exist_ok=True)
        unwrap_clip(accelerator, model).save_pretrained(staging, state_dict=state_dict)
        processor.save_pretrained(staging)
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
    accelerator.wait_for_everyone()


def draw_pictures(output_dir: str, results: dict, history: list) -> None:
    bars = {"starting model": results["initial"]["test"]} if "initial" in results else {}
    bars["fine-tuned"] = results["test"]
    plot_recall_bars(bars, os.path.join(output_dir, "recall_at_k.png"), title="Test recall@K")
    plot_training_curves(history, os.path.join(output_dir, "training_curves.png"))


def write_outputs(output_dir: str, results: dict, history: list, resolved_config: dict) -> None:
    files = {"eval_results.json": results, "log_history.json": history, "training_config.json": resolved_config}
    for name, content in files.items():
        with open(os.path.join(output_dir, name), "w") as handle:
            json.dump(content, handle, indent=2)
    rows = {"starting model (test)": results["initial"]["test"]} if "initial" in results else {}
    rows.update({"fine-tuned (validation)": results["validation"], "fine-tuned (test)": results["test"]})
    logger.info("Results\n" + format_results_table(rows))
