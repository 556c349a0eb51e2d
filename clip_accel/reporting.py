"""What a run says as it goes: the progress bar, the training log lines and history records, non-finite step counts
and the training summary of eval_results.json."""

from __future__ import annotations

import sys

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .checkpoint import TrainerState
from .early_stopping import EarlyStopping
from .model import logit_scale_value, unwrap
from .optim import top_learning_rate
from .startup import Run

logger = get_logger(__name__)


def progress_bar(run: Run, state: TrainerState) -> tqdm:
    """The one bar (pairs/s, time left; loss and LR set at logging steps, so no extra host sync), drawn by the
    local main process where a terminal is attached; elsewhere plain log lines say the same. TQDM_DISABLE=1 (or
    any TQDM_* setting) still applies."""
    drawn = run.accelerator.is_local_main_process and sys.stderr.isatty()
    pairs = run.config.global_batch_size(run.accelerator.num_processes)
    hidden = {} if drawn else {"disable": True}
    return tqdm(total=run.total_steps, initial=state.step, desc="Training", unit="pairs", unit_scale=pairs, **hidden)


def log_training(run: Run, state: TrainerState, losses: list[torch.Tensor], progress: tqdm) -> None:
    # The only host-device sync of the loss, once per logging interval.
    loss = mean_over_processes(run, losses).mean().item()
    learning_rate = top_learning_rate(run.step_context.scheduler)
    logit_scale = logit_scale_value(unwrap(run.accelerator, run.model))
    epochs = epochs_done(run, state)
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


def mean_over_processes(run: Run, losses: list[torch.Tensor]) -> torch.Tensor:
    """Each step's loss averaged over the processes: (steps,), the same on every process."""
    return run.accelerator.reduce(torch.stack(losses), "mean")


def epochs_done(run: Run, state: TrainerState) -> float:
    """Epochs completed, fractional (as transformers.Trainer logs them): 1.0 at the end of the first epoch."""
    return round(state.epoch + state.batches_in_epoch / len(run.train_data), 4)


def count_nonfinite(state: TrainerState, skips: list[torch.Tensor], limit: int) -> list:
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


def training_summary(run: Run, state: TrainerState, early_stopping: EarlyStopping) -> dict:
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
        # Per split: {"truncated", "captions", "max_tokens"}; a stream's counts the captions it read.
        "truncated_captions": {role: counts.as_dict() for role, counts in run.truncation.items()},
        "epochs_run": round(state.step / run.steps_per_epoch, 2),
        "best_step": early_stopping.best_step,
        "early_stopping_metric": early_stopping.metric,
        "stopped_early": early_stopping.should_stop,
        "num_processes": processes,
        "mixed_precision": run.accelerator.mixed_precision,
        "global_batch_size": run.config.global_batch_size(processes),
    }
