"""The training loop: read it top to bottom like a recipe.

train() = data -> model -> optimizer/schedule -> (evaluate the starting model) -> fit with early stopping
        -> reload the best model -> final test evaluation. The best model is saved in OUTPUT/ as it improves;
        writing the result files and publishing are the caller's job (`clip_accel.cli`).
"""

from __future__ import annotations

import gc
import math
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import CLIPModel

from .augment import Augmenter, training_cache_size
from .best_model import load_best_model, save_model
from .checkpoint import CheckpointManager, TrainerState, resume_settings
from .config import RECALL_KS, DataConfig, ModelConfig, TrainConfig, UserError, check_writable_folder, config_to_dict
from .data import (
    CopyStream,
    build_pair_datasets,
    check_strict,
    load_raw_splits,
    make_dataloader,
    prefetched,
    training_captions,
    training_data,
    write_skip_report,
)
from .early_stopping import EarlyStopping
from .ema import WeightEma
from .evaluation import dataset_prompts, evaluate_retrieval, split_captions
from .launch import (
    check_checkpoint_storage,
    check_fsdp_layers,
    check_launch,
    check_streaming_launch,
    check_supported_launch,
    data_prepared_per_node,
    storage_is_shared,
)
from .lora import add_lora
from .loss import LOSSES
from .model import (
    ContrastiveModel,
    PixelNormalizer,
    enable_gradient_checkpointing,
    family_of,
    freeze_parameters,
    image_layout,
    load_model_and_processor,
    logit_scale_value,
    unwrap,
)
from .optim import build_optimizer, build_scheduler, log_parameter_groups, top_learning_rate
from .preemption import Preempted, preempted_everywhere, watching_for_preemption
from .step import StepContext, exact_step, plain_step, use_tf32
from .zero_shot import Prompts

logger = get_logger(__name__)
# Called after every optimizer step (and its logging, evaluation and checkpoint) with the loop's state.
StepHook = Callable[[TrainerState], None]


@dataclass
class TrainingResult:
    """What `train()` hands back: everything the output files are written from, and the best model in memory."""

    metrics: dict  # eval_results.json
    history: list  # log_history.json
    resolved_config: dict  # training_config.json
    model: CLIPModel | None  # the best model as saved (on the main process; None on the others)
    processor: object


@dataclass
class Run:
    """Everything the loop needs, built once by `prepare_run()`."""

    config: TrainConfig
    step_context: StepContext
    processor: object
    train_data: object  # (data.training_data: a cached split's or a stream's, the same to the loop)
    validation_loader: object
    test_loader: object
    total_steps: int
    steps_per_epoch: int
    pair_counts: dict  # usable pairs per role
    shared_train_captions: int | None  # training pairs whose caption another has (None for a stream: not counted)
    labels: dict  # class label of every usable pair, per evaluation role (for zero-shot accuracy)
    captions: dict  # caption of every usable pair, per evaluation role (for the identical-caption figures)
    texts: dict  # per evaluation role, its captions, each distinct one embedded once (SplitCaptions)
    skipped: dict  # rows skipped per role (main process)
    resolved_config: dict  # every option, flat
    prompts: Prompts  # how zero-shot classification words the classes
    augmenter: Augmenter | None  # random crops of the training images (--augment), else None
    early_stopping: EarlyStopping
    checkpoints: CheckpointManager  # saves and restores every resumable piece above

    @property
    def accelerator(self) -> Accelerator:
        return self.step_context.accelerator

    @property
    def model(self) -> torch.nn.Module:
        return self.step_context.model


