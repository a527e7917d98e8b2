"""Local and global representations (DESIGN.md §6) for one (hook, concept, space, seed) cell.

Pipeline, with the paper's defaults: StandardScaler → L2 row normalisation → UMAP(n_components=50,
n_neighbors=15, min_dist=0.1, euclidean) → HDBSCAN(min_cluster_size=10). A local representation is a
cluster; the global representation is the arrangement of the cluster centroids.

Choices made here, and why:
- HDBSCAN comes from the ``hdbscan`` package, not ``sklearn.cluster.HDBSCAN``: it builds the
  mutual-reachability spanning tree with Borůvka on a space tree (sub-quadratic), where sklearn
  uses Prim's algorithm over all pairs (quadratic). On clustered 50-D points it took 0.3 s against
  1.1 s here for 8 000 points and 22 s against 36 s for 32 000. It is the reference implementation
  (same authors) that umap-learn's clustering guide pairs with UMAP.
- Sparse latents are never densified (see ``structure_points``): UMAP receives their exact k-NN
  graph in the preprocessed space (``precomputed_knn``), computed with sparse products. The data
  matrix UMAP is also given (L2-normalised uncentred rows, still sparse) only serves its spectral
  initialisation, to place disconnected graph components relative to each other.
- UMAP's spectral initialisation needs n_components <= n_points − 2; fewer points clamp
  n_components, recorded as ``n_components_used``.
- ``centroids``, ``mst_weight`` and ``agd`` live in UMAP space (the global arrangement the paper
  reads); TwoNN is computed both there (``avg_intrinsic_dim``) and in the preprocessed original
  space (``avg_intrinsic_dim_original``). ``agd`` needs no clusters, so it is reported even when
  HDBSCAN finds none; the cluster metrics are then NaN and ``reason`` says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from saema_core.structure_metrics import (
    average_geodesic_distance,
    cluster_centroids,
    cluster_ids,
    match_clusters,
    matched_procrustes,
    mst_weight,
    twonn_of_points,
    twonn_of_preprocessed,
)
from saema_core.structure_points import (
    Points,
    PreprocessedPoints,
    exact_knn,
    preprocess_points,
    preprocessed_dense,
    where,
)

SUPPORTED_METRICS = ("euclidean", "cosine")

# UMAP searches neighbours exactly below this many points, through sklearn's pairwise_distances
# with a numba metric called once per pair (~20 s for 1 000 points here). The same exact
# neighbours come from BLAS in ``exact_knn`` in a fraction of a second, so they are passed in.
EXACT_KNN_MAX_POINTS = 4096

# Expected, harmless UMAP warnings: a fixed seed forces one thread (we want reproducibility), and
# a precomputed k-NN graph has no search index (we never transform new points).
_EXPECTED_UMAP_WARNINGS = (
    r"n_jobs value .* overridden",
    r"precomputed_knn\[2\]",
)


@dataclass(frozen=True)
class StructureConfig:
    """Parameters of the structure stage; defaults are the paper's."""

    n_components: int = 50
    """UMAP output dimension (clamped to n_points − 2 for small point sets)."""
    n_neighbors: int = 15
    """UMAP neighbourhood size; a point set must have at least this many points."""
    min_dist: float = 0.1
    """UMAP minimum distance between embedded points, in [0, 1] (UMAP's spread is 1)."""
    metric: str = "euclidean"
    """UMAP input metric: 'euclidean' or 'cosine' (same neighbours after L2 normalisation)."""
    random_state: int = 42
    """Default UMAP seed; the caller runs 42, 43, 44 and reports the spread."""
    n_epochs: int = 200
    """UMAP optimisation epochs: UMAP's own choice above 10 000 points (it takes 500 below). Measured
    on 1 400–2 000 concept tokens, 500 epochs took 2.2× longer for the same clusters (count, TwoNN
    dimension and ARI against the token within the seed spread); the average geodesic distance in
    UMAP space varies between seeds by as much at either setting."""
    min_cluster_size: int = 10
    """HDBSCAN minimum cluster size."""
    agd_k: int = 15
    """Neighbours per point in the graph of the average geodesic distance."""
    agd_max_sources: int = 2048
    """Exact AGD up to this many points; above it, paths from this many sampled sources."""
    twonn_discard_fraction: float = 0.1
    """Fraction of the largest TwoNN ratios discarded before the fit (Facco et al. 2017)."""

    def __post_init__(self) -> None:
        for name in ("n_components", "agd_k", "agd_max_sources", "n_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"StructureConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_neighbors", "min_cluster_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"StructureConfig.{name} must be >= 2, got {getattr(self, name)}")
        if not 0.0 <= self.min_dist <= 1.0:
            raise ValueError(f"StructureConfig.min_dist must be in [0, 1], got {self.min_dist}")
        if self.metric not in SUPPORTED_METRICS:
            raise ValueError(
                f"StructureConfig.metric must be one of {SUPPORTED_METRICS}, got {self.metric!r}"
            )
        if self.random_state < 0:
            raise ValueError(f"StructureConfig.random_state must be >= 0, got {self.random_state}")
        if not 0.0 <= self.twonn_discard_fraction < 1.0:
            raise ValueError(
                f"StructureConfig.twonn_discard_fraction must be in [0, 1), "
                f"got {self.twonn_discard_fraction}"
            )


