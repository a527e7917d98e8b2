"""Support strata of a sparse code (DESIGN.md §5.7, beyond the paper).

A sparse code places each token on the coordinate subspace spanned by its active latents (its support).
Tokens sharing a support lie on one stratum. Per noise level σ we count distinct supports, histogram the
support sizes, and compare each token's support with its own support at σ = 0.

Supports are kept as sorted index sets in CSR form (`indptr`, `indices`), never as dense K-wide boolean
rows: distinct supports are counted by hashing each index set's bytes, and per-token intersections come
from the (token·K + latent) keys — a boolean table of them when n·K is small, else one sorted
intersection, O(nnz log nnz) whatever K is.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp


class Supports(NamedTuple):
    """The active-latent index set of each of n tokens, CSR-style.

    Token i's support is `indices[indptr[i]:indptr[i + 1]]`, sorted ascending; `n_latents` = K.
    """

    indptr: np.ndarray  # (n + 1,) int64
    indices: np.ndarray  # (nnz,) int64
    n_latents: int


class StrataResult(NamedTuple):
    """Support strata at one noise level, against the σ = 0 supports of the same tokens."""

    n_supports: int  # distinct supports among the tokens (the empty support counts as one)
    size_histogram: np.ndarray  # (max_size + 1,) int64: tokens with support size 0, 1, ...
    mean_jaccard: float  # mean over tokens of |A ∩ A0| / |A ∪ A0| (1 when both are empty)
    fraction_changed: float  # fraction of tokens whose support differs from their σ = 0 support


def token_supports(latents: np.ndarray | sp.sparray | sp.spmatrix) -> Supports:
    """Supports of `latents (n, K)` (dense numpy or scipy sparse): the nonzero columns of each row."""
    latents = latents if sp.issparse(latents) else np.asarray(latents)
    if len(latents.shape) != 2:
        raise ValueError(f"latents must be (n_tokens, K), got shape {latents.shape}")
    n, K = latents.shape
    if sp.issparse(latents):
        coo = sp.coo_array(latents)
        coo.sum_duplicates()
        nonzero = coo.data != 0  # explicit zeros are not active
        rows, cols = coo.row[nonzero], coo.col[nonzero]
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
    else:
        rows, cols = np.nonzero(latents)  # row-major: columns ascending within a row
    counts = np.bincount(rows, minlength=n)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Supports(indptr, cols.astype(np.int64), int(K))


def support_sizes(supports: Supports) -> np.ndarray:
    """`(n,)` number of active latents of each token."""
    return np.diff(supports.indptr)


def count_distinct_supports(supports: Supports) -> int:
    """Number of distinct index sets among the tokens (exact: sets are compared by their bytes)."""
    bounds = supports.indptr.tolist()
    indices = supports.indices
    return len({indices[a:b].tobytes() for a, b in itertools.pairwise(bounds)})


def _token_keys(supports: Supports) -> np.ndarray:
    """One int64 key token·K + latent per active entry, ascending (rows ascending, sorted within)."""
    rows = np.repeat(np.arange(len(supports.indptr) - 1, dtype=np.int64), support_sizes(supports))
    return rows * supports.n_latents + supports.indices


# Up to this many (token, latent) cells, intersections use a boolean table of the reference's keys
# (O(nnz)); a dense code has n·K keys, where the sorted intersection cost more than the rest of a cell.
_TABLE_CELLS = 2**26


def intersection_sizes(supports: Supports, reference: Supports) -> np.ndarray:
    """`(n,)` |support_i ∩ reference_i| for row-aligned supports of the same n tokens and K latents."""
    n = len(supports.indptr) - 1
    full = n * supports.n_latents
    if supports.indices.size == full and reference.indices.size == full:
        return np.full(n, supports.n_latents)  # every latent active everywhere (a dense code)
    keys, reference_keys = _token_keys(supports), _token_keys(reference)
    if n * supports.n_latents <= _TABLE_CELLS:
        table = np.zeros(n * supports.n_latents, dtype=bool)
        table[reference_keys] = True
        common = keys[table[keys]]
    else:
        common = np.intersect1d(keys, reference_keys, assume_unique=True)
    return np.bincount(common // supports.n_latents, minlength=n)


def _check_aligned(supports: Supports, reference: Supports) -> None:
    if supports.indptr.shape != reference.indptr.shape or supports.n_latents != reference.n_latents:
        raise ValueError(
            f"supports ({len(supports.indptr) - 1} tokens × {supports.n_latents} latents) and reference "
            f"({len(reference.indptr) - 1} tokens × {reference.n_latents} latents) are not row-aligned"
        )
    if len(supports.indptr) < 2:
        raise ValueError("support strata need at least one token")


def support_strata(supports: Supports, reference: Supports, min_bins: int = 0) -> StrataResult:
    """Support strata of n tokens at one σ against their own σ = 0 supports `reference`.

    `min_bins` pads the size histogram to a common length (e.g. K + 1, or the max over σ) for storage.
    """
    _check_aligned(supports, reference)
    sizes, reference_sizes = support_sizes(supports), support_sizes(reference)
    common = intersection_sizes(supports, reference)
    union = sizes + reference_sizes - common
    # Two empty supports are the same stratum: Jaccard 1 by convention.
    jaccard = np.where(union == 0, 1.0, common / np.maximum(union, 1))
    changed = (common != sizes) | (common != reference_sizes)
    return StrataResult(
        n_supports=count_distinct_supports(supports),
        size_histogram=np.bincount(sizes, minlength=min_bins).astype(np.int64),
        mean_jaccard=float(jaccard.mean()),
        fraction_changed=float(changed.mean()),
    )
