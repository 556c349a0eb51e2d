"""The training loop: read it top to bottom like a recipe.

train() = data -> model -> optimizer/schedule -> (evaluate the starting model) -> fit with early stopping
        -> reload the best model -> final test evaluation -> files in OUTPUT/.
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import asdict, dataclass

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import CLIPModel, get_scheduler

from . import hub
from .checkpoint import TrainerState, load_checkpoint, resolve_checkpoint, save_checkpoint
from .config import RECALL_KS, DataConfig, ModelConfig, TrainConfig, config_to_dict
from .data import build_pair_datasets, check_strict, load_raw_splits, make_dataloader, write_skip_report
from .early_stopping import EarlyStopping
from .evaluation import evaluate_retrieval
from .model import PixelNormalizer, freeze_parameters, image_size_of, load_model_and_processor, unwrap_clip
from .outputs import draw_pictures, save_model, write_outputs
from .step import StepContext, exact_step, plain_step

logger = get_logger(__name__)


@dataclass
class TrainingResult:
    """What `train()` hands back: the eval_results.json contents and the best model, in memory."""

    metrics: dict
    model: CLIPModel
    processor: object


@dataclass
class Run:
    """Everything the loop needs, built once by `prepare_run()`."""

    config: TrainConfig
    step_context: StepContext
    processor: object
    train_loader: object
    validation_loader: object
    test_loader: object
    total_steps: int
    steps_per_epoch: int
    pairs: dict  # usable pairs per role
    labels: dict  # class label of every usable pair, per evaluation role (for zero-shot accuracy)
    captions: dict  # caption of every usable pair, per evaluation role (for the identical-caption figures)
    skipped: dict  # rows skipped per role (main process)

    @property
    def accelerator(self) -> Accelerator:
        return self.step_context.accelerator

    @property
    def model(self) -> torch.nn.Module:
        return self.step_context.model


def train(data_config: DataConfig, model_config: ModelConfig, config: TrainConfig) -> TrainingResult:
    """Fine-tune, evaluate, save to OUTPUT/; returns the metrics and the best model."""
    run = prepare_run(data_config, model_config, config)
    accelerator = run.accelerator
    state = _restore(run) if config.resume_from_checkpoint else TrainerState()
    if config.eval_initial_model and not state.initial:
        state.initial = {"test": _evaluate(run, "test")}
    early_stopping = fit(run, state)
    _load_best_weights(run)
    results = {"initial": state.initial} if state.initial else {}
    results["validation"] = early_stopping.best_metrics
    results["test"] = _evaluate(run, "test")
    results["training"] = _training_summary(run, state, early_stopping)
    best_model = unwrap_clip(accelerator, run.model)
    try:
        if accelerator.is_main_process:
            write_outputs(config.output_dir, results, state.history, config_to_dict(data_config, model_config, config))
            draw_pictures(config.output_dir, results, state.history)
            hub.write_model_card(config.output_dir, repo_id=config.hub_model_id)
            if config.push_to_hub:
                hub.push_output_dir(config.output_dir, config.hub_model_id, private=config.hub_private)
    finally:
        _shut_down(run)
    return TrainingResult(results, best_model, run.processor)


def _shut_down(run: Run) -> None:
    """Release the DDP wrapper before the process group goes: a gloo group destroyed first makes the wrapper's
    destructor wait forever on a peer that has already exited."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    run.step_context.model = run.step_context.optimizer = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def _restore(run: Run) -> TrainerState:
    state = load_checkpoint(
        run.accelerator, resolve_checkpoint(run.config.output_dir, run.config.resume_from_checkpoint)
    )
    run.step_context.scheduler.load_state_dict(state.scheduler)
    return state


def _evaluate(run: Run, role: str) -> dict[str, float]:
    loader = run.validation_loader if role == "validation" else run.test_loader
    return evaluate_retrieval(
        run.accelerator,
        run.model,
        loader,
        run.step_context.normalizer,
        run.processor.tokenizer,
        run.labels[role],
        run.captions[role],
        run.config.identical_captions_match,
    )


