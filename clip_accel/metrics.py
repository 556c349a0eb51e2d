"""Image-text retrieval metrics over a whole split, counted the way open_clip does.

The split holds N (image, text) pairs; query i's only positive is its own pair i.
The similarity matrix S = images @ texts.T is scored in square tiles, so memory is
O(chunk_size^2) and no N x N matrix or row sort is ever built. Each tile serves both
directions: its rows count for image queries, its columns for text queries, so the
O(N^2 D) matmul, which dominates the cost, is done once instead of twice.

Tie rule (pessimistic): rank_i = #{j != i : s_ij >= s_ii}. A tie counts against
the query, so a collapsed model (all embeddings equal) gets R@1 = 0, not 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["full_float32_matmuls", "multi_caption_metrics", "pair_ranks", "positive_ranks", "retrieval_metrics"]

# Tiles are padded to a multiple of this: BLAS kernels may sum a dot product in a different order at the ragged
# edge of a matrix, and two equal pairs must get bit-identical scores wherever they sit in their tiles.
_TILE_MULTIPLE = 64


@contextmanager
def full_float32_matmuls() -> Iterator[None]:
    """float32 matrix products and cuDNN convolutions computed in full float32 inside the block, whatever the
    process-wide settings: training on CUDA sets TF32 for speed (or not, with --no_tf32), torch's own default
    lets cuDNN use it, and TF32 similarities may order near-ties differently, so one model would get one set of
    figures in training and another from `clip-accel evaluate`."""
    precision, convolutions = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = convolutions


def _validate(query: torch.Tensor, candidate: torch.Tensor, chunk_size: int) -> None:
    if query.dim() != 2 or candidate.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (N, D); got shapes {tuple(query.shape)} and {tuple(candidate.shape)}")
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
def pair_ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    *,
    chunk_size: int = 2048,
    columns: bool = True,
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """0-based rank of each pair among all N candidates, in both directions, from one pass over S.

    Args:
        image_embeds: (N, D); row i pairs with row i of ``text_embeds``.
        text_embeds: (N, D). Similarity is the dot product, so callers pass
            L2-normalised embeddings.
        chunk_size: side of the square tiles of S scored at once; extra memory is
            ~2 * chunk_size^2 floats whatever N is (tiles grow to hold the largest group).
        columns: also rank the text queries (False skips that half of the counting).
        groups: optional (N,) ids; every candidate of the query's own group counts as correct
            (e.g. identical captions). None: each pair is its own group.

    Returns:
        (image_to_text, text_to_image), LongTensors (N,) on the image device (the second
        is None when ``columns`` is False): rank_i = #{j outside i's group : s_ij >= best_i},
        best_i = max of s_ij over j in i's group (s_ii without groups), where s_ij = image_i . text_j
        for image queries and s_ji for text queries (pessimistic ties). A NaN best score gets the worst
        rank, N - 1.
    """
    rule = "group" if groups is not None else "own"
    return _ranks(image_embeds, text_embeds, chunk_size, columns, groups, rules=(rule,))[rule]


@full_float32_matmuls()
def _ranks(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    chunk_size: int,
    columns: bool,
    groups: torch.Tensor | None,
    rules: tuple[str, ...],
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """`pair_ranks` under each of `rules` ("own": the own pair is the only match; "group": any pair of the
    query's group is), all from the same single pass over S, in full float32."""
    _validate(image_embeds, text_embeds, chunk_size)
    device = image_embeds.device
    # float32 so fp16/bf16 inputs rank like their float32 originals.
    images = image_embeds.to(dtype=torch.float32)
    texts = text_embeds.to(device=device, dtype=torch.float32)
    n = images.shape[0]
    if groups is None:
        order, groups = None, torch.arange(n, device=device)
    else:
        # Members of a group side by side, and tiles cut between groups: every in-group score lies in a
        # diagonal tile, so the best in-group scores come from those tiles alone.
        groups = groups.to(device)
        order = torch.argsort(groups, stable=True)
        groups = groups[order]  # the embeddings are gathered in this order a tile at a time (no N x D copy)
    bounds = _tile_bounds(groups, chunk_size)
    side = max(end - start for start, end in bounds)
    # Every tile is one (padded x D) @ (D x padded) matmul: blocks are zero-padded to a whole number of the
    # matmul kernel's register tiles (the padding is never counted), so every score goes through the same
    # arithmetic wherever it sits. Equal embeddings then score bit-identically and exact ties stay ties.
    padded = -(-side // _TILE_MULTIPLE) * _TILE_MULTIPLE

    scores = torch.empty(padded, padded, device=device)
    mask = torch.empty(side, side, device=device)
    same = torch.empty(side, side, dtype=torch.bool, device=device)
    # Rows gathered in group order go to reused buffers (one per side): no allocation per tile.
    buffers = [torch.zeros(padded, images.shape[1], device=device) for _ in range(2)] if order is not None else []

    def rows_of(embeds: torch.Tensor, block: int, side_index: int) -> torch.Tensor:
        start, end = bounds[block]
        if order is None:
            return _padded(embeds[start:end], padded)
        buffer = buffers[side_index]
        torch.index_select(embeds, 0, order[start:end], out=buffer[: end - start])
        buffer[end - start :].zero_()
        return buffer

    def tile(row: int, col: int) -> torch.Tensor:
        torch.mm(rows_of(images, row, 0), rows_of(texts, col, 1).T, out=scores)
        return scores[: bounds[row][1] - bounds[row][0], : bounds[col][1] - bounds[col][0]]

    def same_group(block: int) -> torch.Tensor:
        """Which (query, candidate) pairs of diagonal tile `block` share a group (no new memory)."""
        ids = groups[bounds[block][0] : bounds[block][1]]
        return torch.eq(ids.unsqueeze(1), ids.unsqueeze(0), out=same[: len(ids), : len(ids)])

    # Pass 1: each query's best score under each rule (the own pair's; the best of its group's), from the
    # diagonal tiles (1/T-th of the work). The same tiles recomputed in pass 2 give the same numbers.
    best = {rule: ([], []) for rule in rules}  # rule -> (per row, per column)
    for block in range(len(bounds)):
        diagonal_tile = tile(block, block)
        if "own" in rules:
            positives = diagonal_tile.diagonal().clone()
            best["own"][0].append(positives)
            best["own"][1].append(positives)
        if "group" in rules:
            diagonal_tile.masked_fill_(same_group(block).logical_not_(), float("-inf"))
            best["group"][0].append(diagonal_tile.amax(dim=1))
            best["group"][1].append(diagonal_tile.amax(dim=0))
    best = {rule: (torch.cat(rows), torch.cat(cols)) for rule, (rows, cols) in best.items()}
    # Pass 2: count, per query, the candidates it does not match scoring >= its best. Counting as float 0/1
    # sums (exact up to 2**24 per tile) is ~4x faster than summing a bool mask.
    counts = {
        rule: (torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device))
        for rule in rules
    }
    for row, (row_start, row_end) in enumerate(bounds):
        for col, (col_start, col_end) in enumerate(bounds):
            block = tile(row, col)
            block_mask = mask[: block.shape[0], : block.shape[1]]
            for rule in rules:
                (best_rows, best_columns), (image_counts, text_counts) = best[rule], counts[rule]
                directions = [(best_rows[row_start:row_end].unsqueeze(1), 1, image_counts, row_start, row_end)]
                if columns:
                    threshold = best_columns[col_start:col_end].unsqueeze(0)
                    directions.append((threshold, 0, text_counts, col_start, col_end))
                for threshold, dim, rule_counts, start, end in directions:
                    torch.ge(block, threshold, out=block_mask)
                    if row == col and rule == "group":
                        block_mask.masked_fill_(same_group(row), 0)  # the query's own group never counts
                    elif row == col:
                        block_mask.diagonal().zero_()  # a pair never counts against itself
                    rule_counts[start:end] += block_mask.sum(dim=dim).long()
    ranks = {}
    for rule in rules:
        (best_rows, best_columns), (image_counts, text_counts) = best[rule], counts[rule]
        image_ranks = torch.where(best_rows.isnan(), n - 1, image_counts)
        text_ranks = torch.where(best_columns.isnan(), n - 1, text_counts) if columns else None
        if order is not None:  # back to the caller's order
            image_ranks = image_ranks.new_empty(n).index_copy_(0, order, image_ranks)
            text_ranks = text_ranks.new_empty(n).index_copy_(0, order, text_ranks) if columns else None
        ranks[rule] = (image_ranks, text_ranks)
    return ranks


def _tile_bounds(groups: torch.Tensor, chunk_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of about `chunk_size` rows, cut only where the (sorted) group id changes; a
    group larger than `chunk_size` gets a tile of its own."""
    n = groups.shape[0]
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=groups.device), groups[1:] != groups[:-1]])
    cuts = torch.nonzero(starts).flatten().tolist() + [n]
    bounds, start, previous = [], 0, 0
    for cut in cuts[1:]:  # the end of each group
        if cut - start > chunk_size and previous > start:
            bounds.append((start, previous))
            start = previous
        previous = cut
    bounds.append((start, n))
    return bounds


def _padded(block: torch.Tensor, rows: int) -> torch.Tensor:
    """`block` with zero rows appended up to `rows` (a copy only when it is short)."""
    if block.shape[0] == rows:
        return block
    return torch.cat([block, block.new_zeros(rows - block.shape[0], block.shape[1])])


def positive_ranks(
    query_embeds: torch.Tensor, candidate_embeds: torch.Tensor, *, chunk_size: int = 2048
) -> torch.Tensor:
    """0-based rank of each query's own pair among all N candidates (one direction of ``pair_ranks``).

    Args:
        query_embeds: (N, D); row i pairs with row i of ``candidate_embeds``.
        candidate_embeds: (N, D). Similarity is the dot product, so callers pass
            L2-normalised embeddings.
        chunk_size: side of the square similarity tiles scored at once (see ``pair_ranks``).

    Returns:
        LongTensor (N,) on the query device: rank_i = #{j != i : s_ij >= s_ii}
        (pessimistic ties: a negative scoring equal to the positive outranks it).
        A NaN positive score gets the worst rank, N - 1.
    """
    return pair_ranks(query_embeds, candidate_embeds, chunk_size=chunk_size, columns=False)[0]


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
    chunk_size: int = 2048,
    captions: list[str] | None = None,
) -> dict:
    """Recall@K and mean/median rank in both directions for N paired embeddings.

    Args:
        image_embeds: (N, D), L2-normalised; row i pairs with text row i.
        text_embeds: (N, D), L2-normalised.
        ks: cut-offs, each >= 1. For k > N, R@k is simply 1.0 (every rank < N);
            callers may want to warn about that.
        chunk_size: side of the similarity tiles scored at once (see ``pair_ranks``).
        captions: optional, one per pair: also the figures of ``identical_caption_metrics``, from the
            same pass over S (nearly free beside the first).

    Returns:
        Plain floats under ``image_to_text_R@{k}`` / ``text_to_image_R@{k}`` (fraction
        of queries with 0-based rank < k, pessimistic ties as in ``pair_ranks``),
        ``{direction}_mean_rank`` and ``{direction}_median_rank`` (1-based, so a
        perfect model gives 1.0; median is numpy's, averaging the middle pair for
        even N), and ``mean_R@1`` = mean of the two R@1 values; with captions, also
        ``identical_caption_match``: a dict as ``identical_caption_metrics`` returns.
    """
    _check_ks(ks)
    groups = None if captions is None else _caption_groups(captions, image_embeds.shape[0])
    ranks = _ranks(
        image_embeds, text_embeds, chunk_size, True, groups, ("own",) if groups is None else ("own", "group")
    )
    # One pass over S ranks both directions: image i's candidates are row i, text j's are column j.
    metrics = _rank_figures(*ranks["own"], ks)
    if groups is not None:
        metrics["identical_caption_match"] = _recall(*ranks["group"], ks)
    return metrics


@torch.no_grad()
@full_float32_matmuls()
def multi_caption_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_images: torch.Tensor,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 2048,
) -> dict:
    """Recall@K and mean/median rank of N images with M >= N captions (Flickr30k, COCO: about 5 each), by the
    standard protocol: image i is a hit at K when any of its captions is among the top K of all M captions
    (over the N images); each caption ranks the N images (over the M captions).

    `text_images` (M,): the image of each caption; every image has at least one. Pessimistic ties, as
    `pair_ranks`: rank_i = #{captions j not of image i : s_ij >= the best of i's captions}, rank_j = #{images
    i != image(j) : s_ij >= s_image(j),j}. clip-benchmark's `recall_at_k` breaks ties in `torch.topk` order
    instead, so the two agree wherever no other candidate scores exactly the positive's score. Keys as
    `retrieval_metrics`, plus `num_captions`. Scored in (chunk_size x chunk_size) tiles, never N x M."""
    _check_ks(ks)
    device = image_embeds.device
    images = image_embeds.to(dtype=torch.float32)
    texts = text_embeds.to(device=device, dtype=torch.float32)
    owners = text_images.to(device=device, dtype=torch.long)
    n, m = images.shape[0], texts.shape[0]
    if texts.dim() != 2 or texts.shape[1] != images.shape[1] or owners.shape != (m,):
        raise ValueError(
            f"need (N, D) images, (M, D) captions and (M,) caption images; got {tuple(images.shape)}, "
            f"{tuple(texts.shape)} and {tuple(owners.shape)}"
        )
    if m and (owners.min() < 0 or owners.max() >= n) or torch.bincount(owners, minlength=n).min() < 1:
        raise ValueError("every caption's image must be one of the N images, and every image needs a caption")
    padded = -(-chunk_size // _TILE_MULTIPLE) * _TILE_MULTIPLE  # (every tile one shape: see _ranks)
    tiles = [
        (a, min(a + chunk_size, n), b, min(b + chunk_size, m))
        for a in range(0, n, chunk_size)
        for b in range(0, m, chunk_size)
    ]

    def tile(a: int, a_end: int, b: int, b_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (_padded(images[a:a_end], padded) @ _padded(texts[b:b_end], padded).T)[: a_end - a, : b_end - b]
        return scores, owners[b:b_end].unsqueeze(0) == torch.arange(a, a_end, device=device).unsqueeze(1)

    best = torch.full((n,), float("-inf"), device=device)  # image i: the best score of its captions
    own = torch.empty(m, device=device)  # caption j: its image's score
    for a, a_end, b, b_end in tiles:  # pass 1: the positives' scores
        scores, mine = tile(a, a_end, b, b_end)
        best[a:a_end] = torch.maximum(best[a:a_end], scores.masked_fill(~mine, float("-inf")).amax(dim=1))
        local = owners[b:b_end] - a
        inside = torch.nonzero((local >= 0) & (local < a_end - a)).flatten()
        own[b + inside] = scores[local[inside], inside]
    image_counts = torch.zeros(n, dtype=torch.long, device=device)
    text_counts = torch.zeros(m, dtype=torch.long, device=device)
    for a, a_end, b, b_end in tiles:  # pass 2: who outranks them (the same tiles, the same numbers)
        scores, mine = tile(a, a_end, b, b_end)
        image_counts[a:a_end] += ((scores >= best[a:a_end].unsqueeze(1)) & ~mine).sum(dim=1)
        text_counts[b:b_end] += ((scores >= own[b:b_end].unsqueeze(0)) & ~mine).sum(dim=0)
    image_ranks = torch.where(best.isnan(), m - 1, image_counts)
    text_ranks = torch.where(own.isnan(), n - 1, text_counts)
    return {**_rank_figures(image_ranks, text_ranks, ks), "num_captions": m}


def identical_caption_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    captions: list[str],
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 2048,
) -> dict[str, float]:
    """R@K both ways when a caption identical to the query's own (product titles repeat) counts as a match:
    image i is right to retrieve any text with caption i; text i is right to retrieve any image whose caption is
    caption i. Keys as in `retrieval_metrics` (R@K and mean_R@1 only). One pass over S, as `retrieval_metrics`
    (which computes both at once when given the captions)."""
    _check_ks(ks)
    groups = _caption_groups(captions, image_embeds.shape[0])
    return _recall(*pair_ranks(image_embeds, text_embeds, chunk_size=chunk_size, groups=groups), ks)


def _check_ks(ks: tuple[int, ...]) -> None:
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of integers >= 1, got {ks!r}")


def _caption_groups(captions: list[str], n: int) -> torch.Tensor:
    if len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} pairs; pass one caption per pair")
    ids = {caption: index for index, caption in enumerate(dict.fromkeys(captions))}
    return torch.tensor([ids[caption] for caption in captions])


def _rank_figures(image_ranks: torch.Tensor, text_ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """`_recall`, and each direction's mean and median rank (1-based)."""
    metrics = _recall(image_ranks, text_ranks, ks)
    for name, ranks in {"image_to_text": image_ranks, "text_to_image": text_ranks}.items():
        metrics[f"{name}_mean_rank"] = float((ranks + 1).double().mean())
        metrics[f"{name}_median_rank"] = _median(ranks + 1)
    return metrics


def _recall(image_ranks: torch.Tensor, text_ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """R@K both ways and mean_R@1 (always reported, even when 1 is not among ks)."""
    metrics = {}
    for name, ranks in {"image_to_text": image_ranks, "text_to_image": text_ranks}.items():
        metrics.update({f"{name}_R@{k}": float((ranks < k).double().mean()) for k in ks})
    at_1 = [float((ranks < 1).double().mean()) for ranks in (image_ranks, text_ranks)]
    metrics["mean_R@1"] = sum(at_1) / 2
    return metrics
