"""Preemption: a scheduler's warning signal becomes a checkpoint and an exit status the job script requeues on.

SIGUSR1 (SLURM's `--signal=USR1@120`, scripts/slurm/train.sbatch) and, under SLURM, SIGTERM (the scheduler
preempting the job) set a flag. The processes agree on it at logging steps (one tiny all-reduce beside the loss's
own sync), so all of them write the same checkpoint at the same step; the run then exits with `PREEMPTED_EXIT`,
on which scripts/slurm/launch_node.sh requeues the job. Outside SLURM a SIGTERM keeps its default (the process
ends at once): torchrun sends it to the surviving processes when one fails, and they must not wait for a
logging step that never comes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): "try again later"


class Preempted(Exception):
    """A preemption signal was received; a checkpoint of `step` was written. Resume from it."""

    def __init__(self, step: int, checkpoint: str) -> None:
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def preemption_signals() -> tuple[signal.Signals, ...]:
    return (signal.SIGUSR1, signal.SIGTERM) if "SLURM_JOB_ID" in os.environ else (signal.SIGUSR1,)


@contextmanager
def watching_for_preemption() -> Iterator[dict[str, bool]]:
    """A flag ({"signalled": bool}) the preemption signals set while the block runs; the previous handlers are
    restored after it. Signals can only be handled on the main thread: elsewhere the flag never rises."""
    flag = {"signalled": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame) -> None:
        flag["signalled"] = True

    previous = {number: signal.signal(number, handler) for number in preemption_signals()}
    try:
        yield flag
    finally:
        for number, handling in previous.items():
            signal.signal(number, handling)


def preempted_everywhere(accelerator: Accelerator, flag: dict[str, bool]) -> bool:
    """Whether any process was signalled: the same answer on every process (a collective: call it on all)."""
    if accelerator.num_processes == 1:  # no device round trip at every logging step
        return flag["signalled"]
    signalled = torch.tensor([float(flag["signalled"])], device=accelerator.device)
    return bool(accelerator.reduce(signalled, "max").item())
