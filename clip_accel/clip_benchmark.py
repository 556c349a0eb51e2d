"""clip-benchmark's figures, computed its way, to set beside the tables published with it.

clip-benchmark (LAION's CLIP_benchmark; read in 1.6.2) names the retrieval directions by what is retrieved:
`image_retrieval_recall@K` is a caption finding its image (our text_to_image_R@K) and `text_retrieval_recall@K` an
image finding one of its captions (our image_to_text_R@K). It does not count ties as we do (`clip_accel.metrics`
counts every candidate scoring at least the positive's score against the query): a query is a hit when a positive
is among the K indices `torch.topk` returns, so where other candidates score exactly the positive's score, topk's
order decides. Identical captions, embedded once, tie exactly, so on a catalogue that repeats titles its figures
are higher than ours, never lower. Zero-shot: `acc1`/`acc5` are hits among `topk(5)` of 100 x the cosine logits
(its `accuracy`), `mean_per_class_recall` is scikit-learn's balanced accuracy of the argmax.

Each function here repeats the tool's steps on embeddings already made (as its `evaluate` does with autocast off):
normalise, the same matrix product, `torch.topk` over the same rows, the same means; rows are taken a chunk at a
time (memory O(chunk x N)), which changes no row. Tested against the installed tool on demo embeddings whose
identical captions tie.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .zero_shot import labelled_rows

__all__ = ["retrieval_recall", "zero_shot_figures"]


@torch.no_grad()
def retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_images: torch.Tensor | None = None,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """clip-benchmark's `image_retrieval_recall@K` and `text_retrieval_recall@K` (its `zeroshot_retrieval.evaluate`).

    Args:
        image_embeds: (N, D), the split's images in order.
        text_embeds: (M, D), the captions; M == N with `text_images` None (caption i is image i's).
        text_images: (M,), the image of each caption (every image has at least one). The tool lists each image's
            captions together, in the image's order: the captions are put in that order (a stable sort), since
            topk's choice among tied candidates depends on where they sit.
        ks: cut-offs; a K above the number of candidates is cut to it (the tool's topk would raise).
        chunk_size: query rows scored at once.
    """
    images = F.normalize(image_embeds.float(), dim=-1)
    texts = F.normalize(text_embeds.to(images.device).float(), dim=-1)
    n, m = images.shape[0], texts.shape[0]
    owners = torch.arange(n, device=images.device) if text_images is None else text_images.to(images.device).long()
    order = torch.sort(owners, stable=True).indices
    texts, owners = texts[order], owners[order]
    # Its scores are texts @ images.T: a caption's row ranks the images; an image's column (its row of scores.T)
    # ranks the captions, and the image is a hit when any of its captions is among the first K.
    caption_hits, image_hits = {k: [] for k in ks}, {k: [] for k in ks}
    for start in range(0, m, chunk_size):
        scores = texts[start : start + chunk_size] @ images.T
        for k in ks:
            found = scores.topk(min(k, n), dim=1).indices
            caption_hits[k].append((found == owners[start : start + chunk_size, None]).any(dim=1))
    for start in range(0, n, chunk_size):
        scores = (texts @ images[start : start + chunk_size].T).T
        queries = torch.arange(start, start + scores.shape[0], device=images.device)[:, None]
        for k in ks:
            image_hits[k].append((owners[scores.topk(min(k, m), dim=1).indices] == queries).any(dim=1))
    figures = {}
    for k in ks:  # float32 means, as its `.float().mean().item()`
        figures[f"image_retrieval_recall@{k}"] = torch.cat(caption_hits[k]).float().mean().item()
        figures[f"text_retrieval_recall@{k}"] = torch.cat(image_hits[k]).float().mean().item()
    return figures


@torch.no_grad()
def zero_shot_figures(
    image_embeds: torch.Tensor, labels: list[str], class_names: list[str], class_embeds: torch.Tensor
) -> dict[str, float]:
    """clip-benchmark's `acc1`, `acc5` and `mean_per_class_recall` (its `zeroshot_classification.evaluate`) of the
    images whose label is one of `class_names`, against `class_embeds` (C, D), one per class in that order. `acc5`
    only with 5 classes or more (the tool reports NaN below, which JSON cannot hold)."""
    rows, targets = labelled_rows(labels, class_names)
    images = F.normalize(image_embeds[rows].float(), dim=-1)
    classifier = class_embeds.to(images.device).float().T.contiguous()  # (D, C), as its zero_shot_classifier
    logits = (100.0 * images @ classifier).cpu()  # its accuracy and argmax run on the host
    top = 5 if logits.shape[1] >= 5 else 1  # one topk for both cut-offs, as its `accuracy` takes it
    hits = torch.tensor(targets).view(1, -1) == logits.topk(top, dim=1).indices.T
    figures = {"acc1": float(hits[:1].sum()) / len(rows)}
    if top == 5:
        figures["acc5"] = float(hits[:5].sum()) / len(rows)
    # scikit-learn's balanced_accuracy_score: the recall of each class present, averaged (in float64).
    predicted, truth = logits.argmax(dim=1).numpy(), np.asarray(targets)
    present = np.unique(truth)
    figures["mean_per_class_recall"] = float(np.mean([np.mean(predicted[truth == c] == c) for c in present]))
    return figures
