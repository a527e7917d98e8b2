"""Tests of saema_core.intervention: separability measures, the optimised intervention, controls."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saema_core.baselines import PaperSearch, paper_search, random_search
from saema_core.intervention import (
    ALPHAS,
    InterventionConfig,
    aedp,
    clusters_from_labels,
    explained_variance,
    gw,
    gw_intrinsic,
    intervention_deltas,
    mse_zscored,
    optimise_intervention,
    random_control,
    run_sweep,
    translate,
)
from saema_core.row_space import (
    decompose_move,
    linear_decoder,
    random_control_row,
    row_space_basis,
    split_displacement,
)
from saema_core.statistics import correlate, verdict

F64 = torch.float64


def build_config(**overrides) -> InterventionConfig:
    """The planted problems' settings; each test states only what it varies."""
    return InterventionConfig(**{"lr": 0.05, "clamp_nonnegative": False, **overrides})


def planted_problem(n_per: int = 8, k: int = 4, d: int = 6, half_gap: float = 0.75, shift: float = 2.0,
                    seed: int = 0):
    """Two clusters whose reconstruction target is a MORE separated copy of themselves.

    Clusters A and B sit at ±half_gap·e1 (noise re-centred so the centroids are exactly there). The
    decoder is D(z) = W z with orthonormal columns (WᵀW = I), and x = D(Z + Δ*) with Δ*_A = +shift·e1,
    Δ*_B = −shift·e1. Then MSE(Δ) = (1/d)·(1/n)·Σ_c n_c‖Δ_c − Δ*_c‖², minimised exactly at Δ*, so moving
    the clusters apart along e1 (AEDP up) lowers MSE and moving them together raises it. The MSE
    gradient has size shift/d = 1/3 per cluster, smaller than the merge pull α·1 ≥ 0.5 of AEDP, so the
    merge direction really merges. With lr 0.05 × 10 Adam steps a cluster moves at most 0.5 < half_gap,
    so neither direction overshoots.
    """
    g = torch.Generator().manual_seed(seed)
    noise = 0.1 * torch.randn(2 * n_per, k, generator=g, dtype=F64)
    noise[:n_per] -= noise[:n_per].mean(0)
    noise[n_per:] -= noise[n_per:].mean(0)
    e1 = torch.zeros(k, dtype=F64)
    e1[0] = 1.0
    side = torch.cat([e1.expand(n_per, k), -e1.expand(n_per, k)])
    latents = noise + half_gap * side
    w, _ = torch.linalg.qr(torch.randn(d, k, generator=g, dtype=F64))

    def decode(z: torch.Tensor) -> torch.Tensor:
        return z @ w.T

    return latents, np.repeat([0, 1], n_per), decode, decode(latents + shift * side)


def random_points(n: int, k: int, n_clusters: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(n) % n_clusters
    centres = 3 * torch.randn(n_clusters, k, generator=g, dtype=F64)
    return centres[labels] + torch.randn(n, k, generator=g, dtype=F64), labels


# ----------------------------------------------------------------------------- separability


def test_aedp_of_two_clusters_is_their_centroid_distance():
    latents = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 3.0], [4.0, 5.0], [9.0, 9.0]], dtype=F64)
    labels = np.array([0, 0, 1, 1, -1])
    # centroids (1, 0) and (4, 4): distance 5; the noise point is ignored.
    assert aedp(latents, labels).item() == pytest.approx(5.0)


def test_aedp_of_three_clusters_averages_the_three_pairs():
    latents = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=F64)
    assert aedp(latents, [0, 1, 2]).item() == pytest.approx((3 + 4 + 5) / 3)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), n_clusters=st.integers(2, 4))
