"""Two CPU processes mean the same as one: loss, weights, recall, schedule, freezing, and a real launch.

Launched the way the README documents for CPU machines: `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`
(`accelerate launch --cpu --num_processes 2` starts only one process on a CPU-only machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import distributed_worker
import psutil
import pytest
import torch
from launching import CPU_ENV, TORCHRUN_2
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*TORCHRUN_2, *args], cwd=REPO, env=CPU_ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Every scenario on 2 processes (torchrun) and on 1 process (here)."""
    outdir = tmp_path_factory.mktemp("distributed")
    torchrun("tests/distributed_worker.py", str(outdir))
    distributed_worker.main(str(outdir))
    return lambda name, world: torch.load(outdir / f"{name}-{world}.pt", weights_only=False)


def _assert_same_step(one: dict, two: dict) -> None:
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for name, weight in one["after"].items():
        torch.testing.assert_close(two["after"][name], weight, rtol=1e-5, atol=1e-7, msg=name)
    moved = [name for name, weight in one["after"].items() if not torch.equal(weight, one["before"][name])]
    assert len(moved) == len(one["after"])


@pytest.mark.parametrize(
    "scenario", ["step", "step_local_loss", "step_exact_accumulation", "step_exact_accumulation_local_loss"]
)
def test_two_processes_times_b_equal_one_process_times_2b(measured, scenario):
    # step: 2 x 8 vs 16 (the global loss on each process: the gather's backward takes its slice x 2); local
    # loss: same gradient with O(B x 2B) logits (the gather's backward reduce-scatters); exact accumulation:
    # 2 x (2 micro x 4) vs one batch of 16, with either loss.
    _assert_same_step(measured("step", 1), measured(scenario, 2))


