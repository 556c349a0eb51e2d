"""Checkpoints: `CheckpointManager` is the one place a run's resumable pieces are saved and restored, the
checkpoint a resume starts from is chosen (agreed by every process) and a resume is checked against the run that
wrote it.

OUTPUT/checkpoints/step-0000040/ holds `accelerator.save_state` (model as safetensors, optimizer, grad scaler,
every process's RNG state, the weight EMA) plus `trainer_state.json` (step, epoch, batches consumed in that epoch,
schedule, early-stopping state, every process's data position, log history). A rename is atomic, so a `step-*`
folder is always complete; a kill during a save leaves only a `.staging-*` folder, ignored and replaced next time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Protocol

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from .config import DataConfig, ModelConfig, TrainConfig, UserError

logger = get_logger(__name__)
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where the loop is. Everything a resumed run needs beyond what `accelerator.save_state` keeps."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    initial: dict = field(default_factory=dict)  # the starting model's test metrics
    unlogged_losses: list = field(default_factory=list)  # losses of the current logging interval so far
    history: list = field(default_factory=list)
    # Written by CheckpointManager.save, read back by its restore (the loop never touches them):
    early_stopping: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    stream: list = field(default_factory=list)  # every process's data position (a stream's: data.streaming)
    sharded: bool = False  # written under FSDP2 (a sharded model and optimizer)
    num_processes: int = 1
    settings: dict = field(default_factory=dict)  # what a resume depends on (`resume_settings`)


class Stateful(Protocol):
    """What the checkpoint manager saves and restores (torch.distributed.checkpoint's protocol)."""

    def state_dict(self): ...

    def load_state_dict(self, state) -> None: ...


class CheckpointManager:
    """Saves and restores every resumable piece of a run, and nothing else does.

    Model, optimizer, grad scaler, every process's RNG and the weight EMA go through `accelerator.save_state`;
    the pieces `track`ed here — the schedule and early stopping (the same on every process) and the training data
    (each process's position, all of them restored to every process, so an elastic resume can redistribute them) —
    and the loop's `TrainerState` go into `trainer_state.json`. `resolve` chooses the checkpoint (the newest every
    process holds) and checks, before any image is decoded, that this run may resume it; `restore` checks the rest
    (the model, the data) and loads every piece.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str, keep: int) -> None:
        self.accelerator, self.output_dir, self.keep = accelerator, output_dir, keep
        self.path: str | None = None  # the checkpoint this run resumes from
        self.settings: dict = {}
        self.shared: dict[str, Stateful] = {}  # TrainerState field -> piece
        self.per_process: dict[str, Stateful] = {}

    def resolve(self, which: str | None, settings: dict) -> str | None:
        """The checkpoint `--resume_from_checkpoint which` names (None: start afresh), once the options it was
        written with (`resume_settings` without the model and data) are found to match `settings`."""
        if which:  # (latest_if_any: None where no process holds one yet)
            self.path = resolve_checkpoint(self.output_dir, which, self.accelerator)
        if self.path:
            check_resume(self.path, read_state(self.path).settings, settings)
        return self.path

    def track(
        self,
        settings: dict,
        *,
        schedule: Stateful,
        early_stopping: Stateful,
        data: Stateful,
        ema: Stateful | None,
        order: Stateful | None = None,
    ) -> None:
        """The run's resumable pieces (the model and optimizer are Accelerate's) and what its resumes depend on
        (`resume_settings` in full). The weight EMA and a mined training `order` (`data.NeighbourSampler`: tensors,
        the same on every process) are saved beside the model by Accelerate (`custom_checkpoint_*.pkl`)."""
        self.settings = settings
        self.shared = {"scheduler": schedule, "early_stopping": early_stopping}
        self.per_process = {"stream": data}
        for piece in (ema, order):  # (in this order: Accelerate numbers them; both are set by resume options)
            if piece is not None:
                self.accelerator.register_for_checkpointing(piece)

    def save(self, state: TrainerState) -> str:
        """Every process calls this; returns the checkpoint folder."""
        for name, piece in self.shared.items():
            setattr(state, name, piece.state_dict())
        for name, piece in self.per_process.items():
            states = gather_object([piece.state_dict()])
            setattr(state, name, states if states[0] is not None else [])
        state.sharded, state.num_processes = self.accelerator.is_fsdp2, self.accelerator.num_processes
        state.settings = self.settings
        return save_checkpoint(self.accelerator, self.output_dir, state, self.keep)

    def restore(self) -> TrainerState:
        """The loop's state at the resolved checkpoint (a fresh one where there is none), every piece loaded."""
        if not self.path:
            return TrainerState()
        state = load_checkpoint(self.accelerator, self.path, self.settings)
        best_step = state.early_stopping.get("best_step", 0)
        saved = os.path.isfile(os.path.join(self.output_dir, "model.safetensors"))
        if best_step and not saved and self.accelerator.is_main_process:
            raise UserError(
                f"{self.path} resumes a run whose best model (step {best_step}) should be in {self.output_dir}, "
                "but model.safetensors is not there: resume in the output folder the run wrote (on the main node), "
                "or restore its model files."
            )
        for name, piece in self.shared.items():
            if getattr(state, name):
                piece.load_state_dict(getattr(state, name))
        for name, piece in self.per_process.items():
            piece.load_state_dict(getattr(state, name))  # (every process's: on another topology too)
        return state


