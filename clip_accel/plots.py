"""PNG pictures of a run: training curves from OUTPUT/log_history.json, and recall bars comparing models.

Figures are drawn on matplotlib's Agg canvas directly instead of through pyplot: no display is needed, and the
caller's own pyplot backend and open figures (e.g. in a notebook) are left untouched.
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_recall_bars", "plot_training_curves", "plot_wise_ft"]

_DPI = 120
_DIRECTIONS = (("image_to_text", "I2T"), ("text_to_image", "T2I"))
_CURVE_KS = (1, 5)
_BAR_KS = (1, 5, 10)


def _new_figure(width: float, height: float, rows: int = 1):
    """An Agg-backed (figure, axes) pair."""
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas: PNG rendering with no GUI backend
    axes = figure.subplots(rows, 1, sharex=rows > 1, squeeze=False)[:, 0]
    return figure, axes


def _save(figure, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png", dpi=_DPI)
    return path


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold `key`, in log order."""
    points = [(record["step"], record[key]) for record in records if key in record and "step" in record]
    return [step for step, _ in points], [value for _, value in points]


def _draw(axis, steps: list[float], values: list[float], **style) -> None:
    # A run with one logged point would draw an invisible zero-length line: markers keep it visible.
    axis.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, **style)


def _note_empty(axis, what: str) -> None:
    axis.text(0.5, 0.5, f"no {what} records", ha="center", va="center", transform=axis.transAxes, color="grey")


def plot_training_curves(log_history: list[dict], path: str) -> str:
    """Loss, learning rate and validation R@1/R@5 (both directions) against the optimizer step, in 3 panels.

    Args:
        log_history: records as the trainer writes them to OUTPUT/log_history.json. Training records hold
            "step", "loss" and "learning_rate"; evaluation records hold "step" and "eval_{direction}_R@{k}".
            A panel with no records says so instead of failing, so a run cut short can still be drawn.
        path: where to write the PNG (its folder is created).

    Returns:
        `path`.
    """
    figure, (loss_axis, lr_axis, recall_axis) = _new_figure(8, 8, rows=3)
    for axis, key, title in ((loss_axis, "loss", "training loss"), (lr_axis, "learning_rate", "learning rate")):
        steps, values = _series(log_history, key)
        if steps:
            _draw(axis, steps, values)
        else:
            _note_empty(axis, title)
        axis.set_ylabel(title)
        axis.grid(alpha=0.3)
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _draw_validation_recall(recall_axis, log_history)
    recall_axis.set_xlabel("optimizer step")
    figure.suptitle("Training curves")
    figure.tight_layout()
    return _save(figure, path)


def _draw_validation_recall(axis, log_history: list[dict]) -> None:
    drawn = False
    # One colour per cut-off, one line style per direction: the two directions of a cut-off read as a pair.
    for colour, k in enumerate(_CURVE_KS):
        for (direction, short), linestyle in zip(_DIRECTIONS, ("-", "--"), strict=True):
            steps, values = _series(log_history, f"eval_{direction}_R@{k}")
            if steps:
                _draw(axis, steps, values, label=f"{short} R@{k}", color=f"C{colour}", linestyle=linestyle)
                drawn = True
    if drawn:
        axis.legend(loc="best", fontsize=8, ncol=2)
        axis.set_ylim(0, 1.02)
    else:
        _note_empty(axis, "evaluation")
    axis.set_ylabel("validation recall")
    axis.grid(alpha=0.3)


def plot_recall_bars(rows: dict[str, dict[str, float]], path: str, title: str = "Image-text retrieval recall") -> str:
    """Grouped bars of R@1/5/10 in both directions, one bar colour per row (e.g. "zero-shot" vs "fine-tuned").

    Args:
        rows: name -> metrics dict holding "image_to_text_R@{k}" and "text_to_image_R@{k}" for k in 1, 5, 10
            (as `clip_accel.metrics.retrieval_metrics` or eval_results.json give them).
        path: where to write the PNG (its folder is created).
        title: the figure title.

    Returns:
        `path`.
    """
    keys = [(f"{short} R@{k}", f"{direction}_R@{k}") for direction, short in _DIRECTIONS for k in _BAR_KS]
    _check_rows(rows, [key for _, key in keys])
    figure, (axis,) = _new_figure(8, 4)
    width = 0.8 / len(rows)
    for index, (name, metrics) in enumerate(rows.items()):
        # Bars of one row sit side by side inside each metric's group, centred on the group's tick.
        positions = [group + (index - (len(rows) - 1) / 2) * width for group in range(len(keys))]
        bars = axis.bar(positions, [metrics[key] for _, key in keys], width=width, label=name)
        axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axis.set_xticks(range(len(keys)), [label for label, _ in keys])
    axis.set_ylim(0, 1.12)  # headroom for the value labels above bars at 1.0
    axis.set_ylabel("recall")
    axis.set_title(title)
    axis.legend(loc="upper left", fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def _check_rows(rows: dict[str, dict[str, float]], keys: list[str]) -> None:
    if not rows:
        raise ValueError("rows is empty; pass at least one name -> metrics dict")
    for name, metrics in rows.items():
        missing = [key for key in keys if key not in metrics]
        if missing:
            raise ValueError(
                f"row {name!r} lacks {missing}; pass metrics from retrieval_metrics with "
                f"ks=(1, 5, 10) (eval_results.json has them)"
            )


def plot_wise_ft(result: dict, path: str) -> str:
    """WiSE-FT mixes (`clip_accel.wise_ft` result): held-out vs in-domain test figure, one point per mixing weight
    (a line from the starting model, w = 0, to the fine-tuned one, w = 1); without a held-out dataset, the in-domain
    figure against w. The chosen mix is ringed."""
    mixes, metric = result["mixes"], result["metric"]
    weights = [mix["weight"] for mix in mixes]
    in_domain = [mix["in-domain/test"][metric] for mix in mixes]
    figure, (axis,) = _new_figure(6, 4.5)
    if "held-out/test" in mixes[0]:
        held_out = [mix["held-out/test"][result["heldout_metric"]] for mix in mixes]
        axis.plot(in_domain, held_out, marker="o")
        for weight, x, y in zip(weights, in_domain, held_out, strict=True):
            axis.annotate(f"w={weight:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(f"in-domain test {metric}")
        axis.set_ylabel(f"held-out test {result['heldout_metric']}")
        chosen = [(x, y) for w, x, y in zip(weights, in_domain, held_out, strict=True) if w == result["chosen_weight"]]
    else:
        axis.plot(weights, in_domain, marker="o")
        axis.set_xlabel("mixing weight w (0: starting model, 1: fine-tuned)")
        axis.set_ylabel(f"in-domain test {metric}")
        chosen = [(w, y) for w, y in zip(weights, in_domain, strict=True) if w == result["chosen_weight"]]
    for x, y in chosen:
        axis.scatter(
            [x], [y], s=160, facecolors="none", edgecolors="red", label=f"chosen, w={result['chosen_weight']:g}"
        )
    if chosen:
        axis.legend(fontsize=8)
    axis.set_title("WiSE-FT: weight-space mixes of the starting and fine-tuned models")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)
