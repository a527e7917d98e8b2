"""Tests for saema_core.stratification: the verdict, whole cells, determinism and error context."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saema_core.stratification import (
    DEFAULT_NOISE_LEVELS,
    MODES,
    analyse_cell,
    derive_seed,
    noise_scale,
    stratification_verdict,
    support_strata,
)

HOOK = "blocks.1.hook_resid_post"
P, T, D = 8, 6, 16
SIGMAS = (0.0, 0.05, 0.5)


def planted_activations(seed=0, signed=False):
    """x (P, T, 16) from the union of subspaces of dims 2, 3, 4, and the encoder ReLU([B⁺; −B⁺] x − b).

    With nonnegative coefficients the σ = 0 code lights only each subspace's own block (rank 9); any
    noise fires both halves of all 9 coefficient latents, which saturates at 18 = n_active.
    """
    rng = np.random.default_rng(seed)
    bases = [rng.standard_normal((D, k)) for k in (2, 3, 4)]
    x = np.empty((P * T, D))
    for i in range(P * T):
        basis = bases[i % 3]
        x[i] = basis @ rng.uniform(-2.0 if signed else 0.5, 2.0, basis.shape[1])
    pinv = np.linalg.pinv(np.hstack(bases))
    W = np.vstack([pinv, -pinv])

    def encode(tokens):
        return np.maximum(tokens @ W.T - 1e-6, 0.0)

    return x.reshape(P, T, D).astype(np.float32), encode


def full_mask():
    return np.ones((P, T), dtype=bool)


def cell_ranks(x, mask, encode, sigmas=SIGMAS, replicates=3, mode="latent", concept="months", bounds=False):
    """Rank table (noise, replicate) of the numerical estimator for one hook × concept (and the rank
    bounds of its cells when `bounds`)."""
    table, bound = np.empty((len(sigmas), replicates)), np.empty((len(sigmas), replicates))
    for i, sigma in enumerate(sigmas):
        for r in range(replicates):
            seed = derive_seed(0, HOOK, concept, sigma, r)
            result = analyse_cell(x, mask, encode, sigma, 1.0, seed, modes=(mode,))
            table[i, r] = result.ranks[mode]["numerical"]
            bound[i, r] = result.spectra[mode].rank_bound
    return (table, bound) if bounds else table


# --- verdict on hand-made tables --------------------------------------------------------------------


def test_constant_rank_is_not_stratified():
    verdict = stratification_verdict((0, 0.1, 1.0), np.full((3, 3), 9.0))
    assert verdict.verdict == "not stratified" and verdict.n_strata == 1 and verdict.spread == 0.0
    assert verdict.tau == 1.5 and verdict.rank_range == 0.0 and verdict.n_unsaturated == 3
    assert math.isnan(verdict.transition_noise) and not verdict.partially_saturated


def test_one_jump_is_two_strata_with_its_transition():
    ranks = [[9, 9, 9], [9, 9, 9], [18, 18, 18], [18, 18, 18]]
    verdict = stratification_verdict((0, 0.1, 0.2, 0.5), ranks)
    assert verdict.verdict == "stratified" and verdict.n_strata == 2 and verdict.transition_noise == 0.2


def test_three_levels():
    verdict = stratification_verdict((0, 1, 2, 5), [[5, 5], [5, 5], [10, 10], [20, 20]])
    assert verdict.n_strata == 3 and verdict.transition_noise == 2.0


def test_differences_within_tau_do_not_count():
    # Spread 2 (replicates 9..11 at σ = 0.1): τ = 2.5; means 9, 10, 10 span 1.
    verdict = stratification_verdict((0, 0.1, 1), [[9, 9, 9], [9, 10, 11], [10, 10, 10]])
    assert verdict.verdict == "not stratified" and verdict.n_strata == 1 and verdict.tau == 2.5
    assert math.isnan(verdict.transition_noise)


def test_a_step_of_one_is_not_a_stratum():
    # τ is at least 1.5: a one-off jump (an affine offset entering the span) is not stratification.
    assert stratification_verdict((0, 0.5), [[3, 3, 3], [4, 4, 4]]).verdict == "not stratified"
    assert stratification_verdict((0, 0.5), [[3, 3, 3], [5, 5, 5]]).verdict == "stratified"


def test_slow_drift_wider_than_tau_is_stratified():
    # Means 10, 11, 12, 13, spread 1 → τ 1.5: no single step exceeds it, the range does.
    ranks = [[9.5, 10.5], [10.5, 11.5], [11.5, 12.5], [12.5, 13.5]]
    verdict = stratification_verdict((0, 1, 2, 3), ranks)
    assert verdict.verdict == "stratified" and verdict.n_strata == 2 and verdict.transition_noise == 2.0


def test_saturated_levels_are_left_out():
    levels = (0, 0.1, 1, 10)
    bounds = np.full((4, 2), 50.0)
    # Only σ = 0 is below the bound: fewer than two unsaturated levels → saturated, never "not stratified".
    verdict = stratification_verdict(levels, [[40, 40], [50, 50], [50, 50], [50, 50]], bounds)
    assert verdict.verdict == "saturated" and verdict.n_unsaturated == 1 and "more than 50" in verdict.reason
    # A level with one saturated replicate is saturated too; the rest decide.
    verdict = stratification_verdict(levels, [[20, 20], [30, 30], [31, 50], [50, 50]], bounds)
    assert verdict.verdict == "stratified" and verdict.n_unsaturated == 2 and verdict.partially_saturated
    verdict = stratification_verdict(levels, [[20, 20], [20, 21], [50, 50], [50, 50]], bounds)
    assert verdict.verdict == "not stratified" and verdict.partially_saturated


@pytest.mark.parametrize(
    ("levels", "ranks", "message"),
    [
        ((0, 1, 0.5), np.ones((3, 2)), "increasing order"),
        ((0, -1), np.ones((2, 2)), "-1"),
        ((0, 1, 1), np.ones((3, 2)), "duplicate"),
        ((0, 1), np.ones((3, 2)), "shape"),
        ((0, 1), np.ones((2, 0)), "shape"),
        ((0, 1), [[1.0, np.nan], [1.0, 1.0]], "NaN"),
        ((0, 1), [[1.0, 2.0], [1.0, 1.0]], "bounds"),
    ],
)
def test_verdict_rejects_bad_tables(levels, ranks, message):
    bounds = np.ones((3, 3)) if message == "bounds" else None
    with pytest.raises(ValueError, match=message):
        stratification_verdict(levels, ranks, bounds)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda n: st.lists(
            st.lists(st.integers(0, 6), min_size=2, max_size=2), min_size=n, max_size=n
        )
    )
)
def test_verdict_is_self_consistent(ranks):
    levels = tuple(float(i) for i in range(len(ranks)))
    bounds = np.full((len(ranks), 2), 6.0)
    verdict = stratification_verdict(levels, ranks, bounds)
    if verdict.verdict == "saturated":
        assert verdict.n_unsaturated < 2
        return
    assert (verdict.verdict == "stratified") == (verdict.n_strata >= 2) == (verdict.rank_range > verdict.tau)
    assert 1 <= verdict.n_strata <= verdict.n_unsaturated and verdict.tau >= 1.5
    if not math.isnan(verdict.transition_noise):
        assert verdict.verdict == "stratified" and verdict.transition_noise > 0


# --- whole cells on planted data ---------------------------------------------------------------------


def test_sae_like_relu_code_stratifies_under_noise():
    x, encode = planted_activations()
    table, bounds = cell_ranks(x, full_mask(), encode, bounds=True)
    np.testing.assert_array_equal(table, [[9, 9, 9], [18, 18, 18], [18, 18, 18]])
    np.testing.assert_array_equal(bounds, np.full((3, 3), P * T))
    verdict = stratification_verdict(SIGMAS, table, bounds)
    assert verdict.verdict == "stratified" and verdict.n_strata == 2 and verdict.transition_noise == 0.05


def topk(encode, k):
    def encoded(tokens):
        z = encode(tokens)
        kth = -np.sort(-z, axis=1)[:, k - 1 : k]
        return np.where(z >= kth, z, 0.0)
    return encoded


def test_planted_topk_code_with_more_tokens_than_active_latents_is_stratified():
    x, encode = planted_activations()
    table, bounds = cell_ranks(x, full_mask(), topk(encode, 9), bounds=True)
    assert table[0].tolist() == [9, 9, 9] and (table[1:] == 18).all()  # 48 tokens > 18 active latents
    assert stratification_verdict(SIGMAS, table, bounds).verdict == "stratified"


def test_planted_topk_code_with_fewer_tokens_than_active_latents_is_saturated():
    x, encode = planted_activations()
    mask = np.zeros((P, T), dtype=bool)
    mask[0, :6] = True  # 6 tokens, 2 per subspace: rank 6 = n_tokens at every σ
    table, bounds = cell_ranks(x, mask, topk(encode, 9), bounds=True)
    np.testing.assert_array_equal(table, np.full((3, 3), 6))
    verdict = stratification_verdict(SIGMAS, table, bounds)
    assert verdict.verdict == "saturated" and verdict.n_unsaturated == 0


def test_affine_encoder_of_hyperplane_inputs_jumps_by_one_and_is_not_stratified():
    # Post-LayerNorm residuals lie on an affine hyperplane: an affine encoder has linear rank D on
    # them and D + 1 once noise leaves the plane — a one-off step, not stratification.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((P * T, D))
    x += (1.0 - x.sum(axis=1, keepdims=True)) / D  # every row on the plane sum(x) = 1
    W, b = rng.standard_normal((24, D)), rng.standard_normal(24)
    table, bounds = cell_ranks(x.reshape(P, T, D).astype(np.float32), full_mask(), lambda t: t @ W.T + b,
                               bounds=True)
    np.testing.assert_array_equal(table, [[D] * 3, [D + 1] * 3, [D + 1] * 3])
    verdict = stratification_verdict(SIGMAS, table, bounds)
    assert verdict.verdict == "not stratified" and verdict.rank_range == 1.0


def test_resid_control_of_generic_tokens_is_full_and_constant():
    x = np.random.default_rng(1).standard_normal((P, T, D)).astype(np.float32)
    table, bounds = cell_ranks(x, full_mask(), lambda tokens: tokens, bounds=True)
    np.testing.assert_array_equal(table, np.full((3, 3), D))
    assert stratification_verdict(SIGMAS, table, bounds).verdict == "not stratified"


def test_dense_linear_control_is_full_and_constant():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((P, T, D)).astype(np.float32)
    W = rng.standard_normal((24, D)).astype(np.float32)
    table = cell_ranks(x, full_mask(), lambda tokens: tokens @ W.T)
    np.testing.assert_array_equal(table, np.full((3, 3), D))


def test_resid_control_of_planted_tokens_jumps_to_d_under_noise():
    x, _ = planted_activations()
    table = cell_ranks(x, full_mask(), lambda tokens: tokens, replicates=1)
    np.testing.assert_array_equal(table[:, 0], [9, D, D])


def test_dead_latents_change_nothing_and_take_the_sparse_path():
    # 2 000 never-firing latents make the code < 1 % dense, so it is held as CSR.
    x, encode = planted_activations()

    def wide(tokens):
        return np.hstack([encode(tokens), np.zeros((len(tokens), 2000))])

    for sigma in SIGMAS:
        narrow = analyse_cell(x, full_mask(), encode, sigma, 1.0, seed=4)
        padded = analyse_cell(x, full_mask(), wide, sigma, 1.0, seed=4)
        # paper_float32's tolerance grows with K (all latents, dead ones included), by design.
        for mode in padded.ranks:  # the sparse path sums in another order: round-off only
            assert {k: v for k, v in padded.ranks[mode].items() if k != "paper_float32"} == pytest.approx(
                {k: v for k, v in narrow.ranks[mode].items() if k != "paper_float32"}, rel=1e-12)
            assert padded.ranks[mode]["paper_float32"] <= narrow.ranks[mode]["paper_float32"]
        np.testing.assert_allclose(
            padded.spectra["latent"].singular_values, narrow.spectra["latent"].singular_values
        )
        for a, b in zip(padded.supports, narrow.supports[:2]):
            np.testing.assert_array_equal(a, b)


def test_masked_tokens_are_not_encoded_and_not_counted():
    x, encode = planted_activations()
    mask = full_mask()
    mask[:, -2:] = False
    x = x.copy()
    x[:, -2:] = np.nan  # padding may hold anything; only analysed tokens must be finite
    result = analyse_cell(x, mask, encode, 0.0, 1.0, seed=0, cell="c")
    assert result.n_analysed == P * (T - 2)
    assert result.spectra["latent"].n_tokens == P * (T - 2)
    assert result.spectra["position"].shape == (T, P * 18)


def test_support_strata_of_cells():
    x, encode = planted_activations()
    clean = analyse_cell(x, full_mask(), encode, 0.0, 1.0, seed=0)
    noisy = analyse_cell(x, full_mask(), encode, 0.5, 1.0, seed=derive_seed(0, HOOK, "m", 0.5, 0))
    same = support_strata(clean.supports, clean.supports)
    assert same.fraction_changed == 0.0 and same.n_supports == 3  # one support per subspace
    moved = support_strata(noisy.supports, clean.supports)
    assert moved.fraction_changed > 0.9 and moved.mean_jaccard < 1.0


def test_relative_noise_scale_is_used_as_given():
    x, encode = planted_activations()
    scale = noise_scale(x, full_mask(), "relative")
    a = analyse_cell(x, full_mask(), encode, 0.1, scale, seed=3)
    b = analyse_cell(x / scale, full_mask(), encode, 0.1, 1.0, seed=3)
    assert a.spectra["latent"].n_active == b.spectra["latent"].n_active == 18


# --- determinism -------------------------------------------------------------------------------------


def assert_same_cell(a, b):
    assert a.seed == b.seed and a.ranks == b.ranks
    for mode in a.spectra:
        np.testing.assert_array_equal(
            a.spectra[mode].singular_values, b.spectra[mode].singular_values
        )
    for u, v in zip(a.supports, b.supports):
        np.testing.assert_array_equal(u, v)


def test_a_cell_recomputed_alone_equals_the_same_cell_in_the_grid():
    x, encode = planted_activations(signed=True)
    grid = {}
    for concept in ("months", "days"):
        for sigma in DEFAULT_NOISE_LEVELS[:4]:
            for replicate in range(2):
                seed = derive_seed(7, HOOK, concept, sigma, replicate)
                grid[concept, sigma, replicate] = analyse_cell(
                    x, full_mask(), encode, sigma, 1.0, seed
                )
    alone = analyse_cell(x, full_mask(), encode, 0.05, 1.0, derive_seed(7, HOOK, "days", 0.05, 1))
    assert_same_cell(alone, grid["days", 0.05, 1])
    assert grid["days", 0.05, 0].ranks != grid["days", 0.05, 1].ranks or not np.array_equal(
        grid["days", 0.05, 0].spectra["latent"].singular_values,
        grid["days", 0.05, 1].spectra["latent"].singular_values,
    )


# --- errors name the cell ----------------------------------------------------------------------------


def test_nan_activations_name_the_cell():
    x, encode = planted_activations()
    x = x.copy()
    x[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*cell L1/months/0\.1/2"):
        analyse_cell(x, full_mask(), encode, 0.1, 1.0, seed=1, cell="L1/months/0.1/2")


def test_nan_latents_name_the_cell():
    x, _ = planted_activations()
    with pytest.raises(ValueError, match="latents contain NaN.*cell c9"):
        analyse_cell(x, full_mask(), lambda t: np.full((len(t), 4), np.nan), 0.0, 1.0, 1, cell="c9")


def test_fewer_than_two_tokens_name_the_cell():
    x, encode = planted_activations()
    mask = np.zeros((P, T), dtype=bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="at least 2 analysed tokens, got 1 in cell c3"):
        analyse_cell(x, mask, encode, 0.0, 1.0, seed=1, cell="c3")


def test_bad_sigma_and_encoder_failures_name_the_cell():
    x, encode = planted_activations()
    with pytest.raises(ValueError, match="sigma.*cell c6"):
        analyse_cell(x, full_mask(), encode, -0.1, 1.0, 1, cell="c6")

    def broken(tokens):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory") as info:
        analyse_cell(x, full_mask(), broken, 0.0, 1.0, 1, cell="c8")
    assert "raised by the encoder in cell c8" in info.value.__notes__


def test_bad_encoder_output_and_mode_name_the_cell():
    x, _ = planted_activations()
    with pytest.raises(ValueError, match="encoder must map.*cell c4"):
        analyse_cell(x, full_mask(), lambda t: t[:3], 0.0, 1.0, 1, cell="c4")
    with pytest.raises(ValueError, match="'token'.*cell c5"):
        analyse_cell(x, full_mask(), lambda t: t, 0.0, 1.0, 1, modes=("token",), cell="c5")


def test_every_mode_and_estimator_is_reported():
    x, encode = planted_activations()
    result = analyse_cell(x, full_mask(), encode, 0.1, 1.0, seed=1)
    assert set(result.ranks) == set(MODES)
    # The prompt and position modes saturate at P and T on noisy codes.
    assert result.ranks["prompt"]["numerical"] == P and result.ranks["position"]["numerical"] == T
