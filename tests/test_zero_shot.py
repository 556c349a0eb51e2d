"""Tests for clip_accel.zero_shot: accuracy against a loop reference, prompt ensembling, and the demo data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import TINY_IMAGE_SIZE, tiny_clip_config
from transformers import CLIPModel

from clip_accel.config import DataConfig
from clip_accel.data import build_pair_datasets, load_raw_splits, make_dataloader
from clip_accel.data.demo import CLASS_LABELS
from clip_accel.evaluation import embed_split
from clip_accel.model import ContrastiveModel, PixelNormalizer
from clip_accel.zero_shot import DEFAULT_TEMPLATES, class_text_embeddings, label_to_text, zero_shot_accuracy


def _normed(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _reference_accuracy(image_embeds, labels, class_names, class_embeds, ks) -> dict[str, float]:
    """Python loops over the score matrix: rank = other classes scoring >= the true class."""
    scores = (image_embeds.double() @ class_embeds.double().T).tolist()
    ranks, per_class = [], {}
    for row, label in enumerate(labels):
        if label not in class_names:
            continue
        true = class_names.index(label)
        ranks.append(sum(1 for c in range(len(class_names)) if c != true and scores[row][c] >= scores[row][true]))
        per_class.setdefault(label, []).append(ranks[-1] == 0)
    out = {f"zero_shot_top{k}": sum(rank < k for rank in ranks) / len(ranks) for k in ks}
    out["zero_shot_mean_per_class_recall"] = sum(sum(hits) / len(hits) for hits in per_class.values()) / len(per_class)
    return {**out, "zero_shot_classes": len(class_names), "zero_shot_images": len(ranks)}


def _tiny_clip(tokenizer) -> CLIPModel:
    torch.manual_seed(0)
    config = tiny_clip_config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return CLIPModel(config).eval()


def test_label_to_text_replaces_underscores():
    assert label_to_text("women_kurta") == "women kurta"
    assert label_to_text("leggings_and_salwars") == "leggings and salwars"
    assert label_to_text("saree") == "saree"
    assert all("{label}" in template for template in DEFAULT_TEMPLATES) and 5 <= len(DEFAULT_TEMPLATES) <= 8


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_matches_loop_reference(seed):
    classes = [f"class_{c}" for c in range(7)]
    class_embeds = _normed(7, 8, seed=seed)
    generator = torch.Generator().manual_seed(100 + seed)
    label_ids = torch.randint(0, 9, (60,), generator=generator).tolist()  # 7 and 8: unknown labels
    labels = [classes[i] if i < 7 else ("" if i == 7 else "not_a_class") for i in label_ids]
    # Images near their class so accuracies spread between 0 and 1.
    image_embeds = F.normalize(torch.stack([class_embeds[i % 7] for i in label_ids]) + _normed(60, 8, seed + 7), dim=-1)
    ks = (1, 2, 5, 7, 9)
    got = zero_shot_accuracy(image_embeds, labels, classes, class_embeds, ks=ks)
    expected = _reference_accuracy(image_embeds, labels, classes, class_embeds, ks)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["zero_shot_top7"] == got["zero_shot_top9"] == 1.0  # k >= C: always correct


def test_perfect_classifier_scores_one():
    class_embeds = torch.eye(4)
    labels = ["a", "b", "c", "d", "b"]
    image_embeds = class_embeds[[0, 1, 2, 3, 1]]
    got = zero_shot_accuracy(image_embeds, labels, ["a", "b", "c", "d"], class_embeds, ks=(1, 5))
    assert got == {
        "zero_shot_top1": 1.0,
        "zero_shot_top5": 1.0,
        "zero_shot_mean_per_class_recall": 1.0,
        "zero_shot_classes": 4,
        "zero_shot_images": 5,
    }


def test_mean_per_class_recall_weighs_every_class_alike():
    # Class a: 3 images, all right; class b: 1 image, wrong. Top-1 is 3/4, the per-class mean (1 + 0) / 2.
    class_embeds = torch.eye(2)
    image_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    got = zero_shot_accuracy(image_embeds, ["a", "a", "a", "b"], ["a", "b"], class_embeds, ks=(1,))
    assert got["zero_shot_top1"] == 0.75 and got["zero_shot_mean_per_class_recall"] == 0.5


def test_ties_count_against_the_image():
    # Every class scores the same: a collapsed model must not look perfect.
    class_embeds = F.normalize(torch.ones(3, 4), dim=-1)
    image_embeds = F.normalize(torch.ones(2, 4), dim=-1)
    got = zero_shot_accuracy(image_embeds, ["x", "y"], ["x", "y", "z"], class_embeds, ks=(1, 2, 3))
    assert got["zero_shot_top1"] == 0.0 and got["zero_shot_top2"] == 0.0 and got["zero_shot_top3"] == 1.0
    # One tie with a wrong class: top-1 wrong, top-2 right.
    class_embeds = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = zero_shot_accuracy(torch.tensor([[1.0, 0.0]]), ["x"], ["x", "y", "z"], class_embeds, ks=(1, 2))
    assert got["zero_shot_top1"] == 0.0 and got["zero_shot_top2"] == 1.0


def test_unknown_and_empty_labels_are_left_out():
    class_embeds = torch.eye(2)
    image_embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    got = zero_shot_accuracy(image_embeds, ["a", "", "other", "b"], ["a", "b"], class_embeds, ks=(1,))
    assert got == {
        "zero_shot_top1": 0.5,
        "zero_shot_mean_per_class_recall": 0.5,
        "zero_shot_classes": 2,
        "zero_shot_images": 2,
    }
    with pytest.raises(ValueError, match="class names the dataset's label column uses"):
        zero_shot_accuracy(image_embeds, ["", "", "q", "r"], ["a", "b"], class_embeds)


def test_inputs_that_do_not_line_up_are_rejected():
    with pytest.raises(ValueError, match="one label per image"):
        zero_shot_accuracy(torch.eye(2), ["a"], ["a", "b"], torch.eye(2))
    with pytest.raises(ValueError, match="one name per class"):
        zero_shot_accuracy(torch.eye(2), ["a", "b"], ["a"], torch.eye(2))
    with pytest.raises(ValueError, match="ks must be"):
        zero_shot_accuracy(torch.eye(2), ["a", "b"], ["a", "b"], torch.eye(2), ks=(0,))


def test_class_embeddings_are_the_normalised_mean_of_normalised_prompts(offline_tokenizer):
    model = _tiny_clip(offline_tokenizer)
    labels = ["women_kurta", "saree", "dhoti_pants"]
    templates = ("a photo of a {label}.", "a product photo of a {label}, a type of indian ethnic wear.")
    got = class_text_embeddings(model, offline_tokenizer, labels, templates)
    assert got.shape == (3, model.config.projection_dim) and got.dtype == torch.float32
    for row, label in enumerate(labels):
        per_template = []
        for template in templates:  # one prompt per forward: no padding at all
            input_ids = offline_tokenizer(template.format(label=label.replace("_", " ")), return_tensors="pt").input_ids
            per_template.append(F.normalize(model.get_text_features(input_ids=input_ids).pooler_output[0], dim=-1))
        expected = F.normalize(torch.stack(per_template).mean(dim=0), dim=-1)
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))


def test_long_prompts_are_truncated_and_templates_checked(offline_tokenizer):
    model = _tiny_clip(offline_tokenizer)
    long_label = " ".join(["kurta"] * 200)  # far past 77 tokens: would overflow the position embedding
    assert class_text_embeddings(model, offline_tokenizer, [long_label, "saree"]).shape == (2, 16)
    with pytest.raises(ValueError, match="placeholder"):
        class_text_embeddings(model, offline_tokenizer, ["saree"], ("a photo of a thing.",))
    with pytest.raises(TypeError, match="sequence of strings"):
        class_text_embeddings(model, offline_tokenizer, ["saree"], "a photo of a {label}.")


def test_demo_split_end_to_end(demo_dir, offline_tokenizer, tmp_path):
    """Real labels and images from the demo catalogue through a tiny untrained CLIP: shapes and bounds hold,
    and class embeddings built from the images themselves classify every image correctly."""
    model = _tiny_clip(offline_tokenizer)
    accelerator = Accelerator(cpu=True)
    config = DataConfig(data_dir=demo_dir, cache_dir=str(tmp_path / "cache"))
    raw = load_raw_splits(accelerator, config, roles=("test",))
    pairs = build_pair_datasets(accelerator, config, raw, offline_tokenizer, TINY_IMAGE_SIZE)["test"]
    labels = pairs.column("label")
    normalizer = PixelNormalizer([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    loader = make_dataloader(pairs, 16, train=False)
    image_embeds, _ = embed_split(accelerator, ContrastiveModel(model), loader, normalizer)
    class_embeds = class_text_embeddings(model, offline_tokenizer, list(CLASS_LABELS))
    assert image_embeds.shape == (len(labels), 16) and class_embeds.shape == (len(CLASS_LABELS), 16)

    got = zero_shot_accuracy(image_embeds, labels, list(CLASS_LABELS), class_embeds)
    assert got["zero_shot_classes"] == 15 and got["zero_shot_images"] == len(labels)
    assert 0.0 <= got["zero_shot_top1"] <= got["zero_shot_top5"] <= 1.0

    # Perfect by construction: each image sits near its own class direction, and each class embedding is the
    # mean of its images' embeddings.
    present = sorted(set(labels))
    directions = torch.linalg.qr(torch.randn(32, len(present), generator=torch.Generator().manual_seed(0)))[0].T
    clustered = F.normalize(
        torch.stack([directions[present.index(label)] for label in labels]) + 0.1 * _normed(len(labels), 32, seed=1),
        dim=-1,
    )
    means = torch.stack([clustered[[i for i, label in enumerate(labels) if label == name]].mean(0) for name in present])
    got = zero_shot_accuracy(clustered, labels, present, F.normalize(means, dim=-1))
    assert got["zero_shot_top1"] == 1.0 and got["zero_shot_images"] == len(labels)


def test_prompt_files_in_clip_benchmark_format(tmp_path):
    from clip_accel.zero_shot import GENERIC_TEMPLATES, Prompts, load_prompts

    assert load_prompts(None, None, indo_fashion=True) == Prompts(DEFAULT_TEMPLATES, {})
    assert load_prompts(None, None, indo_fashion=False) == Prompts(GENERIC_TEMPLATES, {})
    templates, names = tmp_path / "templates.json", tmp_path / "names.json"
    templates.write_text(json.dumps(["a scan of the digit {c}.", "the number {label}"]))
    names.write_text(json.dumps({"7": "seven", "women_kurta": "kurta for women"}))
    prompts = load_prompts(str(templates), str(names), indo_fashion=True)
    assert prompts.templates == ("a scan of the digit {label}.", "the number {label}")
    assert [prompts.words(label) for label in ("7", "women_kurta", "dhoti_pants")] == [
        "seven",
        "kurta for women",
        "dhoti pants",
    ]
    # CLIP_benchmark's per-dataset file: an object holding the list.
    templates.write_text(json.dumps({"mnist": ["a photo of the number: '{c}'."]}))
    assert load_prompts(str(templates), None, indo_fashion=False).templates == ("a photo of the number: '{label}'.",)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("[not json", "not valid JSON"),
        ('"a photo of a {c}."', "a JSON list of template strings"),
        ('["a photo of a thing."]', "placeholder"),
    ],
)
def test_bad_prompt_files_say_what_to_change(tmp_path, content, message):
    from clip_accel.zero_shot import load_prompts

    path = tmp_path / "templates.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_prompts(str(path), None, indo_fashion=True)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["kurta"]))
    with pytest.raises(ValueError, match="mapping each label"):
        load_prompts(None, str(names), indo_fashion=True)


def test_class_names_replace_the_labels_in_the_prompts(offline_tokenizer):
    model = _tiny_clip(offline_tokenizer)
    templates = ("a photo of a {label}.",)
    named = class_text_embeddings(model, offline_tokenizer, ["w_k", "saree"], templates, class_names={"w_k": "kurta"})
    plain = class_text_embeddings(model, offline_tokenizer, ["kurta", "saree"], templates)
    torch.testing.assert_close(named, plain)


@pytest.fixture
def prompts_embedded(monkeypatch) -> list:
    """What evaluation embeds for zero-shot, one (templates, class-name map) per call."""
    from clip_accel import evaluation

    seen = []
    real = evaluation.class_text_embeddings

    def recording(model, tokenizer, labels, templates, device=None, class_names=None):
        seen.append((tuple(templates), tuple(sorted((class_names or {}).items()))))
        return real(model, tokenizer, labels, templates, device=device, class_names=class_names)

    monkeypatch.setattr(evaluation, "class_text_embeddings", recording)
    return seen


def _prompt_files(folder, template: str, names: dict) -> tuple[str, str]:
    templates, class_names = folder / "templates.json", folder / "names.json"
    templates.write_text(json.dumps([template]))
    class_names.write_text(json.dumps(names))
    return str(templates), str(class_names)


def test_training_evaluates_with_the_prompts_it_was_given(make_configs, tmp_path, prompts_embedded):
    from clip_accel.trainer import train

    templates, names = _prompt_files(tmp_path, "a garment: {c}.", {"saree": "sari"})
    train(*make_configs(max_steps=1, zero_shot_templates=templates, zero_shot_class_names=names))
    assert prompts_embedded and set(prompts_embedded) == {(("a garment: {label}.",), (("saree", "sari"),))}


def test_the_evaluate_command_uses_the_prompt_files_it_is_given(
    tiny_pretrained_dir, demo_dir, tmp_path, prompts_embedded
):
    from accelerate.state import AcceleratorState

    from clip_accel.cli import evaluate_main

    templates, names = _prompt_files(tmp_path, "catalogue photo of {c}.", {"gowns": "gown"})
    argv = ["--model_name_or_path", tiny_pretrained_dir, "--data_dir", demo_dir, "--cache_dir", str(tmp_path / "c")]
    try:
        evaluate_main([*argv, "--zero_shot_templates", templates, "--zero_shot_class_names", names])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert prompts_embedded == [(("catalogue photo of {label}.",), (("gowns", "gown"),))]
