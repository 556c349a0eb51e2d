"""One optimizer step over a group of micro-batches, in two flavours.

- `plain_step`: ordinary gradient accumulation. Each micro-batch is its own contrastive batch, so it only
  ever sees its own negatives: accumulation saves memory but does not grow the batch the loss sees.
- `exact_step`: the accumulation that does (GradCache). Embed every micro-batch without grad, compute the loss
  over the whole accumulated (and gathered) batch once and its gradient with respect to the embeddings, then
  re-run each micro-batch with grad and backpropagate its rows of that gradient. The gradient equals that of one
  big batch; the price is one extra forward per micro-batch. Exact for models without dropout (CLIP's default).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from accelerate import Accelerator

from .ema import WeightEma
from .loss import contrastive_loss
from .model import PixelNormalizer, unwrap

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the inverse temperature; fp16 overflows without it
Loss = Callable[..., torch.Tensor]


def use_tf32(device: torch.device, enabled: bool) -> None:
    """On CUDA, let float32 matrix products and cuDNN convolutions (the patch embedding) use TF32 tensor cores,
    or forbid both. CPUs are left alone: there "high" precision may mean bfloat16 passes."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if enabled else "highest")
        torch.backends.cudnn.allow_tf32 = enabled


@dataclass
class StepContext:
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    normalizer: PixelNormalizer
    max_grad_norm: float
    local_loss: bool
    loss: Loss = contrastive_loss  # the family's: CLIP's softmax, SigLIP's sigmoid (with the bias in logit_params)
    max_logit_scale: float | None = MAX_LOGIT_SCALE  # CLIP's cap after each step; SigLIP has none
    # "identical": pairs with the same caption (token ids) are positives of each other (the batches' `caption_ids`);
    # "own": a pair's only positive is itself.
    caption_positives: Literal["identical", "own"] = "own"
    ema: WeightEma | None = None  # --ema_decay's average, updated after each optimizer step


def embed(context: StepContext, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised (B, D) image and text embeddings and logit_scale, through the prepared model's forward so
    its hooks fire (DDP's, FSDP2's), under the run's autocast: Accelerate wraps a DDP model's forward in it, but
    not an FSDP2 one's (its prepare leaves the precision to FSDP2's policy, which trainer.py sets to float32)."""
    with context.accelerator.autocast():
        return context.model(input_ids=batch["input_ids"], **context.normalizer.inputs(batch))


def caption_ids(context: StepContext, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor | None:
    """The caption ids (rows,) of `micro_batches`, concatenated, for the loss's positives; None for "own"."""
    if context.caption_positives == "own":
        return None
    return torch.cat([batch["caption_ids"] for batch in micro_batches])