def train(data_config: DataConfig, model_config: ModelConfig, config: TrainConfig) -> TrainingResult:
    """Fine-tune with early stopping; the best model is saved in OUTPUT/ and measured on the test split."""
    with watching_for_preemption() as preemption:  # (`clip-accel train` watches from its start already)
        run = prepare_run(data_config, model_config, config)
        state = run.checkpoints.restore()
        if preempted_everywhere(run.accelerator, preemption):  # during start-up: nothing new to keep, stop now
            raise Preempted(state.step, run.checkpoints.path)
        if config.eval_initial_model and not state.initial:
            state.initial = {"test": _evaluate(run, "test")}
        early_stopping = fit(run, state)
        best_model = load_best_model(run.accelerator, run.model, config.output_dir)
        metrics = {"initial": state.initial} if state.initial else {}
        metrics["validation"] = early_stopping.best_metrics
        metrics["test"] = _evaluate(run, "test")
        streamed_skips = run.train_data.skip_report(run.accelerator, config.output_dir)
        if streamed_skips is not None:  # (a cached split's were written at start-up)
            run.skipped["train"] = streamed_skips
        metrics["training"] = _training_summary(run, state, early_stopping)
        _shut_down(run)
    return TrainingResult(metrics, state.history, run.resolved_config, best_model, run.processor)


def prepare_run(data_config: DataConfig, model_config: ModelConfig, config: TrainConfig) -> Run:
    """Accelerator, data, model, optimizer and schedule; every check that can fail runs before the first step."""
    check_supported_launch()
    check_writable_folder(config.output_dir, "--output_dir")  # (before any image is decoded: seconds, not a pass)
    prompts = dataset_prompts(data_config)  # a bad prompt file fails before anything is loaded
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        # Both accumulation modes group micro-batches and drive gradient sync themselves (step.py): Accelerate
        # must neither divide the loss nor decide when to sync.
        gradient_accumulation_steps=1,
        log_with=config.report_to_list,
        project_dir=config.output_dir,
        # Pinned batches (make_dataloader, on CUDA) copied without blocking the host; see data.loader.prefetched.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        dynamo_backend="inductor" if config.torch_compile else None,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout)),
            # The towers' only buffers are constant position ids: DDP need not broadcast them every forward.
            DistributedDataParallelKwargs(broadcast_buffers=False),
        ],
    )
    set_seed(config.seed)
    check_launch(accelerator)
    _check_lora(accelerator, model_config, config)
    check_streaming_launch(accelerator, data_config)
    use_tf32(accelerator.device, config.tf32)
    # Node-local output folders: every node keeps its own checkpoints (resume reads them from its own disk).
    accelerator.project_configuration.save_on_each_node = not storage_is_shared(accelerator, config.output_dir)
    check_checkpoint_storage(accelerator, node_local=accelerator.project_configuration.save_on_each_node)
    if accelerator.project_configuration.save_on_each_node:
        logger.info(
            f"{config.output_dir} is node-local: each node keeps its own checkpoints; the model and the "
            "results are written on the main node."
        )
    configs = (data_config, model_config, config)
    checkpoints = CheckpointManager(accelerator, config.output_dir, config.save_total_limit)
    resuming = checkpoints.resolve(config.resume_from_checkpoint, resume_settings(configs, accelerator.num_processes))
    if not resuming:
        _check_output_dir(config)
    _compute_fsdp2_like_ddp(accelerator)
    model, processor, pairs, skipped = _load_model_and_data(accelerator, data_config, model_config, config)
    batch, workers = config.per_device_train_batch_size, config.dataloader_num_workers
    train_data = training_data(accelerator, pairs["train"], batch, workers, config.output_dir, resuming is not None)
    loading = {"num_workers": config.dataloader_num_workers, "device": accelerator.device}
    loaders = [
        make_dataloader(pairs[role], config.per_device_eval_batch_size, train=False, **loading)
        for role in ("validation", "test")
    ]
    optimizer = build_optimizer(model, config)
    log_parameter_groups(optimizer, config)
    model, optimizer, validation_loader, test_loader = accelerator.prepare(model, optimizer, *loaders)
    steps_per_epoch = math.ceil(len(train_data) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or config.num_train_epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, config, total_steps)
    shared = train_data.shared_captions
    _log_startup(accelerator, config, total_steps, pairs, shared)
    resolved_config = config_to_dict(*configs)
    # Trackers take numbers, strings and booleans as hyperparameters: None and lists (--augment_scale) as text.
    tracked = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in resolved_config.items()}
    accelerator.init_trackers("clip_accel", config=tracked)
    normalizer = PixelNormalizer(processor.image_processor.image_mean, processor.image_processor.image_std)
    family = unwrap(accelerator, model).family
    ema = _weight_ema(accelerator, model, config)
    early_stopping = EarlyStopping(
        config.early_stopping_metric, config.early_stopping_patience, config.early_stopping_min_delta
    )
    settings = resume_settings(
        configs,
        accelerator.num_processes,
        unwrap(accelerator, model).clip.config.to_dict(),
        pairs["train"].pairs_per_epoch,
        train_data.identity(),
    )
    checkpoints.track(settings, schedule=scheduler, early_stopping=early_stopping, data=train_data, ema=ema)
    step_context = StepContext(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        normalizer=normalizer.to(accelerator.device),
        max_grad_norm=config.max_grad_norm,
        local_loss=config.local_loss,
        loss=LOSSES[family.loss],
        max_logit_scale=family.max_logit_scale,
        caption_positives=config.caption_positives,
        ema=ema,
    )
    return Run(
        config=config,
        step_context=step_context,
        processor=processor,
        train_data=train_data,
        validation_loader=validation_loader,
        test_loader=test_loader,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        pair_counts={role: pairs[role].pairs_per_epoch for role in pairs},
        shared_train_captions=shared,
        labels={role: pairs[role].column("label") for role in ("validation", "test")},
        captions={role: pairs[role].column("caption") for role in ("validation", "test")},
        texts={
            role: split_captions(accelerator, pairs[role], config.per_device_eval_batch_size)
            for role in ("validation", "test")
        },
        skipped=skipped,
        resolved_config=resolved_config,
        prompts=prompts,
        augmenter=_augmenter(data_config, image_layout(unwrap(accelerator, model).clip, processor).size, config.seed),
        early_stopping=early_stopping,
        checkpoints=checkpoints,
    )


