"""Recipes give defaults, the command line overrides them, and bad values fail at start-up."""

from __future__ import annotations

import dataclasses

import pytest

from clip_accel.config import DataConfig, ModelConfig, TrainConfig, parse_config


def test_recipe_values_are_defaults_that_the_command_line_overrides(tmp_path, demo_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data_dir: {demo_dir}\nlearning_rate: 1.0e-4\nfreeze: backbones\nnum_train_epochs: 7\n")
    data, model, train = parse_config(["--config", str(recipe), "--learning_rate", "3e-5"])
    assert data.data_dir == demo_dir
    assert model.freeze == "backbones"
    assert train.num_train_epochs == 7 and train.learning_rate == 3e-5


def test_every_shipped_recipe_parses():
    import glob

    recipes = sorted(glob.glob("clip_accel/recipes/*.yaml"))
    assert recipes
    for recipe in recipes:
        parse_config(["--config", recipe, "--demo"]) if "demo" not in recipe else parse_config(["--config", recipe])


def test_unknown_recipe_key_is_an_error_not_ignored(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("demo: true\nlearning_rte: 1.0e-4\n")
    with pytest.raises(ValueError, match="learning_rte"):
        parse_config(["--config", str(recipe)])


def test_missing_recipe_file_says_so():
    with pytest.raises(ValueError, match="neither a YAML file nor a bundled recipe"):
        parse_config(["--config", "nope.yaml"])


def test_configs_are_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().learning_rate = 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DataConfig(), "Choose exactly one data source"),
        (lambda: DataConfig(demo=True, dataset_name="x"), "Choose exactly one data source"),
        (lambda: DataConfig(data_dir="/does/not/exist"), "is not a folder"),
        (lambda: DataConfig(demo=True, max_train_samples=0), "max_train_samples"),
        (lambda: ModelConfig(freeze_vision_layers=-1), "freeze_vision_layers"),
        (lambda: TrainConfig(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (lambda: TrainConfig(per_device_train_batch_size=0), "per_device_train_batch_size"),
        (lambda: TrainConfig(learning_rate=0), "learning_rate"),
        (lambda: TrainConfig(warmup_ratio=1.5), "warmup_ratio"),
        (lambda: TrainConfig(early_stopping_metric="accuracy"), "early_stopping_metric"),
        (lambda: TrainConfig(push_to_hub=True), "hub_model_id"),
    ],
)
def test_bad_values_fail_with_a_message_saying_what_to_change(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_freezing_strategy_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse_config(["--demo", "--freeze", "half"])


@pytest.mark.parametrize(
    "template, message",
    [
        ("{product_title}, by {brand.name}", r"\{brand.name\} is not a column placeholder"),
        ("{0} kurta", r"\{0\} is not a column placeholder"),
        ("{price:.2f}", r"\{price:.2f\} is not a column placeholder"),
        ("a kurta", "names no column"),
        ("{product_title", "expected '}'"),
    ],
)
def test_a_caption_template_that_is_not_plain_column_placeholders_fails_at_start_up(template, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(demo=True, caption_template=template)
    assert DataConfig(demo=True, caption_template="{product_title}, by {brand} {{new}}").caption_template


def test_caption_positives_is_a_choice_and_defaults_to_identical(tmp_path):
    assert TrainConfig().caption_positives == "identical"
    with pytest.raises(ValueError, match="--caption_positives 'same'"):
        TrainConfig(caption_positives="same")
