"""Issue 41's fault matrix: a run on the demo data stopped at chosen steps, by SIGKILL and by preemption, cached and
streamed, on 1 and 2 processes, and resumed; each resumed run must equal the uninterrupted one bit for bit on its
whole log history (every evaluation and every logged loss, with their steps), its best step, its saved best model's
weights, its validation and test figures, and the batches it trained. A stream killed on 2 processes and resumed on
1 is checked for what an elastic resume keeps (`test_a_stream_killed_on_two_processes_resumes_on_one`).

The schedule (SCHEDULE): 192 pairs in global batches of 32, 6 steps an epoch, 3 epochs; a log every 3 steps, an
evaluation (and a checkpoint) at every epoch's end, a checkpoint every 4 steps. So step 5 is a plain step, 9 a
logging step, 12 an epoch end (logging, evaluation, checkpoint), 16 a checkpoint step (CELLS).

How the faults are made without a process per cell:
- SIGKILL after step N leaves what the run had written by then. The uninterrupted run copies its output folder at
  the end of step N (after that step's checkpoint, every process done writing); each copy is resumed with
  `--resume_from_checkpoint latest`. What a kill leaves changes only at a checkpoint or a new best model (kills
  after steps 8 to 11 leave the same folder), so each kill cell resumes from another checkpoint: 4, 8, 12, 16.
  The kill by a real signal, of launched runs on 1 and 2 processes, stays
  tests/test_checkpoint.py::test_killed_and_resumed_run_equals_the_uninterrupted_one.
- A preemption is a real SIGUSR1 the process sends itself before step N (on 2 processes only the main one: the
  processes agree on it at the next logging step). The run acts on it at the first logging step from N on:
  evaluates if due, checkpoints and raises `Preempted`. A signal during step 7, 8 or 9 (a plain, a checkpoint, a
  logging step) therefore makes one and the same cell, stopped at 9; at an epoch end the evaluation comes before
  the checkpoint (issue 41, item 1: with the evaluation after the stop, only the epoch-end cells fail).
- 1 process: here, in this test process. 2 processes: one torchrun launch (tests/fault_worker.py) runs the
  uninterrupted runs and every cell, and writes what each run did to a JSON file, compared here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import with_fresh_state
from launching import CPU_ENV, ROOT, TORCHRUN_2
from safetensors.torch import load_file
from test_streaming import STREAM_OPTIONS

import clip_accel.trainer as trainer
from clip_accel.config import DataConfig, ModelConfig, TrainConfig
from clip_accel.preemption import Preempted, watching_for_preemption

SCHEDULE = {
    "num_train_epochs": 3,
    "logging_steps": 3,
    "checkpointing_steps": 4,
    "eval_initial_model": False,
    "early_stopping_patience": 0,
    "learning_rate": 2e-3,
    "per_device_eval_batch_size": 32,
    "seed": 0,
}
GLOBAL_BATCH = 32
LOGGING_STEPS, EVALUATION_STEPS = [3, 6, 9, 12, 15, 18], [6, 12, 18]


@dataclass(frozen=True)
class Cell:
    name: str
    fault: str  # "sigkill" (after step `step`) or "preemption" (signalled before step `step`)
    step: int
    resumes_at: int  # the step of the checkpoint the resumed run starts from


CELLS = [
    Cell("sigkill-after-a-plain-step", "sigkill", 5, 4),  # before the first evaluation: no best model yet
    Cell("sigkill-after-a-logging-step", "sigkill", 9, 8),  # the checkpoint holds the losses of 7 and 8, unlogged
    Cell("sigkill-after-an-epoch-end", "sigkill", 12, 12),
    Cell("sigkill-after-a-checkpoint-step", "sigkill", 16, 16),
    Cell("preemption-during-a-plain-step", "preemption", 7, 9),  # acted on at the next logging step
    Cell("preemption-at-an-epoch-end", "preemption", 12, 12),  # evaluated before its checkpoint
]
KILL_STEPS = [cell.step for cell in CELLS if cell.fault == "sigkill"]
KINDS = ("cached", "streamed")


@dataclass(frozen=True)
class Inputs:
    """The session's demo catalogue, its shards and the tiny model's config; `root` holds every run's folder."""

    root: str
    demo_dir: str
    shards: str
    model_config: str