def prepare_run(data_config: DataConfig, model_config: ModelConfig, config: TrainConfig) -> Run:
    """Accelerator, data, model, optimizer and schedule; every check that can fail runs before the first step."""
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        # Exact accumulation groups micro-batches itself; Accelerate must not also divide the loss.
        gradient_accumulation_steps=1 if config.accumulation == "exact" else config.gradient_accumulation_steps,
        log_with=config.report_to_list,
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_backend="inductor" if config.torch_compile else None,
    )
    set_seed(config.seed)
    _check_precision(accelerator)
    if not config.resume_from_checkpoint:
        _check_output_dir(config)
    if config.push_to_hub and accelerator.is_main_process:  # fail fast: before any image is decoded
        hub.check_hub_access(config.hub_model_id, private=config.hub_private)
    model, processor, pairs, skipped = _load_model_and_data(accelerator, data_config, model_config, config)
    loaders = [
        make_dataloader(
            pairs["train"], config.per_device_train_batch_size, train=True, num_workers=config.dataloader_num_workers
        )
    ]
    loaders += [
        make_dataloader(
            pairs[role], config.per_device_eval_batch_size, train=False, num_workers=config.dataloader_num_workers
        )
        for role in ("validation", "test")
    ]
    optimizer = build_optimizer(model, config, fused=accelerator.device.type == "cuda")
    model, optimizer, train_loader, validation_loader, test_loader = accelerator.prepare(model, optimizer, *loaders)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or config.num_train_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, config, total_steps)
    _log_startup(accelerator, config, total_steps, pairs)
    accelerator.init_trackers(
        "clip_accel",
        config={k: str(v) if v is None else v for k, v in config_to_dict(data_config, model_config, config).items()},
    )
    normalizer = PixelNormalizer(processor.image_processor.image_mean, processor.image_processor.image_std)
    step_context = StepContext(
        accelerator,
        model,
        optimizer,
        scheduler,
        normalizer.to(accelerator.device),
        config.max_grad_norm,
        config.local_loss,
    )
    return Run(
        config,
        step_context,
        processor,
        train_loader,
        validation_loader,
        test_loader,
        total_steps,
        steps_per_epoch,
        {role: len(pairs[role]) for role in pairs},
        {role: pairs[role].column("label") for role in ("validation", "test")},
        {role: pairs[role].column("caption") for role in ("validation", "test")},
        skipped,
    )


def _load_model_and_data(
    accelerator: Accelerator, data_config: DataConfig, model_config: ModelConfig, config: TrainConfig
):
    """Rows (cheap, checked first), then the model and tokenizer, then the cached preprocessing pass."""
    raw_splits = load_raw_splits(accelerator, data_config)
    _check_split_sizes(config, accelerator.num_processes, {role: len(raw.dataset) for role, raw in raw_splits.items()})
    model, processor = load_model_and_processor(model_config, lambda: raw_splits["train"].dataset["caption"])
    trainable, total = freeze_parameters(model, model_config.freeze, model_config.freeze_vision_layers)
    logger.info(
        f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.1f}%), "
        f"freezing: {model_config.freeze}"
    )
    pairs = build_pair_datasets(accelerator, data_config, raw_splits, processor.tokenizer, image_size_of(model))
    if data_config.strict:
        check_strict(pairs, raw_splits)
    skipped = write_skip_report(pairs, raw_splits, config.output_dir) if accelerator.is_main_process else {}
    _check_split_sizes(config, accelerator.num_processes, {role: len(pairs[role]) for role in pairs})
    return model, processor, pairs, skipped


