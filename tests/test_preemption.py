"""A preempted run resumes as if never stopped: the same evaluations, the same best model, the same test figures,
wherever the signal lands (the cross-node SLURM path: tests/test_distributed.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import with_fresh_state
from safetensors.torch import load_file
from test_streaming import STREAM_OPTIONS

import clip_accel.trainer as trainer
from clip_accel.data.loader import make_dataloader
from clip_accel.preemption import TEARDOWN_EXIT, Preempted, watching_for_preemption

ROOT = str(Path(__file__).resolve().parent.parent)

EVALUATIONS = ("step", "eval_mean_R@1", "eval_image_to_text_R@1", "eval_text_to_image_R@5")


def evaluations(history: list[dict]) -> list[tuple]:
    """Every evaluation of a run's log history (log_history.json), in order."""
    return [tuple(record[key] for key in EVALUATIONS) for record in history if "eval_mean_R@1" in record]


def preempt_at(step: int, monkeypatch) -> None:
    """The preemption signal seen at the logging step `step` (as if it arrived during that step)."""
    calls = {"seen": 0}

    def signalled(accelerator, flag) -> bool:
        calls["seen"] += 1  # (once before the first step, then, logging every step, once per step)
        return calls["seen"] == step + 1

    monkeypatch.setattr(trainer, "preempted_everywhere", signalled)


@pytest.mark.parametrize("streamed", [False, True], ids=["cached", "streamed"])
@pytest.mark.parametrize("step", [6, 7], ids=["at-an-epoch-end-evaluation", "at-a-plain-step"])
def test_a_preempted_run_resumes_with_the_uninterrupted_runs_evaluations_best_model_and_test_figures(
    step, streamed, make_configs, demo_shards, tmp_path, monkeypatch
):
    # 192 pairs / 32 = 6 steps an epoch, 3 epochs: evaluations at steps 6, 12 and 18, logging every step. Streamed:
    # the demo's 4 shards of 48 rows, read by the process itself (a resume then cuts the same batches).
    options = {"num_train_epochs": 3, "eval_initial_model": False, "early_stopping_patience": 0}
    if streamed:
        options |= {"data_dir": None, "dataset_name": demo_shards, **STREAM_OPTIONS}
    whole = with_fresh_state(trainer.train, *make_configs(**options, output_dir=str(tmp_path / "whole")))
    out = str(tmp_path / "preempted")
    with monkeypatch.context() as patched:
        preempt_at(step, patched)
        with pytest.raises(Preempted) as preempted:
            with_fresh_state(trainer.train, *make_configs(**options, output_dir=out))
    assert preempted.value.step == step
    resumed = with_fresh_state(trainer.train, *make_configs(**options, output_dir=out, resume_from_checkpoint="latest"))
    assert [record[0] for record in evaluations(resumed.history)] == [6, 12, 18]
    assert evaluations(resumed.history) == evaluations(whole.history)
    assert resumed.metrics["training"]["best_step"] == whole.metrics["training"]["best_step"]
    assert resumed.metrics["test"] == whole.metrics["test"]
    best, best_resumed = (load_file(Path(folder, "model.safetensors")) for folder in (tmp_path / "whole", out))
    for name, weight in best.items():
        assert torch.equal(best_resumed[name], weight), name


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
