"""The symmetric contrastive (InfoNCE) loss of CLIP and the sigmoid loss of SigLIP, with negatives from every
process.

On N processes with per-process batch B, each process gathers all N*B image and text embeddings so every pair is
scored against the global batch. The gather keeps autograd, and its backward hands each process the gradient of
its own rows only:

- global loss (every process computes the same (N*B)^2 loss): the gradient of the gathered tensor is the same on
  every process, so each takes its own slice times N, with no communication;
- local loss (each process scores its own B rows against all N*B columns, O(B*N*B) memory; the default with more
  than one process): each process holds a different partial gradient, summed onto the owner of each row by one
  reduce-scatter.

Either way DDP's gradient averaging then yields exactly the gradient of the global loss (the same weights as one
process with batch N*B). Assumes equal per-process batches, which the training loader's drop_last guarantees.

Positives. By default a pair's only positive is itself. Given `caption_ids` (B,) (a hash of each row's caption
token ids, stored in the preprocessing cache), every pair whose caption reads the same to the text tower is a
positive too: two photos of one catalogue title are not pushed apart. The ids are gathered with the embeddings, so
the mask is the global batch's, and it is built on the device (no host sync). CLIP's softmax loss then takes the
cross-entropy against each row's positives weighted uniformly (UniCL / SupCon), SigLIP's sigmoid loss labels every
positive pair +1. With all captions distinct both are today's loss bit for bit.

Hard negatives (`negative_hardness` alpha > 0, CLIP's softmax loss): every negative's logit gets alpha times its
cosine similarity, without gradient, inside the softmax: its exp() is weighted by exp(alpha s), so the negatives
closest to the row weigh most (HN-NCE, arXiv 2301.02280; Lan et al. 2025's Eq. 5, sentence-transformers'
`hardness_mode="in_batch_negatives"`). Positives (the own pair and, with `caption_ids`, equal captions) are left
alone. The similarities are the gathered batch's, the same on every process and over accumulated micro-batches, so
the loss stays exact across both. SigLIP's sigmoid loss has no softmax over negatives to weight: not offered there.

Nested sizes (Matryoshka, arXiv 2205.13147; sentence-transformers' MatryoshkaLoss): `nested_loss` wraps either loss
and sums it over the full embeddings and their first d dimensions renormalised, for each size d. Each size is the
wrapped loss on its own (B, d) embeddings, gathered and scored as above, so it stays exact across processes and
accumulated micro-batches, with hard negatives and caption positives alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .model import nested_embeddings


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns this process's rows of the gradient summed over processes:
    a reduce-scatter, or, when every process is known to hold the same gradient, the local slice times N.

    (`torch.distributed.nn.functional.all_gather` all-reduces the whole (N*B, D) gradient instead.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, same_gradient_everywhere: bool) -> torch.Tensor:
        world_size, rank = _world()
        ctx.world_size, ctx.same = world_size, same_gradient_everywhere
        ctx.rows = slice(rank * tensor.shape[0], (rank + 1) * tensor.shape[0])
        return _all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.same:
            return grad[ctx.rows] * ctx.world_size, None
        mine = grad.new_empty((ctx.rows.stop - ctx.rows.start, *grad.shape[1:]))
        dist.reduce_scatter_tensor(mine, grad.contiguous())
        return mine, None


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each process -> (N*B, ...), process 0's rows first; no autograd."""
    world_size = _world()[0]
    if world_size == 1:
        return tensor
    gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(gathered, tensor.contiguous())
    return gathered


def gather_with_grad(tensor: torch.Tensor, *, same_gradient_everywhere: bool = False) -> torch.Tensor:
    """(B, D) on each process -> (N*B, D), differentiable; identity on a single process.

    `same_gradient_everywhere`: promise that every process computes the same function of the gathered tensor
    (then the backward needs no communication). Leave it False when each process computes its own share."""
    return tensor if _world()[0] == 1 else _GatherWithGrad.apply(tensor, same_gradient_everywhere)


def contrastive_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = True,
    caption_ids: torch.Tensor | None = None,
    negative_hardness: float = 0.0,
) -> torch.Tensor:
    """CLIP loss over the global batch.

    image_embeds, text_embeds: (B, D), L2-normalised, row i of each is a pair. logit_scale: scalar parameter
    (log of the inverse temperature). With `local_loss` (and more than one process), this process scores only its
    own B rows against all N*B columns (O(B*N*B) memory instead of O((N*B)^2)); the gradient is the same, the
    value is this process's share (their mean over processes is the global loss). `caption_ids` (B,) int64: pairs
    with equal ids are positives of each other (module docstring); None: only the own pair. `negative_hardness`:
    alpha of the hard-negative weighting (module docstring); 0 leaves the loss as it is. Computed in float32
    whatever the autocast dtype.
    """
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    world_size, rank = _world()
    local = local_loss and world_size > 1
    all_image = gather_with_grad(image_embeds, same_gradient_everywhere=not local)
    all_text = gather_with_grad(text_embeds, same_gradient_everywhere=not local)
    scale = logit_scale.float().exp()
    positives = positive_mask(caption_ids, local)
    if local:
        similarity_per_image, similarity_per_text = image_embeds @ all_text.T, text_embeds @ all_image.T
        labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + rank * image_embeds.shape[0]
        text_positives = positives  # equal captions are symmetric: text i's positives are image i's
    else:
        similarity_per_image = all_image @ all_text.T
        similarity_per_text = similarity_per_image.T
        labels = torch.arange(all_image.shape[0], device=image_embeds.device)
        text_positives = None if positives is None else positives.T
    logits_per_image, logits_per_text = scale * similarity_per_image, scale * similarity_per_text
    if negative_hardness:
        logits_per_image = _harden(logits_per_image, similarity_per_image, labels, positives, negative_hardness)
        logits_per_text = _harden(logits_per_text, similarity_per_text, labels, text_positives, negative_hardness)
    return (
        _cross_entropy(logits_per_image, labels, positives) + _cross_entropy(logits_per_text, labels, text_positives)
    ) / 2


