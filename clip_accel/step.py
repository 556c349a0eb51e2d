"""One optimizer step over a group of micro-batches, in two flavours.

- `plain_step`: ordinary gradient accumulation. Each micro-batch is its own contrastive batch, so it only
  ever sees its own negatives: accumulation saves memory but does not grow the batch the loss sees.
- `exact_step`: the accumulation that does (GradCache / open_clip `--accum-freq`). Embed every micro-batch
  without grad, compute the loss over the whole accumulated (and gathered) batch, then re-run each micro-batch
  with grad and backpropagate through its own slot. The gradient equals that of one big batch; the price is one
  extra forward per micro-batch. Exact for models without dropout (CLIP's default).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from .loss import contrastive_loss
from .model import PixelNormalizer, unwrap

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the inverse temperature; fp16 overflows without it


@dataclass
class StepContext:
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    normalizer: PixelNormalizer
    max_grad_norm: float
    local_loss: bool


def embed(context: StepContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised (B, D) image and text embeddings and logit_scale, through the prepared model's forward so
    its hooks fire (DDP's, FSDP2's)."""
    return context.model(input_ids=batch["input_ids"], pixel_values=context.normalizer(batch["pixel_values"]))


def plain_step(context: StepContext, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, bool]:
    """A loss per micro-batch; the gradient is their mean over this group (a short last group of an epoch
    averages its own micro-batches), all-reduced once, after the last one, then one optimizer step.

    Sync is driven here, not by `accelerator.accumulate`: Accelerate decides from its end-of-dataloader flag,
    which is already set while the group read before the first forward is still running.

    Returns the mean loss and whether the optimizer step was applied (False: non-finite gradients, skipped)."""
    accelerator, losses = context.accelerator, []
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(context.model):
            image_embeds, text_embeds, logit_scale = embed(context, batch)
            loss = contrastive_loss(image_embeds, text_embeds, logit_scale, local_loss=context.local_loss)
            accelerator.backward(loss / len(micro_batches))
        losses.append(loss.detach())
    return torch.stack(losses).mean(), _optimizer_step(context)


def exact_step(context: StepContext, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, bool]:
    """Contrastive loss over all micro-batches at once (see the module docstring). Returns that loss and whether
    the optimizer step was applied."""
    accelerator = context.accelerator
    with torch.no_grad():
        cached = [embed(context, batch) for batch in micro_batches]
    cached_images = [image for image, _, _ in cached]
    cached_texts = [text for _, text, _ in cached]
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        # Gradients are all-reduced once, after the last micro-batch.
        with accelerator.no_sync(context.model) if not last else nullcontext():
            image_embeds, text_embeds, logit_scale = embed(context, batch)
            images = torch.cat(cached_images[:index] + [image_embeds] + cached_images[index + 1 :])
            texts = torch.cat(cached_texts[:index] + [text_embeds] + cached_texts[index + 1 :])
            # Each pass recomputes the whole loss; logit_scale must receive its gradient once, not once per pass.
            logit_scale = logit_scale if last else logit_scale.detach()
            loss = contrastive_loss(images, texts, logit_scale, local_loss=context.local_loss)
            accelerator.backward(loss)
    return loss.detach(), _optimizer_step(context)


def _optimizer_step(context: StepContext) -> bool:
    """Clip, step, zero; on a real optimizer step also schedule and clamp logit_scale.

    A step whose gradients are not finite is skipped (returns False) instead of writing NaN into the weights.
    Checking costs one host sync per optimizer step; DDP has already averaged the gradients, so every process
    sees the same norm and takes the same decision.
    """
    accelerator = context.accelerator
    grad_norm = accelerator.clip_grad_norm_(context.model.parameters(), context.max_grad_norm or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    finite = grad_norm is None or bool(torch.isfinite(grad_norm))
    if finite or accelerator.mixed_precision == "fp16":  # fp16: the grad scaler skips and lowers its scale
        context.optimizer.step()
    context.optimizer.zero_grad(set_to_none=True)
    stepped = finite and not accelerator.optimizer_step_was_skipped
    if stepped:
        context.scheduler.step()
        with torch.no_grad():
            unwrap(context.accelerator, context.model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return stepped