@dataclass(frozen=True)
class StructureResult:
    """Clusters and metrics of one point set (one hook, concept, space and seed)."""

    cell: str  # caller's label, e.g. "blocks.3.hook_resid_post/months/latent"
    seed: int  # UMAP random_state used
    labels: np.ndarray  # (n,) int64 HDBSCAN labels, −1 = noise
    embedding: np.ndarray  # (n, n_components_used) float32 UMAP embedding
    cluster_ids: np.ndarray  # (C,) sorted cluster ids; rows of the per-cluster arrays below
    centroids: np.ndarray  # (C, n_components_used) cluster means in UMAP space
    cluster_dims: np.ndarray  # (C,) TwoNN dimension per cluster in UMAP space (NaN if undefined)
    cluster_dims_original: np.ndarray  # (C,) the same in the preprocessed original space
    metrics: dict[str, float]  # see METRIC_NAMES
    reason: str  # why any metric is NaN; "" when all are defined


METRIC_NAMES = (
    "n_points",
    "n_active_columns",
    "n_components_used",
    "n_clusters",
    "noise_fraction",
    "avg_intrinsic_dim",
    "avg_intrinsic_dim_original",
    "mst_weight",
    "agd",
    "agd_n_components",
    "agd_n_sources",
)


class SpaceComparison(NamedTuple):
    """Global arrangement of two spaces' clusters over the same tokens, compared."""

    procrustes_disparity: float  # NaN with a reason when fewer than 3 clusters match
    n_matched: int
    matched_resid: np.ndarray  # (m,) cluster ids in the resid result
    matched_latent: np.ndarray  # (m,) matched cluster ids in the latent result
    overlap: np.ndarray  # (m,) tokens shared by each matched pair
    overlap_fraction: float  # matched shared tokens / all tokens
    reason: str


class SeedSpread(NamedTuple):
    """Spread of one metric over seeds (over the seeds where it is defined)."""

    mean: float
    std: float  # sample standard deviation (ddof = 1); NaN with fewer than 2 defined seeds
    min: float
    max: float
    n_defined: int


def check_point_count(n_points: int, cfg: StructureConfig, cell: str = "") -> None:
    """Raise ValueError naming the cell when there are fewer points than UMAP neighbours."""
    if n_points < cfg.n_neighbors:
        raise ValueError(
            f"{where(cell)}: {n_points} points, fewer than n_neighbors={cfg.n_neighbors}; "
            f"a neighbourhood graph cannot be built"
        )


def umap_components(n_points: int, requested: int) -> int:
    """UMAP output dimension usable for n_points (spectral initialisation needs dim <= n − 2)."""
    return max(1, min(requested, n_points - 2))