def configs(inputs: Inputs, kind: str, processes: int, output_dir: str, **overrides) -> tuple:
    values = {
        "data_dir": inputs.demo_dir,
        "cache_dir": os.path.join(inputs.root, "cache"),
        "scratch_config": inputs.model_config,
        "output_dir": output_dir,
        "per_device_train_batch_size": GLOBAL_BATCH // processes,
        **SCHEDULE,
    }
    if kind == "streamed":  # the demo's 4 shards of 48 rows, read by each process itself
        values |= {"data_dir": None, "dataset_name": inputs.shards, **STREAM_OPTIONS}
    values |= overrides
    return tuple(
        cls(**{name: value for name, value in values.items() if name in cls.__dataclass_fields__})
        for cls in (DataConfig, ModelConfig, TrainConfig)
    )


def observed_training(configs: tuple, at_step_end=None) -> dict:
    """`trainer.train(*configs)`, watched; `at_step_end(run, state)` is called at the end of every step (after its
    checkpoint). Returns what a cell compares: {"resumed_at": the step the loop started from, "batches": the caption
    ids of each step's batch of all processes from there on, "preempted_at": the step a preemption stopped the run
    at (else None), and for a finished run "processes", "history", "best_step", "validation", "test"}."""
    record = {"resumed_at": None, "batches": [], "preempted_at": None}
    fit = trainer.fit

    def watched_fit(run, state, on_step_end=None):
        record["resumed_at"] = state.step
        taken = run.train_data.taken

        def taking(batch: dict) -> None:
            record["batches"].append(batch["caption_ids"].tolist())
            taken(batch)

        def step_end(state) -> None:
            if at_step_end is not None:
                at_step_end(run, state)
            if on_step_end is not None:
                on_step_end(state)

        run.train_data.taken = taking
        return fit(run, state, step_end)

    trainer.fit = watched_fit
    try:
        result = with_fresh_state(trainer.train, *configs)
        metrics, training = result.metrics, result.metrics["training"]
        record |= {"processes": training["num_processes"], "best_step": training["best_step"]}
        record |= {"history": result.history, "validation": metrics["validation"], "test": metrics["test"]}
    except Preempted as preempted:
        record["preempted_at"] = preempted.step
    finally:
        trainer.fit = fit
    record["batches"] = global_batches(record["batches"])
    return record


def global_batches(mine: list[list[int]]) -> list[list[int]]:
    """Each step's batch of all processes: every process's share, in process order."""
    if not torch.distributed.is_initialized():
        return mine
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)
    return [sum(shares, []) for shares in zip(*every, strict=True)]


def on_main_process(action) -> None:
    """`action()` on the main process, once every process has got here; the others wait for it."""
    distributed = torch.distributed.is_initialized()
    if distributed:
        torch.distributed.barrier()
    if not distributed or torch.distributed.get_rank() == 0:
        action()
    if distributed:
        torch.distributed.barrier()


def whole_run(inputs: Inputs, kind: str, processes: int) -> dict:
    """The uninterrupted run, in KIND-PROCESSES/whole, its output folder copied at the end of each step of
    KILL_STEPS (every process's part of that step's checkpoint written) into KIND-PROCESSES/killed-after-N: what
    a SIGKILL then leaves."""
    folder = os.path.join(inputs.root, f"{kind}-{processes}")

    def keep_what_a_kill_leaves(run, state) -> None:
        if state.step in KILL_STEPS:
            killed = os.path.join(folder, f"killed-after-{state.step}")
            on_main_process(lambda: shutil.copytree(run.config.output_dir, killed))

    output = os.path.join(folder, "whole")
    return observed_training(configs(inputs, kind, processes, output), keep_what_a_kill_leaves) | {"output": output}