def fit(run: Run, state: TrainerState, on_step_end: StepHook | None = None) -> EarlyStopping:
    """Optimizer steps until the step budget or early stopping, resuming from `state`. Each step reads
    step -> log? -> evaluate? -> checkpoint? -> stop?."""
    config, early_stopping = run.config, run.early_stopping
    if state.step >= run.total_steps or early_stopping.should_stop:
        return early_stopping  # resumed from the run's last checkpoint
    take_step = exact_step if config.accumulation == "exact" and config.gradient_accumulation_steps > 1 else plain_step
    losses = [torch.tensor(value, device=run.accelerator.device) for value in state.unlogged_losses]
    progress = _progress_bar(run, state)
    run.model.train()
    group_size = config.gradient_accumulation_steps
    skips = []  # device flags of the steps since the counts were last read (reading them syncs with the device)
    copy_stream = CopyStream.for_device(run.accelerator.device)  # one for the run: its memory pool is per stream
    batches = optimizer_step_batches(run.train_data, state, group_size, copy_stream)
    # Log lines go above the bar (where one is drawn), not through it.
    with nullcontext() if progress.disable else logging_redirect_tqdm(), watching_for_preemption() as preemption:
        for micro_batches, epoch_over in batches:
            if run.augmenter is not None:  # drawn once per step: both passes of exact accumulation see the same crops
                micro_batches = run.augmenter(micro_batches, state.step, run.accelerator.process_index)
            loss, skipped = take_step(run.step_context, micro_batches)
            state.step += 1
            losses.append(loss)
            skips.append(skipped)
            progress.update(1)
            out_of_steps = state.step >= run.total_steps
            preempted = False
            if state.step % config.logging_steps == 0 or out_of_steps:
                skips = _count_nonfinite(state, skips, config.max_nonfinite_steps)
                _log_training(run, state, losses, progress)
                losses = []
                preempted = not out_of_steps and preempted_everywhere(run.accelerator, preemption)
            evaluation_due = state.step % config.eval_steps == 0 if config.eval_steps else epoch_over
            if evaluation_due or out_of_steps:  # (before a preemption stops the run: its resume goes on after it)
                _evaluate_and_keep_best(run, state, early_stopping)
            stop = out_of_steps or early_stopping.should_stop
            checkpoint_due = config.checkpointing_steps and state.step % config.checkpointing_steps == 0
            if epoch_over or preempted or (checkpoint_due and not stop):  # every epoch's end, the last one's too
                skips = _count_nonfinite(state, skips, config.max_nonfinite_steps)
                # So a resumed run logs the same interval means: each step's loss averaged over the processes
                # (with the local loss each holds its own share), as _log_training averages them.
                state.unlogged_losses = _mean_over_processes(run, losses).tolist() if losses else []
                checkpoint = run.checkpoints.save(state)
                if preempted:
                    progress.close()
                    raise Preempted(state.step, checkpoint)
            if on_step_end is not None:
                on_step_end(state)
            if stop:
                break
    progress.close()
    return early_stopping


