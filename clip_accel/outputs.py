"""What a finished run leaves in OUTPUT/ beside the best model: the result files, the pictures, the results table."""

from __future__ import annotations

import json
import logging
import os

from .plots import plot_recall_bars, plot_training_curves
from .results import format_results_table, with_starting_model
from .trainer import TrainingResult

logger = logging.getLogger(__name__)
RESULT_FILES = ("eval_results.json", "log_history.json", "training_config.json")


def write_outputs(output_dir: str, result: TrainingResult) -> None:
    """eval_results.json, log_history.json, training_config.json, the two pictures; logs the results table.
    Call it on the main process only."""
    contents = (result.metrics, result.history, result.resolved_config)
    for name, content in zip(RESULT_FILES, contents, strict=True):
        with open(os.path.join(output_dir, name), "w") as handle:
            json.dump(content, handle, indent=2)
    metrics = result.metrics
    plot_recall_bars(
        with_starting_model(metrics, {"fine-tuned": metrics["test"]}),
        os.path.join(output_dir, "recall_at_k.png"),
        title="Test recall@K",
    )
    plot_training_curves(result.history, os.path.join(output_dir, "training_curves.png"))
    rows = with_starting_model(metrics, {"fine-tuned (validation)": metrics["validation"]})
    rows["fine-tuned (test)"] = metrics["test"]
    for size, figures in metrics["test"].get("matryoshka", {}).items():  # --matryoshka_dims' smaller sizes
        rows[f"fine-tuned (test, first {size} dims)"] = figures
    logger.info("Results\n" + format_results_table(rows))