def signal_preemption_before(step: int):
    """An `at_step_end` that sends SIGUSR1 to the main process at the end of step `step - 1`, and waits until its
    preemption watcher has seen it."""

    def signal_at(run, state) -> None:
        if state.step == step - 1 and run.accelerator.is_main_process:
            os.kill(os.getpid(), signal.SIGUSR1)
            with watching_for_preemption() as flag:  # (the run's own watcher: nested blocks share it)
                deadline = time.monotonic() + 30
                while not flag.signalled and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert flag.signalled, "SIGUSR1 was not seen as a preemption"

    return signal_at


def run_cell(inputs: Inputs, kind: str, processes: int, cell: Cell) -> dict:
    """The cell's interrupted run (what the kill left, copied, or a preempted run) and its resumption, in
    KIND-PROCESSES/CELL-NAME: the resumed run's record, with "stopped_at" (the interrupted run's last step) and
    "batches_before" (the preempted run's batches; after a kill, the whole run's are)."""
    folder = os.path.join(inputs.root, f"{kind}-{processes}")
    output = os.path.join(folder, cell.name)
    if cell.fault == "sigkill":
        on_main_process(lambda: shutil.copytree(os.path.join(folder, f"killed-after-{cell.step}"), output))
        stopped_at, before = cell.step, None
    else:
        preempted = observed_training(configs(inputs, kind, processes, output), signal_preemption_before(cell.step))
        stopped_at, before = preempted["preempted_at"], preempted["batches"]
    resumed = observed_training(configs(inputs, kind, processes, output, resume_from_checkpoint="latest"))
    return resumed | {"stopped_at": stopped_at, "batches_before": before, "output": output}


def evaluations(history: list[dict]) -> list[dict]:
    """Every evaluation record of a log history (its step, epoch and figures), in order."""
    return [record for record in history if any(name.startswith("eval_") for name in record)]


def assert_resumed_as_uninterrupted(cell: Cell, resumed: dict, whole: dict, processes: int) -> None:
    # The schedule makes the steps what the cells say they are.
    assert [record["step"] for record in whole["history"] if "loss" in record] == LOGGING_STEPS
    assert [record["step"] for record in evaluations(whole["history"])] == EVALUATION_STEPS
    assert whole["processes"] == resumed["processes"] == processes
    stopped_at = cell.step if cell.fault == "sigkill" else cell.resumes_at
    assert (resumed["stopped_at"], resumed["resumed_at"]) == (stopped_at, cell.resumes_at)
    before = resumed["batches_before"] if cell.fault == "preemption" else whole["batches"][:stopped_at]
    assert len(before) == stopped_at
    batches = before[: cell.resumes_at] + resumed["batches"]
    assert len(batches) == len(whole["batches"]) == 18
    assert [step for step, (a, b) in enumerate(zip(batches, whole["batches"], strict=True), 1) if a != b] == []
    # The run: every evaluation and logged loss, the best model and the figures, bit for bit.
    assert [record["step"] for record in evaluations(resumed["history"])] == EVALUATION_STEPS
    assert evaluations(resumed["history"]) == evaluations(whole["history"])
    assert resumed["history"] == whole["history"]
    assert resumed["best_step"] == whole["best_step"]
    assert resumed["validation"] == whole["validation"]
    assert resumed["test"] == whole["test"]
    best, best_resumed = (load_file(Path(run["output"], "model.safetensors")) for run in (whole, resumed))
    assert best.keys() == best_resumed.keys()
    assert [name for name, weight in best.items() if not torch.equal(best_resumed[name], weight)] == []


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this module on one thread: a tiny model's steps gain nothing from more, and on a shared
    2-core machine two threads per process ran the matrix 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, demo_dir, demo_shards, tiny_model_config_path) -> Inputs:
    return Inputs(str(tmp_path_factory.mktemp("fault-matrix")), demo_dir, demo_shards, tiny_model_config_path)


