"""Weight EMA: the recurrence computed by hand, skipped steps not averaged in, the saved folder holding the
weights that were evaluated, and a resumed run bit-identical, the EMA included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import with_fresh_state
from safetensors.torch import load_file

from clip_accel.config import TrainConfig
from clip_accel.ema import WeightEma
from clip_accel.model import ContrastiveModel


def _by_hand(start: list[torch.Tensor], steps: list[list[torch.Tensor]], decays) -> list[torch.Tensor]:
    averages = [tensor.clone() for tensor in start]
    for weights, decay in zip(steps, decays, strict=True):
        averages = [
            average + (1 - decay) * (weight - average) for average, weight in zip(averages, weights, strict=True)
        ]
    return averages


@pytest.mark.parametrize("warmup", [False, True])
def test_the_average_follows_the_recurrence_and_a_skipped_step_moves_nothing(warmup):
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    module[1].weight.requires_grad_(False)  # (frozen: not averaged)
    ema = WeightEma(module, 0.9, warmup)
    assert ema.names == ["0.weight", "0.bias", "1.bias"]
    start = [parameter.detach().clone() for parameter in ema.parameters]
    applied, skipped_flags = [], [False, False, True, False, True, False]
    for skipped in skipped_flags:
        with torch.no_grad():
            for parameter in ema.parameters:
                parameter.add_(torch.randn_like(parameter))
        ema.update(torch.tensor(skipped))
        if not skipped:
            applied.append([parameter.detach().clone() for parameter in ema.parameters])
    t = torch.arange(1, len(applied) + 1, dtype=torch.float32)
    decays = torch.minimum(torch.tensor(0.9), 1 - (1 + t) ** (-2 / 3)) if warmup else [0.9] * len(applied)
    for average, expected in zip(ema.averages, _by_hand(start, applied, decays), strict=True):
        torch.testing.assert_close(average, expected, rtol=1e-6, atol=1e-6)
    assert float(ema.updates) == len(applied) == 4


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_an_ema_decay_outside_zero_to_one_is_refused(value):
    with pytest.raises(ValueError, match=r"--ema_decay must be in \[0, 1\)"):
        TrainConfig(ema_decay=value)


def test_a_training_run_averages_each_applied_step_and_saves_the_weights_it_evaluated(make_configs, monkeypatch):
    from accelerate.state import AcceleratorState
    from fp16_cpu import keep_fp16_on_cpu

    from clip_accel.checkpoint import TrainerState
    from clip_accel.trainer import fit, prepare_run

    # fp16 with a scale that overflows again and again: some steps are skipped, and must not be averaged in.
    keep_fp16_on_cpu(monkeypatch, init_scale=2.0**16, growth_factor=16.0, growth_interval=1)
    options = {"max_steps": 8, "eval_steps": 8, "eval_initial_model": False, "mixed_precision": "fp16"}
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        run = prepare_run(*make_configs(**options, ema_decay=0.8))
        ema = run.step_context.ema
        start = [parameter.detach().clone() for parameter in ema.parameters]
        weights = [start]
        fit(run, TrainerState(), lambda state: weights.append([p.detach().clone() for p in ema.parameters]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    moved = [not all(map(torch.equal, before, after)) for before, after in zip(weights, weights[1:], strict=False)]
    applied = [after for after, changed in zip(weights[1:], moved, strict=True) if changed]
    assert 0 < len(applied) < 8, "some steps skipped, some applied"
    assert float(ema.updates) == len(applied)
    expected = _by_hand(start, applied, [0.8] * len(applied))
    for name, average, by_hand in zip(ema.names, ema.averages, expected, strict=True):
        torch.testing.assert_close(average, by_hand, rtol=1e-5, atol=1e-6, msg=name)
    saved = ContrastiveModel.from_clip_state_dict(load_file(Path(run.config.output_dir, "model.safetensors")))
    for name, average in zip(ema.names, ema.averages, strict=True):  # (evaluated and saved at step 8: the EMA)
        assert torch.equal(saved[name].reshape(average.shape), average), name
    trained = dict(run.model.named_parameters())
    assert not all(torch.equal(trained[name], average) for name, average in zip(ema.names, ema.averages, strict=True))


def test_an_ema_run_resumes_bit_identically(make_configs):
    from clip_accel.trainer import train

    options = {"max_steps": 6, "checkpointing_steps": 3, "eval_steps": 6, "eval_initial_model": False}
    options |= {"ema_decay": 0.7, "ema_warmup": True}
    full = with_fresh_state(train, *make_configs(**options))
    checkpoint = str(Path(make_configs()[2].output_dir, "checkpoints", "step-0000003"))
    resumed = with_fresh_state(train, *make_configs(**options, resume_from_checkpoint=checkpoint))
    assert [r["loss"] for r in resumed.history if "loss" in r] == [r["loss"] for r in full.history if "loss" in r]
    evaluated = [r["eval_mean_R@1"] for r in full.history if "eval_mean_R@1" in r]
    assert evaluated == [r["eval_mean_R@1"] for r in resumed.history if "eval_mean_R@1" in r]
    for name, weight in full.model.state_dict().items():  # (the saved EMA weights, restored with the checkpoint)
        assert torch.equal(resumed.model.state_dict()[name], weight), name


@pytest.mark.slow
def test_under_fsdp2_only_the_main_process_holds_the_whole_ema_it_checkpoints(tmp_path):
    # Every process calls `state_dict` (Accelerate's save_state) and only the main one writes it: the others send
    # their shards and keep none of the whole tensors; restored from that file, each process has its shards back.
    import json

    from test_distributed import torchrun

    torchrun("tests/ema_worker.py", str(tmp_path))
    result = json.loads((tmp_path / "ema.json").read_text())
    main, other = result["processes"]
    assert result["values"] == 15 + 5 + 1 and result["whole"]  # (5 x 3, 1 x 5 and 1: the frozen bias left out)
    assert main == {"held": 21, "restored": True}
    assert other == {"held": 0, "restored": True}