def test_separability_is_invariant_to_a_global_translation(seed, n_clusters):
    latents, labels = random_points(12, 3, n_clusters, seed)
    shift = torch.randn(1, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert aedp(latents + shift, labels).item() == pytest.approx(aedp(latents, labels).item())
    assert gw(latents + shift, labels).item() == pytest.approx(gw(latents, labels).item(), rel=1e-6)


@pytest.mark.parametrize("gap", [0.5, 1.0, 3.0])
def test_gw_of_two_singletons_is_half_the_squared_distance(gap):
    latents = torch.tensor([[0.0, 0.0], [gap, 0.0]], dtype=F64)
    assert gw(latents, [0, 1]).item() == pytest.approx(gap**2 / 2)


def test_gw_is_zero_for_two_identical_coinciding_clusters():
    points, _ = random_points(5, 3, 1, seed=3)
    latents = torch.cat([points, points])
    assert gw(latents, np.repeat([0, 1], 5)).item() == pytest.approx(0.0, abs=1e-10)


def test_gw_grows_as_clusters_move_apart():
    points, _ = random_points(10, 3, 1, seed=4)
    labels = np.repeat([0, 1], 5)
    moved = [gw(points + torch.cat([torch.zeros(5, 3), g * torch.ones(5, 3)]).to(F64), labels)
             for g in (0.0, 2.0, 4.0, 8.0)]
    assert all(a < b for a, b in itertools.pairwise(moved))


def _separability_of_translations(measure, latents, labels):
    token_cluster = clusters_from_labels(labels, latents.shape[0]).token_cluster

    def of_translations(translations):
        return measure(translate(latents, token_cluster, translations, clamp=False), labels)

    return of_translations


@pytest.mark.parametrize("measure", [aedp, gw], ids=["aedp", "gw"])
def test_gradient_wrt_translations_matches_finite_differences(measure):
    latents, labels = random_points(12, 3, 3, seed=1)
    labels[0] = -1  # a noise token must not break anything
    translations = 0.3 * torch.randn(3, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    fn = _separability_of_translations(measure, latents, labels)
    assert torch.autograd.gradcheck(fn, (translations.requires_grad_(),), eps=1e-6, atol=1e-5)


def test_gw_gradient_is_nonzero_but_intrinsic_gw_is_blind_to_translations():
    latents, labels = random_points(12, 3, 2, seed=5)
    translations = torch.zeros(2, 3, dtype=F64, requires_grad=True)
    gw_grad = torch.autograd.grad(_separability_of_translations(gw, latents, labels)(translations),
                                  translations)[0]
    intrinsic = _separability_of_translations(gw_intrinsic, latents, labels)
    intrinsic_grad = torch.autograd.grad(intrinsic(translations), translations)[0]
    assert gw_grad.abs().max() > 1e-3
    assert intrinsic_grad.abs().max() < 1e-10
    far = torch.tensor([[5.0, 0, 0], [0, -5.0, 0]], dtype=F64)
    assert intrinsic(far).item() == pytest.approx(intrinsic(translations).item(), rel=1e-8)


# ----------------------------------------------------------------------------- metrics and trajectory


def test_step_zero_metrics_match_numpy_oracles():
    latents, labels, decode, target = planted_problem()
    trajectory = optimise_intervention(latents, labels, decode, target, build_config(steps=3))
    x, x_hat = target.numpy(), decode(latents).numpy()

    def z(a: np.ndarray) -> np.ndarray:
        return (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)

    assert trajectory.mse[0] == pytest.approx(((x - x_hat) ** 2).mean())
    assert trajectory.mse_zscored[0] == pytest.approx(((z(x) - z(x_hat)) ** 2).mean(), rel=1e-6)
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert trajectory.explained_variance[0] == pytest.approx(ev)
    assert trajectory.separability[0] == pytest.approx(1.5)
    assert trajectory.displacement_norm[0] == 0.0
    assert all(len(a) == 4 for a in (trajectory.objective, trajectory.mse, trajectory.separability))
    assert trajectory.translations.shape == (2, 4)


def test_metrics_of_a_perfect_reconstruction():
    x = torch.randn(5, 4, dtype=F64)
    assert explained_variance(x, x).item() == pytest.approx(1.0)
    assert mse_zscored(x, 3 * x + 1).item() == pytest.approx(0.0, abs=1e-12)


def test_without_clamping_both_norms_are_the_frobenius_norm_of_the_token_field():
    latents, labels, decode, target = planted_problem()
    trajectory = optimise_intervention(latents, labels, decode, target, build_config(steps=2))
    field = trajectory.translations[np.array(labels)]
    assert trajectory.translation_norm[-1] == pytest.approx(np.linalg.norm(field))
    assert trajectory.displacement_norm[-1] == pytest.approx(np.linalg.norm(field))


def test_with_clamping_the_displacement_counts_only_what_the_clamp_lets_through():
    latents = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=F64)
    decode, target = (lambda z: z), latents.clone()
    config = InterventionConfig(alpha=0.5, lr=0.5, steps=3)
    trajectory = optimise_intervention(latents, [0, 0, 1], decode, target, config)
    moved = translate(latents, torch.tensor([0, 0, 1]), torch.from_numpy(trajectory.translations), True)
    assert trajectory.displacement_norm[-1] == pytest.approx(float(torch.linalg.norm(moved - latents)))
    assert trajectory.displacement_norm[-1] < trajectory.translation_norm[-1]


# ----------------------------------------------------------------------------- the planted problem


@pytest.mark.parametrize("objective", ["aedp", "gw"])
def test_optimiser_separates_and_lowers_mse_on_the_planted_problem(objective):
    latents, labels, decode, target = planted_problem()
    trajectory = optimise_intervention(latents, labels, decode, target, build_config(objective=objective))
    assert trajectory.delta_separability > 0
    assert trajectory.delta_mse < -0.1
    assert trajectory.objective[-1] < trajectory.objective[0]


def test_merging_raises_mse_on_the_planted_problem():
    latents, labels, decode, target = planted_problem()
    trajectory = optimise_intervention(latents, labels, decode, target, build_config(direction=-1))
    assert trajectory.delta_separability < -0.5
    assert trajectory.delta_mse > 0.1


def test_sweep_over_alphas_and_directions_gives_a_strong_negative_correlation():
    latents, labels, decode, target = planted_problem()
    cells = run_sweep(latents, labels, decode, target, build_config())
    assert [(c.direction, c.alpha) for c in cells][:len(ALPHAS)] == [(1, a) for a in ALPHAS]
    stats = correlate(*intervention_deltas([c.optimised for c in cells]))
    assert stats.pearson.statistic < -0.9
    assert stats.pearson.p_value < 0.01
    control = correlate(*intervention_deltas([c.control for c in cells]))
    assert "support the paper's claim" in verdict(stats, control)


def test_decoder_that_ignores_latents_shows_no_relationship():
    latents, labels, _, target = planted_problem()
    constant = torch.linspace(-1, 1, target.shape[1], dtype=F64)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return constant.expand(z.shape[0], -1) + 0 * z.sum(dim=1, keepdim=True)

    cells = run_sweep(latents, labels, decode, target, build_config())
    optimised = [c.optimised for c in cells]
    assert all(np.ptp(t.mse) == 0 for t in optimised)
    stats = correlate(*intervention_deltas(optimised))
    control = correlate(*intervention_deltas([c.control for c in cells]))
    assert not stats.defined and "ΔMSE is constant" in stats.reason
    assert "No relationship" in verdict(stats, control)


def test_loss_decreases_monotonically_on_average_for_a_small_learning_rate():
    curves = []
    for seed in range(4):
        latents, labels = random_points(12, 4, 3, seed)
        w = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
        target = torch.randn(12, 5, generator=torch.Generator().manual_seed(seed + 9), dtype=F64)
        config = build_config(lr=1e-3, steps=15, alpha=0.5)
        decode = torch.nn.Linear(4, 5, bias=False, dtype=F64)
        decode.weight.data = w
        curves.append(optimise_intervention(latents, labels, decode, target, config).objective)
    assert np.all(np.diff(np.mean(curves, axis=0)) < 0)


def test_clamp_keeps_latents_nonnegative_and_can_switch_an_inactive_latent_on():
    """Latent 1 is exactly 0 everywhere; the target needs it at 1 for cluster 0. clamp(min=0) passes the
    gradient at 0, so the optimiser can activate it, and no moved latent goes below 0."""
    latents = torch.tensor([[1.0, 0.0], [1.2, 0.0], [0.0, 0.0], [0.1, 0.0]], dtype=F64)
    labels = [0, 0, 1, 1]
    target = latents + torch.tensor([[0.0, 1.0]] * 2 + [[-0.5, 0.0]] * 2, dtype=F64)
    config = InterventionConfig(alpha=0.01, lr=0.1, steps=20, clamp_nonnegative=True)
    trajectory = optimise_intervention(latents, labels, lambda z: z, target, config)
    assert trajectory.translations[0, 1] > 0.5
    moved = translate(latents, clusters_from_labels(labels, 4).token_cluster,
                      torch.from_numpy(trajectory.translations), clamp=True)
    assert moved.min() >= 0


def test_decoder_parameters_collect_no_gradient():
    latents, labels, _, target = planted_problem()
    decoder = torch.nn.Linear(4, 6, dtype=F64)
    optimise_intervention(latents, labels, decoder, target.detach(), build_config(steps=2))
    assert decoder.weight.grad is None


# ----------------------------------------------------------------------------- controls and baseline


@pytest.mark.parametrize("norm", [0.0, 0.37, 5.0])
def test_random_control_has_exactly_the_target_displacement_norm(norm):
    latents, labels, decode, target = planted_problem()
    labels = labels.copy()
    labels[0] = -1
    control = random_control(latents, labels, decode, target, build_config(steps=4), norm, seed=3)
    assert control.displacement_norm[-1] == pytest.approx(norm, rel=1e-12, abs=1e-15)
    assert control.displacement_norm == pytest.approx(norm * np.linspace(0, 1, 5), abs=1e-12)


@pytest.mark.parametrize("norm", [0.01, 0.37, 5.0])
def test_clamped_random_control_has_exactly_the_target_applied_displacement(norm):
    latents, labels, decode, target = planted_problem()
    sparse = torch.relu(latents + 0.2)  # non-negative, with exact zeros the clamp acts on
    config = build_config(clamp_nonnegative=True)
    control = random_control(sparse, labels, decode, target, config, norm, seed=5)
    assert control.displacement_norm[-1] == pytest.approx(norm, rel=1e-10)
    assert control.translation_norm[-1] > norm  # part of the random move was clamped away


def test_random_control_is_seeded():
    latents, labels, decode, target = planted_problem()
    a, b, c = (random_control(latents, labels, decode, target, build_config(), 1.0, seed=s).translations
               for s in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_random_search_never_worsens_and_loses_to_the_optimiser():
    latents, labels, decode, target = planted_problem(k=16, d=20)
    config = build_config()
    search = random_search(latents, labels, decode, target, config, seed=0)
    assert len(search.objective) == config.steps + 1
    assert np.all(np.diff(search.objective) <= 0)
    optimised = optimise_intervention(latents, labels, decode, target, config)
    assert optimised.objective[-1] < search.objective[-1]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"alpha": 0.0}, "alpha must be > 0, got 0.0"),
        ({"alpha": -1.0}, "alpha"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"objective": "fgw"}, "'fgw'"),
        ({"direction": 0}, "direction"),
        ({"lr": 0.0}, "lr"),
        ({"gw_max_points": 1}, "gw_max_points"),
    ],
)
def test_config_rejects_bad_values(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        InterventionConfig(**overrides)


def test_labels_of_a_different_length_are_rejected():
    latents, labels, decode, target = planted_problem()
    with pytest.raises(ValueError, match=r"expected \(16,\)"):
        optimise_intervention(latents, labels[:-1], decode, target, build_config())
    with pytest.raises(ValueError, match="expected"):
        aedp(latents, labels[:-1])


@pytest.mark.parametrize("labels", [np.zeros(16, dtype=int), np.r_[np.zeros(8, int), -np.ones(8, int)]])
def test_a_single_cluster_is_rejected(labels):
    latents, _, decode, target = planted_problem()
    with pytest.raises(ValueError, match="at least 2 non-noise clusters, got 1"):
        optimise_intervention(latents, labels, decode, target, build_config())
    with pytest.raises(ValueError, match="at least 2"):
        gw(latents, labels)


def test_decoder_width_mismatch_names_both_widths():
    latents, labels, _, target = planted_problem()

    class Sae(torch.nn.Module):
        d_sae = 7

        def decode(self, z: torch.Tensor) -> torch.Tensor:
            return z[:, :1].expand(-1, 6)

    with pytest.raises(ValueError, match="d_sae=7.*K=4"):
        optimise_intervention(latents, labels, Sae().decode, target, build_config())
    linear = torch.nn.Linear(5, 6, dtype=F64)
    with pytest.raises(ValueError, match="d_sae=5.*K=4"):
        optimise_intervention(latents, labels, linear, target, build_config())


def test_decoder_without_declared_width_is_probed():
    latents, labels, _, target = planted_problem()
    w = torch.randn(6, 5, dtype=F64)
    with pytest.raises(ValueError, match="K=4"):
        optimise_intervention(latents, labels, lambda z: z @ w.T, target, build_config())
    with pytest.raises(ValueError, match=r"\(1, 3\).*expected \(1, 6\)"):
        optimise_intervention(latents, labels, lambda z: z[:, :3], target, build_config())


def test_bounded_sample_keeps_the_largest_clusters_and_caps_their_tokens():
    from saema_core.intervention import bounded_sample

    labels = np.array([0] * 50 + [1] * 5 + [2] * 20 + [-1] * 30 + [3] * 20)
    keep = bounded_sample(labels, max_clusters=3, max_per_cluster=10, seed=0)
    assert sorted(set(labels[keep].tolist())) == [0, 2, 3]  # the largest; 2 beats 3 on the tie
    assert np.bincount(labels[keep]).tolist() == [10, 0, 10, 10]
    assert np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(keep, bounded_sample(labels, 3, 10, seed=0))  # seeded
    assert not np.array_equal(keep, bounded_sample(labels, 3, 10, seed=1))
    small = bounded_sample(labels, max_clusters=10, max_per_cluster=100, seed=0)
    np.testing.assert_array_equal(small, np.flatnonzero(labels >= 0))  # noise left out, nothing capped
    assert bounded_sample(np.full(5, -1), 3, 10, seed=0).size == 0


# ----------------------------------------------------------------------------- row / null space


class LinearDecoder(torch.nn.Module):
    """D(z) = z·W_dec + b_dec with a wide W_dec (K > d), so the null space is not empty."""

    def __init__(self, k: int = 12, d: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_dec = torch.nn.Parameter(torch.randn(k, d, generator=g, dtype=F64), requires_grad=False)
        self.b_dec = torch.nn.Parameter(torch.randn(d, generator=g, dtype=F64), requires_grad=False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000))
def test_row_and_null_parts_sum_back_and_the_null_part_is_invisible(seed):
    decoder = LinearDecoder(seed=seed % 7)
    basis = row_space_basis(decoder.W_dec)
    assert basis.shape == (12, 5)
    delta = torch.randn(9, 12, generator=torch.Generator().manual_seed(seed), dtype=F64)
    row, null = split_displacement(delta, basis)
    torch.testing.assert_close(row + null, delta)
    z = torch.rand(9, 12, dtype=F64)
    torch.testing.assert_close(decoder.decode(z + null), decoder.decode(z), rtol=0, atol=1e-12)
    assert float((row * null).sum()) == pytest.approx(0.0, abs=1e-10)


def test_decompose_move_reports_the_mse_of_each_part():
    decoder = LinearDecoder()
    g = torch.Generator().manual_seed(1)
    z, x = torch.rand(8, 12, generator=g, dtype=F64), torch.randn(8, 5, generator=g, dtype=F64)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    translations = torch.randn(2, 12, generator=g, dtype=F64)
    parts = decompose_move(z, labels, decoder.decode, x, translations, clamp=False)
    moved = translate(z, clusters_from_labels(labels, 8).token_cluster, translations, clamp=False)
    total = float(((decoder.decode(moved) - x) ** 2).mean() - ((decoder.decode(z) - x) ** 2).mean())
    assert parts.delta_mse_row == pytest.approx(total, rel=1e-9)  # the row part carries the whole effect
    assert parts.delta_mse_null == pytest.approx(0.0, abs=1e-12)
    delta = moved - z
    assert parts.row_norm ** 2 + parts.null_norm ** 2 == pytest.approx(float((delta ** 2).sum()), rel=1e-9)


class NonLinear(torch.nn.Module):
    """Has a W_dec, but decodes through tanh."""

    def __init__(self, inner: LinearDecoder) -> None:
        super().__init__()
        self.W_dec = inner.W_dec

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W_dec)


