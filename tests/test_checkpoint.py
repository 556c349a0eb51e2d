"""Kill -9 mid-run and resume: the result equals the run nobody interrupted (1 and 2 processes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import CPU_ENV, TORCHRUN_2, interrupt_after_checkpoint
from safetensors.torch import load_file

from clip_accel.checkpoint import TrainerState, list_checkpoints, resolve_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(processes: int, demo_dir: str, model_config: str, out, *extra: str) -> list[str]:
    launcher = [sys.executable, "scripts/train.py"] if processes == 1 else [*TORCHRUN_2, "scripts/train.py"]
    return launcher + [
        "--data_dir",
        demo_dir,
        "--scratch_config",
        model_config,
        "--output_dir",
        str(out),
        "--cache_dir",
        str(out.parent / "cache"),
        "--num_train_epochs",
        "25",
        "--per_device_train_batch_size",
        str(16 // processes),
        "--per_device_eval_batch_size",
        "16",
        "--learning_rate",
        "2e-3",
        "--warmup_ratio",
        "0.1",
        "--checkpointing_steps",
        "5",
        "--logging_steps",
        "3",
        "--seed",
        "3",
        *extra,
    ]


def _env() -> dict:
    return CPU_ENV


def _kill_after_checkpoint(command: list[str], step: int, sig: int = signal.SIGKILL) -> tuple[str, int]:
    return interrupt_after_checkpoint(command, step, cwd=REPO, env=_env(), sig=sig)


@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_naming_the_last_checkpoint_and_the_resume_command(tmp_path, demo_dir):
    out = tmp_path / "out"
    log, status = _kill_after_checkpoint(_command(1, demo_dir, "clip-tiny", out), step=10, sig=signal.SIGINT)
    assert status == 130
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    (line,) = [line for line in log.splitlines() if "Interrupted" in line]
    latest = list_checkpoints(str(out))[-1]
    assert f"Last checkpoint: {latest}." in line and line.endswith("--resume_from_checkpoint latest")
    assert f"--output_dir {out}" in line


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, demo_dir, tiny_model_config_path, processes):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(
        _command(processes, demo_dir, tiny_model_config_path, whole),
        cwd=REPO,
        env=_env(),
        check=True,
        capture_output=True,
        timeout=600,
    )
    _kill_after_checkpoint(_command(processes, demo_dir, tiny_model_config_path, killed), step=10)
    assert not (killed / "eval_results.json").exists()
    resumed = subprocess.run(
        _command(processes, demo_dir, tiny_model_config_path, killed, "--resume_from_checkpoint", "latest"),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from" in resumed.stderr
    expected, actual = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    for name in ("eval_results.json", "log_history.json"):
        assert json.loads((killed / name).read_text()) == json.loads((whole / name).read_text()), name


def _fake_checkpoint(root, step: int) -> None:
    folder = root / "checkpoints" / f"step-{step:07d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps(TrainerState(step=step).__dict__))


def test_latest_is_the_newest_complete_checkpoint_and_staging_folders_are_ignored(tmp_path):
    for step in (5, 40, 100):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / ".staging-step-0000200").mkdir()  # a save that was killed half-way
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == [
        "step-0000005",
        "step-0000040",
        "step-0000100",
    ]
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("step-0000100")


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        resolve_checkpoint(str(tmp_path), "latest")
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        resolve_checkpoint(str(tmp_path), str(tmp_path))


def test_latest_if_any_starts_from_scratch_where_there_is_no_checkpoint_yet(tmp_path, caplog):
    # What a requeued SLURM job resumes with: a job preempted during start-up left no checkpoint.
    from accelerate import PartialState

    PartialState(cpu=True)  # (Accelerate's logger needs one)
    with caplog.at_level("INFO"):
        assert resolve_checkpoint(str(tmp_path), "latest_if_any") is None
    assert f"{tmp_path}/checkpoints holds no checkpoint: starting from scratch" in caplog.text
    _fake_checkpoint(tmp_path, 5)
    assert resolve_checkpoint(str(tmp_path), "latest_if_any").endswith("step-0000005")


def test_resume_without_the_best_model_it_relies_on_says_so_before_training(make_configs):
    from clip_accel.trainer import train

    options = {"max_steps": 4, "checkpointing_steps": 3, "eval_steps": 1, "eval_initial_model": False}
    configs = make_configs(**options)
    train(*configs)
    os.remove(os.path.join(configs[2].output_dir, "model.safetensors"))  # e.g. resumed on another node's disk
    with pytest.raises(ValueError, match=r"best model \(step \d\) should be in .* model.safetensors is not there"):
        train(*make_configs(**options, resume_from_checkpoint="latest"))


def _source_options(kind: str, demo_dir: str, folder: Path) -> dict:
    """Options reading the demo catalogue as `kind`: its Indo-fashion folder, a `datasets` JSON-lines source, or
    WebDataset shards streamed."""
    if kind == "indo_fashion":
        return {}
    if kind == "datasets":
        folder.mkdir()
        for split, file in (("train", "train"), ("validation", "val"), ("test", "test")):
            rows = [json.loads(line) for line in Path(demo_dir, f"{file}_data.json").read_text().splitlines()]
            (folder / f"{split}.jsonl").write_text(
                "".join(
                    json.dumps({**row, "image_path": os.path.join(demo_dir, row["image_path"])}) + "\n" for row in rows
                )
            )
        return {
            "data_dir": None,
            "dataset_name": "json",
            "data_files": str(folder),
            "image_column": "image_path",
            "caption_column": "product_title",
            "label_column": "class_label",
        }
    from clip_accel.data import write_webdataset_shards

    for split in ("train", "val", "test"):
        write_webdataset_shards(demo_dir, str(folder), split, rows_per_shard=48)
    return {
        "data_dir": None,
        "dataset_name": str(folder),
        "streaming": True,
        "image_column": "jpg",
        "caption_column": "txt",
        "label_column": "json.class_label",
    }


@pytest.mark.parametrize("kind", ["indo_fashion", "datasets", "shards"])
def test_a_resume_that_changes_what_it_depends_on_stops_at_start_up_naming_each_option_and_both_values(
    kind, make_configs, demo_dir, tmp_path
):
    from conftest import tiny_clip_config, with_fresh_state

    from clip_accel.trainer import train

    options = {"max_steps": 4, "checkpointing_steps": 3, "eval_initial_model": False, "early_stopping_patience": 0}
    options.update(_source_options(kind, demo_dir, tmp_path / "source"))
    with_fresh_state(train, *make_configs(**options))
    resume = {**options, "resume_from_checkpoint": "latest", "logging_steps": 2}  # (logging may change)
    bigger = tiny_clip_config()
    bigger.text_config.hidden_size = bigger.vision_config.hidden_size = 48
    (tmp_path / "bigger.json").write_text(bigger.to_json_string())
    changes = [
        # 32 pairs a step on 1 process: 16 per device would skip 3 x 16 pairs where 3 x 32 were consumed.
        ({"per_device_train_batch_size": 16}, r"the batch of all processes 32 \(32 per device x 1 processes\) -> 16"),
        ({"learning_rate": 0.5}, r"--learning_rate 0.002 -> 0.5"),
        ({"seed": 1, "early_stopping_patience": 2}, r"--seed 0 -> 1; --early_stopping_patience 0 -> 2\."),
        (
            {"scratch_config": str(tmp_path / "bigger.json")},
            r"model configuration .*text_config.hidden_size 32 -> 48.*vision_config.hidden_size 32 -> 48",
        ),
    ]
    if kind != "indo_fashion":  # a cached run resumed as a stream, or a stream as a cached run
        streamed = options.get("streaming", False)
        changes.append(({"streaming": not streamed}, rf"--streaming {streamed} -> {not streamed}"))
    for change, message in changes:
        with pytest.raises(ValueError, match=r"step-0000003 was written by a run that differs .*" + message):
            with_fresh_state(train, *make_configs(**{**resume, **change}))
    resumed = with_fresh_state(train, *make_configs(**resume))
    assert resumed.metrics["training"]["optimizer_steps"] == 4


def test_an_output_dir_that_cannot_be_written_stops_before_any_image_is_decoded(make_configs, tmp_path):
    from clip_accel.trainer import train

    (tmp_path / "a-file").write_text("")
    for output_dir, problem in ((tmp_path / "a-file", "is a file, not a folder"), (tmp_path / "a-file" / "out", "")):
        with pytest.raises(ValueError, match=rf"--output_dir '{output_dir}' {problem or 'cannot be written'}"):
            train(*make_configs(output_dir=str(output_dir)))
    assert not (tmp_path / "cache").exists()  # nothing was preprocessed


def test_only_the_newest_checkpoints_are_kept(make_configs):
    from clip_accel.trainer import train

    # 192 pairs / 32 = 6 steps per epoch, 24 in all: checkpoints at 2, 4, 6 (epoch end), ... 22, 24 (the last
    # epoch's end: a resume after a crash in the final evaluation or the push trains nothing again).
    configs = make_configs(
        num_train_epochs=4,
        checkpointing_steps=2,
        save_total_limit=2,
        eval_initial_model=False,
        early_stopping_patience=0,
    )
    train(*configs)
    kept = [os.path.basename(p) for p in list_checkpoints(configs[2].output_dir)]
    assert kept == ["step-0000022", "step-0000024"]


def test_non_finite_steps_are_skipped_counted_and_too_many_stop_the_run(make_configs, monkeypatch):
    from clip_accel import loss as loss_module
    from clip_accel.trainer import train

    real_loss, calls = loss_module.contrastive_loss, {"n": 0}

    def loss_going_bad(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (3,) or calls["n"] > 20 else loss

    monkeypatch.setitem(loss_module.LOSSES, "softmax", loss_going_bad)  # the CLIP family's loss
    data, model, train_config = make_configs(num_train_epochs=10, max_nonfinite_steps=4, eval_initial_model=False)
    with pytest.raises(RuntimeError, match="4 optimizer steps in a row had non-finite"):
        train(data, model, train_config)
    out = train_config.output_dir
    assert list_checkpoints(out), "the last good checkpoint is kept"
    state = json.loads(Path(list_checkpoints(out)[-1], "trainer_state.json").read_text())
    assert state["nonfinite_steps"] == 1  # the isolated bad step was skipped, counted, and training went on
    from transformers import CLIPModel

    best = CLIPModel.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in best.parameters())


@pytest.mark.parametrize("compiled_first", [True, False])
@pytest.mark.native_kernels
def test_a_checkpoint_resumes_with_or_without_torch_compile(make_configs, caplog, compiled_first):
    from accelerate.state import AcceleratorState

    from clip_accel.trainer import train

    # 192 pairs / 32 = 6 steps an epoch: a checkpoint at step 2, the run stops at 4 (no checkpoint there).
    options = {"max_steps": 4, "checkpointing_steps": 2, "eval_steps": 4, "eval_initial_model": False}
    runs = []
    caplog.set_level("INFO")
    try:
        for compiled, resume in ((compiled_first, None), (not compiled_first, "latest")):
            AcceleratorState._reset_state(reset_partial_state=True)  # the compile backend is fixed once per process
            configs = make_configs(**options, torch_compile=compiled, resume_from_checkpoint=resume)
            runs.append(train(*configs))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert runs[1].metrics["training"]["optimizer_steps"] == 4
    assert f"Resumed from {list_checkpoints(configs[2].output_dir)[-1]}: step 2" in caplog.text


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process_with_the_same_global_batch(
    tmp_path, demo_dir, tiny_model_config_path
):
    # 2 processes x 8 pairs, then 1 process x 16 from the step-5 checkpoint: the same global batches, in the same
    # order, so the same run up to float rounding (all-reduce sums in another order).
    two, one = tmp_path / "two", tmp_path / "one"
    options = ("--max_steps", "10", "--eval_steps", "10")
    run = {"cwd": REPO, "env": _env(), "capture_output": True, "text": True, "timeout": 600}
    subprocess.run(_command(2, demo_dir, tiny_model_config_path, two, *options), check=True, **run)
    shutil.copytree(two, one)
    assert [os.path.basename(path) for path in list_checkpoints(str(one))] == ["step-0000005"]
    resumed = subprocess.run(
        _command(1, demo_dir, tiny_model_config_path, one, *options, "--resume_from_checkpoint", "latest"), **run
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resumed from" in resumed.stderr and "Processes: 1 (NO)" in resumed.stderr
    expected, actual = (json.loads((folder / "log_history.json").read_text()) for folder in (two, one))
    losses = [(record["step"], record["loss"]) for record in expected if "loss" in record]
    assert [(r["step"], r["loss"]) for r in actual if "loss" in r] == [
        (s, pytest.approx(v, rel=1e-4)) for s, v in losses
    ]
    before, after = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-4, atol=1e-5, msg=name)


def test_an_fp16_run_resumes_bit_identically_with_its_grad_scaler(make_configs, monkeypatch):
    from accelerate.state import AcceleratorState
    from fp16_cpu import keep_fp16_on_cpu

    from clip_accel.trainer import train

    # A scale that grows 16x after every applied step: it overflows again and again, so steps are skipped on
    # both sides of the checkpoint, and a resumed run that restarted the scaler would skip other steps.
    accelerators = keep_fp16_on_cpu(monkeypatch, init_scale=2.0**16, growth_factor=16.0, growth_interval=1)
    options = {"max_steps": 10, "checkpointing_steps": 5, "eval_steps": 10, "eval_initial_model": False}
    runs, scalers = [], []
    try:
        for resume in (None, "latest"):
            AcceleratorState._reset_state(reset_partial_state=True)  # precision is fixed once per process
            configs = make_configs(**options, mixed_precision="fp16", resume_from_checkpoint=resume)
            runs.append(train(*configs))
            scalers.append(accelerators[-1].scaler.state_dict())
            if resume is None:
                checkpoint = list_checkpoints(configs[2].output_dir)[0]
                skipped_before = json.loads(Path(checkpoint, "trainer_state.json").read_text())["nonfinite_steps"]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    full, resumed = runs
    assert os.path.basename(checkpoint) == "step-0000005"
    assert 0 < skipped_before < full.metrics["training"]["nonfinite_steps"], "skips on both sides of the checkpoint"
    assert scalers[1] == scalers[0]  # scale and growth tracker
    assert resumed.metrics["training"]["nonfinite_steps"] == full.metrics["training"]["nonfinite_steps"]
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in full.history if "loss" in r]
    for name, weight in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name


def test_a_run_with_identical_caption_positives_resumes_bit_identically(
    make_configs, shared_titles_demo_dir, tiny_siglip_config_path
):
    from conftest import with_fresh_state

    from clip_accel.trainer import train

    # SigLIP on a catalogue where 30 % of the titles repeat, exact accumulation of 2 x 16: the positives come from
    # the cache's caption ids, so the resumed half sees the same masks as the uninterrupted run.
    options = {"max_steps": 6, "checkpointing_steps": 3, "eval_steps": 6, "eval_initial_model": False}
    options |= {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 2, "caption_positives": "identical"}
    options |= {"data_dir": shared_titles_demo_dir, "scratch_config": tiny_siglip_config_path}
    full = with_fresh_state(train, *make_configs(**options))
    resumed = with_fresh_state(
        train,
        *make_configs(
            **options, resume_from_checkpoint=str(Path(make_configs()[2].output_dir, "checkpoints", "step-0000003"))
        ),
    )
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in full.history if "loss" in r]
    for name, weight in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], weight), name


def test_processes_agree_on_the_newest_checkpoint_every_one_holds(caplog):
    from accelerate import PartialState

    from clip_accel.checkpoint import agreed_step

    PartialState(cpu=True)  # (Accelerate's logger needs one)
    assert agreed_step([[3, 6], [3, 6]], "out/checkpoints") == 6
    with caplog.at_level("WARNING"):
        assert agreed_step([[3, 6, 9], [3, 6]], "out/checkpoints") == 6  # node 1 killed while saving step 9
    assert "differ (process 0: step 9); every process resumes from step 6" in caplog.text
    with pytest.raises(ValueError, match=r"hold no step in common \(newest per process: \[3, None\]\)"):
        agreed_step([[3], []], "out/checkpoints")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        agreed_step([[], []], "out/checkpoints")
