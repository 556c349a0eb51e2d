"""The contrastive loss on one process, against a plain formula (multi-process checks: test_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_accel.loss import contrastive_loss, gather_with_grad, nested_loss, sigmoid_loss


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


# Identical-caption positives (--caption_positives identical): a caption id per row, equal ids equal captions.
DUPLICATES = torch.tensor([7, 3, 7, 5, 3, 7])  # rows 0, 2, 5 share one caption, rows 1, 4 another; row 3 alone
DISTINCT = torch.tensor([11, -4, 9, 2**40, 0, 5])


def _multi_positive_reference(image: torch.Tensor, text: torch.Tensor, scale: float, ids: list[int]) -> float:
    """Each row's cross-entropy against its positives (the columns with its caption) weighted 1/|positives|,
    both directions, written out by hand."""
    total, n = 0.0, image.shape[0]
    for i in range(n):
        positives = [j for j in range(n) if ids[j] == ids[i]]
        for a, b in ((image, text), (text, image)):
            row = [scale * float(a[i] @ b[j]) for j in range(n)]
            log_sum = math.log(sum(math.exp(v) for v in row))
            total += -sum(row[j] - log_sum for j in positives) / len(positives)
    return total / (2 * n)


def _sigmoid_reference(image, text, scale: float, bias: float, ids: list[int]) -> float:
    n = image.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if ids[i] == ids[j] else -1.0
            total += -math.log(1 / (1 + math.exp(-label * (scale * float(image[i] @ text[j]) + bias))))
    return total / n


def test_identical_captions_are_positives_as_written_out_by_hand():
    image, text = _embeds(6, 8, seed=5)
    loss = contrastive_loss(image, text, torch.tensor(math.log(10.0)), caption_ids=DUPLICATES)
    expected = _multi_positive_reference(image, text, 10.0, DUPLICATES.tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() != pytest.approx(_reference(image, text, 10.0), rel=1e-3)  # the duplicates do count


def test_identical_captions_are_positive_pairs_of_the_sigmoid_loss_as_written_out_by_hand():
    image, text = _embeds(6, 8, seed=6)
    params = torch.tensor([math.log(10.0), -2.0])
    loss = sigmoid_loss(image, text, params, caption_ids=DUPLICATES)
    assert loss.item() == pytest.approx(_sigmoid_reference(image, text, 10.0, -2.0, DUPLICATES.tolist()), rel=1e-5)
    own = _sigmoid_reference(image, text, 10.0, -2.0, list(range(6)))
    assert sigmoid_loss(image, text, params).item() == pytest.approx(own, rel=1e-5)
    assert loss.item() != pytest.approx(own, rel=1e-3)


def _loss_and_gradients(loss_fn, scale: torch.Tensor, seed: int, **options):
    image, text = (t.requires_grad_() for t in _embeds(16, 8, seed=seed))
    scale = scale.clone().requires_grad_()
    loss = loss_fn(image, text, scale, **options)
    return [loss, *torch.autograd.grad(loss, [image, text, scale])]


@pytest.mark.parametrize(
    "loss_fn, scale",
    [(contrastive_loss, torch.tensor(math.log(20.0))), (sigmoid_loss, torch.tensor([math.log(10.0), -3.0]))],
)
@pytest.mark.parametrize("local_loss", [True, False])
def test_all_distinct_captions_give_the_own_pair_loss_and_gradient_bit_for_bit(loss_fn, scale, local_loss):
    # Several batches: another formula that is right to rounding (a soft-target cross-entropy) differs in the
    # last bit on about half of them.
    distinct = torch.tensor([*DISTINCT.tolist(), *range(100, 110)])
    for seed in range(8):
        own = _loss_and_gradients(loss_fn, scale, seed, local_loss=local_loss)
        identical = _loss_and_gradients(loss_fn, scale, seed, local_loss=local_loss, caption_ids=distinct)
        for expected, got in zip(own, identical, strict=True):
            assert torch.equal(expected, got), seed


def _with_shared_texts(loss_fn, scale, image, text, **options):
    """Loss and gradients where texts 0 and 1 are one caption embedded once (as the text tower does for equal
    strings): the gradient reaching that caption's embedding is the sum over its rows."""
    image, text, scale = image.clone().requires_grad_(), text.clone().requires_grad_(), scale.clone().requires_grad_()
    loss = loss_fn(image, text, scale, **options)
    image_grad, text_grad, scale_grad = torch.autograd.grad(loss, [image, text, scale])
    return [loss, image_grad, torch.cat([text_grad[:1] + text_grad[1:2], text_grad[2:]]), scale_grad]


