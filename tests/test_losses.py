"""The objective against the naive float64 reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import naive_dual_view, naive_info_nce, unit_vectors

from mocoplus.losses import contrastive_loss, dual_view_loss, info_nce
from mocoplus.negatives import NegativeSampling

SELECTIONS = [
    pytest.param({"negatives": "all"}, id="all"),
    pytest.param({"negatives": "topk", "num_negatives": 5}, id="topk"),
    pytest.param({"negatives": "topk", "num_negatives": 50}, id="topk-k>K"),
    pytest.param({"negatives": "band", "num_negatives": 4, "skip_negatives": 3}, id="band"),
    pytest.param({"negatives": "band", "num_negatives": None, "skip_negatives": 2}, id="band-rest"),
    pytest.param({"negatives": "band", "num_negatives": 10, "skip_negatives": 15}, id="band-short"),
    pytest.param({"negatives": "threshold", "negative_threshold": 0.1, "num_negatives": 3}, id="threshold"),
    pytest.param({"negatives": "threshold", "negative_threshold": 0.0, "num_negatives": None}, id="threshold-rest"),
    pytest.param({"negatives": "threshold", "negative_threshold": -0.2, "num_negatives": 8}, id="threshold-few"),
    pytest.param({"negatives": "band", "num_negatives": 5, "skip_negatives_fraction": 0.1}, id="band-share"),
    pytest.param({"negatives": "band", "num_negatives": None, "skip_negatives_fraction": 0.3}, id="band-share-rest"),
    pytest.param({"negatives": "debiased", "debias_prior": 0.1}, id="debiased"),
    pytest.param({"negatives": "debiased", "debias_prior": 0.5}, id="debiased-floor"),
    pytest.param({"negatives": "hard-weighted", "debias_prior": 0.1, "hardness": 1.0}, id="hard-weighted"),
    pytest.param({"negatives": "hard-weighted", "debias_prior": 0.0, "hardness": 2.0}, id="hard-weighted-no-debias"),
]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_info_nce_matches_naive_loop_value_and_gradients(generator, selection):
    B, K, d, tau = 6, 19, 8, 0.2  # K not a multiple of B
    anchors = unit_vectors(generator, B, d, requires_grad=True)
    positives = unit_vectors(generator, B, d, requires_grad=True)
    queue = unit_vectors(generator, K, d)

    loss = info_nce(anchors, positives, queue, temperature=tau, **selection)
    grads = torch.autograd.grad(loss, [anchors, positives])
    expected = naive_info_nce(anchors, positives, queue, tau, **selection)
    expected_grads = torch.autograd.grad(expected, [anchors, positives])

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_ties_in_the_queue_give_the_naive_loss(generator, selection):
    B, d = 5, 6
    anchors = unit_vectors(generator, B, d)
    positives = unit_vectors(generator, B, d)
    distinct = unit_vectors(generator, 7, d)
    queue = torch.cat([distinct, distinct, distinct[:3]])  # every similarity appears two or three times
    loss = info_nce(anchors, positives, queue, temperature=0.1, **selection)
    expected = naive_info_nce(anchors, positives, queue, 0.1, **selection)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@given(
    batch=st.integers(1, 9),
    queue_size=st.integers(1, 40),
    dim=st.integers(2, 12),
    mode=st.sampled_from(["all", "topk", "band", "threshold", "debiased", "hard-weighted"]),
    k=st.one_of(st.none(), st.integers(1, 50)),
    skip=st.integers(0, 45),
    threshold=st.floats(-1.0, 1.0),
    temperature=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=150, deadline=None)
def test_info_nce_matches_naive_loop_for_any_shapes(
    batch, queue_size, dim, mode, k, skip, threshold, temperature, seed
):
    if mode == "topk" and k is None:
        k = 3
    generator = torch.Generator().manual_seed(seed)
    anchors = unit_vectors(generator, batch, dim, requires_grad=True)
    positives = unit_vectors(generator, batch, dim)
    queue = unit_vectors(generator, queue_size, dim)
    selection = {
        "num_negatives": k,
        "skip_negatives": skip if mode == "band" else 0,
        "negative_threshold": threshold if mode == "threshold" else None,
    }

    loss = info_nce(anchors, positives, queue, temperature=temperature, negatives=mode, **selection)
    expected = naive_info_nce(anchors, positives, queue, temperature, mode, **selection)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, anchors)
    assert torch.isfinite(grad).all()


def test_rows_without_any_negative_give_zero_loss_and_finite_gradients(generator):
    anchors = unit_vectors(generator, 4, 5, requires_grad=True)
    positives = unit_vectors(generator, 4, 5)
    queue = unit_vectors(generator, 6, 5)
    for selection in (
        {"negatives": "threshold", "negative_threshold": -1.5, "num_negatives": 3},
        {"negatives": "band", "skip_negatives": 6, "num_negatives": 2},
    ):
        loss = info_nce(anchors, positives, queue, temperature=0.2, **selection)
        (grad,) = torch.autograd.grad(loss, anchors)
        assert loss.item() == pytest.approx(0.0, abs=1e-12)  # −log(e^p / e^p)
        assert torch.isfinite(grad).all()


def test_selection_changes_the_loss_and_statistics(generator):
    """Hard negatives are harder: the selected ones are more similar than the queue's mean."""
    anchors = unit_vectors(generator, 8, 16)
    positives = unit_vectors(generator, 8, 16)
    queue = unit_vectors(generator, 64, 16)
    everything = contrastive_loss(anchors, positives, queue, temperature=0.2)
    hardest = contrastive_loss(
        anchors, positives, queue, temperature=0.2, sampling=NegativeSampling("topk", num_negatives=4)
    )
    assert hardest.loss < everything.loss  # fewer terms in the denominator
    assert hardest.selected_negative_similarity > everything.selected_negative_similarity
    torch.testing.assert_close(everything.selected_negative_similarity, everything.negative_similarity)


