"""Tests for saema_core.ranks: unfoldings, SSPD spectra and rank estimators.

Oracles: numpy.linalg.matrix_rank / svd of the explicit unfolding and SSPD matrix S = Z(n) Z(n)ᵀ, and
planted union-of-subspaces data whose ranks are counted by hand.
"""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from saema_core.ranks import (
    ESTIMATORS,
    MODES,
    LatentCode,
    latent_code,
    latent_code_from_tokens,
    mask_latents,
    numerical_tolerance,
    rank_estimates,
    sspd_spectrum,
    unfold,
)

SUBSPACE_DIMS = (2, 3, 4)
D_MODEL = 16


def planted_tokens(rng, n_tokens, signed=False):
    """Tokens (n, d) from the union of 3 generic subspaces of dims 2, 3, 4 (token i in subspace i % 3).

    Returns the tokens and the pseudo-inverse of the stacked bases B (d × 9): B⁺ x = the token's
    coefficients on its own subspace's block, 0 elsewhere (the subspaces are independent).
    """
    bases = [rng.standard_normal((D_MODEL, k)) for k in SUBSPACE_DIMS]
    tokens = np.empty((n_tokens, D_MODEL))
    for i in range(n_tokens):
        basis = bases[i % 3]
        low = -2.0 if signed else 0.5
        tokens[i] = basis @ rng.uniform(low, 2.0, basis.shape[1])
    return tokens, np.linalg.pinv(np.hstack(bases))


def relu(a, bias=1e-6):
    # The small negative bias zeroes the ~1e-16 round-off that B⁺ leaves on other subspaces' latents.
    return np.maximum(a - bias, 0.0)


def topk(a, k):
    out = np.zeros_like(a)
    index = np.argpartition(-a, k - 1, axis=1)[:, :k]
    np.put_along_axis(out, index, np.take_along_axis(a, index, axis=1), axis=1)
    return out


def as_tensor(latents, P, T):
    return latents.reshape(P, T, -1)


# --- unfoldings -------------------------------------------------------------------------------------


def test_unfold_follows_kolda_bader():
    P, T, K = 2, 3, 4
    Z = np.arange(P * T * K, dtype=float).reshape(P, T, K)
    prompt, position, latent = unfold(Z, "prompt"), unfold(Z, "position"), unfold(Z, "latent")
    assert (
        prompt.shape == (P, T * K) and position.shape == (T, P * K) and latent.shape == (K, P * T)
    )
    for p in range(P):
        for t in range(T):
            for k in range(K):
                assert prompt[p, t + T * k] == Z[p, t, k]
                assert position[t, p + P * k] == Z[p, t, k]
                assert latent[k, p + P * t] == Z[p, t, k]


def test_unfold_rejects_bad_mode_and_shape():
    with pytest.raises(ValueError, match="'token'"):
        unfold(np.zeros((1, 1, 1)), "token")
    with pytest.raises(ValueError, match=r"\(P, T, K\)"):
        unfold(np.zeros((2, 2)), "latent")


def test_mask_latents_zeroes_masked_positions():
    Z = np.ones((2, 2, 3), dtype=np.float32)
    mask = np.array([[True, False], [False, True]])
    out = mask_latents(Z, mask)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.sum(axis=2), [[3, 0], [0, 3]])
    with pytest.raises(ValueError, match="mask shape"):
        mask_latents(Z, np.ones((2, 3), bool))


@pytest.mark.parametrize("density", [0.02, 0.5])  # held as CSR / dense
def test_code_from_tokens_equals_code_of_the_masked_tensor(density):
    rng = np.random.default_rng(0)
    mask = rng.random((3, 4)) < 0.6
    n = int(mask.sum())
    latents = rng.random((n, 50)) * (rng.random((n, 50)) < density)
    Z = np.zeros((3, 4, 50))
    Z[mask] = latents
    from_tokens, from_tensor = latent_code_from_tokens(latents, mask), latent_code(Z)
    assert from_tokens.shape == from_tensor.shape == Z.shape
    for code in (from_tokens, from_tensor):  # scatter the held rows back into the tensor
        held = code.tokens.toarray() if hasattr(code.tokens, "toarray") else code.tokens
        full = np.zeros((12, 50))
        full[code.token_rows()] = held
        np.testing.assert_array_equal(full, Z.reshape(12, 50))
    assert from_tokens.tokens.shape[0] == n  # only the analysed tokens are held
    for mode in MODES:
        np.testing.assert_array_equal(
            sspd_spectrum(from_tokens, mode).eigenvalues, sspd_spectrum(Z, mode).eigenvalues
        )


