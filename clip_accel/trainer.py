"""The training loop: read it top to bottom like a recipe.

train() = data -> model -> optimizer/schedule -> (evaluate the starting model) -> fit with early stopping
        -> reload the best model -> final test evaluation. The best model is saved in OUTPUT/ as it improves;
        writing the result files and publishing are the caller's job (`clip_accel.cli`).

What a run is made of and the checks before its first step are `startup.prepare_run`'s; what it says as it goes is
`reporting`'s; what a resume needs, `checkpoint.CheckpointManager`'s.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate.logging import get_logger
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import CLIPModel

from .best_model import load_best_model, save_model
from .checkpoint import TrainerState
from .config import DataConfig, ModelConfig, TrainConfig
from .data import CopyStream, prefetched
from .early_stopping import EarlyStopping
from .evaluation import evaluate_retrieval
from .preemption import Preempted, preempted_everywhere, watching_for_preemption
from .reporting import count_nonfinite, epochs_done, log_training, mean_over_processes, progress_bar, training_summary
from .startup import Run, prepare_run
from .step import exact_step, plain_step

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
        if run.truncation["train"] is None:  # a stream's, counted as it was read
            run.truncation["train"] = run.train_data.caption_truncation(run.accelerator)
            logger.info(run.truncation["train"].describe("train (the captions streamed)"))
        metrics["training"] = training_summary(run, state, early_stopping)
        _shut_down(run)
    return TrainingResult(metrics, state.history, run.resolved_config, best_model, run.processor)


def fit(run: Run, state: TrainerState, on_step_end: StepHook | None = None) -> EarlyStopping:
    """Optimizer steps until the step budget or early stopping, resuming from `state`. Each step reads
    step -> log? -> evaluate? -> checkpoint? -> stop?."""
    config, early_stopping = run.config, run.early_stopping
    if state.step >= run.total_steps or early_stopping.should_stop:
        return early_stopping  # resumed from the run's last checkpoint
    take_step = exact_step if config.accumulation == "exact" and config.gradient_accumulation_steps > 1 else plain_step
    losses = [torch.tensor(value, device=run.accelerator.device) for value in state.unlogged_losses]
    progress = progress_bar(run, state)
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
                skips = count_nonfinite(state, skips, config.max_nonfinite_steps)
                log_training(run, state, losses, progress)
                losses = []
                preempted = not out_of_steps and preempted_everywhere(run.accelerator, preemption)
            evaluation_due = state.step % config.eval_steps == 0 if config.eval_steps else epoch_over
            if evaluation_due or out_of_steps:  # (before a preemption stops the run: its resume goes on after it)
                _evaluate_and_keep_best(run, state, early_stopping)
            stop = out_of_steps or early_stopping.should_stop
            checkpoint_due = config.checkpointing_steps and state.step % config.checkpointing_steps == 0
            if epoch_over or preempted or (checkpoint_due and not stop):  # every epoch's end, the last one's too
                skips = count_nonfinite(state, skips, config.max_nonfinite_steps)
                # So a resumed run logs the same interval means: each step's loss averaged over the processes
                # (with the local loss each holds its own share), as log_training averages them.
                state.unlogged_losses = mean_over_processes(run, losses).tolist() if losses else []
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
        run.config.matryoshka_sizes,
    )


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
        {"step": state.step, "epoch": epochs_done(run, state), **{f"eval_{k}": v for k, v in metrics.items()}}
    )
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
    best = (
        " (best so far, saved)"
        if improved
        else f" (best {early_stopping.best_value:.4f} at step {early_stopping.best_step})"
    )
    nested = metrics.get("matryoshka", {})  # --matryoshka_dims' smaller sizes
    sizes = f"; at {' / '.join(nested)} dims: {' / '.join(f'{f[early_stopping.metric]:.4f}' for f in nested.values())}"
    logger.info(
        f"step {state.step}: validation {early_stopping.metric} = {metrics[early_stopping.metric]:.4f}{best}"
        + (sizes if nested else "")
    )
    if early_stopping.should_stop:
        logger.info(f"Early stopping: no improvement in {early_stopping.patience} evaluations.")


def _shut_down(run: Run) -> None:
    """Release the DDP wrapper before the process group goes: a gloo group destroyed first makes the wrapper's
    destructor wait forever on a peer that has already exited."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    run.step_context.model = run.step_context.optimizer = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