def test_low_precision_inputs_and_autocast_compute_in_float32(generator):
    anchors = unit_vectors(generator, 4, 8).to(torch.bfloat16)
    positives = unit_vectors(generator, 4, 8).to(torch.bfloat16)
    queue = unit_vectors(generator, 10, 8).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = info_nce(anchors, positives, queue, temperature=0.2, negatives="topk", num_negatives=3)
    assert loss.dtype == torch.float32
    expected = naive_info_nce(anchors.double(), positives.double(), queue.double(), 0.2, "topk", num_negatives=3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["none", "symmetric", "key-anchor"])
@pytest.mark.parametrize(
    "selection", [{"negatives": "all"}, {"negatives": "band", "num_negatives": 5, "skip_negatives": 2}]
)
def test_dual_view_modes_match_naive_composition(generator, mode, selection):
    B, K, d = 5, 13, 6
    q1, q2 = (unit_vectors(generator, B, d, requires_grad=True) for _ in range(2))
    k1, k2 = (unit_vectors(generator, B, d) for _ in range(2))
    queue = unit_vectors(generator, K, d)
    result = dual_view_loss(
        q1, k2, queue, q2=q2, k1=k1, mode=mode, temperature=0.3,
        sampling=NegativeSampling(**selection), key_anchor_weight=0.7,
    )  # fmt: skip
    expected = naive_dual_view(q1, q2, k1, k2, queue, mode, 0.7, 0.3, **selection)
    torch.testing.assert_close(result.loss, expected, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(result.loss, [q1, q2], allow_unused=True)
    want = torch.autograd.grad(expected, [q1, q2], allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    if mode != "symmetric":
        assert got[1] is None  # q2 plays no part outside the symmetric loss


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"negatives": "hardest"}, "negatives must be one of"),
        ({"negatives": "topk"}, "needs num_negatives"),
        ({"negatives": "threshold", "num_negatives": 2}, "needs negative_threshold"),
        ({"negatives": "band", "num_negatives": 0}, "positive number"),
        ({"negatives": "band", "num_negatives": 2, "skip_negatives": -1}, "skip_negatives must be"),
    ],
)
def test_bad_selection_arguments_are_rejected_clearly(generator, kwargs, message):
    vectors = unit_vectors(generator, 3, 4)
    with pytest.raises(ValueError, match=message):
        info_nce(vectors, vectors, vectors, temperature=0.2, **kwargs)


def test_mismatched_shapes_are_rejected_clearly(generator):
    with pytest.raises(ValueError, match="must both be"):
        info_nce(
            unit_vectors(generator, 3, 4), unit_vectors(generator, 2, 4), unit_vectors(generator, 5, 4), temperature=1
        )
    with pytest.raises(ValueError, match="queue must be"):
        info_nce(
            unit_vectors(generator, 3, 4), unit_vectors(generator, 3, 4), unit_vectors(generator, 5, 3), temperature=1
        )


def test_debiased_estimate_is_floored_when_the_prior_removes_more_than_the_queue_holds(generator):
    anchors = unit_vectors(generator, 4, 6, requires_grad=True)
    queue = -anchors.detach()[:1].repeat(10, 1)  # every queue entry is far: a tiny negative sum
    loss = info_nce(anchors, anchors.detach(), queue, temperature=0.2, negatives="debiased", debias_prior=0.5)
    expected = naive_info_nce(anchors, anchors.detach(), queue, 0.2, "debiased", debias_prior=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    floor_only = torch.log1p(10 * torch.exp(torch.tensor(-1 / 0.2 - 1 / 0.2, dtype=torch.float64)))
    torch.testing.assert_close(loss, floor_only)  # −log(e^{1/τ} / (e^{1/τ} + M·e^{−1/τ}))
    (grad,) = torch.autograd.grad(loss, anchors)
    assert torch.isfinite(grad).all()


def test_hard_weighting_leans_on_the_most_similar_negatives(generator):
    anchors = unit_vectors(generator, 8, 16)
    positives = unit_vectors(generator, 8, 16)
    queue = unit_vectors(generator, 64, 16)
    plain = info_nce(anchors, positives, queue, temperature=0.2, negatives="debiased", debias_prior=0.0)
    hard = info_nce(
        anchors, positives, queue, temperature=0.2, negatives="hard-weighted", debias_prior=0.0, hardness=1.0
    )
    assert hard > plain  # the weighted mean of e^{a·n/τ} exceeds the plain mean when weights favour large terms
    torch.testing.assert_close(plain, info_nce(anchors, positives, queue, temperature=0.2))  # τ⁺ = 0: plain InfoNCE


def test_hard_negatives_wait_for_a_warm_up_in_steps_or_epochs():
    from mocoplus import MoCoConfig

    config = MoCoConfig(negatives="band", num_negatives=8, skip_negatives_fraction=0.1, warmup_steps=50)
    assert config.sampling_at(epoch=3, step=49).negatives == "all"
    assert config.sampling_at(epoch=3, step=50).negatives == "band"
    assert config.sampling_at(epoch=0, step=50).skip_count(4096) == 410
    with pytest.raises(ValueError, match="not be combined with skip_negatives"):
        MoCoConfig(negatives="band", num_negatives=8, skip_negatives=4, skip_negatives_fraction=0.1)
    with pytest.raises(ValueError, match="debias_prior must lie in"):
        MoCoConfig(negatives="debiased", debias_prior=1.0)