# --- agreement with the explicit SSPD matrix ---------------------------------------------------------


@st.composite
def sparse_tensors(draw):
    P, T, K = (draw(st.integers(1, 5)) for _ in range(3))
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.sampled_from([0.0, 0.15, 0.4, 1.0]))
    rng = np.random.default_rng(seed)
    values = (
        rng.integers(1, 4, (P, T, K)) if draw(st.booleans()) else rng.standard_normal((P, T, K))
    )
    Z = values * (rng.random((P, T, K)) < density)
    if draw(st.booleans()) and P > 1:
        Z[-1] = 2.0 * Z[0]  # a planted linear dependence
    return Z


def both_representations(Z):
    """Z as given (the library picks), and forced into the CSR and the dense token-matrix paths."""
    P, T, K = Z.shape
    tokens = Z.reshape(P * T, K)
    return [Z, LatentCode(sp.csr_array(tokens), Z.shape), LatentCode(tokens, Z.shape)]


@settings(max_examples=40, deadline=None)
@given(sparse_tensors())
def test_thresholded_ranks_equal_matrix_rank_of_explicit_sspd(Z):
    for mode in MODES:
        A = unfold(Z, mode)
        S = A @ A.T
        for code in both_representations(Z):
            ranks = rank_estimates(sspd_spectrum(code, mode))
            assert ranks["numerical"] == np.linalg.matrix_rank(S)
            assert ranks["rtol_1e-6"] == np.linalg.matrix_rank(S, rtol=1e-6)
            assert ranks["rtol_1e-3"] == np.linalg.matrix_rank(S, rtol=1e-3)


@settings(max_examples=40, deadline=None)
@given(sparse_tensors())
def test_spectrum_equals_svd_of_explicit_unfolding(Z):
    for mode in MODES:
        A = unfold(Z, mode)
        expected = np.linalg.svd(A, compute_uv=False)
        scale = max(1.0, float(expected.max(initial=0.0)))
        for code in both_representations(Z):
            spectrum = sspd_spectrum(code, mode)
            n = spectrum.singular_values.size
            # √λ of a round-off eigenvalue is ~1e-8·σ_max: the Gram route's documented resolution.
            np.testing.assert_allclose(spectrum.singular_values, expected[:n], atol=1e-7 * scale)
            assert np.all(expected[n:] <= 1e-7 * scale)
            assert spectrum.shape == A.shape
            assert np.all(np.diff(spectrum.singular_values) <= 0)


@settings(max_examples=40, deadline=None)
@given(sparse_tensors())
def test_continuous_estimators_equal_naive_formulas(Z):
    for mode in MODES:
        spectrum = sspd_spectrum(Z, mode)
        ranks = rank_estimates(spectrum)
        A = unfold(Z, mode)
        lam = np.linalg.svd(A, compute_uv=False) ** 2
        lam = lam[lam > numerical_tolerance(spectrum)]
        if lam.size == 0:
            assert ranks["effective"] == 0.0 and ranks["participation_ratio"] == 0.0
            continue
        p = np.sqrt(lam) / np.sqrt(lam).sum()
        assert ranks["effective"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)
        assert ranks["participation_ratio"] == pytest.approx(
            lam.sum() ** 2 / (lam**2).sum(), rel=1e-9
        )


@settings(max_examples=25, deadline=None)
@given(sparse_tensors())
def test_ranks_are_bounded_by_active_latents_and_tokens(Z):
    spectrum = sspd_spectrum(Z, "latent")
    ranks = rank_estimates(spectrum)
    bound = min(spectrum.n_active, spectrum.n_tokens)
    assert spectrum.n_active == int(np.any(Z != 0, axis=(0, 1)).sum())
    assert spectrum.n_tokens == int(np.any(Z != 0, axis=2).sum())
    for name in ESTIMATORS:
        assert 0.0 <= ranks[name] <= bound + 1e-9


