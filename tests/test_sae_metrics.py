"""Reconstruction metrics: hand-computed values, sklearn's R², streaming = one-shot."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import r2_score

from saema_core.sae_metrics import (
    ReconstructionMetricsAccumulator,
    ce_loss_score,
    cossim,
    dead_fraction,
    dense_fraction,
    explained_variance,
    feature_density,
    l0,
    l1,
    mse,
)

X = np.array([[1.0, 0.0], [0.0, 1.0]])
X_HAT = np.array([[1.0, 0.0], [0.0, 0.0]])
Z = np.array([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0]])


def test_hand_computed_reconstruction_metrics():
    assert mse(X, X_HAT) == pytest.approx(0.5)  # errors 0 and 1, mean over tokens
    # E‖x‖² = 1, E x = (½, ½): total variance ½, explained 1 − ½/½ = 0.
    assert explained_variance(X, X_HAT) == pytest.approx(0.0)
    assert cossim(X, X_HAT) == pytest.approx(0.5)  # cos 1, and 0 against a zero vector
    assert explained_variance(X, X) == pytest.approx(1.0)


def test_hand_computed_sparsity_metrics():
    assert l0(Z) == pytest.approx(1.0)
    assert l1(Z) == pytest.approx(1.5)
    np.testing.assert_allclose(feature_density(Z), [0.0, 0.5, 0.5])
    assert dead_fraction(Z) == pytest.approx(1 / 3)
    assert dense_fraction(Z) == pytest.approx(2 / 3)
    assert dense_fraction(Z, threshold=0.5) == 0.0


def test_explained_variance_is_variance_weighted_r2():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * [1, 2, 3, 4, 5] + 10.0
    x_hat = x + rng.normal(size=x.shape)
    assert explained_variance(x, x_hat) == pytest.approx(
        r2_score(x, x_hat, multioutput="variance_weighted"), rel=1e-10)


def test_constant_inputs_follow_the_saelens_convention():
    x = np.ones((4, 3))
    assert explained_variance(x, x) == 1.0
    assert explained_variance(x, x + 1.0) == 0.0


def test_leading_dimensions_are_tokens_and_torch_inputs_work():
    x = torch.randn(2, 3, 4)
    x_hat = x + 0.1 * torch.randn(2, 3, 4)
    assert mse(x, x_hat) == pytest.approx(mse(x.reshape(6, 4).numpy(), x_hat.reshape(6, 4).numpy()))
    with pytest.raises(ValueError, match="same shape"):
        mse(x, x_hat[:, :2])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), cuts=st.lists(st.integers(1, 39), max_size=4))
def test_streaming_equals_one_shot(seed, cuts):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 5)) + 3.0
    x_hat = x + rng.normal(size=x.shape) * 0.5
    z = rng.normal(size=(40, 16)) * (rng.random((40, 16)) < 0.2)
    acc = ReconstructionMetricsAccumulator(d_sae=16)
    bounds = [0, *sorted(set(cuts)), 40]
    for start, stop in itertools.pairwise(bounds):
        acc.update(x[start:stop], x_hat[start:stop], torch.from_numpy(z[start:stop]))
    m = acc.compute()
    assert m.n_tokens == 40
    assert m.mse == pytest.approx(mse(x, x_hat))
    assert m.explained_variance == pytest.approx(explained_variance(x, x_hat))
    assert m.cossim == pytest.approx(cossim(x, x_hat))
    assert m.l0 == pytest.approx(l0(z)) and m.l1 == pytest.approx(l1(z))
    assert m.dead_fraction == pytest.approx(dead_fraction(z))
    assert m.dense_fraction == pytest.approx(dense_fraction(z))
    np.testing.assert_allclose(m.feature_density, feature_density(z))


def test_accumulator_errors():
    with pytest.raises(ValueError, match="d_sae must be a positive integer, got 0"):
        ReconstructionMetricsAccumulator(0)
    with pytest.raises(ValueError, match="dense_threshold must be in"):
        ReconstructionMetricsAccumulator(4, dense_threshold=1.5)
    acc = ReconstructionMetricsAccumulator(4)
    with pytest.raises(ValueError, match="no tokens"):
        acc.compute()
    with pytest.raises(ValueError, match=r"latents must be \[2 tokens, d_sae=4\], got \(2, 3\)"):
        acc.update(X, X_HAT, Z)


def test_ce_loss_score():
    assert ce_loss_score(clean_loss=2.0, sae_loss=4.0, zero_ablation_loss=10.0) == pytest.approx(0.75)
    assert ce_loss_score(2.0, 2.0, 10.0) == 1.0 and ce_loss_score(2.0, 10.0, 10.0) == 0.0
    with pytest.raises(ValueError, match="undefined: zero-ablation loss equals the clean loss"):
        ce_loss_score(2.0, 3.0, 2.0)
    with pytest.raises(ValueError, match="must be finite"):
        ce_loss_score(2.0, float("nan"), 10.0)