def test_a_decoder_that_is_not_linear_is_refused():
    decoder = LinearDecoder()
    with pytest.raises(ValueError, match="not linear"):
        linear_decoder(NonLinear(decoder).decode, 12)
    with pytest.raises(ValueError, match="needs a linear decoder"):
        linear_decoder(lambda z: z[:, :5], 12)


def test_row_matched_control_moves_the_row_space_as_far():
    decoder = LinearDecoder()
    g = torch.Generator().manual_seed(2)
    z, x = torch.rand(8, 12, generator=g, dtype=F64), torch.randn(8, 5, generator=g, dtype=F64)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    for clamp in (False, True):
        config = build_config(clamp_nonnegative=clamp)
        control = random_control_row(z, labels, decoder.decode, x, config, 0.7, seed=3)
        parts = decompose_move(z, labels, decoder.decode, x, control.translations, clamp)
        assert parts.row_norm == pytest.approx(0.7, rel=1e-9)


# ----------------------------------------------------------------------------- the paper's procedure


def test_paper_search_reproduces_its_stated_steps_on_a_toy():
    """Three clusters, a linear decoder: the procedure re-done by hand from its docstring, step by step."""
    decoder = LinearDecoder(k=6, d=4)
    g = torch.Generator().manual_seed(5)
    z = torch.rand(9, 6, generator=g, dtype=F64)
    x = decoder.decode(z) + 0.1 * torch.randn(9, 4, generator=g, dtype=F64)
    labels = np.repeat([0, 1, 2], 3)
    alpha, lam, scale = 0.8, 1.0, 0.5
    result = paper_search(z, labels, decoder.decode, x, alpha, lam, direction=1, seed=11, step_scale=scale)

    mean, spread = z.mean(1, keepdim=True), z.std(1, unbiased=False, keepdim=True) + 1e-8
    scored = (z - mean) / spread

    def zscore(a):
        a = a - a.mean(1, keepdim=True)
        return a / (a.std(1, unbiased=False, keepdim=True) + 1e-8)

    def loss(shifts):
        moved = scored + shifts[labels]
        centroids = torch.stack([moved[labels == c].mean(0) for c in range(3)])
        aedp_value = torch.pdist(centroids).mean()
        return float(1 / aedp_value + lam * ((zscore(decoder.decode(mean + spread * moved)) - zscore(x)) ** 2).mean())

    generator = torch.Generator().manual_seed(11)
    best, losses = torch.zeros(3, 6, dtype=F64), []
    losses.append(loss(best))
    for _ in range(10):
        proposal = best + alpha * scale * torch.randn(3, 6, generator=generator, dtype=F64)
        if loss(proposal) < losses[-1]:
            best = proposal
        losses.append(min(loss(proposal), losses[-1]))
    np.testing.assert_allclose(result.objective, losses, rtol=1e-12)
    torch.testing.assert_close(torch.as_tensor(result.translations), best)
    assert result.delta_separability > 0  # 1/AEDP pushes the clusters apart


