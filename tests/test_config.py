"""Bad values fail at start-up, with a message saying what to change (recipes: test_options.py)."""

from __future__ import annotations

import dataclasses

import pytest

from clip_accel.config import DataConfig, ModelConfig, TrainConfig


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
        (lambda: TrainConfig(negative_hardness=-1.0), "--negative_hardness must be 0 .off. or more"),
        (lambda: TrainConfig(hard_negative_batches=1), "--hard_negative_batches must be 0 .off. or a group size"),
        (lambda: TrainConfig(hard_negative_threshold=1.5), r"--hard_negative_threshold must be in \(0, 1\]"),
        (lambda: TrainConfig(hard_negative_refresh=2), "--hard_negative_refresh 2 re-mines --hard_negative_batches"),
        (lambda: TrainConfig(hard_negative_refresh=-1, hard_negative_batches=4), "--hard_negative_refresh must be 0"),
        (lambda: TrainConfig(matryoshka_dims="128,256"), "--matryoshka_dims '128,256': .* strictly decreasing"),
        (lambda: TrainConfig(matryoshka_dims="512,0"), "--matryoshka_dims '512,0': .* positive integers"),
        (lambda: TrainConfig(matryoshka_dims="512 256"), "--matryoshka_dims '512 256': .* separated by commas"),
        (lambda: TrainConfig(warmup_ratio=1.5), "warmup_ratio"),
        (lambda: TrainConfig(early_stopping_metric="accuracy"), "early_stopping_metric"),
        (lambda: TrainConfig(push_to_hub=True), "hub_model_id"),
    ],
)
def test_bad_values_fail_with_a_message_saying_what_to_change(make, message):
    with pytest.raises(ValueError, match=message):
        make()


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
