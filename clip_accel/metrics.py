"""Image-text retrieval metrics over a whole split, counted the way open_clip does.

The split holds N (image, text) pairs; query i's only positive is its own pair i.
Ranks are computed in chunks of query rows, so memory is O(chunk_size * N) and no
N x N matrix or row sort is ever built.

Tie rule (pessimistic): rank_i = #{j != i : s_ij >= s_ii}. A tie counts against
the query, so a collapsed model (all embeddings equal) gets R@1 = 0, not 1.
"""

from __future__ import annotations

import torch

__all__ = ["positive_ranks", "retrieval_metrics"]


def _validate(query: torch.Tensor, candidate: torch.Tensor, chunk_size: int) -> None:
    if query.dim() != 2 or candidate.dim() != 2:
        raise ValueError(
            f"embeddings must be 2-D (N, D); got shapes {tuple(query.shape)} and {tuple(candidate.shape)}"
        )
    if query.shape != candidate.shape:
        raise ValueError(
            f"embeddings must have the same shape (row i of each is a pair); "
            f"got {tuple(query.shape)} and {tuple(candidate.shape)}"
        )
    if query.shape[0] < 1:
        raise ValueError("need at least one pair (N >= 1)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


@torch.no_grad()
def positive_ranks(
    query_embeds: torch.Tensor, candidate_embeds: torch.Tensor, *, chunk_size: int = 1024
) -> torch.Tensor:
    """0-based rank of each query's own pair among all N candidates.

    Args:
        query_embeds: (N, D); row i pairs with row i of ``candidate_embeds``.
        candidate_embeds: (N, D). Similarity is the dot product, so callers pass
            L2-normalised embeddings.
        chunk_size: query rows scored at once; peak memory is ~chunk_size * N floats.

    Returns:
        LongTensor (N,) on the query device: rank_i = #{j != i : s_ij >= s_ii}
        (pessimistic ties: a negative scoring equal to the positive outranks it).
        A NaN positive score gets the worst rank, N - 1.
    """
    _validate(query_embeds, candidate_embeds, chunk_size)
    device = query_embeds.device
    # float32 so fp16/bf16 inputs rank like their float32 originals.
    query = query_embeds.to(dtype=torch.float32)
    cand_t = candidate_embeds.to(device=device, dtype=torch.float32).T
    n = query.shape[0]
    ranks = torch.empty(n, dtype=torch.long, device=device)
    # Reused mask buffer: the compare+count pass is memory-bound, so avoiding a fresh
    # (b, N) allocation per chunk and counting in int32 (N < 2**31) roughly halve it.
    mask = torch.empty((min(chunk_size, n), n), dtype=torch.bool, device=device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        scores = query[start:end] @ cand_t  # (b, N)
        rows = torch.arange(end - start, device=device)
        # Positives come from the same matmul block so each s_ii is bit-identical to
        # the value it is compared against, and the "-1" removes exactly itself.
        pos = scores[rows, rows + start].unsqueeze(1)  # (b, 1)
        hits = torch.ge(scores, pos, out=mask[: end - start])
        count = hits.sum(dim=1, dtype=torch.int32).long() - 1
        ranks[start:end] = torch.where(pos.squeeze(1).isnan(), n - 1, count)
    return ranks


def _median(values: torch.Tensor) -> float:
    """Usual median (mean of the two middle values for even N), matching numpy.median."""
    v = values.double().sort().values
    n = v.numel()
    mid = n // 2
    return float(v[mid]) if n % 2 else float((v[mid - 1] + v[mid]) / 2)


@torch.no_grad()
def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K and mean/median rank in both directions for N paired embeddings.

    Args:
        image_embeds: (N, D), L2-normalised; row i pairs with text row i.
        text_embeds: (N, D), L2-normalised.
        ks: cut-offs, each >= 1. For k > N, R@k is simply 1.0 (every rank < N);
            callers may want to warn about that.
        chunk_size: query rows scored at once (see ``positive_ranks``).

    Returns:
        Plain floats under ``image_to_text_R@{k}`` / ``text_to_image_R@{k}`` (fraction
        of queries with 0-based rank < k, pessimistic ties as in ``positive_ranks``),
        ``{direction}_mean_rank`` and ``{direction}_median_rank`` (1-based, so a
        perfect model gives 1.0; median is numpy's, averaging the middle pair for
        even N), and ``mean_R@1`` = mean of the two R@1 values.
    """
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of integers >= 1, got {ks!r}")
    _validate(image_embeds, text_embeds, chunk_size)
    metrics: dict[str, float] = {}
    recall_at_1: list[float] = []
    directions = {
        "image_to_text": (image_embeds, text_embeds),
        "text_to_image": (text_embeds, image_embeds),
    }
    for name, (query, cand) in directions.items():
        ranks = positive_ranks(query, cand, chunk_size=chunk_size)
        for k in ks:
            metrics[f"{name}_R@{k}"] = float((ranks < k).double().mean())
        # mean_R@1 is always reported, even when 1 is not among ks.
        recall_at_1.append(float((ranks < 1).double().mean()))
        one_based = ranks + 1
        metrics[f"{name}_mean_rank"] = float(one_based.double().mean())
        metrics[f"{name}_median_rank"] = _median(one_based)
    metrics["mean_R@1"] = sum(recall_at_1) / 2
    return metrics