def optimizer_step_batches(
    data, state: TrainerState, group_size: int, copy_stream: CopyStream | None = None
) -> Iterator[tuple[list[dict], bool]]:
    """(micro-batches of one optimizer step, whether they end the epoch), epoch after epoch, without end.

    Groups of `group_size` consecutive batches of the training data (`data.training_data`), read ahead by a
    background thread (copied to the device on `copy_stream`, where given); an epoch's last group may be shorter.
    Owns the epoch bookkeeping in `state`: the micro-batches consumed in the current epoch (a resumed run's
    first epoch starts after them), and the epoch counter, which has already moved on when an epoch's last group
    is yielded, so a checkpoint taken then resumes at the next epoch's start.
    """
    while True:
        group = []
        for batch in prefetched(data.epoch(state.epoch, state.batches_in_epoch), copy_stream=copy_stream):
            data.taken(batch)
            group.append(batch)
            state.batches_in_epoch += 1
            epoch_over = state.batches_in_epoch == len(data)
            if epoch_over:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if len(group) == group_size or epoch_over:  # the epoch's last group may be shorter
                yield group, epoch_over
                group = []


def _progress_bar(run: Run, state: TrainerState) -> tqdm:
    """The one bar (pairs/s, time left; loss and LR set at logging steps, so no extra host sync), drawn by the
    local main process where a terminal is attached; elsewhere plain log lines say the same. TQDM_DISABLE=1 (or
    any TQDM_* setting) still applies."""
    drawn = run.accelerator.is_local_main_process and sys.stderr.isatty()
    pairs = run.config.global_batch_size(run.accelerator.num_processes)
    hidden = {} if drawn else {"disable": True}
    return tqdm(total=run.total_steps, initial=state.step, desc="Training", unit="pairs", unit_scale=pairs, **hidden)


