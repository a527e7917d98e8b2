"""Metrics of local and global representations (DESIGN.md §6), on bare arrays and labels.

- Intrinsic dimension: TwoNN (Facco et al. 2017), the linear-fit variant of the paper: the ratios
  μ = r2/r1 follow a Pareto(1, d) law, so −log(1 − F(μ)) = d·log μ; the slope through the origin is
  fitted after discarding the 10 % largest μ (their heuristic against outliers), with the empirical
  F(μ_(i)) = i/N. This is also scikit-dimension's default, against which the tests check it.
- Global arrangement: minimum spanning tree weight over cluster centroids.
- Average geodesic distance: mean shortest path on the union-symmetrised k-NN graph.
- Cross-space comparison: clusters matched by token overlap (Hungarian), then Procrustes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components, minimum_spanning_tree, shortest_path
from scipy.spatial import cKDTree, procrustes
from scipy.spatial.distance import pdist, squareform

from saema_core.structure_points import PreprocessedPoints, exact_knn

# Elements of one (sources × points) block of shortest-path lengths: 2**22 float64 = 32 MiB.
GEODESIC_BLOCK_ELEMENTS = 2**22


class GeodesicSummary(NamedTuple):
    """Average geodesic distance on a k-NN graph, and how it was obtained."""

    agd: float  # mean shortest-path length over ordered pairs i != j joined by a path
    n_components: int  # connected components of the symmetrised k-NN graph
    n_sources: int  # source points whose shortest paths were averaged (n when exact)
    n_pairs: int  # finite (source, target) pairs averaged


class ClusterMatching(NamedTuple):
    """Clusters of labelling a matched to clusters of labelling b by shared tokens."""

    labels_a: np.ndarray  # (m,) cluster ids of a, matched pairwise with labels_b
    labels_b: np.ndarray  # (m,) cluster ids of b
    overlap: np.ndarray  # (m,) tokens shared by each matched pair (all > 0)


def twonn_dimension(r1: np.ndarray, r2: np.ndarray, discard_fraction: float = 0.1) -> float:
    """TwoNN intrinsic dimension from first/second nearest-neighbour distances, shapes (N,).

    Linear fit through the origin of −log(1 − i/N) against log μ_(i), i = 1..⌊N(1 − discard)⌋.
    Needs r2 >= r1 > 0 (de-duplicate the points first). Returns NaN when every kept μ equals 1
    (each point's two neighbours equidistant, as on a lattice): the ratios carry no information.
    """
    r1, r2 = np.asarray(r1, dtype=np.float64), np.asarray(r2, dtype=np.float64)
    if r1.shape != r2.shape or r1.ndim != 1:
        raise ValueError(
            f"twonn_dimension: r1, r2 must be 1-D of equal shape, got {r1.shape}, {r2.shape}"
        )
    if np.any(r1 <= 0) or np.any(r2 < r1):
        raise ValueError("twonn_dimension: need 0 < r1 <= r2 (remove duplicate points first)")
    n = r1.size
    n_keep = int(n * (1.0 - discard_fraction))
    if n_keep < 2:
        raise ValueError(f"twonn_dimension: {n} points keep {n_keep} ratios; need at least 2")
    log_mu = np.log(np.sort(r2 / r1)[:n_keep])
    target = -np.log1p(-np.arange(1, n_keep + 1) / n)
    denominator = log_mu @ log_mu
    return float(log_mu @ target / denominator) if denominator > 0 else float("nan")


def first_occurrences(values: np.ndarray) -> np.ndarray:
    """Sorted positions of the first occurrence of each distinct row (or value) of ``values``."""
    return np.sort(np.unique(values, axis=0, return_index=True)[1])


def nearest_neighbours(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) Euclidean distances and indices of each point's k nearest others, nearest first.

    A k-d tree: fast on UMAP embeddings, which are intrinsically low-dimensional (and, unlike
    sklearn's threaded brute force, cheap for the many small per-cluster queries). Self is removed
    by index, so coincident points still find each other at distance 0.
    """
    n = points.shape[0]
    distances, indices = cKDTree(points).query(points, k=k + 1)
    others = indices != np.arange(n)[:, None]
    others[others.all(axis=1), -1] = False  # self lost among > k coincident points: drop the last
    return distances[others].reshape(n, k), indices[others].reshape(n, k)


def twonn_of_points(points: np.ndarray, discard_fraction: float = 0.1) -> float:
    """TwoNN dimension of dense (n, d) points after exact de-duplication; NaN if < 3 distinct."""
    distinct = points[first_occurrences(points)]
    if distinct.shape[0] < 3:
        return float("nan")
    distances, _ = nearest_neighbours(distinct, 2)
    return twonn_dimension(distances[:, 0], distances[:, 1], discard_fraction)


def twonn_of_preprocessed(
    points: PreprocessedPoints, members: np.ndarray, discard_fraction: float = 0.1
) -> float:
    """TwoNN dimension of preprocessed rows ``members`` (dense or sparse, exact neighbours).

    Identical input rows are kept once (their r1 would be 0); NaN if fewer than 3 distinct rows.
    """
    distinct = np.asarray(members)[first_occurrences(points.row_group[members])]
    if distinct.size < 3:
        return float("nan")
    distances = exact_knn(points, 2, distinct).distances
    return twonn_dimension(distances[:, 0], distances[:, 1], discard_fraction)


def cluster_ids(labels: np.ndarray) -> np.ndarray:
    """Sorted distinct cluster ids of a labelling (noise, −1, excluded)."""
    labels = np.asarray(labels)
    return np.unique(labels[labels >= 0])


def cluster_centroids(points: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(len(ids), d) mean of the (n, d) points of each cluster id, in the order of ``ids``."""
    if len(ids) == 0:
        return np.empty((0, points.shape[1]))
    return np.stack([points[labels == cid].mean(axis=0) for cid in ids])


def mst_weight(centroids: np.ndarray) -> float:
    """Total Euclidean length of the minimum spanning tree over (C, d) centroids (0 for C = 1).

    scipy reads zero entries of a dense graph as missing edges, so coincident centroids would be
    left unjoined; they are merged first, which leaves the weight unchanged (they join at cost 0).
    """
    distinct = centroids[first_occurrences(np.asarray(centroids))]
    if distinct.shape[0] < 2:
        return 0.0
    return float(minimum_spanning_tree(squareform(pdist(distinct))).sum())


def knn_graph(points: np.ndarray, k: int) -> sp.csr_matrix:
    """Directed k-NN graph of (n, d) points, self excluded, weights = Euclidean distances.

    Zero distances (coincident points) stay explicit entries, which scipy's csgraph treats as edges.
    """
    n, k = points.shape[0], min(k, points.shape[0] - 1)
    distances, indices = nearest_neighbours(points, k)
    indptr = np.arange(0, n * k + 1, k)
    return sp.csr_matrix((distances.ravel(), indices.ravel(), indptr), shape=(n, n))


def average_geodesic_distance(
    points: np.ndarray, k: int = 15, max_sources: int | None = None, seed: int = 0
) -> GeodesicSummary:
    """Mean shortest-path length between points on the symmetrised k-NN graph of (n, d) points.

    The graph is the union of k-NN edges (an edge if either point is among the other's k nearest).
    Pairs in different components have no path: they are left out and the component count is kept.
    With ``max_sources`` < n, paths from that many uniformly drawn sources (to all targets) are
    averaged (unbiased for a connected graph, a ratio estimate otherwise), which keeps the cost at
    O(max_sources · n log n) for large n.
    """
    n = points.shape[0]
    if n < 2:
        raise ValueError(f"average_geodesic_distance: need at least 2 points, got {n}")
    graph = knn_graph(points, k)
    n_components = int(connected_components(graph, directed=False)[0])
    sources = np.arange(n)
    if max_sources is not None and max_sources < n:
        sources = np.sort(np.random.default_rng(seed).choice(n, size=max_sources, replace=False))
    total, count = 0.0, 0
    step = max(1, GEODESIC_BLOCK_ELEMENTS // n)
    for start in range(0, sources.size, step):
        block = sources[start : start + step]
        lengths = shortest_path(graph, method="D", directed=False, indices=block)
        lengths[np.arange(block.size), block] = np.inf  # a point's path to itself is not a pair
        finite = np.isfinite(lengths)
        total += float(lengths[finite].sum())
        count += int(finite.sum())
    agd = total / count if count else float("nan")
    return GeodesicSummary(agd, n_components, int(sources.size), count)


def contingency_table(labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """(C_a, C_b) counts of tokens in cluster i of a and cluster j of b; noise in either is skipped.

    Rows and columns follow ``cluster_ids`` of each labelling.
    """
    labels_a, labels_b = np.asarray(labels_a), np.asarray(labels_b)
    if labels_a.shape != labels_b.shape or labels_a.ndim != 1:
        raise ValueError(
            f"contingency_table: labellings must be 1-D over the same tokens, "
            f"got shapes {labels_a.shape} and {labels_b.shape}"
        )
    ids_a, ids_b = cluster_ids(labels_a), cluster_ids(labels_b)
    both = (labels_a >= 0) & (labels_b >= 0)
    table = np.zeros((ids_a.size, ids_b.size), dtype=np.int64)
    rows = np.searchsorted(ids_a, labels_a[both])
    cols = np.searchsorted(ids_b, labels_b[both])
    np.add.at(table, (rows, cols), 1)
    return table


def match_clusters(labels_a: np.ndarray, labels_b: np.ndarray) -> ClusterMatching:
    """One-to-one matching of clusters maximising shared tokens (Hungarian on the contingency).

    Depends on which tokens share clusters, never on the label ids themselves; pairs sharing no
    token are dropped. Pairs are ordered by the cluster id of a.
    """
    table = contingency_table(labels_a, labels_b)
    if table.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return ClusterMatching(empty, empty, empty)
    rows, cols = linear_sum_assignment(table, maximize=True)
    keep = table[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    ids_a, ids_b = cluster_ids(labels_a), cluster_ids(labels_b)
    return ClusterMatching(ids_a[rows], ids_b[cols], table[rows, cols])


def pad_columns(matrix: np.ndarray, width: int) -> np.ndarray:
    """(n, width) copy of an (n, d <= width) matrix with zero columns appended."""
    return np.pad(matrix, ((0, 0), (0, width - matrix.shape[1])))


def matched_procrustes(centroids_a: np.ndarray, centroids_b: np.ndarray) -> tuple[float, str]:
    """Procrustes disparity between two (m, d_a), (m, d_b) matched centroid configurations.

    Returns (disparity, reason): NaN and a reason when fewer than 3 pairs are matched (two points
    always match exactly after rotation and scaling) or a configuration has all centroids equal.
    The narrower configuration is zero-padded (padding changes no distance).
    """
    m = centroids_a.shape[0]
    if m != centroids_b.shape[0]:
        raise ValueError(f"matched_procrustes: {m} vs {centroids_b.shape[0]} centroids")
    if m < 3:
        return float("nan"), f"only {m} matched clusters; Procrustes needs at least 3"
    for name, config in (("a", centroids_a), ("b", centroids_b)):
        if np.all(config == config[0]):
            return float("nan"), f"all matched centroids of configuration {name} coincide"
    width = max(centroids_a.shape[1], centroids_b.shape[1])
    _, _, disparity = procrustes(pad_columns(centroids_a, width), pad_columns(centroids_b, width))
    return float(disparity), ""


def identity_agreement(labels: np.ndarray, identity: np.ndarray) -> float:
    """Adjusted Rand index between the clusters and a token identity (the item, the word, the
    sentence), over the clustered tokens (HDBSCAN noise left out).

    1: the clusters are exactly the identity classes ("clusters are just the words"); ≈ 0: no more
    agreement than chance. NaN with fewer than two clusters or two clustered tokens.
    """
    from sklearn.metrics import adjusted_rand_score

    labels, identity = np.asarray(labels), np.asarray(identity)
    if labels.shape != identity.shape or labels.ndim != 1:
        raise ValueError(f"identity_agreement: labels {labels.shape} and identity {identity.shape} "
                         f"must be 1-D over the same tokens")
    clustered = labels >= 0
    if np.unique(labels[clustered]).size < 2 or clustered.sum() < 2:
        return float("nan")
    return float(adjusted_rand_score(identity[clustered], labels[clustered]))