# --- hand-computed ranks -------------------------------------------------------------------------------


def test_zero_tensor_has_rank_zero_everywhere():
    for mode in MODES:
        spectrum = sspd_spectrum(np.zeros((2, 3, 4)), mode)
        assert (
            spectrum.singular_values.size == 0 and spectrum.n_active == 0 and spectrum.n_tokens == 0
        )
        assert rank_estimates(spectrum) == dict.fromkeys(ESTIMATORS, 0.0)


def test_effective_rank_and_participation_ratio_by_hand():
    # Latent mode: two orthogonal latent directions with singular values 3 and 1.
    Z = np.zeros((1, 2, 5))
    Z[0, 0, 1], Z[0, 1, 4] = 3.0, 1.0
    ranks = rank_estimates(sspd_spectrum(Z, "latent"))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ranks["effective"] == pytest.approx(math.exp(entropy))
    assert ranks["participation_ratio"] == pytest.approx((9 + 1) ** 2 / (81 + 1))
    assert ranks["numerical"] == ranks["rtol_1e-6"] == ranks["rtol_1e-3"] == 2.0


def test_rank_one_effective_rank_is_exactly_one():
    Z = np.outer(np.arange(1.0, 7.0), np.arange(1.0, 5.0)).reshape(2, 3, 4)
    ranks = rank_estimates(sspd_spectrum(Z, "latent"))
    assert (
        ranks["numerical"] == 1.0
        and ranks["effective"] == 1.0
        and ranks["participation_ratio"] == 1.0
    )


def test_identical_prompts_have_prompt_rank_one_and_position_rank_of_one_prompt():
    # Positions carry latents e1, e2, e1 + e2 (rank 2); all 4 prompts are the same sentence.
    one_prompt = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1.0, 0, 0]])
    Z = np.broadcast_to(one_prompt, (4, 3, 4)).copy()
    assert rank_estimates(sspd_spectrum(Z, "prompt"))["numerical"] == 1.0
    assert rank_estimates(sspd_spectrum(Z, "position"))["numerical"] == 2.0
    assert rank_estimates(sspd_spectrum(Z, "latent"))["numerical"] == 2.0


def test_linear_encoder_rank_is_the_sum_of_independent_subspace_dims():
    rng = np.random.default_rng(1)
    tokens, _ = planted_tokens(rng, 48, signed=True)
    W = rng.standard_normal((32, D_MODEL))  # injective on R^16, so rank(X Wᵀ) = rank X
    spectrum = sspd_spectrum(as_tensor(tokens @ W.T, 8, 6), "latent")
    assert spectrum.n_active == 32
    assert rank_estimates(spectrum)["numerical"] == sum(SUBSPACE_DIMS)


def test_relu_encoder_on_nonnegative_coefficients_keeps_the_subspace_rank():
    # ReLU([B⁺; −B⁺] x): the −B⁺ half never fires; each subspace lights only its own block of latents.
    rng = np.random.default_rng(2)
    tokens, pinv = planted_tokens(rng, 48)
    latents = relu(tokens @ np.vstack([pinv, -pinv]).T)
    spectrum = sspd_spectrum(as_tensor(latents, 8, 6), "latent")
    assert spectrum.n_active == 9 and spectrum.n_tokens == 48
    assert rank_estimates(spectrum)["numerical"] == 9


def test_relu_encoder_on_signed_coefficients_doubles_the_rank():
    # Signed coefficients fire both halves: the active-column block of subspace i is [c⁺, c⁻], 2·k_i
    # generic columns over 16 tokens, so the rank is 2·(2 + 3 + 4) = 18 = n_active.
    rng = np.random.default_rng(3)
    tokens, pinv = planted_tokens(rng, 48, signed=True)
    latents = relu(tokens @ np.vstack([pinv, -pinv]).T)
    spectrum = sspd_spectrum(as_tensor(latents, 8, 6), "latent")
    assert spectrum.n_active == 18
    assert rank_estimates(spectrum)["numerical"] == 18


