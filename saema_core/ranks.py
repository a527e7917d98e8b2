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
- `paper_float32`: #{λᵢ > λ_max·M·eps₃₂}, the tolerance of `matrix_rank` on the K×K matrix S held in
  float32 (the paper's most plausible reading), applied to the exact float64 eigenvalues — S is never
  built. Measured on real residuals, this threshold moves the rank of the residual-stream control
  itself (362 → 384), so, like the other tolerance-based estimators, it is descriptive only: the
  verdict uses `numerical` (DESIGN.md §5.5).
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
import scipy.linalg
import scipy.sparse as sp
import scipy.stats
from scipy.sparse.csgraph import connected_components

Mode = Literal["prompt", "position", "latent"]
MODES: tuple[str, ...] = ("prompt", "position", "latent")
ESTIMATORS: tuple[str, ...] = (
    "numerical",
    "paper_float32",
    "rtol_1e-6",
    "rtol_1e-3",
    "effective",
    "participation_ratio",
)
_RTOLS = {"rtol_1e-6": 1e-6, "rtol_1e-3": 1e-3}
_EPS = np.finfo(np.float64).eps
_EPS32 = float(np.finfo(np.float32).eps)
# Codes at most this dense are held sparse (SAE latents are ~0.1-1 % dense; the dense AE and
# residual-stream controls are dense). Above the second fill fraction a dense BLAS product beats
# sparse-times-sparse for the Gram of the active block.
_SPARSE_DENSITY = 0.05
_DENSE_GRAM_DENSITY = 0.05


class LatentCode(NamedTuple):
    """A latent tensor `Z (P, T, K)` held as a token matrix: row i of `tokens` is Z[p, t] for the
    flat index `rows[i]` = p·T + t; every other (p, t) is 0 (masked). `rows=None` means all P·T rows
    in order. Only analysed tokens are held, so a concept padded to long prompts costs nothing.

    `tokens` is a dense numpy array, or a scipy CSR array when the code is sparse enough that the
    dense matrix would be mostly zeros (SAE codes); dense AE and residual controls stay dense.
    """

    tokens: np.ndarray | sp.csr_array
    shape: tuple[int, int, int]  # (P, T, K)
    rows: np.ndarray | None = None

    def token_rows(self) -> np.ndarray:
        return np.arange(self.shape[0] * self.shape[1]) if self.rows is None else np.asarray(self.rows)


class SpectrumResult(NamedTuple):
    """Spectrum of one mode-n unfolding Z(n) of shape `shape = (M, N)` and of its SSPD matrix S(n).

    `singular_values` and `eigenvalues` (= singular_values², the eigenvalues of S(n)) are descending,
    float64, of length min(active rows, active columns) of Z(n); all other singular values are exactly 0.
    `n_active`: latents active (nonzero) for at least one token. `n_tokens`: tokens with at least one
    active latent. The latent-mode rank is bounded by min(n_active, n_tokens). `rank_bound`: the
    samples of the mode that have data — tokens (latent mode), prompts (prompt mode) or positions
    (position mode); a rank that reaches it is saturated (it says nothing about the code).
    """

    singular_values: np.ndarray
    eigenvalues: np.ndarray
    n_active: int
    n_tokens: int
    shape: tuple[int, int]
    rank_bound: int = 0


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


def csr_of_dense(tokens: np.ndarray, nonzero: np.ndarray | None = None) -> sp.csr_array:
    """The nonzeros of a dense (n, K) matrix as a canonical CSR array."""
    # One boolean pass, then flat indices: ~5x faster than scipy's dense-to-CSR conversion, and flat
    # indices come out row-major, i.e. already in CSR order.
    flat = np.flatnonzero(tokens != 0 if nonzero is None else nonzero)
    n, K = tokens.shape
    indptr = np.searchsorted(flat, np.arange(n + 1) * K)
    return sp.csr_array((tokens.ravel()[flat], flat % K, indptr), shape=(n, K))


def canonical_csr(matrix: sp.sparray | sp.spmatrix) -> sp.csr_array:
    """`matrix`'s nonzeros as a CSR array with sorted column indices and no stored zeros. `matrix` itself
    is never modified (scipy's in-place clean-ups would rewrite arrays it shares): a copy is made only
    when there is something to clean."""
    csr = sp.csr_array(matrix)
    if (csr.data == 0).any():
        csr = csr.copy()
        csr.eliminate_zeros()
    return csr if csr.has_sorted_indices else csr.sorted_indices()


def _compact(tokens: np.ndarray | sp.sparray) -> np.ndarray | sp.csr_array:
    """`tokens (n, K)` as CSR if at most `_SPARSE_DENSITY` of it is nonzero, else dense."""
    if sp.issparse(tokens):
        tokens = canonical_csr(tokens)
        return tokens if tokens.nnz <= _SPARSE_DENSITY * tokens.shape[0] * tokens.shape[1] else tokens.toarray()
    nonzero = tokens != 0
    if np.count_nonzero(nonzero) > _SPARSE_DENSITY * tokens.size:
        return tokens
    return csr_of_dense(tokens, nonzero)


def latent_code(Z: np.ndarray) -> LatentCode:
    """The `LatentCode` of a dense latent tensor `Z (P, T, K)` (masked positions already 0)."""
    Z = np.asarray(Z)
    _check_tensor(Z)
    P, T, K = Z.shape
    return LatentCode(_compact(Z.reshape(P * T, K)), Z.shape)


def latent_code_from_tokens(latents: np.ndarray, mask: np.ndarray) -> LatentCode:
    """The masked latent tensor's `LatentCode` from the analysed tokens' latents alone.

    `latents (n, K)` are the codes of `x[mask]` (row-major order of the True cells of `mask (P, T)`),
    dense or sparse; the (P, T, K) tensor is never built.
    """
    latents, mask = latents if sp.issparse(latents) else np.asarray(latents), np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask)  # p·T + t of each analysed token, in x[mask] order
    if latents.ndim != 2 or latents.shape[0] != rows.size:
        raise ValueError(f"latents must be (n_analysed={rows.size}, K), got shape {latents.shape}")
    return LatentCode(_compact(latents), (mask.shape[0], mask.shape[1], latents.shape[1]), rows)


