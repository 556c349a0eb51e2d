"""Zero-shot classification: score each image against one text embedding per class, built from prompts.

Each class name is dropped into several prompt templates ("a photo of a {label}."), every prompt is embedded by
the text tower, and the L2-normalised prompt embeddings are averaged and normalised again: the CLIP paper's
prompt ensembling, worth a few points of accuracy over a single prompt. Images are then classified by the dot
product with these class embeddings.

Tie rule (pessimistic, as in `clip_accel.metrics`): rank = #{other classes c : s_c >= s_true}; an image is
top-k correct iff rank < k. A tie counts against the image, so a collapsed model scores 0 top-1, not 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import UserError

__all__ = [
    "DEFAULT_TEMPLATES",
    "GENERIC_TEMPLATES",
    "Prompts",
    "class_text_embeddings",
    "label_to_text",
    "labelled_rows",
    "load_prompts",
    "zero_shot_accuracy",
]

# Product-photo phrasings in the spirit of CLIP's ImageNet prompts; the last ones name the domain, which helps
# with class names a general-purpose model barely knows ("dhoti pants", "mojaris men").
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {label}.",
    "a product photo of a {label}.",
    "a catalogue photo of a {label}.",
    "a close-up photo of a {label}.",
    "a photo of the {label}, a type of clothing.",
    "a photo of a {label}, a type of indian ethnic wear.",
    "an e-commerce photo of a {label}, indian fashion.",
)

# For datasets other than Indo-fashion (and the demo, which imitates it): CLIP's own generic phrasings.
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a photo of a {label}.",
    "a good photo of a {label}.",
    "a close-up photo of a {label}.",
    "a cropped photo of a {label}.",
    "a photo of the {label}.",
)


@dataclass(frozen=True)
class Prompts:
    """How zero-shot classification words its classes: templates with a `{label}` placeholder, and the words
    for each dataset label (labels not in `class_names` go through `label_to_text`)."""

    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    class_names: Mapping[str, str] = field(default_factory=dict)

    def words(self, label: str) -> str:
        return self.class_names.get(label) or label_to_text(label)


def load_prompts(templates_file: str | None, class_names_file: str | None, *, indo_fashion: bool) -> Prompts:
    """Prompts from files in CLIP_benchmark's format, else the defaults for the dataset.

    templates_file: a JSON list of templates, with CLIP_benchmark's `{c}` or our `{label}` placeholder (or a JSON
    object whose first list value is taken, as in CLIP_benchmark's per-dataset files). class_names_file: a JSON
    object mapping each dataset label to the words for it. Defaults: the Indo-fashion product-photo templates for
    Indo-fashion-layout data, CLIP's generic ones for anything else.
    """
    templates = DEFAULT_TEMPLATES if indo_fashion else GENERIC_TEMPLATES
    if templates_file:
        loaded = _read_json(templates_file, "--zero_shot_templates")
        if isinstance(loaded, dict):
            loaded = next((value for value in loaded.values() if isinstance(value, list)), None)
        if not isinstance(loaded, list) or not loaded or not all(isinstance(t, str) for t in loaded):
            raise UserError(
                f"--zero_shot_templates {templates_file}: expected a JSON list of template strings, such as "
                '["a photo of a {c}.", "a close-up photo of a {c}."]'
            )
        templates = tuple(template.replace("{c}", "{label}") for template in loaded)
        _check_templates(templates, ["any"])
    class_names: dict[str, str] = {}
    if class_names_file:
        loaded = _read_json(class_names_file, "--zero_shot_class_names")
        if not isinstance(loaded, dict) or not all(isinstance(v, str) and v.strip() for v in loaded.values()):
            raise UserError(
                f"--zero_shot_class_names {class_names_file}: expected a JSON object mapping each label to the "
                'words for it, such as {"women_kurta": "kurta for women"}'
            )
        class_names = {str(label): words.strip() for label, words in loaded.items()}
    return Prompts(templates, class_names)


def _read_json(path: str, option: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{option} {path} is not valid JSON: {error}") from None


# Prompts embedded per forward pass: bounds memory for datasets with many classes.
_PROMPTS_PER_BATCH = 256


def label_to_text(label: str) -> str:
    """A dataset label as words for a prompt: underscores become spaces, outer spaces are dropped.

    "women_kurta" -> "women kurta", "leggings_and_salwars" -> "leggings and salwars". Nothing else is changed
    (no singularisation, no reordering), so the prompt stays predictable from the label.
    """
    return label.replace("_", " ").strip()


@torch.no_grad()
def class_text_embeddings(
    model: torch.nn.Module,
    tokenizer,
    labels: list[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    device: torch.device | str | None = None,
    class_names: Mapping[str, str] | None = None,
) -> torch.Tensor:
    """One L2-normalised text embedding per class, averaged over prompt templates.

    Args:
        model: a `transformers.CLIPModel` (unwrapped; its `get_text_features(...).pooler_output` is used) or the
            trainer's `ContrastiveModel` (its forward's text embeddings).
        tokenizer: the model's tokenizer; prompts are truncated to the text tower's positions (77, or as many as
            --text_positions stretched) and padded with its pad token to the longest prompt of each batch.
        labels: C class labels; each becomes its words in `class_names`, or goes through `label_to_text`, before
            filling a template.
        templates: T format strings, each with a `{label}` placeholder.
        device: where to run the text tower; defaults to the model's device.
        class_names: optional words for some or all labels.

    Returns:
        float32 (C, D) on `device`: for class c, normalise(mean_t(normalise(text_embed(template_t(label_c))))).
    """
    _check_templates(templates, labels)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    words = Prompts(tuple(templates), class_names or {}).words
    prompts = [template.format(label=words(label)) for label in labels for template in templates]
    was_training = model.training
    model.eval()  # dropout off: the embedding must not depend on the call
    try:
        prompt_embeds = torch.cat(
            [
                embed_texts(model, tokenizer, prompts[start : start + _PROMPTS_PER_BATCH], device)
                for start in range(0, len(prompts), _PROMPTS_PER_BATCH)
            ]
        )
    finally:
        model.train(was_training)
    # Normalising each prompt first weights every template equally, whatever its embedding's norm.
    per_template = F.normalize(prompt_embeds, dim=-1).view(len(labels), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def _check_templates(templates: Sequence[str], labels: list[str]) -> None:
    if isinstance(templates, str):
        raise TypeError(f"templates must be a sequence of strings, not one string: pass ({templates!r},)")
    if not templates or not labels:
        raise ValueError(f"need at least one template and one label; got {len(templates)} and {len(labels)}")
    missing = [template for template in templates if "{label}" not in template]
    if missing:
        raise ValueError(f"every template needs a '{{label}}' placeholder; these have none: {missing}")


def embed_texts(model: torch.nn.Module, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """float32 (P, D) projected text embeddings of P prompts or queries (L2-normalised from the trainer's
    ContrastiveModel, not from a CLIPModel: the caller normalises). A SigLIP model's texts are padded to its fixed
    length, without a mask, as its captions are."""
    pad_to = getattr(getattr(model, "family", None), "pad_to", None)
    if pad_to:
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=pad_to, return_tensors="pt")
        text = {"input_ids": tokens["input_ids"].to(device)}
    else:
        length = getattr(model, "clip", model).config.text_config.max_position_embeddings  # (77, or stretched)
        tokens = tokenizer(prompts, padding="longest", truncation=True, max_length=length, return_tensors="pt")
        text = {"input_ids": tokens["input_ids"].to(device), "attention_mask": tokens["attention_mask"].to(device)}
    if hasattr(model, "get_text_features"):  # a CLIPModel
        return model.get_text_features(**text).pooler_output.float()
    return model(**text)[1].float()  # the trainer's ContrastiveModel: through forward, where FSDP2 gathers shards


@torch.no_grad()
def zero_shot_accuracy(
    image_embeds: torch.Tensor,
    labels: list[str],
    class_names: list[str],
    class_embeds: torch.Tensor,
    ks: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Top-k zero-shot accuracy of N images against C class embeddings.

    Args:
        image_embeds: (N, D), L2-normalised; row i is the image labelled `labels[i]`.
        labels: N class labels; images whose label is "" or not in `class_names` are left out.
        class_names: C distinct labels, in the row order of `class_embeds`.
        class_embeds: (C, D), L2-normalised (e.g. from `class_text_embeddings`).
        ks: cut-offs, each >= 1. For k >= C every kept image is top-k correct (1.0).

    Returns:
        `zero_shot_top{k}` for each k (fraction of kept images whose rank < k, rank = number of other classes
        scoring >= the true class), `zero_shot_classes` = C and `zero_shot_images` = N', the images kept.
    """
    _check_inputs(image_embeds, labels, class_names, class_embeds, ks)
    kept, classes = labelled_rows(labels, class_names)
    targets = torch.tensor(classes, device=image_embeds.device)
    ranks = _true_class_ranks(image_embeds[kept].float(), class_embeds.to(image_embeds.device).float(), targets)
    metrics: dict[str, float] = {f"zero_shot_top{k}": float((ranks < k).double().mean()) for k in ks}
    # Top-1 recall of each class present, averaged over those classes (CLIP_benchmark's mean_per_class_recall):
    # a rare class counts as much as a common one.
    correct = torch.zeros(len(class_names), dtype=torch.float64, device=ranks.device)
    seen = torch.zeros(len(class_names), dtype=torch.float64, device=ranks.device)
    correct.index_add_(0, targets, (ranks < 1).double())
    seen.index_add_(0, targets, torch.ones_like(correct[targets]))
    metrics["zero_shot_mean_per_class_recall"] = float((correct[seen > 0] / seen[seen > 0]).mean())
    metrics["zero_shot_classes"] = len(class_names)
    metrics["zero_shot_images"] = len(kept)
    return metrics


