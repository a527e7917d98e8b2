"""Latent tensors, mode-n unfoldings and the ranks of their SSPD matrices (DESIGN.md §5.2–5.4).

Shapes: `Z (P, T, K)` = prompts × positions × latents. Unfoldings follow Kolda & Bader (2009): the mode
index becomes the row, and the remaining indices form the column with the EARLIER remaining index
varying fastest:

    prompt   Z(1) (P, T·K)   column = t + T·k
    position Z(2) (T, P·K)   column = p + P·k
    latent   Z(3) (K, P·T)   column = p + P·t

(Column order never changes singular values, so the spectra below do not depend on it.)

SSPD matrix `S(n) = Z(n) Z(n)ᵀ`, `(I_n, I_n)`. Its nonzero eigenvalues λᵢ are the squared singular
values σᵢ² of Z(n), and they are also the nonzero eigenvalues of the other Gram `Z(n)ᵀ Z(n)`.
`sspd_spectrum` therefore never builds S: it holds Z as a token matrix (P·T, K) — CSR when sparse —
drops the all-zero rows and columns of the unfolding (inactive latents and tokens contribute only zero
singular values), and takes `numpy.linalg.eigvalsh` of the SMALLER of the two Grams of what remains, in
float64. The Gram route
squares the condition number, so σᵢ far below σ_max·√eps are not resolved; every estimator below is
therefore defined on the eigenvalues λᵢ of S itself, which is where the Gram route is exact to working
precision (|error| ≲ eps·λ_max).

Estimators (dimension `estimator`):

- `numerical`: #{λᵢ > λ_max·M·eps}, M = I_n = size of S(n) (for the latent mode all K latents, active or
  not). This is exactly `numpy.linalg.matrix_rank(S)` with NumPy's default tolerance (S's singular values
  are λᵢ and its shape is M×M). Applied to Z(n) directly, the NumPy default would instead be
  σᵢ > σ_max·max(M, N)·eps, a threshold the Gram route cannot resolve.
- `rtol_1e-6`, `rtol_1e-3`: #{λᵢ > rtol·λ_max} = `numpy.linalg.matrix_rank(S, rtol=rtol)`.
- `effective` (Roy & Vetterli 2007): exp of the Shannon entropy of pᵢ = σᵢ/Σσⱼ, σᵢ = √λᵢ the singular
  values of Z(n) (the paper's definition is on the matrix's own singular values).
- `participation_ratio`: (Σλᵢ)²/Σλᵢ², λᵢ the eigenvalues of S.

The two continuous estimators use only λᵢ above the `numerical` tolerance: below it λᵢ is round-off,
and √(round-off) ≈ 1e-8·σ_max would otherwise leak a spurious amount of entropy into the effective rank.
A zero matrix has rank 0 under every estimator (effective rank and participation ratio included, by
definition here: there is no spectrum to spread).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
import scipy.stats

Mode = Literal["prompt", "position", "latent"]
MODES: tuple[str, ...] = ("prompt", "position", "latent")
ESTIMATORS: tuple[str, ...] = (
    "numerical",
    "rtol_1e-6",
    "rtol_1e-3",
    "effective",
    "participation_ratio",
)
_RTOLS = {"rtol_1e-6": 1e-6, "rtol_1e-3": 1e-3}
_EPS = np.finfo(np.float64).eps
# Codes at most this dense are held sparse (SAE latents are ~0.1-1 % dense; the dense AE and
# residual-stream controls are dense). Above the second fill fraction a dense BLAS product beats
# sparse-times-sparse for the Gram of the active block.
_SPARSE_DENSITY = 0.05
_DENSE_GRAM_DENSITY = 0.05


class LatentCode(NamedTuple):
    """A latent tensor `Z (P, T, K)` held as its token matrix `(P·T, K)`, row p·T + t.

    `tokens` is a dense numpy array, or a scipy CSR array when the code is sparse enough that the
    (P·T)×K dense matrix would be mostly zeros (SAE codes); dense AE and residual controls stay dense.
    """

    tokens: np.ndarray | sp.csr_array
    shape: tuple[int, int, int]  # (P, T, K)


class SpectrumResult(NamedTuple):
    """Spectrum of one mode-n unfolding Z(n) of shape `shape = (M, N)` and of its SSPD matrix S(n).

    `singular_values` and `eigenvalues` (= singular_values², the eigenvalues of S(n)) are descending,
    float64, of length min(active rows, active columns) of Z(n); all other singular values are exactly 0.
    `n_active`: latents active (nonzero) for at least one token. `n_tokens`: tokens with at least one
    active latent. The latent-mode rank is bounded by min(n_active, n_tokens).
    """

    singular_values: np.ndarray
    eigenvalues: np.ndarray
    n_active: int
    n_tokens: int
    shape: tuple[int, int]


def _mode_axis(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return MODES.index(mode)


def _check_tensor(Z: np.ndarray, mask: np.ndarray | None = None) -> None:
    if Z.ndim != 3:
        raise ValueError(f"latent tensor must be (P, T, K), got shape {Z.shape}")
    if mask is not None and mask.shape != Z.shape[:2]:
        raise ValueError(
            f"mask shape {mask.shape} does not match latent tensor (P, T) = {Z.shape[:2]}"
        )


def mask_latents(Z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """`Z (P, T, K)` with the latents of masked-out positions (`mask (P, T)` False) set to 0 (a copy)."""
    Z = np.asarray(Z)
    mask = np.asarray(mask, dtype=bool)
    _check_tensor(Z, mask)
    return np.where(mask[:, :, None], Z, np.zeros((), dtype=Z.dtype))


def unfold(Z: np.ndarray, mode: Mode) -> np.ndarray:
    """The explicit mode-n unfolding of `Z (P, T, K)`: prompt (P, T·K), position (T, P·K), latent (K, P·T).

    Kolda & Bader column order (earlier remaining index fastest). Dense; for small tensors and tests —
    `sspd_spectrum` never materialises it.
    """
    Z = np.asarray(Z)
    _check_tensor(Z)
    axis = _mode_axis(mode)
    return np.moveaxis(Z, axis, 0).reshape(Z.shape[axis], -1, order="F")


def _compact(tokens: np.ndarray) -> np.ndarray | sp.csr_array:
    """`tokens (n, K)` as CSR if at most `_SPARSE_DENSITY` of it is nonzero, else unchanged."""
    # One boolean pass, then flat indices: ~5x faster than scipy's dense-to-CSR conversion or
    # count_nonzero on floats, and flat indices come out row-major, i.e. already in CSR order.
    nonzero = tokens != 0
    if np.count_nonzero(nonzero) > _SPARSE_DENSITY * tokens.size:
        return tokens
    flat = np.flatnonzero(nonzero)
    n, K = tokens.shape
    indptr = np.searchsorted(flat, np.arange(n + 1) * K)
    return sp.csr_array((tokens.ravel()[flat], flat % K, indptr), shape=(n, K))


def latent_code(Z: np.ndarray) -> LatentCode:
    """The `LatentCode` of a dense latent tensor `Z (P, T, K)` (masked positions already 0)."""
    Z = np.asarray(Z)
    _check_tensor(Z)
    P, T, K = Z.shape
    return LatentCode(_compact(Z.reshape(P * T, K)), Z.shape)


def latent_code_from_tokens(latents: np.ndarray, mask: np.ndarray) -> LatentCode:
    """The masked latent tensor's `LatentCode` from the analysed tokens' latents alone.

    `latents (n, K)` are the codes of `x[mask]` (row-major order of the True cells of `mask (P, T)`);
    the rows of masked positions are zero, and the (P, T, K) tensor is never built.
    """
    latents, mask = np.asarray(latents), np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask)  # p·T + t of each analysed token, in x[mask] order
    if latents.ndim != 2 or latents.shape[0] != rows.size:
        raise ValueError(f"latents must be (n_analysed={rows.size}, K), got shape {latents.shape}")
    shape = (mask.shape[0], mask.shape[1], latents.shape[1])
    compact = _compact(latents)
    if sp.issparse(compact):
        placed = sp.coo_array(compact)
        tokens = sp.csr_array(
            (placed.data, (rows[placed.row], placed.col)), shape=(mask.size, shape[2])
        )
    else:
        tokens = np.zeros((mask.size, shape[2]), dtype=latents.dtype)
        tokens[rows] = latents
    return LatentCode(tokens, shape)


def _unfolding_of_code(code: LatentCode, mode: Mode) -> np.ndarray | sp.sparray:
    """Z(mode) with rows = the mode's index; columns in an order other than Kolda & Bader's (the
    spectrum does not depend on it): latent (K, P·T), prompt (P, T·K), position (T, P·K)."""
    P, T, K = code.shape
    axis = _mode_axis(mode)
    if axis == 2:
        return code.tokens.T
    if axis == 0:
        return code.tokens.reshape((P, T * K))
    position_major = np.arange(P * T).reshape(P, T).T.ravel()  # rows t·P + p
    return code.tokens[position_major].reshape((T, P * K))


def _active_block(A: np.ndarray | sp.sparray) -> np.ndarray | sp.csr_array:
    """A restricted to its nonzero rows and columns, float64 (dense stays dense, sparse stays CSR)."""
    if not sp.issparse(A):
        nonzero = A != 0
        rows, cols = np.flatnonzero(nonzero.any(axis=1)), np.flatnonzero(nonzero.any(axis=0))
        return A[np.ix_(rows, cols)].astype(np.float64)
    coo = sp.coo_array(A)
    _, row_index = np.unique(coo.row, return_inverse=True)
    _, col_index = np.unique(coo.col, return_inverse=True)
    shape = (int(row_index.max(initial=-1)) + 1, int(col_index.max(initial=-1)) + 1)
    return sp.csr_array((coo.data.astype(np.float64), (row_index, col_index)), shape=shape)


def _smaller_gram(A: np.ndarray | sp.csr_array) -> np.ndarray:
    """The smaller of A Aᵀ and Aᵀ A, dense float64 — same nonzero eigenvalues as S."""
    if A.shape[0] > A.shape[1]:
        A = A.T
    if sp.issparse(A) and A.nnz > _DENSE_GRAM_DENSITY * A.shape[0] * A.shape[1]:
        A = A.toarray()
    if sp.issparse(A):
        A = sp.csr_array(A)
        return (A @ A.T).toarray()
    return A @ A.T


def _active_counts(code: LatentCode) -> tuple[int, int]:
    """(latents active for some token, tokens with some active latent)."""
    if sp.issparse(code.tokens):
        return np.unique(code.tokens.indices).size, int(
            np.count_nonzero(np.diff(code.tokens.indptr))
        )
    nonzero = code.tokens != 0
    return int(nonzero.any(axis=0).sum()), int(nonzero.any(axis=1).sum())


def _check_finite(code: LatentCode) -> None:
    values = code.tokens.data if sp.issparse(code.tokens) else code.tokens
    if not np.all(np.isfinite(values)):
        raise ValueError("latent tensor contains NaN or inf")


def sspd_spectrum(Z: np.ndarray | LatentCode, mode: Mode) -> SpectrumResult:
    """Eigenvalues of S(n) = Z(n) Z(n)ᵀ and singular values of Z(n), via the smaller active Gram.

    `Z` is a dense `(P, T, K)` latent tensor (masked positions already 0) or its `LatentCode`.
    Never builds a K×K matrix, and densifies at most (active rows × active columns) of Z(n).
    """
    code = Z if isinstance(Z, LatentCode) else latent_code(Z)
    _check_finite(code)
    gram = _smaller_gram(_active_block(_unfolding_of_code(code, mode)))
    eigenvalues = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
    n_active, n_tokens = _active_counts(code)
    P, T, K = code.shape
    shape = {"prompt": (P, T * K), "position": (T, P * K), "latent": (K, P * T)}[mode]
    return SpectrumResult(np.sqrt(eigenvalues), eigenvalues, n_active, n_tokens, shape)


def numerical_tolerance(spectrum: SpectrumResult) -> float:
    """NumPy's default `matrix_rank` tolerance for S(n): λ_max · M · eps, M = rows of Z(n) = size of S."""
    lam_max = float(spectrum.eigenvalues[0]) if spectrum.eigenvalues.size else 0.0
    return lam_max * spectrum.shape[0] * _EPS


def _effective_rank(eigenvalues: np.ndarray) -> float:
    # Roy & Vetterli on the singular values of Z(n); scipy normalises them to a distribution.
    return float(np.exp(scipy.stats.entropy(np.sqrt(eigenvalues))))


def _participation_ratio(eigenvalues: np.ndarray) -> float:
    scaled = eigenvalues / eigenvalues[0]  # avoids overflow of λ² for large activations
    return float(scaled.sum() ** 2 / np.square(scaled).sum())


def rank_estimates(spectrum: SpectrumResult) -> dict[str, float]:
    """Every estimator of `ESTIMATORS` for one spectrum (see the module docstring for definitions)."""
    lam = spectrum.eigenvalues
    if lam.size == 0 or lam[0] == 0.0:
        return dict.fromkeys(ESTIMATORS, 0.0)
    kept = lam[lam > numerical_tolerance(spectrum)]
    ranks = {"numerical": float(kept.size)}
    for name, rtol in _RTOLS.items():
        ranks[name] = float(np.count_nonzero(lam > rtol * lam[0]))
    ranks["effective"] = _effective_rank(kept)
    ranks["participation_ratio"] = _participation_ratio(kept)
    return ranks
