"""The `clip_benchmark` block of every evaluation holds clip-benchmark's own figures: the installed tool (1.6.2, the
`clip_benchmark` fixture) run on the same embeddings gives the same numbers, also where identical captions tie."""

from __future__ import annotations

import pytest
import torch
from conftest import EmbeddedForClipBenchmark, score_demo_test_split

from clip_accel.clip_benchmark import retrieval_recall
from clip_accel.config import RECALL_KS
from clip_accel.metrics import multi_caption_metrics, retrieval_metrics


def their_retrieval(clip_benchmark, images: torch.Tensor, texts: torch.Tensor, owners: torch.Tensor) -> dict:
    """The tool's retrieval figures: its loader lists each image with its captions (indices into `texts`)."""
    model = EmbeddedForClipBenchmark(texts)
    captions = [[str(j) for j in torch.nonzero(owners == i).flatten().tolist()] for i in range(len(images))]
    batches = [(images[start : start + 8], captions[start : start + 8]) for start in range(0, len(images), 8)]
    retrieval = clip_benchmark.zeroshot_retrieval
    return retrieval.evaluate(model, batches, model.tokenize, "cpu", amp=False, recall_k_list=list(RECALL_KS))


def their_zero_shot(images, targets, class_names, class_embeds, folder, monkeypatch) -> dict:
    """The tool's zero-shot figures with our class embeddings as its classifier (its `load_clfs` file)."""
    pytest.importorskip("sklearn")  # (its zero-shot module imports scikit-learn)
    import builtins
    from types import SimpleNamespace

    from clip_benchmark.metrics import zeroshot_classification

    # Its `accuracy` takes float() of a 1-element array, which numpy 2.4 refuses: the same value, taken as numpy 1
    # took it (a module global shadows the builtin; nothing else changes).
    monkeypatch.setattr(
        zeroshot_classification, "float", lambda x: builtins.float(getattr(x, "item", lambda: x)()), raising=False
    )

    path = folder / "classifier.pt"
    torch.save(class_embeds.float().T.contiguous(), path)  # (D, C), as its zero_shot_classifier builds it
    targets = torch.tensor(targets)

    class Loader:
        dataset = SimpleNamespace(classes=class_names)

        def __iter__(self):
            return ((images[s : s + 8], targets[s : s + 8]) for s in range(0, len(images), 8))

    model = EmbeddedForClipBenchmark(None)
    return zeroshot_classification.evaluate(
        model, Loader(), None, class_names, [], "cpu", amp=False, load_clfs=[str(path)]
    )


def test_the_block_is_clip_benchmarks_figures_on_the_demo_embeddings_evaluation_scores(
    clip_benchmark, shared_titles_demo_dir, tiny_pretrained_dir, tmp_path, monkeypatch
):
    """Through the evaluation itself, on a demo catalogue whose titles repeat (their embeddings tie exactly)."""
    from clip_accel import evaluation
    from clip_accel.zero_shot import labelled_rows

    seen = {}  # the embeddings the evaluation scored

    def retrieval_metrics(images, texts, **options):
        seen.update(images=images, texts=texts)
        return real_retrieval(images, texts, **options)

    def zero_shot_accuracy(images, labels, class_names, class_embeds, **options):
        seen.update(labels=labels, class_names=class_names, class_embeds=class_embeds)
        return real_zero_shot(images, labels, class_names, class_embeds, **options)

    real_retrieval, real_zero_shot = evaluation.retrieval_metrics, evaluation.zero_shot_accuracy
    monkeypatch.setattr(evaluation, "retrieval_metrics", retrieval_metrics)
    monkeypatch.setattr(evaluation, "zero_shot_accuracy", zero_shot_accuracy)

    cache = str(tmp_path / "cache")
    ours = score_demo_test_split(tiny_pretrained_dir, shared_titles_demo_dir, cache)[0]["clip_benchmark"]
    images, texts = seen["images"], seen["texts"]
    assert len(torch.unique(texts, dim=0)) < len(texts) == 45  # (titles repeat, and their embeddings tie)
    theirs = their_retrieval(clip_benchmark, images, texts, torch.arange(len(images)))
    rows, targets = labelled_rows(seen["labels"], seen["class_names"])
    class_names, class_embeds = seen["class_names"], seen["class_embeds"]
    theirs |= their_zero_shot(images[rows], targets, class_names, class_embeds, tmp_path, monkeypatch)
    assert ours == theirs  # the same keys, and the same numbers to the last bit