def _load_model_and_data(
    accelerator: Accelerator, data_config: DataConfig, model_config: ModelConfig, config: TrainConfig
):
    """Rows (cheap, checked first), then the model and tokenizer, then the cached preprocessing pass."""
    per_node = data_prepared_per_node(accelerator, data_config)
    raw_splits = load_raw_splits(accelerator, data_config, per_node=per_node)
    rows = {role: raw.rows_per_epoch for role, raw in raw_splits.items()}
    _check_split_sizes(config, accelerator.num_processes, rows)
    captions = training_captions(accelerator, raw_splits["train"], data_config)
    clip, processor = load_model_and_processor(model_config, captions)
    check_fsdp_layers(clip)
    trainable, total = freeze_parameters(clip, model_config.freeze, model_config.freeze_vision_layers)
    how = f"freezing: {model_config.freeze}"
    if model_config.lora_rank:
        add_lora(clip, model_config)
        trainable = sum(p.numel() for p in clip.parameters() if p.requires_grad)
        total = sum(p.numel() for p in clip.parameters())
        how = f"LoRA rank {model_config.lora_rank} on {', '.join(model_config.lora_targets)} (the rest frozen)"
    if model_config.gradient_checkpointing:
        enable_gradient_checkpointing(clip)
    logger.info(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.1f}%), {how}")
    layout = image_layout(clip, processor)
    if data_config.augment and layout.patches:
        raise UserError(
            "--augment crops square images; SigLIP 2's variable-resolution patch sequences are not augmented yet. "
            "Drop --augment (or start from a CLIP or SigLIP checkpoint)."
        )
    pairs = build_pair_datasets(
        accelerator,
        data_config,
        raw_splits,
        processor.tokenizer,
        layout,
        train_image_size=training_cache_size(layout.size) if data_config.augment else None,
        per_node=per_node,
        family=family_of(clip.config),
        seed=config.seed,
        report_dir=config.output_dir,
    )
    if data_config.strict:
        check_strict(pairs, raw_splits)
    skipped = write_skip_report(pairs, raw_splits, config.output_dir) if accelerator.is_main_process else {}
    _check_split_sizes(config, accelerator.num_processes, {role: pairs[role].pairs_per_epoch for role in pairs})
    return ContrastiveModel(clip), processor, pairs, skipped


def _compute_fsdp2_like_ddp(accelerator: Accelerator) -> None:
    """FSDP2 keeps float32 parameters and reduces gradients in float32; autocast alone lowers the precision, as
    under DDP (the step and evaluation enter it themselves: Accelerate wraps no FSDP2 forward in it). Accelerate's
    default FSDP2 policy would gather bf16 parameters and sum gradients in bf16: the accumulated (no_sync)
    gradients of several micro-batches and their reduce-scatter lose bits DDP keeps, and `logit_scale` reaches
    the loss rounded to bf16 (ln 100 = 4.605 as 4.594). The price: the all-gathers move float32, twice bf16's
    bytes."""
    if not accelerator.is_fsdp2:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy

    accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    logger.info(f"FSDP2: float32 parameters and gradient reduction, {accelerator.mixed_precision} autocast for compute")


def _augmenter(data_config: DataConfig, image_size: int, seed: int) -> Augmenter | None:
    if not data_config.augment:
        return None
    return Augmenter(image_size, tuple(data_config.augment_scale), data_config.augment_flip, seed)


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
        run.prompts,
        run.texts[role],
    )


def _weight_ema(accelerator: Accelerator, model: torch.nn.Module, config: TrainConfig) -> WeightEma | None:
    """--ema_decay's average of the prepared model's trainable parameters (FSDP2: of this process's shards), kept
    in every checkpoint."""
    if not config.ema_decay:
        return None
    ema = WeightEma(unwrap(accelerator, model), config.ema_decay, config.ema_warmup)
    count = sum(parameter.numel() for parameter in ema.parameters)
    logger.info(
        f"Weight EMA, decay {config.ema_decay:g}{' with warm-up' if config.ema_warmup else ''}: {count:,} "
        f"trainable parameters averaged in float32 ({4 * sum(a.numel() for a in ema.averages) / 2**20:.1f} MiB "
        f"on this process); {'the EMA weights are evaluated and saved' if config.ema_eval else 'kept only'}"
    )
    return ema


def _evaluate_and_keep_best(run: Run, state: TrainerState, early_stopping: EarlyStopping) -> None:
    """Evaluate on the validation split; save the model when it is the best so far (the EMA's weights, where
    they are the ones evaluated)."""
    ema = run.step_context.ema if run.config.ema_eval else None
    with ema.applied() if ema is not None else nullcontext():
        metrics = _evaluate(run, "validation")
        improved = early_stopping.update(metrics, state.step)
        if improved:
            save_model(run.accelerator, run.model, run.processor, run.config.output_dir)
    state.history.append(
        {"step": state.step, "epoch": _epochs_done(run, state), **{f"eval_{k}": v for k, v in metrics.items()}}
    )
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
    best = (
        " (best so far, saved)"
        if improved
        else f" (best {early_stopping.best_value:.4f} at step {early_stopping.best_step})"
    )
    logger.info(f"step {state.step}: validation {early_stopping.metric} = {metrics[early_stopping.metric]:.4f}{best}")
    if early_stopping.should_stop:
        logger.info(f"Early stopping: no improvement in {early_stopping.patience} evaluations.")


