"""Launching training processes from the tests: the documented CPU launches, and interrupting a run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = str(Path(__file__).resolve().parent.parent)
# Several CPU processes: ACCELERATE_USE_CPU=1 makes Accelerate join them (README); one thread each on 2 cores;
# unbuffered, so a test reading the log sees each line as it is written.
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TORCHRUN_2 = [*TORCHRUN, "--standalone", "--nproc_per_node", "2"]

F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity


def interrupt_after_checkpoint(
    command: list[str], step: int, *, cwd: str, env: dict, sig: int = signal.SIGKILL
) -> tuple[str, int]:
    """Start the run, send `sig` to all of its processes once the checkpoint of `step` is announced; returns what
    it wrote to stderr, to the end, and its exit status."""
    # SIGINT at its default in the run, as under a terminal: a shell's background job (CI started with `&`) has it
    # ignored, which every child inherits, and Python then raises no KeyboardInterrupt.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # A one-page pipe: the run blocks on its own log until this test has read it, so it cannot race past the
    # checkpoint to the end of training while the line that announces the checkpoint waits unread.
    fcntl.fcntl(process.stderr.fileno(), F_SETPIPE_SZ, 4096)
    log = []
    for line in process.stderr:
        log.append(line)
        if f"checkpoints/step-{step:07d}" in line:
            # Every process of the run: torchrun (and accelerate launch) start their workers in sessions of their
            # own, so signalling the launcher's process group alone would leave them training on their own.
            for victim in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    victim.send_signal(sig)
            break
    log += list(process.stderr)
    process.wait(timeout=60)
    assert process.returncode != 0, "the run finished before it could be interrupted; make it longer"
    return "".join(log), process.returncode