def _eigvalsh(S: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of a symmetric matrix: LAPACK dsyevr (all eigenvalues, no vectors),
    measured 1.7× faster than `numpy.linalg.eigvalsh` (dsyevd) at n = 2 000–3 000; both are
    backward stable to O(n·eps·λ_max), well inside the `numerical` tolerance."""
    if S.size == 0:
        return np.zeros(0)
    return scipy.linalg.eigh(S, eigvals_only=True, driver="evr", check_finite=False)


def _gram_rows(tokens: np.ndarray | sp.csr_array) -> np.ndarray:
    """tokens · tokensᵀ, dense float64."""
    if sp.issparse(tokens):
        return (tokens @ tokens.T).toarray().astype(np.float64)
    tokens = tokens.astype(np.float64)
    return tokens @ tokens.T


_PAIR_CHUNK = 4096


def _sorted_groups(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, starts): the tokens sorted by group (stable), and where each group begins in `order`."""
    order = np.argsort(group, kind="stable")
    return order, np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])


def _pairs_within(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (i, j) of tokens with group[i] == group[j] (i = j included)."""
    order, starts = _sorted_groups(group)
    sizes = np.diff(np.r_[starts, order.size])
    own = np.repeat(sizes, sizes)  # size of each sorted token's group
    left = np.repeat(np.arange(order.size), own)
    first = np.repeat(np.repeat(starts, sizes), own)
    right = first + np.arange(left.size) - np.repeat(np.cumsum(own) - own, own)
    return order[left], order[right]


def _pair_dots(tokens: np.ndarray | sp.csr_array, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """⟨tokens[i], tokens[j]⟩ per pair, in float64, a chunk of pairs at a time."""
    out = np.empty(i.size)
    for start in range(0, i.size, _PAIR_CHUNK):
        a, b = i[start:start + _PAIR_CHUNK], j[start:start + _PAIR_CHUNK]
        if sp.issparse(tokens):
            out[start:start + a.size] = np.asarray(tokens[a].multiply(tokens[b]).sum(axis=1)).ravel()
        else:
            out[start:start + a.size] = np.einsum("ij,ij->i", tokens[a], tokens[b], dtype=np.float64)
    return out


def _grouped_gram(code: LatentCode, group: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """S (size × size) with S[index_i, index_j] = Σ ⟨z_i, z_j⟩ over token pairs of the same group.

    The prompt-mode SSPD matrix pairs tokens at the same position (group = position, index = prompt);
    the position mode pairs tokens of the same prompt (group = prompt, index = position). Within a
    group every index occurs once. Few large groups: one Gram (BLAS) per group; many small ones: the
    pairs' dot products, vectorised.
    """
    S = np.zeros((size, size))
    order, starts = _sorted_groups(group)
    if starts.size <= 64:
        for members in np.split(order, starts[1:]):
            S[np.ix_(index[members], index[members])] += _gram_rows(code.tokens[members])
        return S
    i, j = _pairs_within(group)
    np.add.at(S, (index[i], index[j]), _pair_dots(code.tokens, i, j))
    return S


def _block_eigenvalues(S: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric S, block by block: S is block-diagonal after a permutation whenever
    its rows fall into groups that share nothing (e.g. prompts whose analysed tokens sit at
    different positions), and the spectrum is the union of the blocks' spectra."""
    if S.shape[0] == 0:
        return np.zeros(0)
    n_blocks, labels = connected_components(sp.csr_array(S != 0), directed=False)
    if n_blocks == 1:
        return _eigvalsh(S)
    return np.concatenate([_eigvalsh(S[np.ix_(m, m)]) for m in
                           (np.flatnonzero(labels == b) for b in range(n_blocks))])


def _active_columns_of_mode(code: LatentCode, group: np.ndarray) -> int:
    """Nonzero columns of the unfolding whose columns are (group, latent) pairs."""
    if sp.issparse(code.tokens):
        coo = sp.coo_array(code.tokens)
        return int(np.unique(group[coo.row].astype(np.int64) * code.shape[2] + coo.col).size)
    order, starts = _sorted_groups(group)
    return int(np.logical_or.reduceat(code.tokens[order] != 0, starts, axis=0).sum())


def _mode_eigenvalues(code: LatentCode, mode: Mode, n_active: int,
                      gram_code: LatentCode | None = None) -> tuple[np.ndarray, int]:
    """Eigenvalues of S(mode) on its active rows (descending, ≥ 0) and the number of active rows.

    Latent mode: the smaller Gram of the active (token × latent) block. Prompt and position modes:
    S itself, built from same-position / same-prompt token pairs, never from the unfolding — from the
    token dot products of `gram_code` when given (a narrower code with the same token Gram)."""
    if mode == "latent":
        active = _active_block(code.tokens)
        eigenvalues = _eigvalsh(_smaller_gram(active))
        n_rows = active.shape[0]
    else:
        P, T, _ = code.shape
        rows = code.token_rows()
        prompt, position = rows // T, rows % T
        group, index, size = (position, prompt, P) if mode == "prompt" else (prompt, position, T)
        S = _grouped_gram(code if gram_code is None else gram_code, group, index, size)
        active = np.flatnonzero(np.diag(S) > 0)
        eigenvalues = np.sort(_block_eigenvalues(S[np.ix_(active, active)]))[::-1]
        if n_active < active.size:  # else the unfolding has at least as many active columns as rows
            eigenvalues = eigenvalues[: _active_columns_of_mode(code, group)]
        n_rows = active.size
    return np.clip(np.sort(eigenvalues)[::-1], 0.0, None), int(n_rows)


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


class AffineMap(NamedTuple):
    """An affine encoder z = x @ weight + bias (the dense-AE control), with the inputs it encoded.

    `factor`: `affine_factor(weight, bias)`, computed once per encoder and passed to every cell (else
    computed here)."""

    inputs: np.ndarray  # (n, d), the analysed tokens in the code's row order
    weight: np.ndarray  # (d, K)
    bias: np.ndarray  # (K,)
    factor: np.ndarray | None = None  # (d + 1, r)


def affine_factor(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """F = U Σ of the thin SVD M = [W; b] = U Σ Vᵀ ((d + 1) × K): then Z = [X, 1] M and Y = [X, 1] F have
    the same Gram Z Zᵀ = Y Yᵀ (V has orthonormal columns), with r ≤ d + 1 columns instead of K."""
    M = np.vstack([np.asarray(weight, np.float64), np.asarray(bias, np.float64)[None]])
    U, s, _ = np.linalg.svd(M, full_matrices=False)
    return U * s


def _affine_code(code: LatentCode, affine: AffineMap) -> LatentCode:
    """The code Y = [X, 1] F, whose token Gram equals the affine code's: every mode's S(n) from (d + 1)
    columns instead of K (exact in exact arithmetic; round-off of order eps·‖Z‖², like the direct route)."""
    inputs = np.asarray(affine.inputs, dtype=np.float64)
    factor = affine.factor if affine.factor is not None else affine_factor(affine.weight, affine.bias)
    lifted = np.hstack([inputs, np.ones((inputs.shape[0], 1))])
    return code._replace(tokens=lifted @ factor)


def sspd_spectrum(Z: np.ndarray | LatentCode, mode: Mode, affine: AffineMap | None = None) -> SpectrumResult:
    """Eigenvalues of S(n) = Z(n) Z(n)ᵀ and singular values of Z(n), in float64.

    `Z` is a dense `(P, T, K)` latent tensor (masked positions already 0) or its `LatentCode`.
    Never builds a K×K matrix: the latent mode uses the smaller Gram of the active block, the prompt
    and position modes build S (P×P, T×T) from token pairs and split it into independent blocks.
    `affine`: the code is `inputs @ weight + bias` (the dense AE); every mode then works on the
    (d + 1)-column code Y = [X, 1] F of the same token Gram (`affine_factor`) instead of the K columns.
    """
    code = Z if isinstance(Z, LatentCode) else latent_code(Z)
    _check_finite(code)
    n_active, n_tokens = _active_counts(code)
    if affine is None:
        eigenvalues, n_rows = _mode_eigenvalues(code, mode, n_active)
    elif mode == "latent":  # an affine code of the tokens (the dense AE): Z's spectrum is Y's
        eigenvalues = np.clip(_eigvalsh(_smaller_gram(_affine_code(code, affine).tokens))[::-1], 0.0, None)
        n_rows = n_tokens
    else:
        eigenvalues, n_rows = _mode_eigenvalues(code, mode, n_active, _affine_code(code, affine))
    P, T, K = code.shape
    shape = {"prompt": (P, T * K), "position": (T, P * K), "latent": (K, P * T)}[mode]
    return SpectrumResult(np.sqrt(eigenvalues), eigenvalues, n_active, n_tokens, shape, n_rows)


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
    ranks = {"numerical": float(kept.size),
             "paper_float32": float(np.count_nonzero(lam > lam[0] * spectrum.shape[0] * _EPS32))}
    for name, rtol in _RTOLS.items():
        ranks[name] = float(np.count_nonzero(lam > rtol * lam[0]))
    ranks["effective"] = _effective_rank(kept)
    ranks["participation_ratio"] = _participation_ratio(kept)
    return ranks