# The options a resumed run must share with the run that wrote the checkpoint: they shape the optimizer's state,
# the schedule, the data order or what is learned. Others (logging, evaluation cadence, workers, output) may change.
RESUME_OPTIONS = {
    TrainConfig: (
        "seed",
        "num_train_epochs",
        "max_steps",
        "gradient_accumulation_steps",
        "accumulation",
        "caption_positives",
        "negative_hardness",
        "hard_negative_batches",
        "hard_negative_threshold",
        "hard_negative_refresh",
        "matryoshka_dims",
        "learning_rate",
        "layer_decay",
        "ema_decay",
        "ema_warmup",
        "ema_eval",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",
        "max_grad_norm",
        "early_stopping_metric",
        "early_stopping_patience",
        "early_stopping_min_delta",
    ),
    ModelConfig: (
        "freeze",
        "freeze_vision_layers",
        "text_positions",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ),
    DataConfig: (
        "caption_template",
        "extra_caption_templates",
        "max_train_samples",
        "augment",
        "augment_scale",
        "augment_flip",
        "streaming",
        "epoch_rows",
        "shuffle_buffer",
    ),
}
# Model configuration fields that say nothing about the weights' shapes or the computation.
UNCOMPARED_MODEL_FIELDS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def resume_settings(
    configs: tuple[DataConfig, ModelConfig, TrainConfig],
    num_processes: int,
    model_config: dict | None = None,
    train_pairs: int | None = None,
    stream: dict | None = None,
) -> dict:
    """What a resume depends on, as `check_resume` compares it: the options of `RESUME_OPTIONS`, the batch of all
    processes, and (once known) the model configuration, the training pairs and a stream's shards and their rows
    (`{"shards": [file names], "rows": [per shard], "order": the stream order's version, "content": [per shard
    `SIZE:DIGEST`, `data.shard_identity`]}`)."""
    train_config = next(config for config in configs if isinstance(config, TrainConfig))
    options = {name: getattr(config, name) for config in configs for name in RESUME_OPTIONS[type(config)]}
    settings = {
        "options": options,
        "batch": {"per_device": train_config.per_device_train_batch_size, "processes": num_processes},
    }
    if model_config is not None:
        settings["model_config"] = _flat(model_config)
    if train_pairs is not None:
        settings["train_pairs"] = train_pairs
    if stream is not None:
        settings["stream"] = stream
    return json.loads(json.dumps(settings))  # as the checkpoint holds it (tuples as lists)


