"""Point sets for the structure stage (DESIGN.md §6): preprocessing and exact nearest neighbours.

The paper's preprocessing is StandardScaler → L2 row normalisation. On SAE latents (K = 16 384 or
more, ~32 active per token) subtracting the column means fills every active column of every row, so
sparse input is never centred explicitly. Instead a preprocessed point is held as

    u_i = row_scale_i · (scaled_i − centre)

with ``scaled`` sparse (x / column std over the active columns), ``centre`` the scaled column mean
and ``row_scale`` the inverse L2 norm of the centred row. Inner products and distances between
the u_i follow from sparse products plus rank-one corrections (``squared_distances``), so
neighbours are exact without ever building an (n, K) dense matrix. Dense input is materialised
(centre = 0, row_scale = 1): it is already dense, and the materialised form is what UMAP takes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from sklearn.preprocessing import StandardScaler, normalize

Points = np.ndarray | sp.csr_matrix | sp.csr_array

# Elements of one (block × points) distance block: 2**22 float64 = 32 MiB.
DEFAULT_BLOCK_ELEMENTS = 2**22


class PreprocessedPoints(NamedTuple):
    """Points after StandardScaler → L2 row normalisation: row i is row_scale[i]·(scaled[i] − c)."""

    scaled: np.ndarray | sp.csr_matrix  # (n, d_active) float64; dense input: the final rows
    centre: np.ndarray  # (d_active,) float64; zeros for dense input
    row_scale: np.ndarray  # (n,) float64; 0 for a row that is zero after centring (as sklearn)
    active_columns: np.ndarray  # (d_active,) int64: input columns kept (nonzero somewhere)
    row_group: np.ndarray  # (n,) int64: equal ids ⇔ identical input rows (for de-duplication)

    @property
    def n_points(self) -> int:
        return int(self.scaled.shape[0])

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.scaled)


class Neighbours(NamedTuple):
    """k nearest neighbours of each query point, self excluded, nearest first."""

    indices: np.ndarray  # (m, k) int64, positions within the searched member set
    distances: np.ndarray  # (m, k) float64, Euclidean distances in preprocessed space


def where(cell: str) -> str:
    """Prefix naming the analysed cell in error messages."""
    return f"structure of {cell!r}" if cell else "structure"


def check_points(points: Points, cell: str = "") -> np.ndarray | sp.csr_matrix:
    """Validate (n, d) points (2-D, non-empty, finite); returns a float64 CSR matrix or ndarray."""
    if sp.issparse(points):
        matrix = sp.csr_matrix(points, dtype=np.float64)
        values = matrix.data
    else:
        matrix = np.asarray(points, dtype=np.float64)
        values = matrix
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(
            f"{where(cell)}: points must be a non-empty 2-D matrix, got {matrix.shape}"
        )
    n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if n_bad:
        raise ValueError(f"{where(cell)}: points contain {n_bad} NaN or infinite values")
    return matrix


def active_columns(matrix: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """Indices (int64, sorted) of the columns with at least one nonzero entry."""
    if sp.issparse(matrix):
        return np.unique(matrix.indices[matrix.data != 0]).astype(np.int64)
    return np.flatnonzero(np.any(matrix != 0, axis=0)).astype(np.int64)


def identical_row_groups(matrix: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """(n,) int64 ids, equal exactly for identical rows (dense or CSR)."""
    if not sp.issparse(matrix):
        return np.unique(matrix, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    canonical = matrix.copy()
    canonical.sum_duplicates()  # also sorts indices, so equal rows have equal bytes
    canonical.eliminate_zeros()
    ids: dict[bytes, int] = {}
    groups = np.empty(matrix.shape[0], dtype=np.int64)
    for row in range(matrix.shape[0]):
        lo, hi = canonical.indptr[row], canonical.indptr[row + 1]
        key = canonical.indices[lo:hi].tobytes() + b"|" + canonical.data[lo:hi].tobytes()
        groups[row] = ids.setdefault(key, len(ids))
    return groups


def sparse_row_scale(scaled: sp.csr_matrix, centre: np.ndarray) -> np.ndarray:
    """Inverse L2 norms of the implicitly centred rows ``scaled_i − centre`` (0 for a zero row)."""
    own = np.asarray(scaled.multiply(scaled).sum(axis=1)).ravel()
    squared = own - 2.0 * (scaled @ centre) + centre @ centre
    # The expansion cancels to rounding error for a row equal to the mean: call that row zero.
    zero = squared <= 1e-12 * (own + centre @ centre)
    return np.where(zero, 0.0, 1.0 / np.sqrt(np.where(zero, 1.0, squared)))


def preprocess_points(points: Points, cell: str = "") -> PreprocessedPoints:
    """StandardScaler → L2 row normalisation over the active columns of (n, d) dense or CSR points.

    All-zero columns are dropped first (they carry nothing and are most of an SAE's latents);
    constant columns get unit scale from sklearn, so they become 0, never NaN. Raises ValueError,
    naming the cell, for non-finite values or when all points are identical.
    """
    matrix = check_points(points, cell)
    columns = active_columns(matrix)
    if columns.size == 0:
        raise ValueError(f"{where(cell)}: all {matrix.shape[0]} points are identical (all zero)")
    matrix = matrix[:, columns]
    groups = identical_row_groups(matrix)
    n = matrix.shape[0]
    # Decided on exact row equality: a float variance of identical rows need not be exactly 0.
    if np.all(groups == groups[0]):
        raise ValueError(f"{where(cell)}: all {n} points are identical")
    scaler = StandardScaler(with_mean=not sp.issparse(matrix)).fit(matrix)
    if not sp.issparse(matrix):
        final = normalize(scaler.transform(matrix))
        return PreprocessedPoints(final, np.zeros(columns.size), np.ones(n), columns, groups)
    scaled = sp.csr_matrix(scaler.transform(matrix))
    centre = scaler.mean_ / scaler.scale_
    return PreprocessedPoints(scaled, centre, sparse_row_scale(scaled, centre), columns, groups)


def preprocessed_dense(points: PreprocessedPoints) -> np.ndarray:
    """The (n, d_active) preprocessed matrix materialised: for dense input and small oracles."""
    scaled = points.scaled.toarray() if points.is_sparse else points.scaled
    return points.row_scale[:, None] * (scaled - points.centre)


def subset(points: PreprocessedPoints, members: np.ndarray) -> PreprocessedPoints:
    """The preprocessed rows ``members`` (same centre; no re-scaling)."""
    return points._replace(
        scaled=points.scaled[members],
        row_scale=points.row_scale[members],
        row_group=points.row_group[members],
    )


class RowTerms(NamedTuple):
    """Per-row quantities reused by every distance block of a point set."""

    squared_norm: (
        np.ndarray
    )  # (n,) squared L2 norm of each preprocessed row (1, or 0 for a zero row)
    centre_product: np.ndarray  # (n,) ⟨scaled_i, centre⟩


def row_terms(points: PreprocessedPoints) -> RowTerms:
    """Squared norms of the preprocessed rows and their scaled rows' products with the centre."""
    scaled, centre = points.scaled, points.centre
    own = scaled.multiply(scaled).sum(axis=1) if points.is_sparse else np.sum(scaled**2, axis=1)
    centre_product = np.asarray(scaled @ centre).ravel()
    raw = np.asarray(own).ravel() - 2.0 * centre_product + centre @ centre
    return RowTerms(points.row_scale**2 * raw, centre_product)


def squared_distances(
    a: PreprocessedPoints,
    b: PreprocessedPoints,
    terms_a: RowTerms | None = None,
    terms_b: RowTerms | None = None,
) -> np.ndarray:
    """(n_a, n_b) squared Euclidean distances between preprocessed rows of a and b (same centre).

    ⟨u_i, u_j⟩ = s_i s_j (⟨x_i, x_j⟩ − ⟨x_i, c⟩ − ⟨x_j, c⟩ + ⟨c, c⟩): a sparse product plus
    rank-one terms, so the centred rows are never formed. ``terms_*`` may be passed to avoid
    recomputing them.
    """
    terms_a = row_terms(a) if terms_a is None else terms_a
    terms_b = row_terms(b) if terms_b is None else terms_b
    product = a.scaled @ b.scaled.T
    product = product.toarray() if sp.issparse(product) else np.asarray(product)
    offset = a.centre @ a.centre
    inner = product - terms_a.centre_product[:, None] - terms_b.centre_product[None, :] + offset
    inner *= a.row_scale[:, None] * b.row_scale[None, :]
    squared = terms_a.squared_norm[:, None] + terms_b.squared_norm[None, :] - 2.0 * inner
    return np.maximum(squared, 0.0)


def exact_knn(
    points: PreprocessedPoints,
    k: int,
    members: np.ndarray | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Neighbours:
    """Exact k nearest neighbours (self excluded by index) among ``members`` (default: all points).

    Brute force in row blocks of at most ``block_elements`` distances, so memory stays bounded and
    sparse input stays sparse. Indices are positions within ``members``.
    """
    group = points if members is None else subset(points, np.asarray(members))
    m = group.n_points
    if not 1 <= k < m:
        raise ValueError(f"exact_knn: need 1 <= k < number of points, got k={k} for {m} points")
    rows_per_block = max(1, block_elements // m)
    terms = row_terms(group)
    indices = np.empty((m, k), dtype=np.int64)
    distances = np.empty((m, k), dtype=np.float64)
    for start in range(0, m, rows_per_block):
        stop = min(m, start + rows_per_block)
        rows = np.arange(start, stop)
        block_terms = RowTerms(terms.squared_norm[rows], terms.centre_product[rows])
        block = squared_distances(subset(group, rows), group, block_terms, terms)
        block[np.arange(stop - start), rows] = np.inf  # self is not a neighbour
        nearest = np.argpartition(block, k - 1, axis=1)[:, :k]
        near_d = np.take_along_axis(block, nearest, axis=1)
        order = np.argsort(near_d, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(nearest, order, axis=1)
        distances[start:stop] = np.sqrt(np.take_along_axis(near_d, order, axis=1))
    return Neighbours(indices, distances)