def test_for_the_softmax_loss_an_identical_caption_is_already_a_positive():
    # Why --caption_positives changes nothing for CLIP when equal captions embed equally: image 1 is a negative
    # of text 0's row and the positive of text 1's, the same vector; the two rows' own-pair terms sum to exactly
    # the multi-positive target's. Same value, same gradient reaching each tower (to rounding).
    image, text = _embeds(5, 8, seed=8)
    text = torch.cat([text[:1], text[:1], text[2:]])
    ids, scale = torch.tensor([1, 1, 2, 3, 4]), torch.tensor(math.log(20.0))
    own = _with_shared_texts(contrastive_loss, scale, image, text)
    identical = _with_shared_texts(contrastive_loss, scale, image, text, caption_ids=ids)
    for expected, got in zip(own, identical, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Not vacuous: where the two texts differ (dropout, a different caption) the positives do change the loss.
    other = torch.cat([text[:1], F.normalize(text[1:2] + 0.5 * text[2:3], dim=-1), text[2:]])
    assert contrastive_loss(image, other, scale, caption_ids=ids) != pytest.approx(
        contrastive_loss(image, other, scale).item(), rel=1e-3
    )


def test_the_sigmoid_own_pair_loss_pushes_two_photos_of_one_title_apart():
    # SigLIP: image 1 with the shared text is labelled -1 (as text 0's negative) and +1 (as text 1's pair): the
    # own-pair loss drives that score to sigmoid 0.5, pushing a matching photo away from its title once it is
    # above. With the title's positives both labels are +1 and the photo is pulled towards it.
    basis = torch.eye(8)
    image, text = basis[[0, 0, 2, 3]], basis[[0, 0, 2, 3]]  # every other pair orthogonal: only the title acts
    ids, params = torch.tensor([1, 1, 2, 3]), torch.tensor([math.log(10.0), -2.0])
    own = _with_shared_texts(sigmoid_loss, params, image, text)[1]
    identical = _with_shared_texts(sigmoid_loss, params, image, text, caption_ids=ids)[1]
    # A gradient step moves image 1 by -gradient: along its title's text (basis 0) away from it, or towards it.
    assert float(own[1] @ basis[0]) > 2 and float(identical[1] @ basis[0]) < -1e-3


def _hardness_reference(image, text, scale: float, alpha: float, ids: list[int]) -> torch.Tensor:
    """HN-NCE as written out, in torch so it has gradients: each row's softmax over its columns, every negative's
    exp() multiplied by exp(alpha x its similarity) taken as a constant; -mean log-probability of the positives."""
    total, n = 0.0, image.shape[0]
    for i in range(n):
        positives = [j for j in range(n) if ids[j] == ids[i]]
        for a, b in ((image, text), (text, image)):
            terms = []
            for j in range(n):
                similarity = a[i] @ b[j]
                weight = 1.0 if j in positives else math.exp(alpha * float(similarity.detach()))
                terms.append(weight * torch.exp(scale * similarity))
            denominator = sum(terms)
            total = total - sum(torch.log(terms[j] / denominator) for j in positives) / len(positives)
    return total / (2 * n)


@pytest.mark.parametrize("ids", [None, DUPLICATES], ids=["own pair", "identical captions"])
@pytest.mark.parametrize("local_loss", [False, True])
def test_hard_negatives_are_weighted_by_exp_alpha_similarity_as_written_out_by_hand(ids, local_loss):
    image, text = (t.requires_grad_() for t in _embeds(6, 8, seed=7))
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss = contrastive_loss(image, text, scale, local_loss=local_loss, caption_ids=ids, negative_hardness=3.0)
    gradients = torch.autograd.grad(loss, [image, text, scale])
    reference = _hardness_reference(image, text, scale.exp(), 3.0, list(range(6)) if ids is None else ids.tolist())
    expected = torch.autograd.grad(reference, [image, text, scale])
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(gradients, expected, strict=True):  # the weights carry no gradient
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert loss.item() != pytest.approx(contrastive_loss(image, text, scale, caption_ids=ids).item(), rel=1e-3)


def _sigmoid_torch_reference(image, text, params: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss as written out, in torch so it has gradients: every pair a binary problem, the own pair +1, the
    rest -1, summed per row."""
    logits = params[0].exp() * image @ text.T + params[1]
    labels = 2 * torch.eye(image.shape[0]) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


@pytest.mark.parametrize("family", ["clip", "clip with hard negatives and identical captions", "siglip"])
@pytest.mark.parametrize("sizes", [(8, 4, 2), (4, 2)], ids=["full size listed", "full size implied"])
def test_nested_loss_sums_the_loss_over_the_leading_dims_renormalised_as_written_out_by_hand(family, sizes):
    generator = torch.Generator().manual_seed(11)
    raw_image, raw_text = (3 * torch.randn(6, 8, generator=generator)).requires_grad_(), torch.randn(6, 8)
    raw_text.requires_grad_()
    if family == "siglip":
        loss, options = sigmoid_loss, {}
        scale = torch.tensor([math.log(10.0), -2.0], requires_grad=True)

        def reference(image, text):
            return _sigmoid_torch_reference(image, text, scale)
    else:
        hard = family != "clip"
        loss, options = contrastive_loss, {"caption_ids": DUPLICATES, "negative_hardness": 3.0} if hard else {}
        scale = torch.tensor(math.log(10.0), requires_grad=True)
        ids = DUPLICATES.tolist() if hard else list(range(6))

        def reference(image, text):
            return _hardness_reference(image, text, scale.exp(), 3.0 if hard else 0.0, ids)

    embeds = F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1)  # as the model's forward returns them
    value = nested_loss(loss, sizes, *embeds, scale, **options)
    gradients = torch.autograd.grad(value, [raw_image, raw_text, scale])
    # Each size's loss on the truncated raw features normalised (the same as the normalised ones renormalised).
    truncated = [(raw_image[:, :d] / raw_image[:, :d].norm(dim=1, keepdim=True), raw_text[:, :d]) for d in (8, 4, 2)]
    expected_value = sum(reference(image, text / text.norm(dim=1, keepdim=True)) for image, text in truncated)
    expected = torch.autograd.grad(expected_value, [raw_image, raw_text, scale])
    assert value.item() == pytest.approx(expected_value.item(), rel=1e-5)
    for got, want in zip(gradients, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_the_run_s_loss_wraps_the_family_s_over_the_sizes_which_fit_the_model():
    from accelerate.state import AcceleratorState, PartialState
    from conftest import tiny_clip_config
    from transformers import CLIPModel

    from clip_accel.config import TrainConfig, UserError
    from clip_accel.model import CLIP
    from clip_accel.startup import _check_nested_sizes, _loss

    loss = _loss(CLIP, TrainConfig(matryoshka_dims="16,8", negative_hardness=2.0))
    assert loss.func is nested_loss and loss.args[1] == (16, 8)
    assert loss.args[0].func is contrastive_loss and loss.args[0].keywords == {"negative_hardness": 2.0}
    model = CLIPModel(tiny_clip_config())  # embeddings of 16
    PartialState(cpu=True)  # (the start-up's logger needs it)
    try:
        _check_nested_sizes(TrainConfig(matryoshka_dims="16,8,4"), model)
        with pytest.raises(UserError, match="32 exceeds this model's embedding size, 16; list sizes of at most 16"):
            _check_nested_sizes(TrainConfig(matryoshka_dims="32,8"), model)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