def test_paper_search_from_the_cluster_shifts_of_an_affine_decoder_equals_the_search_on_every_latent():
    decoder = LinearDecoder(k=30, d=5, seed=1)
    codes = torch.from_numpy(_sparse_codes(n=20, k=30, active_per_token=4, seed=2).toarray())
    x = decoder.decode(codes) + 0.05 * torch.randn(20, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    labels = np.r_[np.repeat([0, 1, 2], 6), [-1, -1]]  # noise tokens are never moved
    for direction in (1, -1):
        shifted = paper_search(codes, labels, decoder.decode, x, 1.2, direction=direction, seed=3, step_scale=0.03)
        generic = paper_search(codes, labels, lambda z: decoder.decode(z), x, 1.2, direction=direction, seed=3,
                               step_scale=0.03)  # no W_dec to read: every moved latent decoded
        for name in ("objective", "separability", "mse", "mse_zscored", "displacement_norm"):
            np.testing.assert_allclose(getattr(shifted, name), getattr(generic, name), rtol=1e-10, atol=1e-12,
                                       err_msg=name)  # the closed form is exactly 0 where the generic is round-off
        assert (np.diff(shifted.objective) != 0).any()  # some proposals were accepted


def test_one_prepared_paper_search_gives_every_alpha_and_seed_what_a_fresh_search_gives():
    """PaperSearch shares the z-scoring and each seed's draws (and their projections) across runs: in any
    order, every run equals `paper_search` called alone."""
    decoder = LinearDecoder(k=40, d=6, seed=4)
    codes = torch.from_numpy(_sparse_codes(n=24, k=40, active_per_token=5, seed=5).toarray())
    x = decoder.decode(codes) + 0.05 * torch.randn(24, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    labels = np.repeat([0, 1, 2, 3], 6)
    search = PaperSearch(codes, labels, decoder.decode, x)
    for alpha, seed in [(1.5, 2), (0.5, 1), (1.5, 1), (0.5, 2)]:
        shared = search.run(alpha, direction=-1, seed=seed, step_scale=0.05)
        alone = paper_search(codes, labels, decoder.decode, x, alpha, direction=-1, seed=seed, step_scale=0.05)
        for name in ("objective", "separability", "mse", "displacement_norm"):
            np.testing.assert_array_equal(getattr(shared, name), getattr(alone, name), err_msg=name)
        np.testing.assert_array_equal(shared.translations, alone.translations)


def test_paper_search_refuses_bad_settings():
    decoder = LinearDecoder()
    z, x = torch.rand(6, 12, dtype=F64), torch.rand(6, 5, dtype=F64)
    with pytest.raises(ValueError, match="step_scale"):
        paper_search(z, np.repeat([0, 1], 3), decoder.decode, x, 1.0, step_scale=0.0)
    with pytest.raises(ValueError, match="direction"):
        paper_search(z, np.repeat([0, 1], 3), decoder.decode, x, 1.0, direction=0)


# ----------------------------------------------------------------------------- active-latent subspace


def _sparse_codes(n: int, k: int, active_per_token: int, seed: int):
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    cols = np.concatenate([rng.choice(k, active_per_token, replace=False) for _ in range(n)])
    rows = np.repeat(np.arange(n), active_per_token)
    return sp.csr_array((rng.uniform(0.1, 2.0, cols.size), (rows, cols)), shape=(n, k))


def test_the_active_subspace_decodes_as_the_full_decoder_and_keeps_only_used_latents():
    from saema_core.row_space import active_subspace

    decoder = LinearDecoder(k=40, d=5, seed=3)
    codes = _sparse_codes(n=6, k=40, active_per_token=3, seed=1)
    z, sub = active_subspace(codes, decoder.W_dec.float(), decoder.b_dec.float())
    np.testing.assert_array_equal(sub.active, np.unique(codes.indices))
    assert z.shape == (6, sub.active.size) == (6, sub.d_sae) and sub.d_sae < 40
    full = decoder.decode(torch.from_numpy(codes.toarray()))
    torch.testing.assert_close(sub.decode(z).double(), full, rtol=1e-5, atol=1e-5)
    weights, _ = linear_decoder(sub.decode, sub.d_sae)  # the row/null-space split works on it
    assert weights.shape == (sub.d_sae, 5)


def test_when_every_latent_is_used_the_subspace_move_is_the_full_space_move():
    from saema_core.row_space import active_subspace

    decoder = LinearDecoder(k=8, d=5, seed=2)
    codes = _sparse_codes(n=24, k=8, active_per_token=6, seed=4)
    assert np.unique(codes.indices).size == 8
    labels = np.arange(24) % 3
    x = decoder.decode(torch.from_numpy(codes.toarray())).float() + 0.1
    z, sub = active_subspace(codes, decoder.W_dec.float(), decoder.b_dec.float())
    config = InterventionConfig(lr=0.05, steps=5)
    in_subspace = optimise_intervention(z, labels, sub.decode, x, config)
    W, b = decoder.W_dec.float(), decoder.b_dec.float()
    full = optimise_intervention(torch.from_numpy(codes.toarray()).float(), labels, lambda v: v @ W + b, x, config)
    np.testing.assert_allclose(in_subspace.mse, full.mse, rtol=1e-5)
    np.testing.assert_allclose(in_subspace.separability, full.separability, rtol=1e-5)