@pytest.mark.parametrize("world", [1, 2])
def test_the_weight_ema_on_two_processes_equals_one_process_s(measured, world):
    one, two = measured("ema_step", 1), measured("ema_step", world)
    _assert_same_step(one, two)
    for name, average in one["ema"].items():  # halfway between the weights before and after (decay 0.5)
        torch.testing.assert_close(two["ema"][name], average, rtol=1e-5, atol=1e-7, msg=name)
        halfway = (one["before"][name] + one["after"][name]) / 2
        torch.testing.assert_close(average, halfway, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("scenario", ["siglip_step", "siglip_step_exact_accumulation"])
def test_sigmoid_loss_on_two_processes_equals_one_process_with_the_doubled_batch(measured, scenario):
    # SigLIP: 2 x 8 (each process its images against all 16 texts, the texts' gradient reduce-scattered) and
    # 2 x (2 micro x 4) with exact accumulation vs one batch of 16; the bias and the scale move too.
    one, two = measured("siglip_step", 1), measured(scenario, 2)
    _assert_same_step(one, two)
    assert {"logit_scale", "logit_bias"} <= set(two["after"])


@pytest.mark.parametrize("scenario", ["siglip2_step", "siglip2_step_exact_accumulation"])
def test_siglip2_on_two_processes_equals_one_process_with_the_doubled_batch(measured, scenario):
    # SigLIP 2: patch sequences of different grids (most padded), the same sigmoid loss and gather.
    one, two = measured("siglip2_step", 1), measured(scenario, 2)
    _assert_same_step(one, two)
    assert "clip.vision_model.embeddings.position_embedding.weight" in two["after"]


@pytest.mark.parametrize("world", [1, 2])
def test_sigmoid_exact_accumulation_equals_one_batch(measured, world):
    _assert_same_step(measured("siglip_step", 1), measured("siglip_step_exact_accumulation", world))


@pytest.mark.parametrize("scenario", ["lora_step", "lora_step_exact_accumulation"])
def test_lora_on_two_processes_trains_the_adapters_as_on_one(measured, scenario):
    one, two = measured("lora_step", 1), measured(scenario, 2)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    for name, weight in one["after"].items():
        torch.testing.assert_close(two["after"][name], weight, rtol=1e-5, atol=1e-7, msg=name)
    moved = {name for name, weight in two["after"].items() if not torch.equal(weight, two["before"][name])}
    # Every adapter weight moves (lora_B is set non-zero first), nothing outside the adapters does.
    assert moved == {name for name in two["after"] if ".lora_" in name} and len(moved) == 32


@pytest.mark.parametrize("world", [1, 2])
def test_exact_accumulation_of_micro_batches_of_4_equals_one_batch_of_16(measured, world):
    # 1 process x 4 micro-batches of 4, and 2 processes x 2 micro-batches of 4, against 1 process x 16.
    _assert_same_step(
        measured("step", 1), measured("step_exact_accumulation_4" if world == 1 else "step_exact_accumulation", world)
    )


@pytest.mark.parametrize("batches_per_epoch", [8, 6])
@pytest.mark.parametrize("world", [1, 2])
def test_plain_accumulation_steps_once_per_group_the_short_last_one_included(measured, world, batches_per_epoch):
    # 4 micro-batches per step for 2 epochs: 8 batches an epoch make 2 full groups, 6 a full group and one of 2
    # that steps on its own mean (it neither steps 4 times nor leaks its gradients into the next epoch).
    trained = measured(f"plain_accumulation_{batches_per_epoch}", world)
    by_hand = distributed_worker.plain_accumulation_by_hand(batches_per_epoch)
    assert trained["optimizer_steps"] == by_hand["optimizer_steps"] == 4
    for name, weight in by_hand["after"].items():
        torch.testing.assert_close(trained["after"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_torchrun_without_accelerate_use_cpu_stops_before_any_work(tmp_path, demo_dir):
    # Without ACCELERATE_USE_CPU=1 on a machine without GPUs Accelerate joins neither process: two runs would
    # train alone into the same folder. The start-up check stops both, before the data is read.
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    command = [*TORCHRUN_2, "scripts/train.py", "--data_dir", demo_dir, "--scratch_config", "clip-tiny"]
    command += ["--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "The launcher started 2 processes, but Accelerate sees 1" in result.stderr
    assert "ACCELERATE_USE_CPU=1" in result.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out" / "skipped_rows.jsonl").exists()


def test_plain_accumulation_is_not_a_bigger_contrastive_batch():
    """Why exact accumulation is the default: plain accumulation gives a different gradient."""
    from accelerate import Accelerator

    from clip_accel.step import plain_step

    accelerator = Accelerator(cpu=True)
    context = distributed_worker.step_context(accelerator)
    pairs = distributed_worker.synthetic_pairs(distributed_worker.GLOBAL_BATCH, seed=1)
    plain_loss, _ = plain_step(context, [distributed_worker.stack(pairs[i : i + 4]) for i in range(0, 16, 4)])
    assert plain_loss.item() < distributed_worker.one_step(Accelerator(cpu=True), 1)["loss"] - 0.5


@pytest.mark.parametrize("strategy", ["none", "vision_layers", "backbones"])
def test_freezing_under_ddp_without_find_unused_parameters(measured, strategy):
    one, two = measured(f"freeze_{strategy}", 1), measured(f"freeze_{strategy}", 2)
    for name, weight in two["after"].items():
        torch.testing.assert_close(weight, one["after"][name], rtol=1e-5, atol=1e-7, msg=name)
    frozen = [n for n in two["after"] if torch.equal(two["after"][n], two["before"][n])]
    assert bool(frozen) == (strategy != "none")


def test_recall_on_two_processes_equals_one_process_exactly(measured):
    one, two = measured("evaluate", 1), measured("evaluate", 2)
    assert one["num_pairs"] == two["num_pairs"] == distributed_worker.EVAL_PAIRS
    assert two == one


def test_uneven_last_batches_give_every_collective_equal_sizes_and_one_process_figures(measured):
    # 45 pairs in batches of 8 on 2 processes: 23 + 22 rows, last batches of 7 and 6. NCCL needs every process to
    # hand each collective the same sizes (gloo, here, would forgive some mismatches).
    one, two = measured("uneven_evaluation", 1), measured("uneven_evaluation", 2)
    assert "zero_shot_top1" in one["metrics"] and two["metrics"] == one["metrics"]
    assert len(one["image_only"]) == 45  # the repeated pairs that even out the last batches dropped, in order
    # (The last batch is 5 pairs on one process and a padded 8 on two: BLAS may round differently.)
    torch.testing.assert_close(two["image_only"], one["image_only"], rtol=1e-5, atol=1e-6)
    first, second = two["collectives"]
    assert first == second, "a collective saw different sizes on the two processes"
    # gather_for_metrics (all_gather on gloo), the loss's gather and its backward; DDP's own gradient all-reduce
    # runs in its C++ reducer, on buckets of equal size by construction.
    assert {name for name, _ in first} == {"all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"}


def run_options(demo_dir: str, model_config: str, out) -> list[str]:
    """A short demo run: 192 pairs / (16 x 2 processes) = 6 micro-batches per process per epoch, 2 accumulated
    per optimizer step."""
    options = {
        "data_dir": demo_dir,
        "scratch_config": model_config,
        "output_dir": out,
        "cache_dir": out.parent / "cache",
        "num_train_epochs": 8,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 2,
        "per_device_eval_batch_size": 16,
        "learning_rate": 2e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "logging_steps": 1,
        "early_stopping_patience": 0,
    }
    return [str(part) for name, value in options.items() for part in (f"--{name}", value)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, demo_dir, tiny_model_config_path):
    out = tmp_path_factory.mktemp("ddp-run") / "out"
    result = torchrun("scripts/train.py", *run_options(demo_dir, tiny_model_config_path, out))
    return out, result.stdout + result.stderr


@pytest.mark.learning
def test_launch_line_trains_on_two_processes_and_logs_what_it_got(two_process_run):
    out, log = two_process_run
    results = json.loads((out / "eval_results.json").read_text())
    assert results["training"]["num_processes"] == 2
    assert results["training"]["global_batch_size"] == 16 * 2 * 2
    assert "Processes: 2 (MULTI_CPU)" in log and "Global batch: 64 = 16 per device x 2 processes x 2" in log
    assert results["test"]["mean_R@1"] > results["initial"]["test"]["mean_R@1"]
    assert log.count("Results\n") == 1  # the table is printed once, by the main process


def test_schedule_ends_where_it_should_on_two_processes(two_process_run):
    out, _ = two_process_run
    history = [r for r in json.loads((out / "log_history.json").read_text()) if "loss" in r]
    results = json.loads((out / "eval_results.json").read_text())
    # 192 pairs / (16 x 2 processes) = 6 micro-batches per process per epoch -> 3 optimizer steps per epoch.
    assert results["training"]["planned_steps"] == 24
    assert [r["step"] for r in history] == list(range(1, 25))
    assert history[1]["learning_rate"] == pytest.approx(2e-3)  # end of warmup
    assert history[-1]["learning_rate"] == 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


FAKE_SCONTROL = """#!/bin/bash
# What scripts/slurm/launch_node.sh asks of SLURM: the job's hosts (two "nodes" on this machine) and a requeue.
case "$1" in
    show) printf '127.0.0.1\\n127.0.0.1\\n' ;;
    requeue) echo "requeue $2" >> "$FAKE_SLURM_LOG" ;;
esac
"""


def start_slurm_nodes(tmp_path, options: list[list[str]], port: int, restarts: int = 0) -> list[subprocess.Popen]:
    """scripts/slurm/launch_node.sh on two faked SLURM nodes of one process each, as `srun` would start it (the
    SLURM_* variables; `scontrol` faked on PATH); node RANK's output goes to tmp_path/node{RANK}.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1"}
    nodes = []
    for rank in (0, 1):
        env = {**CPU_ENV, **slurm, "SLURM_NODEID": str(rank), "SLURM_RESTART_COUNT": str(restarts)}
        env |= {"PATH": f"{bin_dir}:{env['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "scontrol.log")}
        env["CLIP_ACCEL_MASTER_PORT"] = str(port)
        command = ["bash", "scripts/slurm/launch_node.sh", *options[rank]]
        with open(tmp_path / f"node{rank}.log", "a") as handle:
            nodes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT))
    return nodes


def exit_statuses(nodes: list[subprocess.Popen]) -> list[int]:
    for process in nodes:
        process.wait(timeout=600)
    return [process.returncode for process in nodes]


def node_logs(tmp_path) -> list[str]:
    return [(tmp_path / f"node{rank}.log").read_text() for rank in (0, 1)]


def signal_every_process(nodes: list[subprocess.Popen], sig: int) -> int:
    """What SLURM does to a job step (`--signal`, a preemption): `sig` to every process of every node, the node
    scripts, torchrun, the training processes (torchrun starts them in sessions of their own) and their DataLoader
    workers. Returns how many processes it reached."""
    victims = [psutil.Process(node.pid) for node in nodes]
    victims += [child for node in victims for child in node.children(recursive=True)]
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(sig)
    return len(victims)


def wait_for_log(nodes: list[subprocess.Popen], tmp_path, text: str) -> None:
    while text not in node_logs(tmp_path)[0]:
        assert nodes[0].poll() is None, node_logs(tmp_path)[0][-5000:]
        time.sleep(0.05)


def test_two_slurm_nodes_without_shared_storage_train_as_two_processes_of_one_node(
    two_process_run, tmp_path, demo_dir, tiny_model_config_path
):
    # Two single-process "nodes" on this machine, started by the SLURM per-node script, each with output and cache
    # folders the other never sees (what node-local disks look like to the code: nothing of one node's folder can
    # be read by the other).
    outs = [tmp_path / f"node{rank}" / "out" for rank in (0, 1)]
    options = [run_options(demo_dir, tiny_model_config_path, out) for out in outs]
    nodes = start_slurm_nodes(tmp_path, options, free_port())
    assert exit_statuses(nodes) == [0, 0], [log[-5000:] for log in node_logs(tmp_path)]
    logs, (node0, node1) = node_logs(tmp_path), outs
    assert "Processes: 2 (MULTI_CPU)" in logs[0] and "node-local" in logs[0]
    one_node, _ = two_process_run
    assert (
        json.loads((node0 / "eval_results.json").read_text())["test"]
        == json.loads((one_node / "eval_results.json").read_text())["test"]
    )
    expected, actual = load_file(one_node / "model.safetensors"), load_file(node0 / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    # Each node keeps its own checkpoints (to resume from its own disk); the model and results are node 0's.
    assert os.listdir(node0 / "checkpoints") == os.listdir(node1 / "checkpoints") != []
    assert not (node1 / "model.safetensors").exists()

    # Node 1 lost its newest checkpoint (killed mid-save): both nodes resume from the newest step both hold (alone,
    # node 0 would resume at the end while node 1 trains on), and end where the uninterrupted run ended.
    assert sorted(os.listdir(node1 / "checkpoints")) == ["step-0000021", "step-0000024"]
    shutil.rmtree(node1 / "checkpoints" / "step-0000024")
    resume = ["--resume_from_checkpoint", "latest", "--overwrite_output_dir"]
    nodes = start_slurm_nodes(tmp_path, [[*node_options, *resume] for node_options in options], free_port())
    assert exit_statuses(nodes) == [0, 0], [log[-5000:] for log in node_logs(tmp_path)]
    log = node_logs(tmp_path)[0]
    assert "newest checkpoints differ (process 0: step 24); every process resumes from step 21" in log
    assert f"Resumed from {node0}/checkpoints/step-0000021" in log
    actual = load_file(node0 / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_a_preempted_slurm_job_checkpoints_exits_75_requeues_and_resumes_as_if_never_stopped(
    two_process_run, tmp_path, demo_dir, tiny_model_config_path
):
    # SIGUSR1 (train.sbatch's --signal=USR1@120) to both nodes' scripts mid-run, on shared storage (one output
    # folder); then the requeued job: the same command, SLURM_RESTART_COUNT=1.
    out = tmp_path / "out"
    options = [run_options(demo_dir, tiny_model_config_path, out)] * 2
    nodes = start_slurm_nodes(tmp_path, options, free_port())
    while "step 5/24" not in node_logs(tmp_path)[0]:
        assert nodes[0].poll() is None, node_logs(tmp_path)[0][-5000:]
        time.sleep(0.05)
    for process in nodes:
        process.send_signal(signal.SIGUSR1)
    assert exit_statuses(nodes) == [75, 75], [log[-5000:] for log in node_logs(tmp_path)]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"  # once, by the main node
    checkpoint = sorted(os.listdir(out / "checkpoints"))[-1]  # the preemption's (older ones: at epoch ends)
    preempted_at = int(checkpoint.removeprefix("step-"))
    assert 5 <= preempted_at < 24 and f"Preempted: checkpoint {out}/checkpoints/{checkpoint}" in node_logs(tmp_path)[0]
    assert not (out / "eval_results.json").exists()  # the run's end was not reached

    nodes = start_slurm_nodes(tmp_path, options, free_port(), restarts=1)
    assert exit_statuses(nodes) == [0, 0], [log[-5000:] for log in node_logs(tmp_path)]
    assert f"Resumed from {out}/checkpoints/{checkpoint}" in node_logs(tmp_path)[0]
    one_node, _ = two_process_run
    expected, actual = load_file(one_node / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_sigterm_to_every_process_with_dataloader_workers_checkpoints_then_requeues_once(
    tmp_path, demo_dir, tiny_model_config_path
):
    # A preemption as SLURM sends it: SIGTERM to every process of the step, DataLoader workers included. The workers
    # carry on (the training processes decide), every process checkpoints at its next logging step, both nodes
    # exit 75 and the main node requeues the job once.
    out = tmp_path / "out"
    options = [[*run_options(demo_dir, tiny_model_config_path, out), "--dataloader_num_workers", "1"]] * 2
    nodes = start_slurm_nodes(tmp_path, options, free_port())
    wait_for_log(nodes, tmp_path, "step 5/24")
    # 2 scripts, 2 torchruns, 2 training processes and at least one DataLoader worker each
    assert signal_every_process(nodes, signal.SIGTERM) >= 8
    statuses, logs = exit_statuses(nodes), node_logs(tmp_path)
    assert statuses == [75, 75], [log[-5000:] for log in logs]
    assert not any("killed by signal" in log for log in logs)
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    checkpoint = sorted(os.listdir(out / "checkpoints"))[-1]
    assert 5 <= int(checkpoint.removeprefix("step-")) < 24
    assert f"Preempted: checkpoint {out}/checkpoints/{checkpoint}" in logs[0]


def wait_for_training_processes(nodes: list[subprocess.Popen]) -> None:
    """Until each node's torchrun has started its training process (which is then still importing torch)."""
    deadline = time.monotonic() + 60
    while not all(len(psutil.Process(node.pid).children(recursive=True)) >= 2 for node in nodes):
        assert time.monotonic() < deadline and all(node.poll() is None for node in nodes)
        time.sleep(0.01)


def test_a_preemption_during_start_up_is_kept_and_the_requeued_job_starts_from_scratch(
    tmp_path, demo_dir, tiny_model_config_path
):
    # SIGUSR1 to every process while the training processes are still starting (importing torch): no step was
    # taken, so there is nothing to checkpoint; both nodes exit 75 at once, the job is requeued, and the requeued
    # job finds no checkpoint and says it starts from scratch.
    out = tmp_path / "out"
    options = [run_options(demo_dir, tiny_model_config_path, out) + ["--num_train_epochs", "1"]] * 2
    nodes = start_slurm_nodes(tmp_path, options, free_port())
    wait_for_training_processes(nodes)
    signal_every_process(nodes, signal.SIGUSR1)
    statuses, logs = exit_statuses(nodes), node_logs(tmp_path)
    assert statuses == [75, 75], [log[-5000:] for log in logs]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "Preempted during start-up, before any checkpoint" in logs[0]
    assert "the requeued job starts from scratch" in logs[0]
    assert not (out / "checkpoints").exists()

    nodes = start_slurm_nodes(tmp_path, options, free_port(), restarts=1)
    assert exit_statuses(nodes) == [0, 0], [log[-5000:] for log in node_logs(tmp_path)]
    assert f"{out}/checkpoints holds no checkpoint: starting from scratch" in node_logs(tmp_path)[0]
    assert (out / "model.safetensors").is_file()


def test_a_preempted_run_that_fails_without_a_checkpoint_is_not_requeued(tmp_path, demo_dir, tiny_model_config_path):
    # The run fails at start-up (its output folder already holds a model) after the preemption signal arrived: no
    # checkpoint, so no requeue (the requeued job would fail the same way); the nodes report the failure.
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"")
    nodes = start_slurm_nodes(tmp_path, [run_options(demo_dir, tiny_model_config_path, out)] * 2, free_port())
    wait_for_training_processes(nodes)
    signal_every_process(nodes, signal.SIGUSR1)
    statuses, logs = exit_statuses(nodes), node_logs(tmp_path)
    assert 0 not in statuses and 75 not in statuses, [log[-5000:] for log in logs]
    assert "already holds a model" in logs[0]
    assert not (tmp_path / "scontrol.log").exists()
    assert "not requeueing" in logs[0]


FAKE_PYTHON = """#!/bin/bash
# Stands in for python: records the command the node script would run.
echo "$@" >> "$FAKE_PYTHON_LOG"
"""


def run_node_script(tmp_path, **variables: str) -> subprocess.CompletedProcess:
    """scripts/slurm/launch_node.sh with one node's SLURM variables (`variables` override them) and python faked:
    what it would launch is written to tmp_path/python.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("python", FAKE_PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CLIP_ACCEL_"))}
    env |= {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "FAKE_PYTHON_LOG": str(tmp_path / "python.log")} | variables
    command = ["bash", "scripts/slurm/launch_node.sh", "--config", "demo"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_the_node_script_takes_the_port_from_any_job_id(tmp_path):
    for job_id, port in (("42", 20042), ("4242", 24242), ("1234567", 24567)):
        assert run_node_script(tmp_path, SLURM_JOB_ID=job_id).returncode == 0
        assert f"--master_port {port} " in (tmp_path / "python.log").read_text().splitlines()[-1]


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({"SLURM_NNODES": "0"}, "SLURM_NNODES=0"),
        ({"SLURM_NNODES": "two"}, "SLURM_NNODES=two"),
        ({"SLURM_NNODES": "1", "SLURM_NODEID": "1"}, "SLURM_NODEID=1"),
        ({"SLURM_NODEID": "-1"}, "SLURM_NODEID=-1"),
        ({"SLURM_JOB_ID": "job"}, "SLURM_JOB_ID=job"),
        ({"CLIP_ACCEL_MASTER_PORT": "99999"}, "CLIP_ACCEL_MASTER_PORT=99999"),
        ({"CLIP_ACCEL_PROCS_PER_NODE": "0"}, "CLIP_ACCEL_PROCS_PER_NODE=0"),
        ({"SLURM_GPUS_ON_NODE": "x(IDX:0)"}, "SLURM_GPUS_ON_NODE=x(IDX:0)"),
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST"),
    ],
)
def test_the_node_script_stops_at_once_naming_a_wrong_slurm_variable(tmp_path, variables, named):
    done = run_node_script(tmp_path, **variables)
    assert done.returncode == 2 and not (tmp_path / "python.log").exists()
    assert done.stderr.count("\n") == 1 and named in done.stderr and done.stderr.startswith("clip-accel:")


@pytest.mark.parametrize(
    "scenario",
    [
        "positives_step",
        "positives_step_local_loss",
        "positives_step_exact_accumulation",
        "positives_step_exact_accumulation_local_loss",
    ],
)
def test_repeated_captions_are_positives_across_processes_and_micro_batches(measured, scenario):
    # The repeats straddle processes and micro-batches (distributed_worker.REPEATS): 2 processes x 8 (global and
    # local loss) and 2 x (2 micro x 4) with exact accumulation train as 1 process x 16 with the whole mask.
    one = measured("positives_step", 1)
    _assert_same_step(one, measured(scenario, 2))
    assert one["loss"] != pytest.approx(measured("step", 1)["loss"], rel=1e-3)  # the positives do count


@pytest.mark.parametrize(
    "scenario",
    [
        "hardness_step",
        "hardness_step_local_loss",
        "hardness_step_exact_accumulation",
        "hardness_step_exact_accumulation_local_loss",
    ],
)
def test_hard_negative_weights_come_from_the_global_batch_across_processes_and_micro_batches(measured, scenario):
    # --negative_hardness: each negative weighted by its similarity within the whole global batch, so 2 processes
    # x 8 and 2 x (2 micro x 4) train as 1 process x 16 (the repeated captions stay unweighted positives).
    one = measured("hardness_step", 1)
    _assert_same_step(one, measured(scenario, 2))
    assert one["loss"] != pytest.approx(measured("positives_step", 1)["loss"], rel=1e-3)  # the weights do count


@pytest.mark.parametrize(
    "scenario",
    [
        "matryoshka_step",
        "matryoshka_step_local_loss",
        "matryoshka_step_exact_accumulation",
        "matryoshka_step_exact_accumulation_local_loss",
    ],
)
def test_nested_sizes_train_alike_across_processes_and_micro_batches(measured, scenario):
    # --matryoshka_dims: the loss at each size is the loss on the truncated, renormalised global batch, so 2
    # processes x 8 and 2 x (2 micro x 4) train as 1 process x 16 (with hard negatives and repeated captions).
    one = measured("matryoshka_step", 1)
    _assert_same_step(one, measured(scenario, 2))
    assert one["loss"] > measured("hardness_step", 1)["loss"] * 1.5  # the smaller sizes do count


@pytest.mark.parametrize("scenario", ["siglip_matryoshka_step", "siglip_matryoshka_step_exact_accumulation"])
def test_nested_sizes_of_the_sigmoid_loss_train_alike_across_processes(measured, scenario):
    one = measured("siglip_matryoshka_step", 1)
    _assert_same_step(one, measured(scenario, 2))
    assert one["loss"] > measured("siglip_step", 1)["loss"] * 1.5


@pytest.mark.parametrize("scenario", ["siglip_positives_step", "siglip_positives_step_exact_accumulation"])
def test_repeated_captions_are_positive_pairs_of_the_sigmoid_loss_across_processes(measured, scenario):
    one = measured("siglip_positives_step", 1)
    _assert_same_step(one, measured(scenario, 2))
    assert one["loss"] != pytest.approx(measured("siglip_step", 1)["loss"], rel=1e-3)


def test_plain_accumulation_with_repeated_captions_equals_one_process(measured):
    one, two = measured("plain_accumulation_positives", 1), measured("plain_accumulation_positives", 2)
    assert two["optimizer_steps"] == one["optimizer_steps"] == 4
    for name, weight in one["after"].items():
        torch.testing.assert_close(two["after"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    own = measured("plain_accumulation_8", 1)["after"]
    assert any(not torch.allclose(own[name], weight) for name, weight in one["after"].items())
