"""Results tables: one definition of the columns and the cell format, used by the log, the card and RESULTS.md.

Metrics are the dicts `evaluation.evaluate_retrieval` returns and eval_results.json stores.
"""

from __future__ import annotations

from collections.abc import Sequence

# (header, eval_results.json key)
RECALL_COLUMNS = (
    ("I2T R@1", "image_to_text_R@1"),
    ("T2I R@1", "text_to_image_R@1"),
    ("I2T R@5", "image_to_text_R@5"),
    ("T2I R@5", "text_to_image_R@5"),
    ("I2T R@10", "image_to_text_R@10"),
    ("T2I R@10", "text_to_image_R@10"),
)
RANK_COLUMNS = (("I2T med. rank", "image_to_text_median_rank"), ("T2I med. rank", "text_to_image_median_rank"))
ZERO_SHOT_COLUMNS = (("ZS top-1", "zero_shot_top1"), ("ZS top-5", "zero_shot_top5"))
STARTING_MODEL = "starting model"


def with_starting_model(results: dict, rows: dict[str, dict]) -> dict[str, dict]:
    """`rows` after the starting model's test figures, when the run evaluated it (eval_results.json's "initial")."""
    starting = {STARTING_MODEL: results["initial"]["test"]} if "initial" in results else {}
    return {**starting, **rows}


def metric_cells(metrics: dict, columns: Sequence[tuple[str, str]]) -> list[str]:
    """Recall and accuracy to 4 decimals, ranks as they are, "–" where a metric is missing (e.g. no labels)."""
    cells = []
    for _, key in columns:
        value = metrics.get(key)
        cells.append("–" if value is None else f"{value:g}" if key.endswith("_rank") else f"{value:.4f}")
    return cells


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def format_results_table(rows: dict[str, dict]) -> str:
    """One row per (name -> metrics): pairs, recall@1/5/10 both ways, median ranks, and zero-shot accuracy (ZS)
    when any row has it."""
    columns = RECALL_COLUMNS + RANK_COLUMNS
    if any("zero_shot_top1" in metrics for metrics in rows.values()):
        columns += ZERO_SHOT_COLUMNS
    headers = ["Model", "Pairs", *(title for title, _ in columns)]
    body = [[name, _pairs_cell(metrics), *metric_cells(metrics, columns)] for name, metrics in rows.items()]
    return markdown_table(headers, body)


def _pairs_cell(metrics: dict) -> str:
    """The images scored, and the captions where an image has several (every caption is a query)."""
    pairs = str(metrics.get("num_pairs", ""))
    return f"{pairs} ({metrics['num_captions']} captions)" if "num_captions" in metrics else pairs
