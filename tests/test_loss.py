"""The contrastive loss on one process, against a plain formula (multi-process checks: test_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_accel.loss import contrastive_loss, gather_with_grad


def _embeds(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, d, generator=generator), dim=-1),
        F.normalize(torch.randn(n, d, generator=generator), dim=-1),
    )


def _reference(image: torch.Tensor, text: torch.Tensor, scale: float) -> float:
    """Mean over pairs of -log softmax of the matching entry, both directions, written out by hand."""
    total = 0.0
    n = image.shape[0]
    for i in range(n):
        row = [scale * float(image[i] @ text[j]) for j in range(n)]
        col = [scale * float(text[i] @ image[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        total += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def test_matches_the_written_out_formula():
    image, text = _embeds(6, 8, seed=0)
    logit_scale = torch.tensor(math.log(10.0))
    assert contrastive_loss(image, text, logit_scale).item() == pytest.approx(_reference(image, text, 10.0), rel=1e-5)


def test_perfect_pairs_at_high_temperature_give_near_zero_loss():
    image, _ = _embeds(8, 64, seed=1)
    assert contrastive_loss(image, image.clone(), torch.tensor(math.log(100.0))).item() < 0.05


def test_local_loss_equals_global_loss_on_one_process():
    image, text = _embeds(5, 8, seed=2)
    scale = torch.tensor(2.0)
    assert torch.allclose(contrastive_loss(image, text, scale), contrastive_loss(image, text, scale, local_loss=True))


def test_low_precision_inputs_are_scored_in_float32():
    image, text = _embeds(4, 8, seed=3)
    loss = contrastive_loss(image.bfloat16(), text.bfloat16(), torch.tensor(1.0))
    assert loss.dtype == torch.float32


def test_gradients_reach_embeddings_and_logit_scale():
    image, text = (t.requires_grad_() for t in _embeds(4, 8, seed=4))
    logit_scale = torch.tensor(1.0, requires_grad=True)
    contrastive_loss(image, text, logit_scale).backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0 and logit_scale.grad.abs() > 0


def test_gather_is_identity_without_a_process_group():
    tensor = torch.randn(3, 2)
    assert gather_with_grad(tensor) is tensor
