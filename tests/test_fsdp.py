"""FSDP2 on 2 CPU processes trains like DDP, saves a plain float32 CLIPModel folder, checkpoints and resumes.

The FSDP2 runs go through `tests/fsdp_train.py` (see its docstring: the one change from a GPU launch is that
Accelerate keeps FSDP on CPU processes) with the real `accelerate_configs/fsdp.yaml`; the DDP runs through the
documented `ACCELERATE_USE_CPU=1 torchrun` launch (of `scripts/train.py` in tests/test_distributed.py). Every run
that is not interrupted is one of `RUNS`, trained once for the module: all of them under FSDP2 in one launch, all
under DDP in another (tests/train_runs.py), as a launch costs more here than a run of 9 tiny steps. A killed run,
and the run that resumes it, have launches of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launching import CPU_ENV, TORCHRUN_2, interrupt_after_checkpoint
from safetensors.torch import load_file
from train_runs import run_logs
from transformers import CLIPModel

from clip_accel.checkpoint import TrainerState, _check_resumable
from clip_accel.data import write_webdataset_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ENV = CPU_ENV


def options(demo_dir: str, model_config: str, out: Path, freeze: str, *extra: str) -> list[str]:
    """192 pairs / (16 x 2 processes) = 6 micro-batches per process per epoch, 2 accumulated (exactly) per step."""
    values = {
        "data_dir": demo_dir,
        "scratch_config": model_config,
        "output_dir": out,
        "cache_dir": out.parent / "cache",
        "freeze": freeze,
        "freeze_vision_layers": 1,
        "num_train_epochs": 3,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 2,
        "per_device_eval_batch_size": 16,
        "learning_rate": 2e-3,
        "logging_steps": 1,
        "checkpointing_steps": 4,
        "early_stopping_patience": 0,
        "seed": 1,
    }
    return [str(part) for name, value in values.items() for part in (f"--{name}", value)] + list(extra)


FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp.yaml"]
FSDP_LAUNCH += ["--num_processes", "2", "--mixed_precision", "no", "tests/fsdp_train.py"]
EMA = ("--ema_decay", "0.8", "--ema_warmup", "true")
STREAM = ("--streaming", "true", "--image_column", "jpg", "--caption_column", "txt")
STREAM += ("--label_column", "json.class_label", "--num_train_epochs", "1")
# name: (freezing strategy, more options); "streamed" reads the demo as WebDataset shards instead of its folder.
RUNS = {
    "none": ("none", ()),
    "vision_layers": ("vision_layers", ()),
    "backbones": ("backbones", ()),
    "bf16": ("none", ("--num_train_epochs", "1", "--mixed_precision", "bf16")),
    "streamed": ("none", STREAM),
    "ema": ("none", EMA),
}


def fsdp(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*FSDP_LAUNCH, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert not check or result.returncode == 0, result.stderr[-6000:]
    return result


def run_options(root: Path, name: str, launch: str, demo_dir: str, model_config: str) -> list[str]:
    """RUNS[name]'s options, its output in ROOT/NAME/LAUNCH."""
    freeze, more = RUNS[name]
    values = options(demo_dir, model_config, root / name / launch, freeze, *more)
    if name == "streamed":
        at = values.index("--data_dir")
        values = values[:at] + ["--dataset_name", str(root / "shards")] + values[at + 2 :]
    return values