def check_resume(path: str, saved: dict, current: dict) -> None:
    """Stop when this run differs from the checkpoint's run in what a resume depends on (what both name), naming
    each option and both values. Another per-device batch is taken when the batch of all processes is the same:
    the seeded sampler then cuts the same pairs into each step, only split otherwise among the processes."""
    changed = [
        f"--{name} {saved['options'][name]!r} -> {value!r}"
        for name, value in current.get("options", {}).items()
        if name in saved.get("options", {}) and saved["options"][name] != value
    ]
    if "batch" in saved and "batch" in current:
        (was, now) = (saved["batch"], current["batch"])
        if was["per_device"] * was["processes"] != now["per_device"] * now["processes"]:
            keep = was["per_device"] * was["processes"] / now["processes"]
            changed.append(
                f"the batch of all processes {was['per_device'] * was['processes']} ({was['per_device']} per device "
                f"x {was['processes']} processes) -> {now['per_device'] * now['processes']} ({now['per_device']} x "
                f"{now['processes']})"
                + (f": --per_device_train_batch_size {int(keep)} keeps it" if keep == int(keep) else "")
            )
    if "model_config" in saved and "model_config" in current:
        fields = sorted(set(saved["model_config"]) | set(current["model_config"]))
        differ = [
            f"{name} {saved['model_config'].get(name)!r} -> {current['model_config'].get(name)!r}"
            for name in fields
            if saved["model_config"].get(name) != current["model_config"].get(name)
        ]
        if differ:
            changed.append(
                "the model configuration (--model_name_or_path / --scratch_config): "
                + ", ".join(differ[:8])
                + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
            )
    if "train_pairs" in saved and "train_pairs" in current and saved["train_pairs"] != current["train_pairs"]:
        changed.append(
            f"the usable training pairs {saved['train_pairs']} -> {current['train_pairs']} (the data changed)"
        )
    if "stream" in saved and "stream" in current and (change := _stream_change(saved["stream"], current["stream"])):
        changed.append(change)
    if changed:
        raise UserError(
            f"{path} was written by a run that differs from this one in what a resume depends on: "
            + "; ".join(changed)
            + ". Resume with the checkpoint's settings, or start a new run (from its model: --model_name_or_path "
            "OUTPUT) to train with the new ones."
        )


def _stream_change(was: dict, now: dict) -> str | None:
    """What changed in a stream's shards, in words (None: nothing): the checkpoint's position is in the order of the
    old ones. A checkpoint written before shards' contents were kept (no "content") compares the rest."""
    added = [name for name in now["shards"] if name not in was["shards"]]
    removed = [name for name in was["shards"] if name not in now["shards"]]
    if added or removed:
        return (
            f"the stream's shards ({len(was['shards'])} -> {len(now['shards'])}"
            + (f"; added {added[0]}" + (f" and {len(added) - 1} more" if len(added) > 1 else "") if added else "")
            + (
                f"; removed {removed[0]}" + (f" and {len(removed) - 1} more" if len(removed) > 1 else "")
                if removed
                else ""
            )
            + ")"
        )
    if was.get("order") != now.get("order"):
        return (
            "the order clip_accel reads a stream in (the checkpoint's is an earlier one's: its position would "
            "resume other rows): resume it with the clip_accel that wrote it"
        )
    if {k: v for k, v in was.items() if k != "content"} != {k: v for k, v in now.items() if k != "content"}:
        return "the rows of the stream's shards (rewritten shards, or another --shard_index)"
    rewritten = [
        name
        for name, old, new in zip(now["shards"], was.get("content") or [], now.get("content") or [], strict=False)
        if old is not None and new is not None and old != new
    ]
    if rewritten:
        return (
            f"the content of the stream's shard {rewritten[0]}"
            + (f" and {len(rewritten) - 1} more" if len(rewritten) > 1 else "")
            + " (its size or its first 512 bytes differ: another file under the name and row count that the "
            "checkpoint's position refers to)"
        )
    return None


