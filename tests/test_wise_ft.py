"""clip-accel wise-ft: weight-space mixes of a run and its starting model, scored, tabled, plotted, saved."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import train_on_demo, user_error, with_fresh_state
from safetensors.torch import load_file

from clip_accel.cli import wise_ft_main
from clip_accel.config import ModelConfig
from clip_accel.data.demo import write_demo_dataset
from clip_accel.evaluation import evaluate_folder
from clip_accel.wise_ft import mix_state_dicts


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, demo_dir, tiny_pretrained_dir):
    """A full fine-tune of the tiny pretrained model, and a second catalogue as the held-out data."""
    root = tmp_path_factory.mktemp("wise")
    model = ModelConfig(model_name_or_path=tiny_pretrained_dir)
    schedule = {"num_train_epochs": 2, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 32}
    configs, result = train_on_demo(
        root, demo_dir, model, "run", **schedule, learning_rate=2e-3, seed=1, eval_initial_model=False
    )
    heldout = write_demo_dataset(root / "heldout", num_train=32, num_val=20, num_test=20, image_size=48, seed=5)
    return configs, result, str(heldout), root


def _wise_ft(argv):
    with_fresh_state(wise_ft_main, argv)


def test_weight_0_is_the_starting_model_and_weight_1_the_fine_tuned_one(finetuned, tiny_pretrained_dir):
    configs, result, heldout, root = finetuned
    out = root / "mixes"
    _wise_ft(
        [configs[2].output_dir, "--weights", "0", "0.5", "1", "--heldout_data_dir", heldout, "--output_dir", str(out)]
    )
    table = json.loads((out / "wise_ft.json").read_text())
    assert table["base"] == tiny_pretrained_dir and [m["weight"] for m in table["mixes"]] == [0, 0.5, 1]
    mixes = {mix["weight"]: mix for mix in table["mixes"]}
    try:
        starting = evaluate_folder(tiny_pretrained_dir, configs[0], batch_size=32)
        starting_heldout = evaluate_folder(tiny_pretrained_dir, _heldout_config(heldout, root), batch_size=32)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    for key in ("image_to_text_R@1", "text_to_image_R@5", "mean_R@1", "zero_shot_top1"):
        assert mixes[0]["in-domain/test"][key] == starting[key], key
        assert mixes[0]["held-out/test"][key] == starting_heldout[key], key
        assert mixes[1]["in-domain/test"][key] == result.metrics["test"][key], key
    ends = (mixes[0]["in-domain/test"]["mean_R@1"], mixes[1]["in-domain/test"]["mean_R@1"])
    assert ends[0] != ends[1]  # the fine-tune moved the figures, so the ends above tell the models apart
    # Chosen on the validation splits: the best mean of in-domain and held-out validation mean R@1.
    scores = {
        w: (m["in-domain/validation"]["mean_R@1"] + m["held-out/validation"]["mean_R@1"]) / 2 for w, m in mixes.items()
    }
    assert scores[table["chosen_weight"]] == max(scores.values())
    assert (out / "wise_ft.png").stat().st_size > 0 and "| w |" in (out / "wise_ft.md").read_text()


def _heldout_config(heldout, root):
    from clip_accel.config import DataConfig

    return DataConfig(data_dir=heldout, cache_dir=str(root / "cache"))


def test_the_chosen_mix_is_saved_as_a_from_pretrained_folder(finetuned, tiny_pretrained_dir):
    from transformers import CLIPModel, CLIPProcessor

    configs, _, _, root = finetuned
    out = root / "saved"
    _wise_ft([configs[2].output_dir, "--weights", "0.25", "1", "--save_weight", "0.25", "--output_dir", str(out)])
    assert json.loads((out / "wise_ft.json").read_text())["chosen_weight"] == 0.25
    saved = CLIPModel.from_pretrained(out / "model").state_dict()
    CLIPProcessor.from_pretrained(out / "model")
    start = load_file(os.path.join(tiny_pretrained_dir, "model.safetensors"))
    tuned = load_file(os.path.join(configs[2].output_dir, "model.safetensors"))
    expected = mix_state_dicts(start, tuned, 0.25)
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=1e-7, msg=name)
    moved = [
        name for name in expected if expected[name].is_floating_point() and not torch.equal(tuned[name], start[name])
    ]
    assert moved and all(not torch.equal(saved[name], tuned[name]) for name in moved)


def test_mixing_is_linear_and_exact_at_the_ends():
    start = {"w": torch.zeros(3), "ids": torch.arange(3)}
    tuned = {"w": torch.tensor([4.0, -8.0, 2.0]), "ids": torch.arange(3)}
    assert torch.equal(mix_state_dicts(start, tuned, 0.25)["w"], torch.tensor([1.0, -2.0, 0.5]))
    assert (
        mix_state_dicts(start, tuned, 0.0)["w"] is start["w"] and mix_state_dicts(start, tuned, 1.0)["w"] is tuned["w"]
    )
    with pytest.raises(ValueError, match="--base must be the model the run started from"):
        mix_state_dicts({"w": torch.zeros(2), "ids": torch.arange(3)}, tuned, 0.5)


def test_bad_wise_ft_requests_say_what_to_change(finetuned, tmp_path, tiny_pretrained_dir, capsys):
    configs, _, _, _ = finetuned
    for argv, message in (
        (["--weights", "0.5", "1.5"], "--weights must lie in [0, 1]"),
        (["--weights", "0.5", "1", "--save_weight", "0.3"], "--save_weight 0.3 is not among --weights"),
    ):
        with pytest.raises(SystemExit):
            wise_ft_main([configs[2].output_dir, *argv])
        assert message in capsys.readouterr().err
    argv = [tiny_pretrained_dir, "--output_dir", str(tmp_path / "x")]  # itself trained from scratch
    assert "trained from scratch: there is no starting model" in user_error(capsys, _wise_ft, argv)