def umap_knn(
    points: PreprocessedPoints, n_neighbors: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (n, n_neighbors) k-NN indices and distances laid out as UMAP's: self first, at 0."""
    found = exact_knn(points, n_neighbors - 1)
    distances = found.distances if metric == "euclidean" else found.distances**2 / 2.0
    n = points.n_points
    indices = np.hstack([np.arange(n)[:, None], found.indices])
    return indices, np.hstack([np.zeros((n, 1)), distances])


def embed_umap(
    points: PreprocessedPoints, n_components: int, cfg: StructureConfig, seed: int
) -> np.ndarray:
    """(n, n_components) float32 UMAP embedding of preprocessed points.

    Neighbours are exact (``exact_knn``) for sparse input and below UMAP's own exact-search size;
    above it, dense input goes to UMAP's approximate search (pynndescent), as UMAP would do.
    """
    n_neighbors = min(cfg.n_neighbors, points.n_points - 1)
    extra = {}
    if points.is_sparse or points.n_points < EXACT_KNN_MAX_POINTS:
        extra["precomputed_knn"] = umap_knn(points, n_neighbors, cfg.metric)
    if points.is_sparse:
        data = points.scaled.multiply(points.row_scale[:, None]).tocsr()
    else:
        data = preprocessed_dense(points).astype(np.float32)
    import umap  # on first use: it loads numba (~1 s), which a cached re-run never needs

    model = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=cfg.min_dist,
        metric=cfg.metric,
        n_epochs=cfg.n_epochs,
        random_state=seed,
        **extra,
    )
    with warnings.catch_warnings():
        for message in _EXPECTED_UMAP_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        return np.asarray(model.fit_transform(data), dtype=np.float32)