def _log_training(run: Run, state: TrainerState, losses: list[torch.Tensor], progress: tqdm) -> None:
    # The only host-device sync of the loss, once per logging interval.
    loss = _mean_over_processes(run, losses).mean().item()
    learning_rate = top_learning_rate(run.step_context.scheduler)
    logit_scale = logit_scale_value(unwrap(run.accelerator, run.model))
    epochs = _epochs_done(run, state)
    state.history.append(
        {"step": state.step, "epoch": epochs, "loss": loss, "learning_rate": learning_rate, "logit_scale": logit_scale}
    )
    run.accelerator.log(
        {"train/loss": loss, "train/learning_rate": learning_rate, "train/logit_scale": logit_scale}, step=state.step
    )
    line = f"step {state.step}/{run.total_steps} epoch {epochs:.2f}: loss {loss:.4f} lr {learning_rate:.3g}"
    if progress.disable:
        logger.info(f"{line} logit_scale {logit_scale:.2f}")
    else:  # the bar says it
        progress.set_postfix_str(f"loss {loss:.4f}, lr {learning_rate:.3g}", refresh=False)
        logger.debug(f"{line} logit_scale {logit_scale:.2f}")


def _mean_over_processes(run: Run, losses: list[torch.Tensor]) -> torch.Tensor:
    """Each step's loss averaged over the processes: (steps,), the same on every process."""
    return run.accelerator.reduce(torch.stack(losses), "mean")


def _epochs_done(run: Run, state: TrainerState) -> float:
    """Epochs completed, fractional (as transformers.Trainer logs them): 1.0 at the end of the first epoch."""
    return round(state.epoch + state.batches_in_epoch / len(run.train_data), 4)


def _count_nonfinite(state: TrainerState, skips: list[torch.Tensor], limit: int) -> list:
    """Read the skipped-step flags of the last `len(skips)` steps (one sync), count them into `state`, warn for
    each, and stop the run after `limit` in a row. Returns the empty list of flags still to read."""
    first_step = state.step - len(skips) + 1
    for step, skipped in enumerate(torch.stack(skips).tolist() if skips else [], start=first_step):
        if not skipped:
            state.nonfinite_in_a_row = 0
            continue
        state.nonfinite_steps += 1
        state.nonfinite_in_a_row += 1
        logger.warning(
            f"step {step}: non-finite loss or gradients, optimizer step skipped ({state.nonfinite_in_a_row} in a row)"
        )
        if state.nonfinite_in_a_row >= limit:
            raise RuntimeError(
                f"{limit} optimizer steps in a row had non-finite loss or gradients (last at step {step}); "
                "stopping. The best model and the last checkpoint in the output folder are intact. Lower "
                "--learning_rate, use bf16 instead of fp16, or check the data, then resume with "
                "--resume_from_checkpoint latest."
            )
    return []


