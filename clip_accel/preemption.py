"""Preemption: a scheduler's warning signal becomes a checkpoint and an exit status the job script requeues on.

SIGUSR1 (SLURM's `--signal=USR1@120`, scripts/slurm/train.sbatch) and, under SLURM, SIGTERM (the scheduler
preempting the job) raise a flag. The processes agree on it before the first step and at logging steps (one tiny
all-reduce beside the loss's own sync), so all of them write the same checkpoint at the same step; the run then
exits with `PREEMPTED_EXIT` and names the checkpoint in the file `PREEMPTED_FILE` names (none: preempted during
start-up, nothing to keep), on which scripts/slurm/launch_node.sh requeues the job. Outside SLURM a SIGTERM keeps
its default: the process ends at once.

Who sent it decides. SLURM signals every process of the job step, and torchrun stops the survivors of a failed run
with SIGTERM too: a Python signal handler cannot tell these apart (it is not given the sender). So the preemption
signals are blocked, and one watcher thread per process takes them with `sigtimedwait`, which says who sent each:

- in a training process, SIGUSR1, or SIGTERM from anyone but its launcher, is a preemption. SIGTERM from its
  launcher (its parent, where torchrun or `accelerate launch` started it: `TORCHELASTIC_RUN_ID` is set) is a
  teardown: the process ends at once, with status 143 (128 + SIGTERM), for its peers may be gone and the next
  logging step's all-reduce would wait for them forever.
- in a process it forks (DataLoader workers, the preprocessing pass's pool), they are the training process's to
  act on and are dropped, except SIGTERM from the training process or its launcher (a DataLoader's shutdown, a
  pool's `terminate()`, torchrun's teardown of the process group), which ends it with status 143.

Blocked, not ignored, so a signal that arrives before the watcher runs waits for it: `clip-accel train` watches
from its first instruction, and launch_node.sh starts torchrun with the signals already blocked, so its training
processes inherit them blocked and keep one sent while they import torch. Two consequences of blocking: a program a
training process runs (`subprocess`) inherits them blocked too, with no watcher: it ignores them (and a SIGTERM
meant to stop it); and a thread that existed before the watcher started (torch's own, when launched another way)
may take a signal where it is not blocked: a handler then raises the flag, without knowing the sender.
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
PREEMPTED_FILE = "CLIP_ACCEL_PREEMPTED_FILE"  # where a preempted run names its checkpoint (launch_node.sh sets it)
TEARDOWN_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(Exception):
    """A preemption signal was received; a checkpoint of `step` was written (None: the signal came during start-up,
    before any checkpoint existed, and the run stopped before its first step). Resume from it."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet"
        super().__init__(f"preempted at step {step}; {where}")
        self.step, self.checkpoint = step, checkpoint


def preemption_signals() -> tuple[signal.Signals, ...]:
    return (signal.SIGUSR1, signal.SIGTERM) if "SLURM_JOB_ID" in os.environ else (signal.SIGUSR1,)


class SignalWatcher:
    """A thread taking `signals` (blocked in every thread but read here) with their senders. In a training process
    (`training`) a preemption raises `signalled`; anywhere, SIGTERM from one of `launchers` ends the process."""

    def __init__(self, signals: tuple[signal.Signals, ...], launchers: frozenset[int], training: bool) -> None:
        self.signals, self.launchers, self.training = signals, launchers, training
        self._signalled = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="preemption-watcher", daemon=True)

    @property
    def signalled(self) -> bool:
        return self._signalled.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def raise_flag(self, signum=None, frame=None) -> None:
        """Also the handler of a signal some thread took unblocked (sender unknown): a preemption."""
        if self.training:
            self._signalled.set()

    def _watch(self) -> None:
        while not self._stopping.is_set():
            received = signal.sigtimedwait(self.signals, 0.2)  # (a timeout, to notice `stop`)
            if received is None:
                continue
            if received.si_signo == signal.SIGTERM and received.si_pid in self.launchers:
                if self.training:
                    os.write(2, f"clip-accel: SIGTERM from the launcher (pid {received.si_pid}): ending now\n".encode())
                os._exit(TEARDOWN_EXIT)  # at once: no cleanup that could wait for a peer
            self.raise_flag()


_NEVER = SignalWatcher((), frozenset(), training=False)  # the flag off the main thread: never raised
_watching: SignalWatcher | None = None  # this process's watcher while `watching_for_preemption` runs


@contextmanager
def watching_for_preemption() -> Iterator[SignalWatcher]:
    """This process's preemption flag (`.signalled`) while the block runs; the signals' previous handling is
    restored after it. Nested blocks share the outermost one's watcher. Only the main thread can watch: elsewhere
    the flag never rises."""
    global _watching
    if _watching is not None or threading.current_thread() is not threading.main_thread():
        yield _watching or _NEVER
        return
    signals = preemption_signals()
    launchers = frozenset([os.getppid()] if "TORCHELASTIC_RUN_ID" in os.environ else [])
    watcher = SignalWatcher(signals, launchers, training=True)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    handlers = {number: signal.signal(number, watcher.raise_flag) for number in signals}
    _register_fork_hook()
    watcher.start()
    _watching = watcher
    try:
        yield watcher
    finally:
        _watching = None
        watcher.stop()
        while signal.sigtimedwait(signals, 0) is not None:  # arrived since: nobody acts on them now
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for number, handling in handlers.items():
            signal.signal(number, handling)


_fork_hook_registered = False


def _register_fork_hook() -> None:
    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_leave_preemption_to_the_parent)
        _fork_hook_registered = True


def _leave_preemption_to_the_parent() -> None:
    """In a process forked while its parent watches: the signals stay blocked (the mask is inherited), and a
    watcher of its own drops them, but ends it on SIGTERM from the parent or the parent's launcher."""
    global _watching
    parent, _watching = _watching, None
    if parent is not None:
        SignalWatcher(parent.signals, parent.launchers | {os.getppid()}, training=False).start()


def preempted_everywhere(accelerator: Accelerator, flag: SignalWatcher) -> bool:
    """Whether any process was signalled: the same answer on every process (a collective: call it on all)."""
    if accelerator.num_processes == 1:  # no device round trip at every logging step
        return flag.signalled
    signalled = torch.tensor([float(flag.signalled)], device=accelerator.device)
    return bool(accelerator.reduce(signalled, "max").item())


def name_the_checkpoint(preempted: Preempted) -> None:
    """Write the file `PREEMPTED_FILE` names, if set: the checkpoint's path (empty: none yet). Its existence tells
    scripts/slurm/launch_node.sh, which sees only torchrun's status (1 for any failure), that the run stopped for a
    preemption, and what the requeued job resumes from. Every process writes it (the same text, atomically)."""
    path = os.environ.get(PREEMPTED_FILE)
    if not path:
        return
    staging = f"{path}.{os.getpid()}"
    with open(staging, "w") as handle:
        handle.write(preempted.checkpoint or "")
    os.replace(staging, path)
