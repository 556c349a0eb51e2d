"""`--hard_negative_batches`' neighbours: the training split embedded with the starting model, and for each row the
rows whose captions its image scores highest, false negatives dropped (sentence-transformers'
`mine_hard_negatives`; NV-Retriever's TopK-PercPos, arXiv 2407.15831). `data.hard_negatives` lays them out in
batches.

Cost: one embedding pass over the training split (images and each distinct caption once), and all N^2 image-text
scores, computed in tiles of rows (memory O(tile x N), as metrics.py ranks): before the first step, and again at
the start of every N-th epoch with `--hard_negative_refresh N`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast

from .data import PairDataset, make_dataloader
from .evaluation import embed_captions, embed_split, split_captions
from .metrics import full_float32_matmuls
from .model import PixelNormalizer

logger = get_logger(__name__)


@dataclass
class MinedNeighbours:
    """`neighbours`: (N, count) int64, each row's candidates nearest first, -1 where fewer are left; how many
    (row, candidate) pairs were dropped for sharing the row's caption and for scoring above the threshold."""

    neighbours: torch.Tensor
    identical_captions: int
    over_threshold: int


@torch.no_grad()
def mine_neighbours(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    caption_ids: torch.Tensor,
    count: int,
    threshold: float,
    rows_per_tile: int = 1024,
) -> MinedNeighbours:
    """For each row i of (N, D) L2-normalised `image_embeds` and `text_embeds` (pair i = image i, caption i), the
    `count` rows j != i whose caption image i scores highest, s(i, j) = image_i . text_j, nearest first.

    Dropped as false negatives before choosing: rows with row i's caption (equal `caption_ids`, (N,): the same
    text, as the loss's positives), and rows with s(i, j) > threshold x s(i, i) (scored nearly as well as, or
    better than, the own pair: most likely another true match). Exact: every score is computed, `rows_per_tile`
    rows at a time. Ties in the score are ordered as `torch.topk` orders them.
    """
    size = image_embeds.shape[0]
    text_embeds = text_embeds.float()
    caption_ids = caption_ids.to(image_embeds.device)
    kept = min(count, size)
    parts, identical, over = [], 0, 0
    for start in range(0, size, rows_per_tile):
        stop = min(start + rows_per_tile, size)
        scores = image_embeds[start:stop].float() @ text_embeds.T  # (tile, N)
        tile = torch.arange(stop - start, device=scores.device)
        own = scores[tile, tile + start]
        same_caption = caption_ids[start:stop, None] == caption_ids[None, :]
        same_caption[tile, tile + start] = False  # (the own pair is no candidate, and no false negative)
        above = (scores > threshold * own[:, None]) & ~same_caption
        above[tile, tile + start] = False
        identical += int(same_caption.sum())
        over += int(above.sum())
        scores[same_caption | above] = -torch.inf
        scores[tile, tile + start] = -torch.inf
        values, columns = scores.topk(kept, dim=1)
        parts.append(torch.where(values > -torch.inf, columns, -1))
    neighbours = torch.cat(parts) if parts else torch.empty(0, kept, dtype=torch.int64)
    if kept < count:  # (a split smaller than the candidates asked for)
        neighbours = torch.nn.functional.pad(neighbours, (0, count - kept), value=-1)
    return MinedNeighbours(neighbours, identical, over)


class TrainingNeighbours:
    """`--hard_negative_batches`' miner: called with an epoch, (N, count) int64 on the host, `mine_neighbours` of the
    training split's pairs (each row with its first caption) embedded by the prepared `model` as it is then, with
    4 x (group_size - 1) candidates a row (spares for neighbours another group took first). Its loaders are
    prepared once, whatever the number of calls (`--hard_negative_refresh`).

    Every process embeds its share and scores the gathered embeddings; the main process's result is broadcast, so
    no difference in the last bits between devices can make the processes' orders differ.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        pairs: PairDataset,
        normalizer: PixelNormalizer,
        batch_size: int,
        group_size: int,
        threshold: float,
    ) -> None:
        self.accelerator, self.model, self.pairs, self.normalizer = accelerator, model, pairs, normalizer
        self.group_size, self.threshold = group_size, threshold
        self.images = accelerator.prepare(make_dataloader(pairs, batch_size, train=False, device=accelerator.device))
        self.texts = split_captions(accelerator, pairs, batch_size)  # (each distinct caption embedded once)

    @full_float32_matmuls()  # (the scores as evaluation computes them, TF32 or not)
    def __call__(self, epoch: int) -> torch.Tensor:
        accelerator, pairs, group_size = self.accelerator, self.pairs, self.group_size
        image_embeds, _ = embed_split(accelerator, self.model, self.images, self.normalizer, with_text=False)
        text_embeds = embed_captions(accelerator, self.model, self.texts.loader)
        text_embeds = text_embeds[self.texts.index[: len(pairs)].to(image_embeds.device)]
        caption_ids = torch.from_numpy(pairs.caption_ids[pairs.rows])
        mined = mine_neighbours(image_embeds, text_embeds, caption_ids, 4 * (group_size - 1), self.threshold)
        neighbours = broadcast(mined.neighbours.contiguous(), from_process=0).cpu()
        candidates = len(pairs) * (len(pairs) - 1)
        short = int((neighbours[:, group_size - 2] < 0).sum()) if len(pairs) else 0
        model = "the starting model" if epoch == 0 else f"the model trained so far (epoch {epoch + 1} starts)"
        logger.info(
            f"Hard-negative batches: {len(pairs)} training pairs embedded with {model}; of their "
            f"{candidates:,} candidate negatives, {mined.identical_captions:,} share the row's caption and "
            f"{mined.over_threshold:,} score above {self.threshold:g} x the row's own pair (likely false negatives), "
            f"dropped; each row keeps its {neighbours.shape[1]} nearest of the rest ({short} rows fewer than "
            f"{group_size - 1}); batches hold groups of {group_size} neighbours"
        )
        return neighbours