def test_topk_encoder_with_duplicated_latents_has_rank_below_n_active():
    # TopK_8(ReLU([B⁺; B⁺] x)): every coefficient fires twice (≤ 8 positives per token, so all are
    # kept): 18 active latents, but duplicated columns give rank 2 + 3 + 4 = 9.
    rng = np.random.default_rng(4)
    tokens, pinv = planted_tokens(rng, 48)
    latents = topk(relu(tokens @ np.vstack([pinv, pinv]).T), k=8)
    spectrum = sspd_spectrum(as_tensor(latents, 8, 6), "latent")
    assert spectrum.n_active == 18
    assert rank_estimates(spectrum)["numerical"] == 9


def test_dense_control_is_full_rank():
    rng = np.random.default_rng(5)
    tokens = rng.standard_normal((48, D_MODEL))
    for latents in (tokens, tokens @ rng.standard_normal((24, D_MODEL)).T):
        ranks = rank_estimates(sspd_spectrum(as_tensor(latents, 8, 6), "latent"))
        assert ranks["numerical"] == D_MODEL


def test_huge_latent_dictionary_never_builds_k_by_k():
    # K = 200 000: a K×K float64 matrix would need 320 GB, so this only passes on the active-Gram route.
    P, T, K = 2, 3, 200_000
    latents = np.zeros((P * T, K), dtype=np.float32)
    latents[np.arange(6), [5, 17, 5, 199_999, 17, 42]] = [1, 2, 3, 4, 5, 6]
    spectrum = sspd_spectrum(as_tensor(latents, P, T), "latent")
    assert spectrum.shape == (K, P * T) and spectrum.n_active == 4
    assert rank_estimates(spectrum)["numerical"] == 4.0


def test_spectrum_rejects_non_finite_latents():
    Z = np.ones((1, 2, 3))
    Z[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        sspd_spectrum(Z, "latent")


@pytest.mark.parametrize("on_hyperplane", [False, True])
def test_affine_code_spectrum_equals_the_direct_route(on_hyperplane):
    """Z = X W + b: the (d + 1)-factor route gives the direct Gram route's spectrum and ranks."""
    from saema_core.ranks import AffineMap

    rng = np.random.default_rng(7)
    X = rng.standard_normal((60, 8))
    if on_hyperplane:  # rows on sum(x) = 1: [X, 1] has rank 8, not 9
        X += (1.0 - X.sum(axis=1, keepdims=True)) / 8
    W, b = rng.standard_normal((8, 40)), rng.standard_normal(40)
    Z = X @ W + b
    code = latent_code_from_tokens(Z, np.ones((6, 10), dtype=bool))
    direct, factored = sspd_spectrum(code, "latent"), sspd_spectrum(code, "latent", AffineMap(X, W, b))
    assert rank_estimates(factored)["numerical"] == rank_estimates(direct)["numerical"] == (8 if on_hyperplane else 9)
    n = int(rank_estimates(direct)["numerical"])
    np.testing.assert_allclose(factored.eigenvalues[:n], direct.eigenvalues[:n], rtol=1e-9)
    assert (factored.n_active, factored.n_tokens, factored.rank_bound) == (direct.n_active, direct.n_tokens, 60)
    for mode in ("prompt", "position"):  # S(n) from the (d + 1)-column code of the same token Gram
        direct, factored = sspd_spectrum(code, mode), sspd_spectrum(code, mode, AffineMap(X, W, b))
        assert rank_estimates(factored)["numerical"] == rank_estimates(direct)["numerical"]
        np.testing.assert_allclose(factored.eigenvalues, direct.eigenvalues, rtol=1e-9, atol=1e-9 * direct.eigenvalues[0])


def test_canonical_csr_drops_stored_zeros_and_sorts_without_touching_its_input():
    from saema_core.ranks import canonical_csr

    matrix = sp.csr_array((np.array([0.0, 2.0, 3.0, 1.0]), np.array([1, 2, 0, 1]), np.array([0, 2, 4])), shape=(2, 3))
    before = [a.copy() for a in (matrix.data, matrix.indices, matrix.indptr)]
    clean = canonical_csr(matrix)
    assert clean.nnz == 3 and clean.has_sorted_indices
    np.testing.assert_array_equal(clean.toarray(), matrix.toarray())
    for array, kept in zip((matrix.data, matrix.indices, matrix.indptr), before):
        np.testing.assert_array_equal(array, kept)