def caption_vectors(captions: list[str], dim: int = 32) -> torch.Tensor:
    """(N, dim) L2-normalised bags of words (a fixed random vector per word): a caption model that knows the
    demo's words; identical captions get identical vectors."""
    words = sorted({word for caption in captions for word in caption.lower().split()})
    table = dict(zip(words, torch.randn(len(words), dim, generator=torch.Generator().manual_seed(0)), strict=True))
    return torch.nn.functional.normalize(
        torch.stack([sum(table[word] for word in caption.lower().split()) for caption in captions]), dim=-1
    )


def counts(figures: dict, n: int) -> dict:
    """Hits per key (the tool's float32 means and our float64 ones compared as what they count)."""
    return {key: round(value * n) for key, value in figures.items()}


def test_where_repeated_titles_tie_the_figures_are_the_tools_not_ours(clip_benchmark, shared_titles_demo_dir):
    """Demo-like embeddings that rank well, from the shared-titles demo's test captions: identical titles tie, and
    topk's order, not our rule, decides whether the own caption is among the first K."""
    import json
    from pathlib import Path

    lines = Path(shared_titles_demo_dir, "test_data.json").read_text().splitlines()
    captions = [json.loads(line)["product_title"] for line in lines]
    texts = caption_vectors(captions)
    noise = torch.randn(texts.shape, generator=torch.Generator().manual_seed(1))
    images = torch.nn.functional.normalize(texts + 0.3 * noise, dim=-1)
    ours = retrieval_recall(images, texts, chunk_size=16)  # (chunks smaller than the split)
    theirs = their_retrieval(clip_benchmark, images, texts, torch.arange(len(images)))
    assert ours == theirs
    ranked_our_way = counts(retrieval_metrics(images, texts, ks=RECALL_KS), len(images))
    ties_decide = [
        k
        for k in RECALL_KS
        if counts(theirs, len(images))[f"text_retrieval_recall@{k}"] != ranked_our_way[f"image_to_text_R@{k}"]
    ]
    assert ties_decide, (theirs, ranked_our_way)


def test_several_captions_a_shared_one_among_them_score_as_the_tool_scores_them(clip_benchmark):
    """Images of 1 to 4 captions, where every other image shares its first caption with the next (a tie), listed
    as the evaluation lists them: every image's first caption, then the others."""
    generator = torch.Generator().manual_seed(4)  # (a draw where the captions' order changes topk's choice)
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    per_image = torch.randint(1, 5, (40,), generator=generator)
    by_image = torch.repeat_interleave(torch.arange(40), per_image)
    texts = torch.nn.functional.normalize(
        images[by_image] + 0.5 * torch.randn(len(by_image), 8, generator=generator), dim=-1
    )
    first = torch.cat([torch.zeros(1, dtype=torch.long), per_image.cumsum(0)[:-1]])  # each image's first caption
    texts[first[1::2]] = texts[first[0::2]]  # image 2i+1's title is image 2i's
    order = torch.cat([first, torch.tensor([j for j in range(len(by_image)) if j not in set(first.tolist())])])
    ours = retrieval_recall(images, texts[order], by_image[order], chunk_size=7)
    theirs = their_retrieval(clip_benchmark, images, texts, by_image)
    assert ours == theirs
    ranked_our_way = counts(multi_caption_metrics(images, texts, by_image, ks=RECALL_KS), len(images))
    ties_decide = [
        k
        for k in RECALL_KS
        if counts(theirs, len(images))[f"text_retrieval_recall@{k}"] != ranked_our_way[f"image_to_text_R@{k}"]
    ]
    assert ties_decide, (theirs, ranked_our_way)
