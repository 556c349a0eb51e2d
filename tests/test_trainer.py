"""End-to-end training on the tiny demo: recall rises, outputs load back, numbers reproduce."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import with_fresh_state
from transformers import CLIPModel, CLIPProcessor

from clip_accel.cli import evaluate_main, train_and_publish
from clip_accel.trainer import EarlyStopping, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir, tiny_model_config_path):
    """One short demo run shared by the tests that only read its outputs."""
    from clip_accel.config import DataConfig, ModelConfig, TrainConfig

    out = tmp_path_factory.mktemp("run") / "out"
    configs = (
        DataConfig(data_dir=demo_dir, cache_dir=str(out.parent / "cache")),
        ModelConfig(scratch_config=tiny_model_config_path),
        TrainConfig(
            output_dir=str(out),
            num_train_epochs=6,
            per_device_train_batch_size=32,
            per_device_eval_batch_size=32,
            learning_rate=2e-3,
            warmup_steps=3,
            lr_scheduler_type="linear",
            logging_steps=1,
            seed=0,
            early_stopping_patience=0,
        ),
    )
    return configs, train_and_publish(*configs)


@pytest.mark.learning
def test_training_raises_recall_above_the_untrained_model(trained):
    _, result = trained
    initial, final = result.metrics["initial"]["test"], result.metrics["test"]
    assert final["mean_R@1"] > initial["mean_R@1"]
    assert final["image_to_text_R@5"] > initial["image_to_text_R@5"]
    chance = 1 / final["num_pairs"]
    assert final["image_to_text_R@1"] > 2 * chance and final["text_to_image_R@1"] > 2 * chance


def test_output_folder_loads_with_from_pretrained_and_gives_the_same_embeddings(trained, demo_dir):
    (_, _, train_config), result = trained
    model = CLIPModel.from_pretrained(train_config.output_dir)
    processor = CLIPProcessor.from_pretrained(train_config.output_dir)
    inputs = processor(
        text=["Women's red striped cotton kurta with gold border", "Men's blue sherwani"],
        images=[torch.zeros(3, 48, 48, dtype=torch.uint8).numpy().transpose(1, 2, 0)] * 2,
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        loaded = model(**inputs)
        in_memory = result.model.eval()(**inputs)
    torch.testing.assert_close(loaded.image_embeds, in_memory.image_embeds, rtol=0, atol=0)
    torch.testing.assert_close(loaded.text_embeds, in_memory.text_embeds, rtol=0, atol=0)
    saved = set(os.listdir(train_config.output_dir))
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "processor_config.json",
        "eval_results.json",
        "training_config.json",
        "log_history.json",
        "skipped_rows.jsonl",
    } <= saved, saved


def test_eval_results_file_matches_the_returned_metrics(trained):
    (_, _, train_config), result = trained
    with open(os.path.join(train_config.output_dir, "eval_results.json")) as handle:
        assert json.load(handle) == json.loads(json.dumps(result.metrics))


def test_results_are_also_under_clip_benchmark_names(trained):
    # clip-benchmark's own figures (tests/test_clip_benchmark.py checks them against the tool). It names directions
    # by what is retrieved (its image retrieval is our text-to-image) and lets topk's order break ties, where ours
    # count against the query: never below ours. Its zero-shot figures are ours where no two classes tie.
    _, result = trained
    for split in ("test", "validation"):
        figures = result.metrics[split]
        theirs, pairs = figures["clip_benchmark"], figures["num_pairs"]
        for k in (1, 5, 10):  # (compared as counts: its means are float32)
            for direction, ours in (("image_retrieval", "text_to_image"), ("text_retrieval", "image_to_text")):
                assert round(theirs[f"{direction}_recall@{k}"] * pairs) >= round(figures[f"{ours}_R@{k}"] * pairs)
        assert (theirs["acc1"], theirs["acc5"]) == (figures["zero_shot_top1"], figures["zero_shot_top5"])
        assert theirs["mean_per_class_recall"] == pytest.approx(figures["zero_shot_mean_per_class_recall"], abs=1e-12)


def test_evaluate_script_reproduces_eval_results(trained, demo_dir, tmp_path):
    (_, _, train_config), result = trained
    out_file = tmp_path / "metrics.json"
    evaluate_main(
        [
            "--model_name_or_path",
            train_config.output_dir,
            "--data_dir",
            demo_dir,
            "--split",
            "test",
            "--output_file",
            str(out_file),
        ]
    )
    assert json.loads(out_file.read_text()) == json.loads(json.dumps(result.metrics["test"]))


def test_learning_rate_follows_the_schedule_in_optimizer_steps(trained):
    (_, _, train_config), result = trained
    history = [r for r in json.loads(Path(train_config.output_dir, "log_history.json").read_text()) if "loss" in r]
    total = result.metrics["training"]["planned_steps"]
    assert [r["step"] for r in history] == list(range(1, total + 1))
    peak, warmup = train_config.learning_rate, train_config.warmup_steps
    expected = [peak * min(s / warmup, (total - s) / (total - warmup)) for s in range(1, total + 1)]
    assert [r["learning_rate"] for r in history] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert history[-1]["learning_rate"] == 0.0
    assert all(math.isfinite(r["loss"]) and r["logit_scale"] <= 100.0 + 1e-4 for r in history)


def test_same_config_gives_the_same_numbers(trained, tmp_path):
    (data_config, model_config, train_config), result = trained
    again = train(
        data_config,
        model_config,
        type(train_config)(**{**train_config.__dict__, "output_dir": str(tmp_path / "again")}),
    )
    assert again.metrics["test"] == result.metrics["test"]


def test_early_stopping_stops_after_patience_and_keeps_the_best(make_configs):
    # A learning rate too small to move the metric: the first evaluation is the best, then patience runs out.
    result = train(
        *make_configs(
            learning_rate=1e-12, eval_steps=1, early_stopping_patience=2, num_train_epochs=5, eval_initial_model=False
        )
    )
    training = result.metrics["training"]
    assert training["stopped_early"] and training["best_step"] == 1 and training["optimizer_steps"] == 3


def test_early_stopping_rule():
    stopper = EarlyStopping("mean_R@1", patience=2, min_delta=0.01)
    assert stopper.update({"mean_R@1": 0.10}, step=1)
    assert not stopper.update({"mean_R@1": 0.105}, step=2)  # below min_delta: not an improvement
    assert not stopper.should_stop
    assert stopper.update({"mean_R@1": 0.2}, step=3) and stopper.best_step == 3
    stopper.update({"mean_R@1": 0.1}, step=4)
    stopper.update({"mean_R@1": 0.1}, step=5)
    assert stopper.should_stop and stopper.best_metrics == {"mean_R@1": 0.2}


def test_refuses_to_overwrite_a_finished_run(make_configs, trained):
    (_, _, train_config), _ = trained
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        train(*make_configs(output_dir=train_config.output_dir))


def test_tensorboard_tracking_writes_event_files(make_configs, tmp_path):
    train(*make_configs(report_to="tensorboard", num_train_epochs=1, eval_initial_model=False))
    events = [name for _, _, names in os.walk(tmp_path / "out") for name in names if "tfevents" in name]
    assert events


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"per_device_train_batch_size": 1000}, "One batch of all processes .* exceeds the 192 training pairs"),
        ({"max_eval_samples": 5}, "validation split has 5 pairs, but recall@10 needs at least 10"),
    ],
)
def test_bad_sizes_stop_before_any_image_is_decoded(make_configs, overrides, message, tmp_path):
    data, model, config = make_configs(**overrides)
    with pytest.raises(ValueError, match=message):
        train(data, model, config)
    assert not os.path.exists(data.cache_dir) or not os.listdir(data.cache_dir)


def test_unknown_freezing_strategy_fails_at_start_up():
    from clip_accel.config import ModelConfig

    with pytest.raises(ValueError, match="not a freezing strategy"):
        ModelConfig(freeze="half")


def test_mixed_precision_the_device_cannot_autocast_fails_at_start_up(make_configs, monkeypatch):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # precision is fixed once per process otherwise
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device: False)
    try:
        with pytest.raises(ValueError, match="--mixed_precision bf16 is not available on cpu"):
            train(*make_configs(mixed_precision="bf16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_missing_split_of_the_data_folder_fails_at_start_up(make_configs, tmp_path, demo_dir):
    import shutil

    broken = tmp_path / "no-val"
    shutil.copytree(demo_dir, broken)
    os.remove(broken / "val_data.json")
    with pytest.raises(ValueError, match="val_data.json is missing"):
        train(*make_configs(data_dir=str(broken)))


@pytest.mark.native_kernels
def test_torch_compile_option_trains_the_same_and_saves_a_plain_clip_model(make_configs, tmp_path):
    from accelerate.state import AcceleratorState

    eager = train(*make_configs(num_train_epochs=1, eval_initial_model=False, output_dir=str(tmp_path / "eager")))
    AcceleratorState._reset_state(reset_partial_state=True)  # the compile backend is fixed once per process
    try:
        compiled = train(
            *make_configs(
                num_train_epochs=1, eval_initial_model=False, torch_compile=True, output_dir=str(tmp_path / "compiled")
            )
        )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    for key in ("image_to_text_R@5", "text_to_image_R@5"):
        assert compiled.metrics["test"][key] == pytest.approx(eager.metrics["test"][key], abs=1 / 45 + 1e-9)
    loaded = CLIPModel.from_pretrained(tmp_path / "compiled")
    assert not any(name.startswith("_orig_mod") for name in loaded.state_dict())
    torch.testing.assert_close(loaded.logit_scale, compiled.model.logit_scale)


def test_gradient_checkpointing_option_reaches_the_model(make_configs, tmp_path):
    from clip_accel.model import unwrap
    from clip_accel.trainer import _shut_down, prepare_run

    for enabled in (False, True):
        run = prepare_run(*make_configs(gradient_checkpointing=enabled, output_dir=str(tmp_path / f"out-{enabled}")))
        clip = unwrap(run.accelerator, run.model).clip
        checking = getattr(clip, "is_activation_checkpointing", None)  # transformers >= 5 name
        assert (checking if checking is not None else clip.is_gradient_checkpointing) is enabled
        _shut_down(run)


def test_ddp_does_not_broadcast_the_constant_buffers_every_forward(make_configs, tmp_path):
    from clip_accel.model import unwrap
    from clip_accel.trainer import _shut_down, prepare_run

    run = prepare_run(*make_configs(output_dir=str(tmp_path / "out")))
    try:
        assert run.accelerator.ddp_handler.to_kwargs() == {"broadcast_buffers": False}
        # Safe because the towers' buffers are position ids that no step changes.
        buffers = dict(unwrap(run.accelerator, run.model).named_buffers())
        assert buffers and all(name.endswith("position_ids") for name in buffers), list(buffers)
    finally:
        _shut_down(run)


def test_identical_caption_positives_reach_the_loss_and_change_nothing_where_captions_are_distinct(
    make_configs, shared_titles_demo_dir, tiny_siglip_config_path
):
    # SigLIP, where a repeated title changes the loss (test_loss): the run with identical-caption positives differs
    # from the own-pair run. With every caption made distinct (the image URL holds the item's index) the two runs
    # are the same, bit for bit.
    runs = {}
    for template in (None, "{product_title} {image_url}"):
        for positives in ("own", "identical"):
            configs = make_configs(
                data_dir=shared_titles_demo_dir,
                scratch_config=tiny_siglip_config_path,
                caption_template=template,
                caption_positives=positives,
                max_steps=3,
                eval_steps=3,
                eval_initial_model=False,
                overwrite_output_dir=True,
            )
            runs[template, positives] = with_fresh_state(train, *configs)
    shared = runs[None, "own"].metrics["training"]["train_pairs_sharing_a_caption"]
    assert shared > 0.25 * 192
    assert runs["{product_title} {image_url}", "own"].metrics["training"]["train_pairs_sharing_a_caption"] == 0

    def weights(run):
        return run.model.state_dict()

    own, identical = weights(runs[None, "own"]), weights(runs[None, "identical"])
    assert any(not torch.equal(own[name], identical[name]) for name in own)
    own, identical = (weights(runs["{product_title} {image_url}", p]) for p in ("own", "identical"))
    for name in own:
        assert torch.equal(own[name], identical[name]), name


def test_a_run_on_the_compact_cache_trains_and_keeps_the_evaluation_pixels_exact(make_configs, tmp_path):
    import datasets

    runs = {}
    for cache_format in ("uint8", "jpeg"):
        configs = make_configs(
            cache_format=cache_format,
            max_steps=4,
            eval_steps=4,
            output_dir=str(tmp_path / cache_format),
            cache_dir=str(tmp_path / "cache"),
        )
        runs[cache_format] = with_fresh_state(train, *configs)
    # The starting model scored on the same uint8 evaluation pixels: the same figures, whatever the training cache.
    assert runs["jpeg"].metrics["initial"] == runs["uint8"].metrics["initial"]
    losses = {name: [r["loss"] for r in run.history if "loss" in r] for name, run in runs.items()}
    assert losses["jpeg"] != losses["uint8"]  # trained on the decoded JPEGs
    assert runs["jpeg"].metrics["training"]["optimizer_steps"] == 4
    kinds = {}
    for path in (tmp_path / "cache").glob("*.arrow"):
        feature = datasets.Dataset.from_file(str(path)).features["pixel_values"]
        jpeg = isinstance(feature, datasets.Value) and feature.dtype == "binary"
        kinds.setdefault(path.name.split("-")[0], set()).add("jpeg" if jpeg else "uint8")
    assert kinds["train"] == {"jpeg", "uint8"} and kinds["test"] == kinds["validation"] == {"uint8"}