@pytest.fixture(scope="module")
def launched(tmp_path_factory, demo_dir, tiny_model_config_path):
    """Every run of RUNS under FSDP2 (one launch) and under DDP (one launch). Returns a function of a run's name:
    (its FSDP2 output folder, its FSDP2 log, its DDP output folder), once it has checked that both finished."""
    root = tmp_path_factory.mktemp("fsdp")
    for split in ("train", "val", "test"):
        write_webdataset_shards(demo_dir, str(root / "shards"), split, rows_per_shard=48)
    launches = {}
    for launch, command in (("fsdp", [*FSDP_LAUNCH, "--runs"]), ("ddp", [*TORCHRUN_2, "tests/train_runs.py"])):
        runs = [run_options(root, name, launch, demo_dir, tiny_model_config_path) for name in RUNS]
        (root / f"{launch}.json").write_text(json.dumps(runs))
        launches[launch] = subprocess.run(
            [*command, str(root / f"{launch}.json")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900
        )

    def finished(name: str) -> tuple[Path, str, Path]:
        for launch, result in launches.items():  # (a run that fails stops its launch: the runs after it never ran)
            assert (root / name / launch / "eval_results.json").is_file(), f"{launch}: {result.stderr[-6000:]}"
        logs = dict(zip(RUNS, run_logs(launches["fsdp"].stderr, len(RUNS)), strict=True))
        return root / name / "fsdp", logs[name], root / name / "ddp"

    return finished


@pytest.mark.parametrize("freeze", ["none", "vision_layers", "backbones"])
def test_fsdp2_trains_like_ddp(launched, freeze):
    sharded, log, replicated = launched(freeze)
    assert "Processes: 2 (FSDP) on cpu" in log
    losses = [
        [record["loss"] for record in json.loads((out / "log_history.json").read_text()) if "loss" in record]
        for out in (sharded, replicated)
    ]
    assert len(losses[0]) == len(losses[1]) == 9
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    fsdp_results, ddp_results = (json.loads((out / "eval_results.json").read_text()) for out in (sharded, replicated))
    for key in ("image_to_text_mean_rank", "text_to_image_mean_rank"):
        assert fsdp_results["test"][key] == pytest.approx(ddp_results["test"][key], rel=1e-3)


@pytest.mark.parametrize("freeze", ["none", "vision_layers", "backbones"])
def test_fsdp2_best_model_is_a_plain_float32_clip_folder_with_ddps_weights(launched, freeze):
    sharded, _, replicated = launched(freeze)
    loaded = CLIPModel.from_pretrained(sharded)
    weights, reference = load_file(sharded / "model.safetensors"), load_file(replicated / "model.safetensors")
    assert weights.keys() == reference.keys() and {t.dtype for t in weights.values()} == {torch.float32}
    assert weights["logit_scale"].shape == ()  # CLIPModel's layout, not the trainer's 1-element parameter
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(loaded.logit_scale, reference["logit_scale"], rtol=1e-4, atol=1e-5)


def test_fsdp2_killed_and_resumed_run_equals_the_uninterrupted_one(
    launched, tmp_path, demo_dir, tiny_model_config_path
):
    sharded, _, _ = launched("none")  # one strategy: the kill is the point here
    freeze = json.loads((sharded / "training_config.json").read_text())["freeze"]
    killed = tmp_path / "killed"
    interrupt_after_checkpoint(
        FSDP_LAUNCH + options(demo_dir, tiny_model_config_path, killed, freeze), 4, cwd=str(ROOT), env=ENV
    )
    assert not (killed / "eval_results.json").exists()
    result = fsdp(*options(demo_dir, tiny_model_config_path, killed, freeze, "--resume_from_checkpoint", "latest"))
    assert "Resumed from" in result.stderr
    expected, actual = load_file(sharded / "model.safetensors"), load_file(killed / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    for name in ("eval_results.json", "log_history.json"):
        assert json.loads((killed / name).read_text()) == json.loads((sharded / name).read_text()), name


def test_a_checkpoint_resumes_only_under_the_sharding_that_wrote_it(tmp_path):
    fsdp_on_2 = SimpleNamespace(is_fsdp2=True, num_processes=2)
    _check_resumable(fsdp_on_2, TrainerState(sharded=True, num_processes=2), "ckpt")
    for state, accelerator in (
        (TrainerState(sharded=False, num_processes=2), fsdp_on_2),
        (TrainerState(sharded=True, num_processes=2), SimpleNamespace(is_fsdp2=False, num_processes=2)),
        (TrainerState(sharded=True, num_processes=4), fsdp_on_2),
    ):
        with pytest.raises(ValueError, match="resume it with the launch that wrote it"):
            _check_resumable(accelerator, state, "ckpt")
    _check_resumable(SimpleNamespace(is_fsdp2=False, num_processes=1), TrainerState(num_processes=2), "ckpt")


def test_fsdp2_under_bf16_keeps_float32_weights_and_gradients_and_trains_like_ddp(launched):
    # Exact accumulation of 2 micro-batches (no_sync) under bf16 autocast: Accelerate's default FSDP2 policy would
    # gather bf16 parameters and sum the gradients in bf16, where DDP keeps both in float32.
    sharded, log, replicated = launched("bf16")
    policies = {line for line in log.splitlines() if line.startswith("fully_shard mp_policy")}
    assert policies == {"fully_shard mp_policy: param_dtype=None reduce_dtype=torch.float32"}
    losses = [
        [record["loss"] for record in json.loads((out / "log_history.json").read_text()) if "loss" in record]
        for out in (sharded, replicated)
    ]
    # Step 1 runs the same weights under the same bf16 autocast: its loss is DDP's to the last bits. An FSDP2 forward
    # without autocast, or with parameters gathered in bf16, is 5e-4 apart (1.2e-4 relative) there. After a step the
    # two differ by their gradient sums' order (a reduce-scatter against an all-reduce), which bf16 compute turns
    # into 1e-4 relative at step 3 on an AVX-512 machine: "trains like DDP" is held to 1e-3 from step 2 on.
    assert len(losses[0]) == 3 and losses[0][0] == pytest.approx(losses[1][0], rel=1e-6, abs=0)
    assert losses[0][1:] == pytest.approx(losses[1][1:], rel=1e-3)


def test_fsdp2_streams_the_same_pairs_and_trains_like_ddp(launched):
    # Each process reads its own slots of the shards, under FSDP2 as under DDP: the same batches, the same losses.
    sharded, log, replicated = launched("streamed")
    assert "Processes: 2 (FSDP) on cpu" in log
    logs = [json.loads((out / "log_history.json").read_text()) for out in (sharded, replicated)]
    losses = [[record["loss"] for record in log if "loss" in record] for log in logs]
    assert len(losses[0]) == len(losses[1]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    results = [json.loads((out / "eval_results.json").read_text()) for out in (sharded, replicated)]
    assert results[0]["training"]["train_pairs"] == results[1]["training"]["train_pairs"] == 192
    for key in ("image_to_text_mean_rank", "text_to_image_mean_rank"):
        assert results[0]["test"][key] == pytest.approx(results[1]["test"][key], rel=1e-3)


def test_fsdp2_weight_ema_is_ddps_and_resumes_after_a_kill(launched, tmp_path, demo_dir, tiny_model_config_path):
    # The EMA is sharded with its parameters (each process averages its shards) and gathered whole into the
    # checkpoint; the saved folder holds the EMA weights (evaluated and saved by default).
    sharded, _, replicated = launched("ema")
    killed = tmp_path / "killed"
    weights, reference = load_file(sharded / "model.safetensors"), load_file(replicated / "model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    interrupt_after_checkpoint(
        FSDP_LAUNCH + options(demo_dir, tiny_model_config_path, killed, "none", *EMA), 4, cwd=str(ROOT), env=ENV
    )
    fsdp(*options(demo_dir, tiny_model_config_path, killed, "none", *EMA, "--resume_from_checkpoint", "latest"))
    resumed = load_file(killed / "model.safetensors")
    for name in weights:
        assert torch.equal(resumed[name], weights[name]), name
    for name in ("eval_results.json", "log_history.json"):  # (every evaluation after the resume: the EMA's)
        assert json.loads((killed / name).read_text()) == json.loads((sharded / name).read_text()), name
