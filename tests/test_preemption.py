"""A preempted run resumes as if never stopped: the same evaluations, the same best model, the same test figures,
wherever the signal lands (the cross-node SLURM path: tests/test_distributed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import with_fresh_state
from safetensors.torch import load_file

import clip_accel.trainer as trainer
from clip_accel.preemption import Preempted

EVALUATIONS = ("step", "eval_mean_R@1", "eval_image_to_text_R@1", "eval_text_to_image_R@5")


def evaluations(history: list[dict]) -> list[tuple]:
    """Every evaluation of a run's log history (log_history.json), in order."""
    return [tuple(record[key] for key in EVALUATIONS) for record in history if "eval_mean_R@1" in record]


def preempt_at(step: int, monkeypatch) -> None:
    """The preemption signal seen at the logging step `step` (as if it arrived during that step)."""
    calls = {"seen": 0}

    def signalled(accelerator, flag) -> bool:
        calls["seen"] += 1  # (logging every step: called once per step)
        return calls["seen"] == step

    monkeypatch.setattr(trainer, "preempted_everywhere", signalled)


@pytest.mark.parametrize("step", [6, 7], ids=["at-an-epoch-end-evaluation", "at-a-plain-step"])
def test_a_preempted_run_resumes_with_the_uninterrupted_runs_evaluations_best_model_and_test_figures(
    step, make_configs, tmp_path, monkeypatch
):
    # 192 pairs / 32 = 6 steps an epoch, 3 epochs: evaluations at steps 6, 12 and 18, logging every step.
    options = {"num_train_epochs": 3, "eval_initial_model": False, "early_stopping_patience": 0}
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
