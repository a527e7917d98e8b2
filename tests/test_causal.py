"""The training-time causal test: separability term, held-out measures, statistics and verdict against
known answers (planted coupling through the real trainer, planted slopes, independent outcomes)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saema_core.causal import (
    CausalDesign,
    SeparabilityAccumulator,
    SeparabilityTerm,
    assign,
    causal_verdict,
    centroid_separability,
    dose_response,
    fit_residual_clusters,
    t_interval,
)
from saema_core.sae import build_sae
from saema_core.sae_training import TrainingConfig, train_sae, training_sae_config
from saema_core.separability import aedp

BETAS = (-1.0, -0.3, 0.0, 0.3, 1.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"betas": (-1.0, 1.0)}, "must include 0"),
    ({"betas": (0.0, 0.5, 1.0)}, "both signs"),
    ({"betas": (-1.0, 0.0, 0.0, 1.0)}, "distinct"),
    ({"seeds": (1,)}, "≥ 2 distinct seeds"),
    ({"seeds": (1, 1, 2)}, "≥ 2 distinct seeds"),
    ({"n_clusters": 1}, "clusters must be ≥ 2"),
])
def test_design_refuses_grids_that_cannot_test(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalDesign(**kwargs)


def test_design_sorts_betas():
    assert CausalDesign(betas=(1.0, 0.0, -1.0)).betas == (-1.0, 0.0, 1.0)


def test_separability_needs_two_clusters_in_the_batch():
    latents = torch.rand(6, 4)
    with pytest.raises(ValueError, match="1 cluster"):
        centroid_separability(latents, torch.tensor([0, 0, 0, 0, 0, 1]), 3)


# ----------------------------------------------------------------------------- oracles


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 5))
def test_centroid_separability_is_the_papers_aedp(seed, n_clusters):
    g = torch.Generator().manual_seed(seed)
    latents = torch.rand(40, 7, generator=g, dtype=torch.float64)
    labels = torch.arange(40) % n_clusters
    expected = aedp(latents, labels.numpy())
    assert torch.allclose(centroid_separability(latents, labels, n_clusters), expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_assign_is_the_nearest_centroid(seed):
    g = torch.Generator().manual_seed(seed)
    x, centroids = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    naive = torch.tensor([int(np.argmin([float((row - c).norm()) for c in centroids])) for row in x])
    assert torch.equal(assign(x, centroids), naive)


def test_accumulator_streams_like_one_pass_and_measures_the_ratio():
    g = torch.Generator().manual_seed(0)
    centroids = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x = torch.cat([torch.randn(30, 2, generator=g) * 0.1, torch.randn(30, 2, generator=g) * 0.1 + torch.tensor([10.0, 0])])
    latents = torch.cat([torch.tensor([[1.0, 0, 0]]).repeat(30, 1), torch.tensor([[0, 4.0, 0]]).repeat(30, 1)])
    latents[::2] += 1.0  # within-cluster spread: every other token moved by (1, 1, 1)
    whole, streamed = SeparabilityAccumulator(centroids, 3), SeparabilityAccumulator(centroids, 3)
    whole.update(x, latents)
    for rows in torch.split(torch.arange(60), 7):
        streamed.update(x[rows], latents[rows])
    assert np.allclose(whole.compute(), streamed.compute())
    aedp_value, ratio = whole.compute()
    labels = np.repeat([0, 1], 30)
    assert aedp_value == pytest.approx(float(aedp(latents.double(), labels)))
    # every token sits at distance √3/2 from its cluster's centroid
    assert ratio == pytest.approx(aedp_value / (np.sqrt(3) / 2))


def test_kmeans_finds_planted_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(3, 5) * 20
    x = np.concatenate([c + rng.normal(size=(50, 5)) for c in centres]).astype(np.float32)
    found = fit_residual_clusters(x, 3, seed=0)
    assert sorted(np.argmin(np.linalg.norm(found[:, None] - centres[None], axis=2), axis=1)) == [0, 1, 2]


def test_t_interval_matches_the_textbook():
    interval = t_interval([1.0, 2.0, 3.0])
    half = scipy.stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    assert interval == pytest.approx((2.0, 2.0 - half, 2.0 + half, 3))
    assert np.isnan(t_interval([1.0]).low)


# ----------------------------------------------------------------------------- the training term


def test_beta_zero_is_plain_training():
    term = SeparabilityTerm(np.eye(2, 4), 0.0)
    assert float(term(torch.rand(8, 4), torch.rand(8, 6), torch.tensor(3.0))) == 0.0


def test_term_gradient_is_scale_free():
    """−β·sg(MSE)·log Sep: scaling the latents leaves the gradient direction and relative size alone."""
    g = torch.Generator().manual_seed(1)
    x, latents = torch.randn(32, 4, generator=g), torch.rand(32, 6, generator=g)
    term = SeparabilityTerm(torch.randn(3, 4, generator=g), 1.0)
    grads = []
    for scale in (1.0, 10.0):
        z = (latents * scale).requires_grad_()
        term(x, z, torch.tensor(2.0)).backward()
        grads.append(z.grad * scale)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


D, C, WIDTH = 16, 4, 8
CENTRES = torch.eye(C, D) * 4.0


def cluster_batches(seed: int, batch_size: int = 256):
    """x = one of C orthogonal centres + small noise: the planted local representations."""
    g = torch.Generator().manual_seed(seed)
    while True:
        labels = torch.randint(0, C, (batch_size,), generator=g)
        yield CENTRES[labels] + 0.1 * torch.randn(batch_size, D, generator=g)


def merged_sae():
    """A TopK (k = 1) SAE whose decoder rows all point near the clusters' mean: every cluster merged."""
    sae = build_sae(training_sae_config(D, WIDTH, "topk", 1))
    rows = CENTRES.sum(0).repeat(WIDTH, 1) / 8 + 0.05 * torch.randn(WIDTH, D, generator=torch.Generator().manual_seed(0))
    rows = rows / rows.norm(dim=1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        sae.W_enc.copy_(rows.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def planted_grid(betas=BETAS, seeds=(1, 2, 3), steps=40):
    """Held-out (MSE, separability) of the merged SAE fine-tuned at each (β, seed) through the trainer."""
    held_out, init = next(cluster_batches(99, 4096)), merged_sae()
    mse, sep = np.zeros((len(betas), len(seeds))), np.zeros((len(betas), len(seeds)))
    for (i, beta), (j, seed) in itertools.product(enumerate(betas), enumerate(seeds)):
        config = TrainingConfig(n_steps=steps, batch_size=256, seed=seed, lr=0.002, dead_tokens_threshold=2560)
        sae = train_sae(init.cfg, config, cluster_batches(seed), init=init, extra_loss=SeparabilityTerm(CENTRES, beta)).sae
        latents, reconstruction = sae(held_out)
        mse[i, j] = float(((reconstruction - held_out) ** 2).sum(1).mean())
        accumulator = SeparabilityAccumulator(CENTRES, WIDTH)
        accumulator.update(held_out, latents)
        sep[i, j] = accumulator.compute()[0]
    return mse, sep


def test_planted_coupling_is_found_through_the_trainer():
    """Clusters merged onto shared latents: separating them is what reconstruction needs, so the
    separating SAEs reconstruct better and the merging ones worse — the test must say supported."""
    mse, sep = planted_grid()
    mean_sep = sep.mean(1)
    assert mean_sep[0] < mean_sep[2] < mean_sep[-1]  # the term manipulates separability both ways
    stats = dose_response(BETAS, mse, sep)
    assert stats.slope.high < 0 and stats.merge_mse.low > 0
    assert causal_verdict(stats, max(BETAS)).verdict == "supported"


# ----------------------------------------------------------------------------- statistics


def test_dose_response_recovers_a_planted_slope():
    rng = np.random.default_rng(0)
    sep = np.linspace(1, 2, 5)[:, None] + rng.uniform(0, 0.1, size=(5, 4))
    mse = 10 + 4.0 * sep + np.array([0.0, 0.5, -0.3, 1.0])  # slope +4, a different offset per seed
    stats = dose_response(BETAS, mse, sep)
    assert stats.slope.mean == pytest.approx(4.0)
    assert stats.slope.high - stats.slope.low == pytest.approx(0, abs=1e-9)
    verdict = causal_verdict(stats, 1.0)
    assert verdict.verdict == "contradicted" and verdict.effect > 0


def test_independent_outcome_gives_a_ci_that_covers_zero():
    rng = np.random.default_rng(3)
    sep = np.linspace(1, 2, 5)[:, None] * np.ones((1, 5))
    mse = 20 + rng.normal(scale=0.5, size=(5, 5))  # reconstruction independent of separability
    stats = dose_response(BETAS, mse, sep)
    assert stats.slope.low < 0 < stats.slope.high
    assert stats.separate_mse.low < 0 < stats.separate_mse.high
    assert causal_verdict(stats, 1.0).verdict == "inconclusive"


def test_no_manipulation_is_inconclusive_whatever_the_mse_does():
    sep = np.full((5, 3), 2.0) + np.random.default_rng(0).normal(scale=0.01, size=(5, 3))
    mse = np.linspace(30, 10, 5)[:, None] * np.ones((1, 3))
    verdict = causal_verdict(dose_response(BETAS, mse, sep), 1.0)
    assert verdict.verdict == "inconclusive" and "nothing was manipulated" in verdict.reason


def test_dose_response_refuses_a_grid_without_zero():
    with pytest.raises(ValueError, match="include 0"):
        dose_response((-1.0, 1.0), np.ones((2, 3)), np.ones((2, 3)))
