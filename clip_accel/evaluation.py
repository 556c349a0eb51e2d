"""Embed a whole split on every process, gather it, and score retrieval once."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .clip_benchmark import retrieval_recall, zero_shot_figures
from .config import RECALL_KS, DataConfig, parse_nested_sizes
from .data import ImageLayout, PairDataset, build_pair_datasets, load_raw_splits, make_dataloader
from .launch import check_processes, data_prepared_per_node
from .metrics import full_float32_matmuls, multi_caption_metrics, retrieval_metrics
from .model import (
    ContrastiveModel,
    PixelNormalizer,
    image_layout,
    load_pretrained,
    nested_embeddings,
    text_length,
    unwrap,
)
from .zero_shot import Prompts, class_text_embeddings, load_prompts, zero_shot_accuracy


@torch.no_grad()
def embed_split(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: DataLoader,
    normalizer: PixelNormalizer,
    *,
    with_text: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """L2-normalised (N, D) image and text embeddings of every pair of the split, in split order, on the device
    (where the recall is then computed: a GPU scores 100,000 pairs in well under a second, and no batch waits
    for a copy to the host).

    Gathered batch by batch with `gather_for_metrics`, which drops the samples Accelerate repeated to even out
    the last batches (after the loop it could no longer tell which they were). Image and text embeddings of a
    batch are gathered together so pairs stay aligned. Without `with_text` only images are embedded (text None);
    `progress` draws a bar on the local main process.
    """
    # The module itself, not DDP's wrapper (no gradient bookkeeping, no buffer broadcast per batch); under FSDP2
    # the module is its own wrapper and gathers its shards in forward.
    module = unwrap(accelerator, model)
    was_training = module.training
    module.eval()
    image_parts, text_parts = [], []
    hidden = {"disable": not (progress and accelerator.is_local_main_process)}
    for batch in tqdm(dataloader, desc="Embedding", **hidden):
        input_ids = batch["input_ids"] if with_text else None
        with accelerator.autocast():
            image, text, _ = module(**normalizer.inputs(batch), input_ids=input_ids)
        if with_text:
            image, text = accelerator.gather_for_metrics((image, text))
            text_parts.append(text)
        else:
            image = accelerator.gather_for_metrics(image)
        image_parts.append(image)
    module.train(was_training)
    return torch.cat(image_parts), torch.cat(text_parts) if with_text else None


@dataclass
class SplitCaptions:
    """A split's captions, each distinct one embedded once: a prepared loader of the distinct captions' token
    ids; for each caption of the split (the pairs' own captions in split order, then the other captions of rows
    with several) the index of its distinct caption, and the pair it belongs to."""

    loader: DataLoader
    index: torch.Tensor
    owners: torch.Tensor


def split_captions(accelerator: Accelerator, pairs: PairDataset, batch_size: int) -> SplitCaptions:
    """`SplitCaptions` of a cached split."""
    distinct, index, owners = pairs.distinct_captions()
    loader = make_dataloader(distinct, batch_size, train=False, device=accelerator.device)
    return SplitCaptions(accelerator.prepare(loader), torch.from_numpy(index), torch.from_numpy(owners))


@torch.no_grad()
def embed_captions(accelerator: Accelerator, model: torch.nn.Module, loader: DataLoader) -> torch.Tensor:
    """L2-normalised (M, D) text embeddings of a prepared caption loader, gathered in order, on the device."""
    module = unwrap(accelerator, model)
    was_training = module.training
    module.eval()
    parts = []
    for batch in loader:
        with accelerator.autocast():
            _, text, _ = module(input_ids=batch["input_ids"])
        parts.append(accelerator.gather_for_metrics(text))
    module.train(was_training)
    return torch.cat(parts)


@full_float32_matmuls()  # the same figures as `clip-accel evaluate`, with TF32 on for training or not
def evaluate_retrieval(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: DataLoader,
    normalizer: PixelNormalizer,
    tokenizer=None,
    labels: list[str] | None = None,
    captions: list[str] | None = None,
    identical_captions_match: bool = False,
    prompts: Prompts | None = None,
    texts: SplitCaptions | None = None,
    nested_sizes: tuple[int, ...] = (),
) -> dict[str, float]:
    """Recall@1/5/10 both ways plus mean/median rank over the whole split; with `labels` (one per pair, in split
    order) and the tokenizer, also zero-shot top-1/top-5 accuracy of classifying the images by prompted class
    names. With `texts`, each distinct caption is embedded once (identical captions tie exactly), and with rows
    of several captions every caption is scored by the standard protocol (`multi_caption_metrics`; no
    identical-caption figures then); without, each caption is embedded beside its image. Under `clip_benchmark`,
    the same embeddings scored as clip-benchmark scores them (`clip_accel.clip_benchmark`). Every process computes
    the same numbers from the same gathered embeddings, so decisions taken on them (early stopping) agree
    everywhere. `nested_sizes` (--matryoshka_dims): also the figures at each size below the full one, nested
    under "matryoshka" (`nested_size_metrics`); the main figures stay the full size's."""
    image_embeds, text_embeds = embed_split(accelerator, model, dataloader, normalizer, with_text=texts is None)
    several = texts is not None and len(texts.owners) > len(image_embeds)
    device = image_embeds.device
    owners = None  # each caption's pair: its own row unless the split has its caption table
    if texts is not None:
        text_embeds = embed_captions(accelerator, model, texts.loader)[texts.index.to(device)]
        owners = texts.owners.to(device)
    if several:
        metrics = multi_caption_metrics(image_embeds, text_embeds, owners, ks=RECALL_KS)
    else:  # with the captions, the identical-caption figures come from the same pass over the similarities
        metrics = retrieval_metrics(image_embeds, text_embeds, ks=RECALL_KS, captions=captions)
    metrics["num_pairs"] = int(image_embeds.shape[0])
    if captions is not None and not several:
        # Product titles repeat: also score as if any identical caption were a correct match. The default (the
        # reference's and open_clip's rule) counts only the own pair; the other figures ride along, nested.
        lenient = metrics.pop("identical_caption_match")
        if identical_captions_match:
            metrics["own_pair_only"] = {key: metrics[key] for key in lenient}
            metrics.update(lenient)
        else:
            metrics["identical_caption_match"] = lenient
    if any(size < image_embeds.shape[1] for size in nested_sizes):
        lenient = identical_captions_match and captions is not None and not several
        metrics["matryoshka"] = nested_size_metrics(
            image_embeds, text_embeds, nested_sizes, owners if several else None, captions if lenient else None
        )
    # The same embeddings scored clip-benchmark's way (its tie order), under its names.
    benchmark = retrieval_recall(image_embeds, text_embeds, owners, ks=RECALL_KS)
    class_names = sorted({label for label in labels or [] if label})
    if tokenizer is not None and len(class_names) >= 2:
        with accelerator.autocast():
            prompts = prompts or Prompts()
            class_embeds = class_text_embeddings(
                unwrap(accelerator, model),
                tokenizer,
                class_names,
                prompts.templates,
                device=accelerator.device,
                class_names=prompts.class_names,
            )
        metrics.update(zero_shot_accuracy(image_embeds, labels, class_names, class_embeds.float()))
        benchmark.update(zero_shot_figures(image_embeds, labels, class_names, class_embeds))
    metrics["clip_benchmark"] = benchmark
    return metrics


