"""WiSE-FT (Wortsman et al., 2022): mix the fine-tuned weights with the starting ones, theta = (1 - w) theta_start +
w theta_finetuned, and pick the mix on held-out data. Small w keeps more of what the starting model could do
elsewhere; w = 1 is the fine-tuned model, w = 0 the starting one.

`clip-accel wise-ft` scores every mix on the in-domain validation and test splits (recall, zero-shot) and, when
given, on a second dataset of the user's (what general ability was kept); writes wise_ft.json, wise_ft.md and
wise_ft.png; and saves the chosen mix as a `from_pretrained` folder in OUTPUT/model/. The mix is chosen on the
validation splits (the test figures are reported, never used to choose), or fixed with `--save_weight`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields, replace

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel

from .config import DataConfig, UserError
from .evaluation import evaluation_splits, score, training_eval_batch_size
from .launch import check_processes
from .model import ContrastiveModel, family_of, image_layout, load_pretrained, save_model_folder, unwrap
from .plots import plot_wise_ft
from .results import markdown_table, metric_cells

logger = logging.getLogger(__name__)
MODEL_DIR = "model"


@dataclass(frozen=True)
class WiseFtOptions:
    finetuned: str  # a clip-accel output folder (or any CLIPModel folder with --base)
    weights: tuple[float, ...]
    output_dir: str
    base: str | None = None  # default: the run's model_name_or_path
    data: DataConfig | None = None  # default: the run's data
    heldout: DataConfig | None = None
    metric: str = "mean_R@1"
    heldout_metric: str = "mean_R@1"
    save_weight: float | None = None
    batch_size: int | None = None
    cache_dir: str | None = None  # the preprocessing cache for every split (default: the data's own setting)


def mix_state_dicts(start: dict, finetuned: dict, weight: float) -> dict[str, torch.Tensor]:
    """(1 - weight) start + weight finetuned for every floating tensor; other tensors (integer buffers) from the
    fine-tuned model. Weight 0 gives `start` and weight 1 `finetuned` exactly."""
    if start.keys() != finetuned.keys():
        differing = sorted(start.keys() ^ finetuned.keys())[:5]
        raise UserError(f"The two models do not have the same weights ({differing} ...): mix a run with its start.")
    mixed = {}
    for key, tuned in finetuned.items():
        if start[key].shape != tuned.shape:
            raise UserError(
                f"{key} is {tuple(start[key].shape)} in the starting model but {tuple(tuned.shape)} in the fine-tuned "
                "one: --base must be the model the run started from."
            )
        if not tuned.is_floating_point() or weight == 1:
            mixed[key] = tuned
        elif weight == 0:
            mixed[key] = start[key]
        else:
            mixed[key] = torch.lerp(start[key].float(), tuned.float(), weight).to(tuned.dtype)
    return mixed


def run_config(folder: str) -> dict:
    path = os.path.join(folder, "training_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def starting_model(options: WiseFtOptions, trained_with: dict) -> str:
    if options.base:
        return options.base
    if trained_with.get("scratch_config"):
        raise UserError(
            f"{options.finetuned} was trained from scratch: there is no starting model to mix with. WiSE-FT mixes a "
            "fine-tuned model with the pretrained one it started from."
        )
    if "model_name_or_path" not in trained_with:
        raise UserError(f"{options.finetuned} has no training_config.json: name the starting model with --base.")
    return trained_with["model_name_or_path"]


def run_data(options: WiseFtOptions, trained_with: dict) -> DataConfig:
    """The in-domain data: as given, else the run's own (training_config.json); `cache_dir` applied to it."""
    data = options.data
    if data is None:
        if not trained_with:
            raise UserError(
                f"{options.finetuned} has no training_config.json: name its data with --data_dir or --demo."
            )
        data = DataConfig(**{f.name: trained_with[f.name] for f in fields(DataConfig) if f.name in trained_with})
    return replace(data, cache_dir=options.cache_dir) if options.cache_dir else data


