"""Evaluation as training runs it: the figures do not depend on settings made for training speed."""

from __future__ import annotations

import distributed_worker
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

from clip_accel.evaluation import embed_split, evaluate_retrieval
from clip_accel.metrics import retrieval_metrics


def test_evaluation_embeds_and_ranks_in_full_float32_under_a_tf32_training_run(monkeypatch):
    accelerator = Accelerator(cpu=True)
    context = distributed_worker.step_context(accelerator)
    loader = accelerator.prepare(
        DataLoader(distributed_worker.synthetic_pairs(20, seed=2), batch_size=8, collate_fn=distributed_worker.stack)
    )
    seen = []
    model = accelerator.unwrap_model(context.model)
    model.register_forward_hook(
        lambda *_: seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
    )
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    default = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as use_tf32 sets both for a CUDA training run
    try:
        expected = evaluate_retrieval(accelerator, context.model, loader, context.normalizer)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(default)
    assert len(seen) == 3 and set(seen) == {("highest", False)}
    assert evaluate_retrieval(accelerator, context.model, loader, context.normalizer) == expected


def test_each_distinct_caption_is_embedded_once_so_identical_captions_tie_exactly(
    shared_titles_demo_dir, tiny_pretrained_dir, tmp_path, monkeypatch
):
    from conftest import score_demo_test_split

    from clip_accel import evaluation

    embedded, scored = [], {}  # caption rows through the text tower; what retrieval was scored on

    def retrieval_metrics(images, texts, **options):
        scored.update(texts=texts, embedded=sum(embedded))  # (the zero-shot prompts are embedded after)
        return real(images, texts, **options)

    real = evaluation.retrieval_metrics
    monkeypatch.setattr(evaluation, "retrieval_metrics", retrieval_metrics)

    def count_caption_rows(clip) -> None:
        clip.text_model.register_forward_hook(lambda _, __, output: embedded.append(len(output.pooler_output)))

    cache = str(tmp_path / "cache")
    captions = score_demo_test_split(tiny_pretrained_dir, shared_titles_demo_dir, cache, count_caption_rows)[1].captions
    assert scored["embedded"] == len(set(captions)) < len(captions) == 45  # (batches of 8: a title's copies apart)
    texts = scored["texts"]
    for caption in set(captions):
        rows = texts[[i for i, other in enumerate(captions) if other == caption]]
        assert torch.equal(rows, rows[:1].expand_as(rows))


def test_recall_at_each_nested_size_is_scored_on_the_gathered_embeddings_truncated_and_renormalised():
    accelerator = Accelerator(cpu=True)
    context = distributed_worker.step_context(accelerator)  # the tiny CLIP: embeddings of 16
    loader = accelerator.prepare(
        DataLoader(distributed_worker.synthetic_pairs(40, seed=2), batch_size=8, collate_fn=distributed_worker.stack)
    )
    forwards = []
    accelerator.unwrap_model(context.model).register_forward_hook(lambda *_: forwards.append(1))
    metrics = evaluate_retrieval(accelerator, context.model, loader, context.normalizer, nested_sizes=(16, 8, 4))
    assert len(forwards) == 5  # one forward per batch: the sizes reuse the gathered embeddings
    images, texts = embed_split(accelerator, context.model, loader, context.normalizer)
    full = retrieval_metrics(images, texts)
    assert {key: metrics[key] for key in full} == full  # the main figures stay the full size's
    assert set(metrics["matryoshka"]) == {"8", "4"}  # (the full size is the main figures)
    for size in (8, 4):
        expected = retrieval_metrics(F.normalize(images[:, :size], dim=1), F.normalize(texts[:, :size], dim=1))
        assert metrics["matryoshka"][str(size)] == expected
        assert expected["image_to_text_mean_rank"] != full["image_to_text_mean_rank"]  # truncation does change them
