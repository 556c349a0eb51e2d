"""The symmetric contrastive (InfoNCE) loss, with negatives from every process.

On N processes with per-process batch B, each process gathers all N*B image and text embeddings so every pair is
scored against the global batch. The gather keeps autograd: the backward pass all-reduces the gradient of the
gathered tensor and each process keeps its own slice, so DDP's gradient averaging then yields exactly the gradient
of the global loss (the same weights as one process with batch N*B). Assumes equal per-process batches, which the
training loader's drop_last guarantees.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every process's gradient and returns this process's slice.

    (`torch.distributed.nn.functional.all_gather` does the same but is deprecated; all_reduce works on every
    backend, gloo included.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size, rank = _world()
        ctx.slice = slice(rank * tensor.shape[0], (rank + 1) * tensor.shape[0])
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.slice]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, D) on each process -> (N*B, D), differentiable; identity on a single process."""
    return tensor if _world()[0] == 1 else _GatherWithGrad.apply(tensor)


def contrastive_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, *, local_loss: bool = False
) -> torch.Tensor:
    """CLIP loss over the global batch.

    image_embeds, text_embeds: (B, D), L2-normalised, row i of each is a pair. logit_scale: scalar parameter
    (log of the inverse temperature). With `local_loss`, this process scores only its own B rows against all N*B
    columns (O(B*N*B) memory instead of O((N*B)^2)); the gradient is the same, the logged value is this
    process's share. Computed in float32 whatever the autocast dtype.
    """
    image_embeds, text_embeds = image_embeds.float(), text_embeds.float()
    all_image, all_text = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    scale = logit_scale.float().exp()
    if local_loss:
        _, rank = _world()
        logits_per_image = scale * image_embeds @ all_text.T
        logits_per_text = scale * text_embeds @ all_image.T
        labels = torch.arange(image_embeds.shape[0], device=image_embeds.device) + rank * image_embeds.shape[0]
    else:
        logits_per_image = scale * all_image @ all_text.T
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image_embeds.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