def nested_size_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    sizes: tuple[int, ...],
    owners: torch.Tensor | None = None,
    captions: list[str] | None = None,
) -> dict[str, dict]:
    """{"128": figures, ...}: for each of `sizes` below the full size D, the retrieval figures of the first `size`
    dimensions of the (N, D) embeddings renormalised, by the main figures' rule: `owners` (M,) where the split has
    several captions per image (`multi_caption_metrics`); `captions` where an identical caption counts as a match
    (--identical_captions_match: recall by that rule, ranks by the own pair's). Computed from the embeddings
    already gathered: no extra forward."""
    figures = {}
    for size in (size for size in sizes if size < image_embeds.shape[1]):
        images, texts = nested_embeddings(image_embeds, size), nested_embeddings(text_embeds, size)
        if owners is not None:
            figures[str(size)] = multi_caption_metrics(images, texts, owners, ks=RECALL_KS)
            continue
        found = retrieval_metrics(images, texts, ks=RECALL_KS, captions=captions)
        found.update(found.pop("identical_caption_match", {}))
        figures[str(size)] = found
    return figures


@dataclass
class EvaluationSplit:
    """One split ready to score: its prepared loader, and the labels and captions of its usable pairs."""

    loader: DataLoader
    labels: list[str]
    captions: list[str]
    prompts: Prompts
    texts: SplitCaptions