def _shut_down(run: Run) -> None:
    """Release the DDP wrapper before the process group goes: a gloo group destroyed first makes the wrapper's
    destructor wait forever on a peer that has already exited."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    run.step_context.model = run.step_context.optimizer = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


def _check_split_sizes(config: TrainConfig, num_processes: int, sizes: dict[str, int]) -> None:
    """Before any image is decoded (on row counts) and again after (on usable pairs)."""
    micro_batch = config.per_device_train_batch_size * num_processes
    if micro_batch > sizes["train"]:
        raise UserError(
            f"One batch of all processes ({micro_batch} = per-device batch x {num_processes} processes) exceeds "
            f"the {sizes['train']} training pairs; lower --per_device_train_batch_size."
        )
    for role in ("validation", "test"):
        if sizes[role] < max(RECALL_KS):
            raise UserError(
                f"The {role} split has {sizes[role]} pairs, but recall@{max(RECALL_KS)} needs at least "
                f"{max(RECALL_KS)}; use a larger split (or a larger --max_eval_samples)."
            )


def _check_lora(accelerator: Accelerator, model_config: ModelConfig, config: TrainConfig) -> None:
    if not model_config.lora_rank:
        return
    if config.layer_decay < 1:
        raise UserError(
            f"--layer_decay {config.layer_decay:g} with --lora_rank: LoRA freezes every layer whose rate layer decay "
            "would scale and trains only its adapters. Drop --layer_decay, or fine-tune without LoRA."
        )
    if accelerator.is_fsdp2 or accelerator.distributed_type.value == "DEEPSPEED":
        raise UserError(
            "--lora_rank runs on one device or under DDP (the adapters are small: every process holds them whole); "
            "launch without FSDP/DeepSpeed, e.g. --config_file accelerate_configs/multi_gpu.yaml."
        )
    if model_config.lora_dropout and config.accumulation == "exact" and config.gradient_accumulation_steps > 1:
        raise UserError(
            "--lora_dropout with exact accumulation: each micro-batch runs twice and dropout would draw other "
            "masks the second time, so the gradient would not be exact. Use --lora_dropout 0 or --accumulation plain."
        )


def _check_output_dir(config: TrainConfig) -> None:
    taken = os.path.isfile(os.path.join(config.output_dir, "model.safetensors"))
    if taken and not config.overwrite_output_dir:
        raise UserError(
            f"{config.output_dir} already holds a model. Choose another --output_dir or pass --overwrite_output_dir."
        )


def _log_startup(accelerator: Accelerator, config: TrainConfig, total_steps: int, pairs: dict, shared: int) -> None:
    processes = accelerator.num_processes
    logger.info(
        f"Processes: {processes} ({accelerator.distributed_type.value}) on {accelerator.device.type}; "
        f"mixed precision: {accelerator.mixed_precision}"
    )
    logger.info(
        f"Global batch: {config.global_batch_size(processes)} = {config.per_device_train_batch_size} per device "
        f"x {processes} processes x {config.gradient_accumulation_steps} accumulation steps"
    )
    logger.info(
        f"Pairs: train {pairs['train'].pairs_per_epoch}{' (streamed: rows per epoch)' if shared is None else ''}, "
        f"validation {len(pairs['validation'])}, test {len(pairs['test'])}; "
        f"optimizer steps: {total_steps}"
    )
    identical = config.caption_positives == "identical"
    treated = "positives of each other" if identical else "negatives (--caption_positives own)"
    counted = "Streamed (not counted ahead): pairs that" if shared is None else f"{shared} training pairs"
    logger.info(f"{counted} share their caption with another; in one batch they are {treated}")


def _training_summary(run: Run, state: TrainerState, early_stopping: EarlyStopping) -> dict:
    processes = run.accelerator.num_processes
    return {
        "optimizer_steps": state.step,
        "planned_steps": run.total_steps,
        "warmup_steps": run.config.warmup_steps_for(run.total_steps),
        "nonfinite_steps": state.nonfinite_steps,
        "train_pairs": run.pair_counts["train"],
        "train_pairs_sharing_a_caption": run.shared_train_captions,
        "pairs": run.pair_counts,
        "skipped_rows": run.skipped,
        "epochs_run": round(state.step / run.steps_per_epoch, 2),
        "best_step": early_stopping.best_step,
        "early_stopping_metric": early_stopping.metric,
        "stopped_early": early_stopping.should_stop,
        "num_processes": processes,
        "mixed_precision": run.accelerator.mixed_precision,
        "global_batch_size": run.config.global_batch_size(processes),
    }