def build_optimizer(model: torch.nn.Module, config: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over trainable parameters only (DDP then never waits on frozen ones); biases, norms, the class
    embedding and logit_scale (all < 2-D) get no weight decay."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 and "logit_scale" not in name else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        fused=fused,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Warmup then cosine/linear/constant, in optimizer steps.

    Not handed to accelerator.prepare: its wrapper steps N times per optimizer step on N processes. The step
    code steps it exactly once per optimizer step, so the schedule means the same at any scale.
    """
    warmup_steps = config.warmup_steps or int(total_steps * config.warmup_ratio)
    # "constant" in transformers ignores warmup; its warmup variant with 0 steps is the same constant schedule.
    schedule = "constant_with_warmup" if config.lr_scheduler_type == "constant" else config.lr_scheduler_type
    return get_scheduler(schedule, optimizer, warmup_steps, total_steps)


def fit(run: Run, state: TrainerState) -> EarlyStopping:
    """Optimizer steps over groups of micro-batches, logging, evaluating and checkpointing, until the step budget
    or early stopping. Resumes from `state` (mid-epoch too: the consumed batches of that epoch are skipped once)."""
    accelerator, config = run.accelerator, run.config
    early_stopping = (
        EarlyStopping(**state.early_stopping)
        if state.early_stopping
        else EarlyStopping(
            config.early_stopping_metric, config.early_stopping_patience, config.early_stopping_min_delta
        )
    )
    take_step = exact_step if config.accumulation == "exact" and config.gradient_accumulation_steps > 1 else plain_step
    done = state.step >= run.total_steps or early_stopping.should_stop
    losses = [torch.tensor(value, device=accelerator.device) for value in state.unlogged_losses]
    progress = tqdm(
        total=run.total_steps, initial=state.step, desc="Training", disable=not accelerator.is_local_main_process
    )
    while not done:
        run.model.train()
        for micro_batches in _groups(_epoch_batches(run, state), config.gradient_accumulation_steps):
            loss, stepped = take_step(run.step_context, micro_batches)
            losses.append(loss)
            state.step += 1
            state.batches_in_epoch += len(micro_batches)
            _count_nonfinite(state, stepped, config.max_nonfinite_steps)
            progress.update(1)
            done = state.step >= run.total_steps
            if state.step % config.logging_steps == 0 or done:
                # The only host-device sync of the loss, once per logging interval.
                _log_training(run, state, accelerator.reduce(torch.stack(losses).mean(), "mean").item())
                losses = []
            if config.eval_steps and (state.step % config.eval_steps == 0 or done):
                done = _evaluate_and_keep_best(run, state, early_stopping) or done
            epoch_over = state.batches_in_epoch >= len(run.train_loader)  # then the epoch-end checkpoint follows
            if config.checkpointing_steps and state.step % config.checkpointing_steps == 0 and not (done or epoch_over):
                _checkpoint(run, state, early_stopping, losses)
            if done:
                break
        epoch_over = state.batches_in_epoch >= len(run.train_loader)
        if not config.eval_steps and (epoch_over or done):
            done = _evaluate_and_keep_best(run, state, early_stopping) or done
        if epoch_over:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if not done:
                _checkpoint(run, state, early_stopping, losses)
    progress.close()
    return early_stopping


def _epoch_batches(run: Run, state: TrainerState):
    """This epoch's batches in the seeded order for `state.epoch`, minus those a resumed run already consumed."""
    run.train_loader.set_epoch(state.epoch)
    if state.batches_in_epoch == 0:
        return run.train_loader
    skipping = run.accelerator.skip_first_batches(run.train_loader, state.batches_in_epoch)
    skipping.set_epoch(state.epoch)
    return skipping


def _count_nonfinite(state: TrainerState, stepped: bool, limit: int) -> None:
    if stepped:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    logger.warning(
        f"step {state.step}: non-finite loss or gradients, optimizer step skipped ({state.nonfinite_in_a_row} in a row)"
    )
    if state.nonfinite_in_a_row >= limit:
        raise RuntimeError(
            f"{limit} optimizer steps in a row had non-finite loss or gradients (last at step {state.step}); "
            "stopping. The best model and the last checkpoint in the output folder are intact. Lower "
            "--learning_rate, use bf16 instead of fp16, or check the data, then resume with "
            "--resume_from_checkpoint latest."
        )


def _checkpoint(run: Run, state: TrainerState, early_stopping: EarlyStopping, losses: list) -> None:
    state.unlogged_losses = [float(loss) for loss in losses]  # so a resumed run logs the same interval means
    state.early_stopping = asdict(early_stopping)
    state.scheduler = run.step_context.scheduler.state_dict()
    save_checkpoint(run.accelerator, run.config.output_dir, state, run.config.save_total_limit)


def _groups(loader, size: int):
    """Consecutive groups of `size` micro-batches; the epoch's last group may be shorter."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _evaluate_and_keep_best(run: Run, state: TrainerState, early_stopping: EarlyStopping) -> bool:
    """Evaluate on the validation split, save the model if it is the best so far; True when it is time to stop."""
    metrics = _evaluate(run, "validation")
    step = state.step
    improved = early_stopping.update(metrics, step)
    if improved:
        save_model(run.accelerator, run.model, run.processor, run.config.output_dir)
    state.history.append({"step": step, "epoch": state.epoch + 1, **{f"eval_{k}": v for k, v in metrics.items()}})
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    logger.info(
        f"step {step}: validation {early_stopping.metric} = {metrics[early_stopping.metric]:.4f}"
        + (
            " (best so far, saved)"
            if improved
            else f" (best {early_stopping.best_value:.4f} at step {early_stopping.best_step})"
        )
    )
    if early_stopping.should_stop:
        logger.info(f"Early stopping: no improvement in {early_stopping.patience} evaluations.")
    return early_stopping.should_stop


def _log_training(run: Run, state: TrainerState, loss: float) -> None:
    step, epoch = state.step, state.epoch
    learning_rate = run.step_context.scheduler.get_last_lr()[0]
    logit_scale = unwrap_clip(run.accelerator, run.model).logit_scale.exp().item()
    state.history.append(
        {"step": step, "epoch": epoch + 1, "loss": loss, "learning_rate": learning_rate, "logit_scale": logit_scale}
    )
    run.accelerator.log(
        {"train/loss": loss, "train/learning_rate": learning_rate, "train/logit_scale": logit_scale}, step=step
    )
    logger.info(
        f"step {step}/{run.total_steps} epoch {epoch + 1}: loss {loss:.4f} lr {learning_rate:.3g} "
        f"logit_scale {logit_scale:.2f}"
    )


def _load_best_weights(run: Run) -> None:
    """The saved best model is what the final test evaluation measures and what users get."""
    best = CLIPModel.from_pretrained(run.config.output_dir, dtype=torch.float32)
    unwrap_clip(run.accelerator, run.model).load_state_dict(best.state_dict())


def _check_split_sizes(config: TrainConfig, num_processes: int, sizes: dict[str, int]) -> None:
    """Before any image is decoded (on row counts) and again after (on usable pairs)."""
    global_batch = config.per_device_train_batch_size * num_processes
    if global_batch > sizes["train"]:
        raise ValueError(
            f"The global batch ({global_batch} = per-device batch x {num_processes} processes) exceeds "
            f"the {sizes['train']} training pairs; lower --per_device_train_batch_size."
        )
    for role in ("validation", "test"):
        if sizes[role] < max(RECALL_KS):
            raise ValueError(
                f"The {role} split has {sizes[role]} pairs, but recall@{max(RECALL_KS)} needs at least "
                f"{max(RECALL_KS)}; use a larger split (or a larger --max_eval_samples)."
            )


def _check_precision(accelerator: Accelerator) -> None:
    if accelerator.mixed_precision == "no":
        return
    device = accelerator.device.type
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    if dtype is None or not torch.amp.is_autocast_available(device):
        raise ValueError(
            f"--mixed_precision {accelerator.mixed_precision} is not available on {device}; use "
            "--mixed_precision no (or bf16 where supported)."
        )
    with torch.autocast(device, dtype=dtype):
        probe = torch.ones(2, 2, device=accelerator.device) @ torch.ones(2, 2, device=accelerator.device)
    if probe.dtype != dtype:
        raise ValueError(
            f"{device} autocast does not compute in {dtype} here; use --mixed_precision no or another precision."
        )


def _check_output_dir(config: TrainConfig) -> None:
    taken = os.path.isfile(os.path.join(config.output_dir, "model.safetensors"))
    if taken and not config.overwrite_output_dir:
        raise ValueError(
            f"{config.output_dir} already holds a model. Choose another --output_dir or pass --overwrite_output_dir."
        )


def _log_startup(accelerator, config: TrainConfig, total_steps: int, pairs) -> None:
    per_device, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    logger.info(
        f"Processes: {accelerator.num_processes} ({accelerator.distributed_type.value}) on "
        f"{accelerator.device.type}; mixed precision: {accelerator.mixed_precision}"
    )
    logger.info(
        f"Global batch: {per_device * accelerator.num_processes * accumulation} = {per_device} per device "
        f"x {accelerator.num_processes} processes x {accumulation} accumulation steps"
    )
    logger.info(
        f"Pairs: train {len(pairs['train'])}, validation {len(pairs['validation'])}, test "
        f"{len(pairs['test'])}; optimizer steps: {total_steps}"
    )


def _training_summary(run: Run, state: TrainerState, early_stopping: EarlyStopping) -> dict:
    return {
        "optimizer_steps": state.step,
        "planned_steps": run.total_steps,
        "nonfinite_steps": state.nonfinite_steps,
        "train_pairs": run.pairs["train"],
        "pairs": run.pairs,
        "skipped_rows": run.skipped,
        "epochs_run": round(state.step / run.steps_per_epoch, 2),
        "best_step": early_stopping.best_step,
        "early_stopping_metric": early_stopping.metric,
        "stopped_early": early_stopping.should_stop,
        "num_processes": run.accelerator.num_processes,
        "mixed_precision": run.accelerator.mixed_precision,
        "global_batch_size": run.config.per_device_train_batch_size
        * run.accelerator.num_processes
        * run.config.gradient_accumulation_steps,
    }