@pytest.fixture(scope="module")
def one_process(inputs):
    """The uninterrupted runs on 1 process (here), each made once, when first asked for."""
    runs = {}

    def whole(kind: str) -> dict:
        if kind not in runs:
            runs[kind] = whole_run(inputs, kind, 1)
        return runs[kind]

    return whole


@pytest.fixture(scope="module")
def two_processes(inputs) -> dict:
    """Every run of the matrix on 2 processes: {kind: {"whole": record, cell name: record}}."""
    command = [*TORCHRUN_2, "tests/fault_worker.py", inputs.root, inputs.demo_dir, inputs.shards, inputs.model_config]
    finished = subprocess.run(command, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    return json.loads(Path(inputs.root, "two-processes.json").read_text())


@pytest.mark.parametrize("cell", CELLS, ids=lambda cell: cell.name)
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_stopped_on_one_process_resumes_as_if_never_stopped(kind, cell, inputs, one_process):
    whole = one_process(kind)
    assert_resumed_as_uninterrupted(cell, run_cell(inputs, kind, 1, cell), whole, 1)


@pytest.mark.slow
@pytest.mark.parametrize("cell", CELLS, ids=lambda cell: cell.name)
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_stopped_on_two_processes_resumes_as_if_never_stopped(kind, cell, two_processes):
    runs = two_processes[kind]
    assert "error" not in runs[cell.name], runs[cell.name].get("error")
    assert_resumed_as_uninterrupted(cell, runs[cell.name], runs["whole"], 2)


@pytest.mark.slow
def test_a_stream_killed_on_two_processes_resumes_on_one(inputs, one_process, two_processes):
    # Killed after step 9 on 2 processes (checkpoint 8, two thirds into epoch 2), resumed on 1 with the same global
    # batch. Another topology cuts the rest of the pass into other batches (the same rows, not the same batches:
    # clip_accel/data/streaming.py), so the run goes on from step 9 as no uninterrupted run does; what it must
    # keep: the history and best model so far, every row of the pass once, the next passes as 1 process reads them.
    whole, alone = two_processes["streamed"]["whole"], one_process("streamed")
    killed = os.path.join(inputs.root, "streamed-2", "killed-after-9")
    output = os.path.join(inputs.root, "streamed-2-then-1")
    shutil.copytree(killed, output)
    resumed = observed_training(configs(inputs, "streamed", 1, output, resume_from_checkpoint="latest"))
    assert (whole["processes"], resumed["processes"], resumed["resumed_at"]) == (2, 1, 8)
    assert [r for r in resumed["history"] if r["step"] <= 8] == [r for r in whole["history"] if r["step"] <= 8]
    assert [(r["step"], sorted(r)) for r in resumed["history"]] == [(r["step"], sorted(r)) for r in whole["history"]]
    epoch_2 = [row for batch in whole["batches"][6:8] + resumed["batches"][:4] for row in batch]
    assert len(resumed["batches"]) == 10  # (the demo's rows, each once: two of them share a caption id)
    assert sorted(epoch_2) == sorted(row for batch in whole["batches"][6:12] for row in batch)
    assert resumed["batches"][4:] == alone["batches"][12:], "epoch 3 is not the pass 1 process reads"
    # The best model: the first best evaluation of the run's own history, kept across the resume.
    figures = [record["eval_mean_R@1"] for record in evaluations(resumed["history"])]
    assert resumed["best_step"] == EVALUATION_STEPS[figures.index(max(figures))]
    best = evaluations(resumed["history"])[figures.index(max(figures))]
    assert resumed["validation"] == {name[5:]: value for name, value in best.items() if name.startswith("eval_")}
    saved, saved_before = (load_file(Path(folder, "model.safetensors")) for folder in (output, killed))
    same = all(torch.equal(saved[name], weight) for name, weight in saved_before.items())
    assert same == (resumed["best_step"] <= 8), "the best model of before the kill, kept unless beaten after it"
    if resumed["best_step"] == whole["best_step"] <= 8:  # the uninterrupted run's best model: its test figures
        assert resumed["test"] == whole["test"]