def evaluation_splits(
    accelerator: Accelerator,
    data_config: DataConfig,
    processor,
    layout: ImageLayout,
    batch_size: int,
    roles=("test",),
    family=None,
    text_length: int | None = None,
) -> dict[str, EvaluationSplit]:
    """The `roles` of `data_config` (e.g. validation, test) through the training data pipeline (with `family`'s
    pixels and text padding, and `text_length`: the model's own, `model.text_length`), for scoring any model of
    that family with `score`."""
    prompts = dataset_prompts(data_config)  # a bad prompt file fails before anything is loaded
    per_node = data_prepared_per_node(accelerator, data_config)
    raw = load_raw_splits(accelerator, data_config, roles=roles, per_node=per_node)
    pairs = build_pair_datasets(
        accelerator,
        data_config,
        raw,
        processor.tokenizer,
        layout,
        per_node=per_node,
        family=family,
        text_length=text_length,
    )
    return {
        role: EvaluationSplit(
            accelerator.prepare(make_dataloader(pairs[role], batch_size, train=False, device=accelerator.device)),
            pairs[role].column("label"),
            pairs[role].column("caption"),
            prompts,
            split_captions(accelerator, pairs[role], batch_size),
        )
        for role in roles
    }


def score(
    accelerator: Accelerator,
    model: torch.nn.Module,
    processor,
    split: EvaluationSplit,
    identical_captions_match=False,
    nested_sizes: tuple[int, ...] = (),
) -> dict:
    """`evaluate_retrieval` of a (prepared) ContrastiveModel on one prepared split."""
    normalizer = PixelNormalizer(processor.image_processor.image_mean, processor.image_processor.image_std)
    return evaluate_retrieval(
        accelerator,
        model,
        split.loader,
        normalizer.to(accelerator.device),
        processor.tokenizer,
        split.labels,
        split.captions,
        identical_captions_match,
        split.prompts,
        split.texts,
        nested_sizes,
    )


def evaluate_folder(
    model_name_or_path: str,
    data_config: DataConfig,
    *,
    batch_size: int | None = None,
    identical_captions_match: bool = False,
) -> dict[str, float]:
    """Score a saved folder or Hub id on `data_config.test_split`, through the same data pipeline as training.

    With the folder, split and batch size a training run used, this reproduces that run's eval_results.json figures;
    `batch_size` defaults to the one in the folder's training_config.json, and a run trained with
    --matryoshka_dims is scored at its sizes too.
    """
    dataset_prompts(data_config)  # a bad prompt file fails before anything is loaded
    accelerator = Accelerator()
    check_processes(accelerator)
    clip, processor = load_pretrained(model_name_or_path)
    model = ContrastiveModel(clip)
    batch_size = batch_size or training_eval_batch_size(model_name_or_path)
    layout = image_layout(clip, processor)
    splits = evaluation_splits(
        accelerator,
        data_config,
        processor,
        layout,
        batch_size,
        family=model.family,
        text_length=text_length(clip.config),
    )
    sizes = parse_nested_sizes(training_option(model_name_or_path, "matryoshka_dims"))
    return score(accelerator, accelerator.prepare(model), processor, splits["test"], identical_captions_match, sizes)


def dataset_prompts(data_config: DataConfig) -> Prompts:
    """The zero-shot prompts for this data: the user's files, else the Indo-fashion product-photo templates for
    Indo-fashion-layout folders (and the demo) and CLIP's generic ones for a `datasets` source."""
    return load_prompts(
        data_config.zero_shot_templates,
        data_config.zero_shot_class_names,
        indo_fashion=data_config.dataset_name is None,
    )


def training_eval_batch_size(model_name_or_path: str, default: int = 128) -> int:
    """The batch size a training run evaluated with (its training_config.json), else `default`: the same batch
    size gives bit-identical embeddings, another can flip near-ties."""
    return training_option(model_name_or_path, "per_device_eval_batch_size", default)


def training_option(model_name_or_path: str, name: str, default=None):
    """An option of the training run that wrote this folder (its training_config.json), else `default`."""
    run_config = os.path.join(model_name_or_path, "training_config.json")
    if os.path.isfile(run_config):
        with open(run_config) as handle:
            return json.load(handle).get(name, default)
    return default