def cluster_hdbscan(embedding: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """(n,) int64 HDBSCAN labels of an (n, d) embedding, −1 = noise."""
    if embedding.shape[0] < min_cluster_size:
        return np.full(embedding.shape[0], -1, dtype=np.int64)  # no cluster can be that large
    import hdbscan

    model = hdbscan.HDBSCAN(min_cluster_size=min_cluster_size)
    return np.asarray(model.fit_predict(embedding), dtype=np.int64)


def mean_cluster_dim(dims: np.ndarray, space: str) -> tuple[float, str]:
    """Mean of the defined per-cluster dimensions, or NaN and the reason none is defined."""
    defined = dims[np.isfinite(dims)]
    if defined.size:
        return float(defined.mean()), ""
    if dims.size == 0:
        return float("nan"), ""  # no cluster at all: said once by the caller
    return float("nan"), f"no cluster has a defined TwoNN dimension in {space}"


def summarise_structure(
    points: PreprocessedPoints,
    embedding: np.ndarray,
    labels: np.ndarray,
    cfg: StructureConfig,
    cell: str,
    seed: int,
) -> StructureResult:
    """Metrics of one clustered point set (see the module docstring for the spaces used)."""
    ids = cluster_ids(labels)
    members = [np.flatnonzero(labels == cid) for cid in ids]
    discard = cfg.twonn_discard_fraction
    dims = np.array([twonn_of_points(embedding[m], discard) for m in members], dtype=np.float64)
    dims_original = np.array(
        [twonn_of_preprocessed(points, m, discard) for m in members], dtype=np.float64
    )
    centroids = cluster_centroids(embedding, labels, ids)
    geodesic = average_geodesic_distance(embedding, cfg.agd_k, cfg.agd_max_sources, seed)
    avg_dim, why_dim = mean_cluster_dim(dims, "UMAP space")
    avg_dim_original, why_original = mean_cluster_dim(dims_original, "the original space")
    no_cluster = (
        ""
        if ids.size
        else (
            f"HDBSCAN found no cluster: all {labels.size} points are noise "
            f"(min_cluster_size={cfg.min_cluster_size})"
        )
    )
    metrics = {
        "n_points": float(labels.size),
        "n_active_columns": float(points.active_columns.size),
        "n_components_used": float(embedding.shape[1]),
        "n_clusters": float(ids.size),
        "noise_fraction": float(np.mean(labels < 0)),
        "avg_intrinsic_dim": avg_dim,
        "avg_intrinsic_dim_original": avg_dim_original,
        "mst_weight": mst_weight(centroids) if ids.size else float("nan"),
        "agd": geodesic.agd,
        "agd_n_components": float(geodesic.n_components),
        "agd_n_sources": float(geodesic.n_sources),
    }
    reason = "; ".join(r for r in (no_cluster, why_dim, why_original) if r)
    return StructureResult(
        cell, seed, labels, embedding, ids, centroids, dims, dims_original, metrics, reason
    )


def analyse_structure(
    points: Points, cfg: StructureConfig | None = None, cell: str = "", seed: int | None = None
) -> StructureResult:
    """Preprocess, embed (UMAP), cluster (HDBSCAN) and measure an (n, d) dense or CSR point set.

    ``seed`` overrides ``cfg.random_state``. Raises ValueError naming ``cell`` for NaN/inf values,
    fewer points than ``n_neighbors``, or all points identical. HDBSCAN finding no cluster is a
    result (n_clusters 0, NaN cluster metrics, ``reason``), not an error.
    """
    cfg = StructureConfig() if cfg is None else cfg
    seed = cfg.random_state if seed is None else seed
    prepared = preprocess_points(points, cell)
    check_point_count(prepared.n_points, cfg, cell)
    n_components = umap_components(prepared.n_points, cfg.n_components)
    embedding = embed_umap(prepared, n_components, cfg, seed)
    labels = cluster_hdbscan(embedding, cfg.min_cluster_size)
    return summarise_structure(prepared, embedding, labels, cfg, cell, seed)


def umap_2d(
    points: Points, cfg: StructureConfig | None = None, cell: str = "", seed: int | None = None
) -> np.ndarray:
    """(n, 2) float32 UMAP embedding for scatter plots, with the same preprocessing and checks."""
    cfg = StructureConfig() if cfg is None else cfg
    prepared = preprocess_points(points, cell)
    check_point_count(prepared.n_points, cfg, cell)
    return embed_umap(prepared, 2, cfg, cfg.random_state if seed is None else seed)


def compare_spaces(resid: StructureResult, latent: StructureResult) -> SpaceComparison:
    """Procrustes disparity between the resid and latent centroid arrangements over the same tokens.

    Clusters are matched by shared tokens (Hungarian on the contingency table), never by label id.
    Both results' centroids live in UMAP spaces; the narrower is zero-padded to a common width.
    """
    if resid.labels.shape != latent.labels.shape:
        raise ValueError(
            f"compare_spaces: {resid.cell!r} has {resid.labels.size} tokens but "
            f"{latent.cell!r} has {latent.labels.size}; both must label the same tokens"
        )
    matching = match_clusters(resid.labels, latent.labels)
    a = resid.centroids[np.searchsorted(resid.cluster_ids, matching.labels_a)]
    b = latent.centroids[np.searchsorted(latent.cluster_ids, matching.labels_b)]
    disparity, reason = matched_procrustes(a, b)
    return SpaceComparison(
        disparity,
        int(matching.labels_a.size),
        matching.labels_a,
        matching.labels_b,
        matching.overlap,
        float(matching.overlap.sum() / max(1, resid.labels.size)),
        reason,
    )


def seed_spread(results: Sequence[StructureResult]) -> dict[str, SeedSpread]:
    """Per metric, mean/std/min/max over the results of several seeds (NaN seeds left out)."""
    spread = {}
    for name in METRIC_NAMES:
        values = np.array([r.metrics[name] for r in results], dtype=np.float64)
        defined = values[np.isfinite(values)]
        if defined.size == 0:
            spread[name] = SeedSpread(float("nan"), float("nan"), float("nan"), float("nan"), 0)
            continue
        std = float(defined.std(ddof=1)) if defined.size > 1 else float("nan")
        spread[name] = SeedSpread(
            float(defined.mean()),
            std,
            float(defined.min()),
            float(defined.max()),
            int(defined.size),
        )
    return spread
