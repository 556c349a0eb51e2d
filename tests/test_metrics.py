"""Tests for clip_accel.metrics: chunked retrieval ranks against a plain reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clip_accel.metrics import pair_ranks, positive_ranks, retrieval_metrics


def _normed(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def _reference_ranks(query: torch.Tensor, cand: torch.Tensor) -> np.ndarray:
    """Brute force over the full similarity matrix with Python loops, counting >=."""
    sims = query.double().numpy() @ cand.double().numpy().T
    n = sims.shape[0]
    ranks = np.zeros(n, dtype=np.int64)
    for i in range(n):
        ranks[i] = sum(1 for j in range(n) if j != i and sims[i, j] >= sims[i, i])
    return ranks


def _reference_metrics(img: torch.Tensor, txt: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (q, c) in {"image_to_text": (img, txt), "text_to_image": (txt, img)}.items():
        r = _reference_ranks(q, c)
        for k in ks:
            out[f"{name}_R@{k}"] = float(np.mean(r < k))
        out[f"{name}_mean_rank"] = float(np.mean(r + 1))
        out[f"{name}_median_rank"] = float(np.median(r + 1))
    out["mean_R@1"] = (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2
    return out


@pytest.mark.parametrize("n", [1, 2, 13, 50, 64])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_matches_bruteforce_reference(n: int, chunk_size: int) -> None:
    # Correlated pairs so ranks spread over the whole range instead of all being 0.
    img = _normed(n, 8, seed=n)
    txt = img + 0.8 * _normed(n, 8, seed=n + 1000)
    txt = txt / txt.norm(dim=1, keepdim=True)
    got = positive_ranks(img, txt, chunk_size=chunk_size)
    assert got.dtype == torch.long and got.shape == (n,)
    np.testing.assert_array_equal(got.numpy(), _reference_ranks(img, txt))

    ks = (1, 5, 10)
    metrics = retrieval_metrics(img, txt, ks=ks, chunk_size=chunk_size)
    expected = _reference_metrics(img, txt, ks)
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert type(metrics[key]) is float
        assert metrics[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_matches_reference_with_many_exact_ties(chunk_size: int) -> None:
    # Small integer entries: dot products are exact in float32, so ties are real ties.
    g = torch.Generator().manual_seed(3)
    img = torch.randint(-1, 2, (30, 3), generator=g).float()
    txt = torch.randint(-1, 2, (30, 3), generator=g).float()
    for q, c in ((img, txt), (txt, img)):
        got = positive_ranks(q, c, chunk_size=chunk_size).numpy()
        np.testing.assert_array_equal(got, _reference_ranks(q, c))
    got_m = retrieval_metrics(img, txt, ks=(1, 3), chunk_size=chunk_size)
    assert got_m == pytest.approx(_reference_metrics(img, txt, (1, 3)), abs=1e-12)


def test_perfect_alignment() -> None:
    emb = torch.eye(6)
    m = retrieval_metrics(emb, emb.clone())
    for direction in ("image_to_text", "text_to_image"):
        assert m[f"{direction}_R@1"] == 1.0
        assert m[f"{direction}_mean_rank"] == 1.0
        assert m[f"{direction}_median_rank"] == 1.0
    assert m["mean_R@1"] == 1.0


def test_hand_crafted_ranks() -> None:
    # Queries along the axes, so row i of scores is column i of the candidates:
    # q0 -> [0.5, 1.0, 0.0]: c1 beats the positive 0.5          -> rank 1
    # q1 -> [0.0, 0.9, 0.0]: positive is best                    -> rank 0
    # q2 -> [0.8, 0.2, 0.1]: c0 and c1 both beat the positive     -> rank 2
    query = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cand = torch.tensor([[0.5, 0.0, 0.8], [1.0, 0.9, 0.2], [0.0, 0.0, 0.1]])
    assert positive_ranks(query, cand).tolist() == [1, 0, 2]
    m = retrieval_metrics(query, cand, ks=(1, 2, 3))
    assert m["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert m["image_to_text_R@3"] == 1.0
    assert m["image_to_text_mean_rank"] == pytest.approx(2.0)  # 1-based: (2 + 1 + 3) / 3
    assert m["image_to_text_median_rank"] == 2.0


def test_even_n_median_is_numpy_median() -> None:
    # Ranks (0-based) [1, 0, 0, 1] -> 1-based [2, 1, 1, 2]; numpy median = 1.5.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    cand = torch.tensor([[0.5, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 0.5]])
    ranks = positive_ranks(query, cand)
    assert ranks.tolist() == [1, 0, 0, 1]
    assert retrieval_metrics(query, cand)["image_to_text_median_rank"] == 1.5


def test_all_equal_embeddings_score_zero() -> None:
    emb = torch.ones(5, 4) / 2.0
    assert positive_ranks(emb, emb).tolist() == [4] * 5
    m = retrieval_metrics(emb, emb, ks=(1, 5))
    assert m["image_to_text_R@1"] == 0.0 and m["text_to_image_R@1"] == 0.0
    assert m["mean_R@1"] == 0.0
    assert m["image_to_text_R@5"] == 1.0  # k >= N: every rank < N
    assert m["image_to_text_mean_rank"] == 5.0


def test_single_tie_counts_against_query() -> None:
    # Candidate 1 scores exactly as high as q0's positive; nothing else ties.
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    cand = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    ranks = positive_ranks(query, cand)
    assert ranks.tolist() == [1, 0, 0]
    assert retrieval_metrics(query, cand)["image_to_text_R@1"] == pytest.approx(2 / 3)


def test_k_larger_than_n_is_one() -> None:
    img, txt = _normed(4, 8, seed=1), _normed(4, 8, seed=2)
    m = retrieval_metrics(img, txt, ks=(1, 4, 5, 100))
    for direction in ("image_to_text", "text_to_image"):
        assert m[f"{direction}_R@4"] == 1.0
        assert m[f"{direction}_R@5"] == 1.0
        assert m[f"{direction}_R@100"] == 1.0


def test_mean_r1_reported_without_k1() -> None:
    emb = torch.eye(3)
    m = retrieval_metrics(emb, emb, ks=(5,))
    assert m["mean_R@1"] == 1.0
    assert "image_to_text_R@1" not in m


def test_directions_differ_on_asymmetric_example() -> None:
    # Image 1 sits between text 0 and text 1 but closer to text 0:
    # image->text: img1 prefers txt0 -> rank 1; img0 ranks its own text first.
    # text->image: txt0 prefers img0 (1.0 > 0.8), txt1 prefers img1 -> all rank 0.
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert positive_ranks(img, txt).tolist() == [0, 1]
    assert positive_ranks(txt, img).tolist() == [0, 0]
    m = retrieval_metrics(img, txt)
    assert m["image_to_text_R@1"] == 0.5
    assert m["text_to_image_R@1"] == 1.0
    assert m["mean_R@1"] == 0.75
    assert m["image_to_text_mean_rank"] == 1.5
    assert m["text_to_image_mean_rank"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_float32(dtype: torch.dtype) -> None:
    # Well separated: text = image + small noise, with few pairs in high dimension,
    # so score gaps are far larger than fp16/bf16 rounding.
    n, d = 40, 64
    img = _normed(n, d, seed=7)
    txt = img + 0.3 * _normed(n, d, seed=8)
    txt = txt / txt.norm(dim=1, keepdim=True)
    ref = positive_ranks(img, txt, chunk_size=9)
    assert ref.eq(0).all()  # sanity: the example really is well separated
    low = positive_ranks(img.to(dtype), txt.to(dtype), chunk_size=9)
    assert torch.equal(low, ref)
    assert retrieval_metrics(img.to(dtype), txt.to(dtype)) == retrieval_metrics(img, txt)

    # An imperfect model too: img_i = e_i, txt_i ~ e_i + w_i e_{i+1}. With w in
    # {0.3, 3} the scores are {0.958, 0.287} or {0.316, 0.949}, so ranks 0 and 1
    # both occur and every gap (>= 0.029) dwarfs bf16 rounding (~0.004).
    w = torch.tensor([0.3, 3.0, 3.0, 0.3, 3.0, 0.3, 0.3, 3.0])
    m = len(w)
    img = torch.eye(m)
    txt = torch.eye(m) + w[:, None] * torch.eye(m).roll(1, dims=1)
    txt = txt / txt.norm(dim=1, keepdim=True)
    ref = positive_ranks(img, txt, chunk_size=3)
    assert set(ref.tolist()) == {0, 1}
    assert torch.equal(positive_ranks(img.to(dtype), txt.to(dtype), chunk_size=3), ref)
    assert torch.equal(positive_ranks(txt.to(dtype), img.to(dtype)), positive_ranks(txt, img))


@pytest.mark.parametrize(
    "img, txt, kwargs",
    [
        (torch.zeros(4), torch.zeros(4), {}),  # 1-D
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), {}),  # 3-D
        (torch.zeros(4, 3), torch.zeros(5, 3), {}),  # different N
        (torch.zeros(4, 3), torch.zeros(4, 2), {}),  # different D
        (torch.zeros(0, 3), torch.zeros(0, 3), {}),  # N == 0
        (torch.zeros(4, 3), torch.zeros(4, 3), {"ks": (1, 0)}),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"ks": (-1,)}),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"ks": (1.5,)}),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"ks": ()}),
        (torch.zeros(4, 3), torch.zeros(4, 3), {"chunk_size": 0}),
    ],
)
def test_bad_inputs_raise(img: torch.Tensor, txt: torch.Tensor, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        retrieval_metrics(img, txt, **kwargs)
    if "ks" not in kwargs:
        with pytest.raises(ValueError):
            positive_ranks(img, txt, **kwargs)


def test_nan_positive_gets_worst_rank() -> None:
    query = torch.eye(3)
    query[1] = float("nan")
    assert positive_ranks(query, torch.eye(3)).tolist() == [0, 2, 0]


@pytest.mark.parametrize("n, chunk_size", [(1, 1), (13, 1), (30, 7), (50, 16), (64, 1000)])
def test_one_pass_ranks_both_directions_like_the_reference(n: int, chunk_size: int) -> None:
    # The same similarity tiles serve image queries (rows) and text queries (columns).
    img = _normed(n, 8, seed=n)
    txt = img + 0.8 * _normed(n, 8, seed=n + 1000)
    image_ranks, text_ranks = pair_ranks(img, txt, chunk_size=chunk_size)
    np.testing.assert_array_equal(image_ranks.numpy(), _reference_ranks(img, txt))
    np.testing.assert_array_equal(text_ranks.numpy(), _reference_ranks(txt, img))
    g = torch.Generator().manual_seed(n)
    img, txt = (torch.randint(-1, 2, (n, 3), generator=g).float() for _ in range(2))  # exact ties
    image_ranks, text_ranks = pair_ranks(img, txt, chunk_size=chunk_size)
    np.testing.assert_array_equal(image_ranks.numpy(), _reference_ranks(img, txt))
    np.testing.assert_array_equal(text_ranks.numpy(), _reference_ranks(txt, img))
    assert pair_ranks(img, txt, chunk_size=chunk_size, columns=False)[1] is None


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 1000])
def test_duplicate_pair_ties_whatever_tile_it_lands_in(chunk_size: int) -> None:
    # Real-valued (not integer) embeddings: a pair repeated elsewhere in the split scores exactly its own
    # positive, so each copy outranks the other (pessimistic ties) in both directions, even when the two copies
    # sit at different positions of different similarity tiles.
    img = _normed(50, 64, seed=5)
    img[41] = img[3]
    image_ranks, text_ranks = pair_ranks(img, img.clone(), chunk_size=chunk_size)
    expected = [1 if i in (3, 41) else 0 for i in range(50)]
    assert image_ranks.tolist() == expected
    assert text_ranks.tolist() == expected


def test_nan_pair_gets_worst_rank_in_both_directions() -> None:
    images = torch.eye(3)
    images[1] = float("nan")
    image_ranks, text_ranks = pair_ranks(images, torch.eye(3))
    assert image_ranks.tolist() == [0, 2, 0]
    assert text_ranks.tolist() == [0, 2, 0]


def test_identical_captions_count_as_matches_only_in_the_lenient_figures():
    from clip_accel.metrics import identical_caption_metrics

    # Texts 0 and 1 share a caption; image 0 is closest to text 1, image 1 to text 0.
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    text = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    captions = ["red kurta", "red kurta", "blue saree"]
    strict = retrieval_metrics(image, text, ks=(1,))
    lenient = identical_caption_metrics(image, text, captions, ks=(1,))
    assert strict["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert lenient["image_to_text_R@1"] == 1.0 and lenient["text_to_image_R@1"] == 1.0
    both = retrieval_metrics(image, text, ks=(1,), captions=captions)  # one pass, both rules
    assert both.pop("identical_caption_match") == lenient and both == strict
    # With all captions distinct the lenient rank is the own-pair rank, ties included.
    image, text = _normed(40, 8, seed=5), _normed(40, 8, seed=6)
    for distinct in (torch.arange(40), torch.arange(40).flip(0) * 3):
        ranked = pair_ranks(image, text, chunk_size=7, groups=distinct)
        assert torch.equal(ranked[0], positive_ranks(image, text))
        assert torch.equal(ranked[1], positive_ranks(text, image))


def _group_ranks_by_brute_force(query: torch.Tensor, candidate: torch.Tensor, groups: torch.Tensor) -> list[int]:
    scores = query @ candidate.T
    same = groups[:, None] == groups[None, :]
    best = scores.masked_fill(~same, float("-inf")).amax(dim=1, keepdim=True)
    return ((scores >= best) & ~same).sum(dim=1).tolist()


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100])
def test_group_ranks_match_brute_force_with_ties_shuffled_groups_and_a_group_larger_than_a_tile(chunk_size):
    generator = torch.Generator().manual_seed(3)
    n = 60
    # Small integer entries: exact ties. Group ids shuffled (members far apart), sizes 1 to 5, and one of 9.
    image, text = (torch.randint(-1, 2, (n, 4), generator=generator).float() for _ in range(2))
    groups = torch.cat([torch.full((9,), 100), torch.randint(0, 15, (n - 9,), generator=generator)])
    groups = groups[torch.randperm(n, generator=generator)]
    image_ranks, text_ranks = pair_ranks(image, text, chunk_size=chunk_size, groups=groups)
    assert image_ranks.tolist() == _group_ranks_by_brute_force(image, text, groups)
    assert text_ranks.tolist() == _group_ranks_by_brute_force(text, image, groups)


def test_group_ranks_of_a_matrix_against_itself():
    # The same tensor on both sides (image = text): gathered into separate buffers, not one.
    embeds = _normed(30, 6, seed=9)
    groups = torch.arange(30) % 7
    image_ranks, text_ranks = pair_ranks(embeds, embeds, chunk_size=8, groups=groups)
    expected = _group_ranks_by_brute_force(embeds, embeds, groups)
    assert image_ranks.tolist() == expected and text_ranks.tolist() == expected


def test_ranking_runs_in_full_float32_whatever_the_process_wide_matmul_precision(monkeypatch) -> None:
    # Training on CUDA sets "high" (TF32) for the whole process; near-ties must rank as `clip-accel evaluate`
    # (float32) ranks them.
    seen, mm = [], torch.mm

    def recording_mm(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", recording_mm)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default
    default = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        embeds = torch.nn.functional.normalize(torch.randn(70, 8), dim=1)
        retrieval_metrics(embeds, embeds.flip(0), chunk_size=32, captions=[str(i % 5) for i in range(70)])
        assert torch.get_float32_matmul_precision() == "high", "the setting is restored afterwards"
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(default)
    assert seen and set(seen) == {("highest", False)}
