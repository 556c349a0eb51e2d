"""How a training process sees a preemption: SIGTERM from SLURM is one, from torchrun a teardown; DataLoader workers
leave it to the training process. That a preempted run resumes as if never stopped (cached and streamed, 1 and 2
processes): tests/test_fault_matrix.py; the cross-node SLURM path: tests/test_distributed.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clip_accel.data.loader import make_dataloader
from clip_accel.preemption import TEARDOWN_EXIT, watching_for_preemption

ROOT = str(Path(__file__).resolve().parent.parent)

# A training process's view of the signals: it watches for a preemption and answers each line on stdin with whether
# one has arrived.
WATCHING = """
import sys, types
from clip_accel.preemption import preempted_everywhere, watching_for_preemption
one_process = types.SimpleNamespace(num_processes=1)
with watching_for_preemption() as flag:
    print("watching", flush=True)
    for line in sys.stdin:
        print("preempted" if preempted_everywhere(one_process, flag) else "running", flush=True)
"""


def start_watching(launcher: str) -> subprocess.Popen:
    """The process above under SLURM, started by this test process as torchrun (`launcher`) or srun starts it, with
    the signals blocked from its start (as scripts/slurm/launch_node.sh starts torchrun)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "SLURM_JOB_ID": "4242"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    if launcher == "torchrun":
        env["TORCHELASTIC_RUN_ID"] = "none"  # (set by torchrun in every process it starts)
    process = subprocess.Popen(
        [sys.executable, "-c", WATCHING],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM}),
    )
    assert process.stdout.readline() == "watching\n"
    return process


def answer_within(process: subprocess.Popen, expected: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while True:
        process.stdin.write("?\n")
        process.stdin.flush()
        answer = process.stdout.readline().strip()
        if answer == expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert answer == expected


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_sigterm_from_slurm_is_a_preemption_and_from_torchrun_a_teardown(launcher):
    process = start_watching(launcher)
    try:
        answer_within(process, "running")
        subprocess.run(["kill", "-TERM", str(process.pid)], check=True)  # from another process: SLURM preempting
        answer_within(process, "preempted")
        process.send_signal(signal.SIGTERM)  # from its parent: torchrun stopping the survivors of a failed run
        if launcher == "torchrun":
            assert process.wait(timeout=10) == TEARDOWN_EXIT  # ended at once: no logging step is waited for
        else:  # srun starts the process itself: its parent is SLURM's, and SIGTERM from it is a preemption
            answer_within(process, "preempted")
            assert process.poll() is None
    finally:
        process.kill()
        process.wait()


class Numbers(torch.utils.data.Dataset):
    """8 batches of one number; the last one never comes (its worker hangs)."""

    draws_captions = False  # (what make_dataloader asks of a dataset)

    def __len__(self) -> int:
        return 8

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        if positions == [7]:
            time.sleep(60)
        return {"numbers": torch.tensor(positions)}


def test_workers_leave_preemption_to_the_training_process_which_can_still_stop_them(monkeypatch):
    # Under SLURM a preemption signals every process, DataLoader workers too: SIGUSR1 and SIGTERM from another
    # process (SLURM) leave a worker serving batches (the training process decides when to stop); SIGTERM from the
    # training process (the DataLoader's shutdown terminates a worker that does not stop) still ends it.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.5)  # (shutdown's wait: 5 s)
    with watching_for_preemption():
        batches = iter(make_dataloader(Numbers(), 1, train=False, num_workers=1))
        next(batches)
        worker = batches._workers[0]
        for name in ("USR1", "TERM"):
            subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
        time.sleep(0.5)
        assert [next(batches)["numbers"].item() for _ in range(6)] == [1, 2, 3, 4, 5, 6]
        batches._shutdown_workers()  # (what the iterator's end or deletion does)
        assert worker.exitcode == TEARDOWN_EXIT