def wise_ft(options: WiseFtOptions) -> dict:
    """Score every mix, write the table and plot, save the chosen mix; returns what wise_ft.json holds."""
    trained_with = run_config(options.finetuned)
    base = starting_model(options, trained_with)
    data = run_data(options, trained_with)
    accelerator = Accelerator()
    check_processes(accelerator)
    if accelerator.is_fsdp2 or accelerator.distributed_type.value == "DEEPSPEED":
        raise UserError("wise-ft loads whole weights into every process: launch it on one process or under DDP.")
    finetuned, processor = load_pretrained(options.finetuned)
    start = load_pretrained(base, None if options.base else trained_with.get("open_clip_model"))[0].state_dict()
    # Copies: the state dict's tensors share the model's storage, which every mix is loaded into.
    tuned = {key: value.clone() for key, value in finetuned.state_dict().items()}
    mix_state_dicts(start, tuned, 1.0)  # the same architecture, checked before any image is decoded
    batch_size = options.batch_size or training_eval_batch_size(options.finetuned)
    layout = image_layout(finetuned, processor)
    roles, family = ("validation", "test"), family_of(finetuned.config)
    sources = {"in-domain": evaluation_splits(accelerator, data, processor, layout, batch_size, roles, family)}
    if options.heldout is not None:
        heldout = replace(options.heldout, cache_dir=options.cache_dir) if options.cache_dir else options.heldout
        sources["held-out"] = evaluation_splits(accelerator, heldout, processor, layout, batch_size, roles, family)
    for source, metric in (("in-domain", options.metric), ("held-out", options.heldout_metric)):
        splits = sources.get(source, {})
        if metric.startswith("zero_shot") and any(len(set(split.labels) - {""}) < 2 for split in splits.values()):
            raise UserError(
                f"The {source} data has no class labels (2 or more) to score {metric} with: choose a recall metric, "
                "or give the data a label column."
            )
    model = accelerator.prepare(ContrastiveModel(finetuned))
    mixes = []
    for weight in options.weights:
        weights = ContrastiveModel.from_clip_state_dict(mix_state_dicts(start, tuned, weight))
        unwrap(accelerator, model).load_state_dict(weights)
        figures = {
            f"{source}/{role}": score(accelerator, model, processor, split)
            for source, splits in sources.items()
            for role, split in splits.items()
        }
        mixes.append({"weight": weight, **figures})
        logger.info(f"w = {weight}: {_summary(figures, options)}")
    chosen = options.save_weight if options.save_weight is not None else choose(mixes, options)
    result = {
        "finetuned": options.finetuned,
        "base": base,
        "metric": options.metric,
        "heldout_metric": options.heldout_metric if options.heldout is not None else None,
        "chosen_weight": chosen,
        "chosen_by": "--save_weight" if options.save_weight is not None else _choice_rule(options),
        "mixes": mixes,
    }
    if accelerator.is_main_process:
        _write(options, result, mix_state_dicts(start, tuned, chosen), processor, unwrap(accelerator, model).clip)
    accelerator.wait_for_everyone()
    return result


def choose(mixes: list[dict], options: WiseFtOptions) -> float:
    """The weight with the best validation score: in-domain `metric`, averaged with the held-out `heldout_metric`
    when a held-out dataset is given. Ties go to the smaller weight (closer to the starting model)."""

    def validation_score(mix: dict) -> float:
        value = mix["in-domain/validation"][options.metric]
        if "held-out/validation" in mix:
            value = (value + mix["held-out/validation"][options.heldout_metric]) / 2
        return value

    best = max(validation_score(mix) for mix in mixes)
    return min(mix["weight"] for mix in mixes if validation_score(mix) == best)


def _choice_rule(options: WiseFtOptions) -> str:
    if options.heldout is None:
        return f"best in-domain validation {options.metric}"
    return f"best mean of in-domain validation {options.metric} and held-out validation {options.heldout_metric}"


def _summary(figures: dict, options: WiseFtOptions) -> str:
    parts = [f"in-domain test {options.metric} {figures['in-domain/test'][options.metric]:.4f}"]
    if "held-out/test" in figures:
        parts.append(f"held-out test {options.heldout_metric} {figures['held-out/test'][options.heldout_metric]:.4f}")
    return ", ".join(parts)


COLUMNS = (("mean R@1", "mean_R@1"), ("I2T R@1", "image_to_text_R@1"), ("T2I R@1", "text_to_image_R@1"))
COLUMNS += (("ZS top-1", "zero_shot_top1"),)


def format_table(result: dict) -> str:
    """One row per mix: in-domain test figures, then held-out test figures when measured; the chosen mix marked."""
    sources = [name for name in ("in-domain/test", "held-out/test") if name in result["mixes"][0]]
    headers = ["w", *(f"{source.split('/')[0]} {title}" for source in sources for title, _ in COLUMNS)]
    rows = []
    for mix in result["mixes"]:
        mark = " (chosen)" if mix["weight"] == result["chosen_weight"] else ""
        cells = [cell for source in sources for cell in metric_cells(mix[source], COLUMNS)]
        rows.append([f"{mix['weight']:g}{mark}", *cells])
    return markdown_table(headers, rows)


def _write(options: WiseFtOptions, result: dict, chosen: dict, processor, clip: PreTrainedModel) -> None:
    os.makedirs(options.output_dir, exist_ok=True)
    with open(os.path.join(options.output_dir, "wise_ft.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    table = format_table(result)
    with open(os.path.join(options.output_dir, "wise_ft.md"), "w") as handle:
        handle.write(
            f"# WiSE-FT: {result['finetuned']} mixed with {result['base']}\n\n"
            "theta = (1 - w) theta_start + w theta_finetuned; test-split figures below. "
            f"Chosen w = {result['chosen_weight']:g} ({result['chosen_by']}), saved in {MODEL_DIR}/.\n\n{table}\n"
        )
    plot_wise_ft(result, os.path.join(options.output_dir, "wise_ft.png"))
    folder = os.path.join(options.output_dir, MODEL_DIR)
    save_model_folder(clip, processor, folder, chosen)  # the wrapped CLIPModel, with the chosen mix's weights
    logger.info("\n" + table)