def _flat(values: dict, prefix: str = "") -> dict:
    """A nested configuration as {"text_config.hidden_size": 32, ...}, less `UNCOMPARED_MODEL_FIELDS`."""
    flat = {}
    for name, value in values.items():
        if name in UNCOMPARED_MODEL_FIELDS:
            continue
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def save_checkpoint(accelerator: Accelerator, output_dir: str, state: TrainerState, keep: int) -> str:
    """Every process calls this (each saves its own RNG state). The main process writes the rest, renames and
    prunes; with node-local output folders (`save_on_each_node`), each node's first process does, in its own."""
    root = os.path.join(output_dir, CHECKPOINTS)
    final = os.path.join(root, f"step-{state.step:07d}")
    staging = os.path.join(root, f".staging-step-{state.step:07d}")
    writer = (
        accelerator.is_local_main_process
        if accelerator.project_configuration.save_on_each_node
        else accelerator.is_main_process
    )
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if writer:
        with open(os.path.join(staging, STATE_FILE), "w") as handle:
            json.dump(asdict(state), handle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        logger.info(f"Saved checkpoint {final}", main_process_only=False)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    steps = sorted((int(match.group(1)), name) for name in os.listdir(root) if (match := _NAME.match(name)))
    return [os.path.join(root, name) for _, name in steps]


def resolve_checkpoint(output_dir: str, which: str, accelerator: Accelerator | None = None) -> str | None:
    """`latest` (the newest complete checkpoint in output_dir), `latest_if_any` (the same, or None, saying the run
    starts from scratch, when no process holds a checkpoint yet: what a requeued SLURM job resumes with) or a
    checkpoint folder path. With `accelerator`, every process resolves the same step: node-local output folders can
    hold different checkpoints (a node killed mid-save is one behind), so `latest` is the newest step every process
    holds, and saying so when a process held a newer one."""
    if which not in ("latest", "latest_if_any"):
        if not os.path.isfile(os.path.join(which, STATE_FILE)):
            raise UserError(
                f"--resume_from_checkpoint {which!r} is not a checkpoint folder (no {STATE_FILE}); "
                f"checkpoints live in OUTPUT/{CHECKPOINTS}/step-*."
            )
        return which
    held = [int(_NAME.match(os.path.basename(path)).group(1)) for path in list_checkpoints(output_dir)]
    everyone = [held] if accelerator is None or accelerator.num_processes == 1 else gather_object([held])
    where = f"{output_dir}/{CHECKPOINTS}"
    if which == "latest_if_any" and not any(everyone):  # (the same answer on every process)
        logger.info(f"--resume_from_checkpoint latest_if_any: {where} holds no checkpoint: starting from scratch.")
        return None
    step = agreed_step(everyone, where)
    return os.path.join(output_dir, CHECKPOINTS, f"step-{step:07d}")


def agreed_step(held: list[list[int]], where: str) -> int:
    """The newest checkpoint step every process holds (`held`: each process's steps); a warning names the
    processes that held a newer one."""
    if not any(held):
        raise UserError(
            f"--resume_from_checkpoint latest: {where} holds no checkpoint. Start without it, or pass a checkpoint "
            "folder."
        )
    common = set.intersection(*(set(steps) for steps in held))
    newest = [max(steps, default=None) for steps in held]
    if not common:
        raise UserError(
            f"--resume_from_checkpoint latest: the processes' {where} hold no step in common (newest per process: "
            f"{newest}): give every node the same checkpoints, or start again without --resume_from_checkpoint."
        )
    step = max(common)
    ahead = [f"process {rank}: step {newest_step}" for rank, newest_step in enumerate(newest) if newest_step != step]
    if ahead:
        logger.warning(
            f"--resume_from_checkpoint latest: the processes' newest checkpoints differ ({', '.join(ahead)}); every "
            f"process resumes from step {step}, the newest all of them hold."
        )
    return step


def read_state(path: str) -> TrainerState:
    with open(os.path.join(path, STATE_FILE)) as handle:
        return TrainerState(**json.load(handle))


def load_checkpoint(accelerator: Accelerator, path: str, settings: dict | None = None) -> TrainerState:
    """Restore model, optimizer, scaler and RNG (Accelerate loads with weights_only=True) and the loop state, once
    `settings` (`resume_settings`) are found to match the checkpoint's."""
    state = read_state(path)
    if settings is not None:
        check_resume(path, state.settings, settings)
    _check_resumable(accelerator, state, path)
    accelerator.load_state(path)
    logger.info(
        f"Resumed from {path}: step {state.step}, epoch {state.epoch + 1}, "
        f"{state.batches_in_epoch} batches of that epoch already done"
    )
    return state


def _check_resumable(accelerator: Accelerator, state: TrainerState, path: str) -> None:
    """A DDP checkpoint holds whole tensors and resumes on any number of processes; an FSDP2 one holds shards,
    resumed here only under FSDP2 on as many processes as wrote it (the combinations the tests run)."""
    sharded = accelerator.is_fsdp2
    if state.sharded == sharded and (not sharded or state.num_processes == accelerator.num_processes):
        return
    written = f"FSDP2 on {state.num_processes} processes" if state.sharded else "DDP (or one process)"
    now = f"FSDP2 on {accelerator.num_processes} processes" if sharded else "DDP (or one process)"
    raise UserError(
        f"{path} was written under {written} and this run is {now}: resume it with the launch that wrote it, "
        "or start from its best model (--model_name_or_path OUTPUT) instead of resuming."
    )
