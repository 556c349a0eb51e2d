"""Interrupting a training run from a test: a signal to every one of its processes once a checkpoint is written."""

from __future__ import annotations

import contextlib
import fcntl
import signal
import subprocess

import psutil

F_SETPIPE_SZ = 1031  # Linux fcntl: set a pipe's capacity


def interrupt_after_checkpoint(
    command: list[str], step: int, *, cwd: str, env: dict, sig: int = signal.SIGKILL
) -> tuple[str, int]:
    """Start the run, send `sig` to all of its processes once the checkpoint of `step` is announced; returns what
    it wrote to stderr, to the end, and its exit status."""
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True
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