def labelled_rows(labels: list[str], class_names: list[str]) -> tuple[list[int], list[int]]:
    """(rows, classes): the images whose label is one of `class_names` ("" and unknown labels are left out), and
    the index in `class_names` of each one's label."""
    class_index = {name: index for index, name in enumerate(class_names)}
    rows = [row for row, label in enumerate(labels) if label != "" and label in class_index]
    if not rows:
        raise UserError(
            f"none of the {len(labels)} image labels is among class_names {class_names[:5]}...; "
            "pass the class names the dataset's label column uses"
        )
    return rows, [class_index[labels[row]] for row in rows]


def _true_class_ranks(images: torch.Tensor, classes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """LongTensor (N',): per image, how many other classes score >= its true class (NaN true score: C - 1)."""
    scores = images @ classes.T  # (N', C); C is small, so no chunking is needed
    true_scores = scores.gather(1, targets.unsqueeze(1))
    at_least_as_good = scores >= true_scores
    at_least_as_good.scatter_(1, targets.unsqueeze(1), False)  # the true class never counts against itself
    ranks = at_least_as_good.sum(dim=1)
    # NaN compares false everywhere, which would look like rank 0; treat it as the worst rank instead.
    return torch.where(true_scores.squeeze(1).isnan(), classes.shape[0] - 1, ranks)


def _check_inputs(
    image_embeds: torch.Tensor,
    labels: list[str],
    class_names: list[str],
    class_embeds: torch.Tensor,
    ks: tuple[int, ...],
) -> None:
    if image_embeds.dim() != 2 or class_embeds.dim() != 2 or image_embeds.shape[1] != class_embeds.shape[1]:
        raise ValueError(
            f"need image_embeds (N, D) and class_embeds (C, D) with the same D; got "
            f"{tuple(image_embeds.shape)} and {tuple(class_embeds.shape)}"
        )
    if len(labels) != image_embeds.shape[0]:
        raise ValueError(
            f"labels has {len(labels)} entries but image_embeds has {image_embeds.shape[0]} rows; "
            "pass one label per image, in the same order"
        )
    if len(class_names) != class_embeds.shape[0]:
        raise ValueError(
            f"class_names has {len(class_names)} entries but class_embeds has "
            f"{class_embeds.shape[0]} rows; pass one name per class embedding, in the same order"
        )
    if len(set(class_names)) != len(class_names):
        raise ValueError("class_names has duplicates; each class must appear once")
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of integers >= 1, got {ks!r}")
