"""--hard_negative_batches' mining (clip_accel.mining) against a brute-force reference, its false negatives dropped,
and runs with the option (and --hard_negative_refresh): 2 processes x B equal 1 process x 2B, and a run killed before
or after the neighbours are mined again resumes as if never stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import with_fresh_state
from launching import CPU_ENV, ROOT, TORCHRUN_2
from safetensors.torch import load_file
from test_fault_matrix import Inputs, configs, observed_training

import clip_accel.trainer as trainer
from clip_accel.config import UserError
from clip_accel.mining import mine_neighbours


def brute_force(image, text, caption_ids, count: int, threshold: float) -> tuple[list[list[int]], int, int]:
    """Each row's neighbours written out: every j scored one by one, false negatives skipped, sorted by score."""
    neighbours, identical, over = [], 0, 0
    for i in range(len(image)):
        own = float(image[i] @ text[i])
        kept = []
        for j in range(len(image)):
            score = float(image[i] @ text[j])
            if j == i:
                continue
            if caption_ids[j] == caption_ids[i]:
                identical += 1
            elif score > threshold * own:
                over += 1
            else:
                kept.append((score, j))
        nearest = [j for _, j in sorted(kept, reverse=True)[:count]]
        neighbours.append(nearest + [-1] * (count - len(nearest)))
    return neighbours, identical, over


@pytest.mark.parametrize("rows_per_tile", [1, 7, 64])
def test_mining_equals_a_brute_force_reference(rows_per_tile):
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(23, 8, generator=generator), dim=1)
    # Captions near their images (own pairs score high: the threshold removes some rows, not all).
    text = torch.nn.functional.normalize(image + 0.8 * torch.randn(23, 8, generator=generator), dim=1)
    caption_ids = torch.tensor([i % 17 for i in range(23)])  # rows 0-5 share a caption with rows 17-22
    mined = mine_neighbours(image, text, caption_ids, count=30, threshold=0.8, rows_per_tile=rows_per_tile)
    neighbours, identical, over = brute_force(image, text, caption_ids, 30, 0.8)
    assert mined.neighbours.tolist() == neighbours
    assert (mined.identical_captions, mined.over_threshold) == (identical, over) and identical == 12 and over > 0


def test_an_identical_caption_and_a_candidate_scored_near_the_own_pair_are_no_neighbours():
    image = torch.eye(4)
    text = torch.tensor([[1.0, 0, 0, 0], [0.99, 0.141, 0, 0], [0.96, 0, 0.28, 0], [0.9, 0, 0, 0.436]])
    text = torch.nn.functional.normalize(text, dim=1)
    # Row 0: row 1's caption is its own text; row 2's scores 0.96 of its own pair (> 0.95); row 3's 0.9.
    mined = mine_neighbours(image, text, torch.tensor([5, 5, 6, 7]), count=3, threshold=0.95)
    assert mined.neighbours[0].tolist() == [3, -1, -1]
    assert mined.identical_captions == 2  # 0 -> 1 and 1 -> 0


# 12 steps of 32 pairs (8 groups of 4 a batch), the neighbours mined again with the trained model as epoch 2 starts.
OPTION = {"hard_negative_batches": 4, "hard_negative_refresh": 1, "num_train_epochs": 2}
# Checkpoints a kill leaves: the first epoch's end (the refresh still to come) and step 8 (2 batches of epoch 2 read
# in the refreshed order).
KILLED_AFTER = (6, 8)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_titles_demo_dir, demo_shards, tiny_model_config_path) -> Inputs:
    """The demo catalogue with repeated titles (identical captions for the mining to drop)."""
    root = str(tmp_path_factory.mktemp("mining"))
    return Inputs(root, shared_titles_demo_dir, demo_shards, tiny_model_config_path)


@pytest.fixture(scope="module")
def one_process(inputs) -> dict:
    """The run on 1 process x 32, its output folder copied at the end of each step of KILLED_AFTER (what a kill
    leaves), and the epoch the neighbours in use were mined at, step by step."""
    output = os.path.join(inputs.root, "one")
    mined_at = {}

    def keep_what_a_kill_leaves(run, state) -> None:
        mined_at[state.step] = run.train_data.sampler.mined_epoch
        if state.step in KILLED_AFTER:
            shutil.copytree(run.config.output_dir, os.path.join(inputs.root, f"killed-{state.step}"))

    record = observed_training(configs(inputs, "cached", 1, output, **OPTION), keep_what_a_kill_leaves)
    return record | {"output": output, "mined_at": mined_at}


def assert_same_run(run: dict, other: dict) -> None:
    for key in ("batches", "history", "best_step", "validation", "test"):
        assert run[key] == other[key], key
    best, other_best = (load_file(Path(r["output"], "model.safetensors")) for r in (run, other))
    assert [name for name, weight in best.items() if not torch.equal(other_best[name], weight)] == []


@pytest.mark.parametrize("killed_after", KILLED_AFTER)
def test_a_killed_run_with_hard_negative_batches_resumes_as_if_never_stopped(inputs, one_process, killed_after):
    assert len(one_process["batches"]) == 12 and one_process["processes"] == 1
    assert one_process["mined_at"] == {step: 0 if step <= 6 else 1 for step in range(1, 13)}  # refreshed once
    output = os.path.join(inputs.root, f"killed-{killed_after}")
    resumed = observed_training(configs(inputs, "cached", 1, output, **OPTION, resume_from_checkpoint="latest"))
    assert resumed["resumed_at"] == killed_after
    resumed["batches"] = one_process["batches"][:killed_after] + resumed["batches"]
    assert_same_run(resumed | {"output": output}, one_process)


@pytest.mark.slow
def test_hard_negative_batches_on_two_processes_equal_one_process_with_the_doubled_batch(inputs, one_process):
    command = [*TORCHRUN_2, "tests/mining_worker.py", inputs.root, inputs.demo_dir, inputs.model_config]
    finished = subprocess.run(command, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-5000:]
    two = json.loads(Path(inputs.root, "two-processes.json").read_text())
    assert two["processes"] == 2
    assert two["batches"] == one_process["batches"]  # the same pairs meet, step by step
    # The same training up to the float rounding of the reductions: every logged loss and evaluation (the weights
    # after 12 AdamW steps differ by more than a tolerance can say: Adam divides the rounding by tiny moments).
    assert len(two["history"]) == len(one_process["history"])
    for record, other in zip(two["history"], one_process["history"], strict=True):
        assert record.keys() == other.keys()
        assert {k: v for k, v in record.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in other.items() if isinstance(v, float)}, rel=1e-4, abs=1e-6
        )


def test_hard_negative_batches_are_refused_for_a_stream_and_groups_cut_by_batches(inputs):
    with pytest.raises(UserError, match="a stream is read in its shards' order"):
        with_fresh_state(trainer.train, *configs(inputs, "streamed", 1, os.path.join(inputs.root, "s"), **OPTION))
    with pytest.raises(UserError, match="does not divide the batch of all processes .32 = 32 per device"):
        cut = configs(inputs, "cached", 1, os.path.join(inputs.root, "c"), hard_negative_batches=3)
        with_fresh_state(trainer.train, *cut)