def _harden(
    logits: torch.Tensor, similarity: torch.Tensor, labels: torch.Tensor, positives: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """`logits` (R, C) with alpha x similarity (no gradient) added to each negative column: each negative's exp()
    weighted by exp(alpha s). The positives (the own column `labels`, or the `positives` mask) stay as they are."""
    if positives is None:
        positives = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels[:, None], True)
    return logits + (alpha * similarity.detach()).masked_fill(positives, 0.0)


def positive_mask(caption_ids: torch.Tensor | None, local: bool) -> torch.Tensor | None:
    """(rows, N*B) bool: True where the column's caption is the row's (its own pair included). Rows: this
    process's B with `local`, else all N*B. None without `caption_ids`. The ids are gathered (one small
    all_gather), so duplicates held by other processes count too."""
    if caption_ids is None:
        return None
    all_ids = _all_gather(caption_ids)
    return (caption_ids if local else all_ids)[:, None] == all_ids[None, :]


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, positives: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy of each row of `logits` (R, C) against its positives (R, C) weighted uniformly (UniCL /
    SupCon: -mean over the positives of log softmax), or against its own column `labels` (R,) alone when
    `positives` is None.

    Written as the own-column cross-entropy minus each row's (mean positive - own) log-probability, gated to the
    rows that have another positive: with all captions distinct that term and its gradient are exactly 0, so value
    and gradient are those of `F.cross_entropy(logits, labels)` bit for bit (a soft-target cross-entropy rounds
    differently). One more pass over the (R, C) log-probabilities; no host sync."""
    if positives is None:
        return F.cross_entropy(logits, labels)
    log_probs = logits.log_softmax(dim=1)
    count = positives.sum(dim=1)
    mean_positive = torch.where(positives, log_probs, 0.0).sum(dim=1) / count
    own = log_probs.gather(1, labels[:, None]).squeeze(1)
    return F.nll_loss(log_probs, labels) - ((mean_positive - own) * (count > 1)).mean()


def sigmoid_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_params: torch.Tensor,
    *,
    local_loss: bool = True,
    caption_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over the global batch: every (image, text) pair is a binary problem, its own
    pair positive, all others negative: -sum(log sigmoid(label * (exp(t) x.y + b))) / (global batch).

    logit_params: (2,) = (t, b), the learned log-scale and bias. With N processes each scores its own B images
    against all N*B texts (the gathered texts' gradient reduce-scattered back to their owners) and divides by B:
    the mean over processes is the global loss, and DDP's averaging gives its gradient, the same as one process
    with batch N*B (the paper's chunked variant passes text blocks around a ring instead; the gradient is the
    same). `local_loss` is accepted for a uniform signature: this loss is always computed locally.
    `caption_ids` (B,) int64: every pair of equal ids is labelled +1 (module docstring); None: only the own pair.
    """
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    rank = _world()[1]
    all_text = gather_with_grad(text_embeds, same_gradient_everywhere=False)
    scale, bias = logit_params.float()[0].exp(), logit_params.float()[1]
    logits = scale * image_embeds @ all_text.T + bias
    rows = image_embeds.shape[0]
    positives = positive_mask(caption_ids, local=True)
    if positives is not None:
        labels = positives.float() * 2 - 1
    else:
        labels = -torch.ones_like(logits)
        own = torch.arange(rows, device=logits.device)
        labels[own, own + rank * rows] = 1.0
    return -F.logsigmoid(labels * logits).sum() / rows


def nested_loss(
    loss,
    sizes: tuple[int, ...],
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    **options,
) -> torch.Tensor:
    """`loss` (contrastive_loss or sigmoid_loss, with its `options`) summed over the full (B, D) embeddings and,
    for each of `sizes` below D, their first d dimensions renormalised (B, d). The full size counts once, listed
    in `sizes` or not; the sizes share `logit_scale` (SigLIP: and the bias)."""
    full = image_embeds.shape[1]
    total = loss(image_embeds, text_embeds, logit_scale, **options)
    for size in sizes:
        if size < full:
            images, texts = nested_embeddings(image_embeds, size), nested_embeddings(text_embeds, size)
            total = total + loss(images, texts, logit_scale, **options)
    return total


LOSSES = {"softmax": contrastive_loss, "sigmoid": sigmoid_loss}