def plain_step(context: StepContext, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss per micro-batch; the gradient is their mean over this group (a short last group of an epoch
    averages its own micro-batches), all-reduced once, after the last one, then one optimizer step.

    Sync is driven here, not by `accelerator.accumulate`: Accelerate decides from its end-of-dataloader flag,
    which is already set while the group read before the first forward is still running.

    Returns the mean loss and whether the optimizer step was skipped (a device tensor, see `_optimizer_step`)."""
    accelerator, losses = context.accelerator, []
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(context.model):
            image_embeds, text_embeds, logit_scale = embed(context, batch)
            ids = caption_ids(context, [batch])
            loss = context.loss(image_embeds, text_embeds, logit_scale, local_loss=context.local_loss, caption_ids=ids)
            accelerator.backward(loss / len(micro_batches))
        losses.append(loss.detach())
    return torch.stack(losses).mean(), _optimizer_step(context)


def exact_step(context: StepContext, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive loss over all micro-batches at once, GradCache-style (see the module docstring):

    1. embed every micro-batch without grad (activations freed at once);
    2. gather once, compute the loss once on those embeddings as leaf tensors, and backpropagate it to them and
       to `logit_scale` (the embeddings' gradient is the only thing the towers need from the loss);
    3. per micro-batch, embed again with grad and backpropagate its rows of the cached gradient, through
       `<embeds, gradient>` as a surrogate loss. `logit_scale`'s gradient joins the last pass only, and the
       model's gradients are all-reduced once, after it.

    Returns the loss and whether the optimizer step was skipped (a device tensor, see `_optimizer_step`)."""
    accelerator = context.accelerator
    with torch.no_grad():
        cached = [embed(context, batch) for batch in micro_batches]
    images = torch.cat([image for image, _, _ in cached]).requires_grad_()
    texts = torch.cat([text for _, text, _ in cached]).requires_grad_()
    scale = cached[0][2].detach().requires_grad_()
    with torch.enable_grad():
        ids = caption_ids(context, micro_batches)  # in the order of the cached rows
        loss = context.loss(images, texts, scale, local_loss=context.local_loss, caption_ids=ids)
        image_grads, text_grads, scale_grad = torch.autograd.grad(loss, [images, texts, scale])
    rows = 0
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(context.model):
            image_embeds, text_embeds, logit_scale = embed(context, batch)
            mine = slice(rows, rows + image_embeds.shape[0])
            surrogate = (image_embeds * image_grads[mine]).sum() + (text_embeds * text_grads[mine]).sum()
            if last and logit_scale.requires_grad:  # (SigLIP: the scale and the bias)
                surrogate = surrogate + (logit_scale * scale_grad).sum()
            accelerator.backward(surrogate)  # under fp16 the grad scaler scales it like a loss
        rows = mine.stop
    return loss.detach(), _optimizer_step(context)


def _optimizer_step(context: StepContext) -> torch.Tensor:
    """Clip, step, zero, schedule, clamp logit_scale. Returns a 0-D bool tensor on the device: True where the step
    was skipped because its gradients were not finite (the trainer reads these on logging steps).

    A step whose gradients are not finite is not applied. The fused optimizer (the trainer's AdamW, on every
    device) takes the decision on the device through its `found_inf` input: set here from the gradient norm, or,
    under fp16, by the grad scaler from the unscaled gradients. An optimizer without that input is stepped or not
    from the host (one sync). DDP has already averaged the gradients, so every process takes the same decision.

    The schedule moves on at a step skipped in bf16/float32 (a skip there is rare, and knowing would cost a sync
    per step). Under fp16 skips are routine (the scaler lowers its scale until the gradients fit), so the
    schedule follows the scaler: one sync per step, the price of fp16 (bf16 needs neither scaler nor sync).
    """
    accelerator, optimizer, scaler = context.accelerator, context.optimizer, context.accelerator.scaler
    grad_norm = accelerator.clip_grad_norm_(context.model.parameters(), context.max_grad_norm or math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    if scaler is not None:
        skipped = _scaler_step(optimizer, scaler)
    else:
        skipped = ~torch.isfinite(grad_norm)
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.grad_scale, inner.found_inf = None, skipped.float()
            try:
                optimizer.step()
            finally:  # never left for the next step (or the grad scaler) to find
                del inner.grad_scale, inner.found_inf
        elif not bool(skipped):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scaler is None or not bool(skipped):
        context.scheduler.step()
    if context.max_logit_scale is not None:
        with torch.no_grad():
            unwrap(accelerator, context.model).logit_scale.clamp_(0, context.max_logit_scale)
    if context.ema is not None:  # (after the clamp: the average of the weights as they are used)
        context.ema.update(skipped)
    return skipped


def _scaler_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> torch.Tensor:
    """fp16: step through Accelerate's wrapper (the scaler's step and update); True (on the device) where the scaler
    skipped the step. With a fused optimizer the scaler always calls its step (the kernel skips on the device), so
    Accelerate's `optimizer_step_was_skipped` is always False; the scale, which falls exactly when the scaler
    found non-finite gradients (backoff < 1), says what happened."""
    scale = scaler._scale.clone()  # the device tensor: get_scale() would read it back
    optimizer.step()
    return (scaler._scale < scale).reshape(())
