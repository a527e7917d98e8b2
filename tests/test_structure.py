"""Tests of the structure stage (DESIGN.md §6): planted clusters, hand-computed metrics, oracles.

UMAP JIT-compiles on its first call (numba), so only a few small tests run the full pipeline; the
metrics are tested directly on synthetic points and labels.
"""

from __future__ import annotations

import dataclasses
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import special_ortho_group
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler, normalize

from saema_core import structure
from saema_core.structure import (
    StructureConfig,
    StructureResult,
    analyse_structure,
    compare_spaces,
    seed_spread,
    summarise_structure,
    umap_2d,
    umap_components,
)
from saema_core.structure_metrics import (
    average_geodesic_distance,
    contingency_table,
    match_clusters,
    matched_procrustes,
    mst_weight,
    twonn_dimension,
    twonn_of_points,
    twonn_of_preprocessed,
)
from saema_core.structure_points import (
    exact_knn,
    identical_row_groups,
    preprocess_points,
    preprocessed_dense,
)

FAST = StructureConfig(n_components=10)  # UMAP cost grows with the output dimension


# ---------------------------------------------------------------- planted data


def gaussian_subspace_clusters(
    rng: np.random.Generator,
    dims: tuple[int, ...],
    n: int,
    ambient: int = 20,
    separation: float = 10.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(len(dims)·n, ambient) Gaussian blobs, blob c on a random dims[c]-dim subspace; labels."""
    blobs = []
    for d in dims:
        basis = np.linalg.qr(rng.normal(size=(ambient, d)))[0]
        blobs.append(rng.normal(size=ambient) * separation + rng.normal(size=(n, d)) @ basis.T)
    return np.vstack(blobs), np.repeat(np.arange(len(dims)), n)


def sparse_latent_clusters(
    rng: np.random.Generator, n_clusters: int, n: int, n_latents: int, pool: int, active: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """CSR latents (n_clusters·n, n_latents): a cluster's tokens fire `active` of its pool."""
    rows, cols, values = [], [], []
    for c in range(n_clusters):
        latents = rng.choice(n_latents, pool, replace=False)
        for i in range(n):
            rows += [c * n + i] * active
            cols += list(rng.choice(latents, active, replace=False))
            values += list(rng.uniform(0.5, 2.0, active))
    shape = (n_clusters * n, n_latents)
    return sp.csr_matrix((values, (rows, cols)), shape=shape), np.repeat(np.arange(n_clusters), n)


def uniform_ball(rng: np.random.Generator, n: int, d: int, ambient: int) -> np.ndarray:
    """n points uniform in the unit d-ball, rotated into R^ambient."""
    directions = rng.normal(size=(n, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    ball = directions * rng.uniform(size=(n, 1)) ** (1.0 / d)
    return ball @ np.linalg.qr(rng.normal(size=(ambient, d)))[0].T


def make_result(
    labels: np.ndarray, centroids: dict[int, np.ndarray], cell: str = ""
) -> StructureResult:
    """A StructureResult with given labels and centroids (by cluster id), for comparison tests."""
    ids = np.array(sorted(centroids), dtype=np.int64)
    stacked = np.stack([centroids[i] for i in ids])
    nan = np.full(ids.size, np.nan)
    embedding = np.zeros((labels.size, stacked.shape[1]), dtype=np.float32)
    return StructureResult(cell, 42, labels, embedding, ids, stacked, nan, nan, {}, "")


# ---------------------------------------------------------------- config


def test_config_defaults_are_the_papers() -> None:
    cfg = StructureConfig()
    assert (cfg.n_components, cfg.n_neighbors, cfg.min_dist, cfg.metric) == (
        50,
        15,
        0.1,
        "euclidean",
    )
    assert (cfg.random_state, cfg.min_cluster_size, cfg.agd_k) == (42, 10, 15)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_components", 0),
        ("n_neighbors", 1),
        ("min_dist", -0.1),
        ("metric", "manhattan"),
        ("random_state", -1),
        ("min_cluster_size", 1),
        ("agd_k", 0),
        ("twonn_discard_fraction", 1.0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(StructureConfig(), **{field: value})


# ---------------------------------------------------------------- preprocessing


def test_dense_preprocessing_is_standard_scaler_then_l2_and_drops_zero_columns() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6))
    x[:, 2] = 0.0  # all-zero column: dropped
    x[:, 4] = 3.0  # constant column: kept, becomes 0, never NaN
    prepared = preprocess_points(x)
    np.testing.assert_array_equal(prepared.active_columns, [0, 1, 3, 4, 5])
    expected = normalize(StandardScaler().fit_transform(x[:, [0, 1, 3, 4, 5]]))
    np.testing.assert_allclose(preprocessed_dense(prepared), expected, atol=1e-12)
    assert np.all(np.isfinite(preprocessed_dense(prepared)))


def test_sparse_preprocessing_matches_the_dense_oracle_without_centring_rows() -> None:
    rng = np.random.default_rng(1)
    latents, _ = sparse_latent_clusters(rng, n_clusters=3, n=20, n_latents=400, pool=15, active=5)
    prepared = preprocess_points(latents)
    assert prepared.is_sparse
    columns = np.flatnonzero(latents.getnnz(axis=0))
    np.testing.assert_array_equal(prepared.active_columns, columns)
    expected = normalize(StandardScaler().fit_transform(latents.toarray()[:, columns]))
    np.testing.assert_allclose(preprocessed_dense(prepared), expected, atol=1e-12)


@pytest.mark.parametrize("sparse_input", [False, True])
def test_exact_knn_matches_sklearn_on_the_dense_oracle(sparse_input: bool) -> None:
    rng = np.random.default_rng(2)
    latents, _ = sparse_latent_clusters(rng, n_clusters=3, n=30, n_latents=300, pool=20, active=6)
    points = latents if sparse_input else latents.toarray()
    prepared = preprocess_points(points)
    found = exact_knn(prepared, 4, block_elements=500)  # several blocks
    distances, indices = (
        NearestNeighbors(n_neighbors=4).fit(preprocessed_dense(prepared)).kneighbors()
    )
    np.testing.assert_allclose(found.distances, distances, atol=1e-9)
    np.testing.assert_array_equal(found.indices, indices)


def test_identical_rows_share_a_group_dense_and_sparse() -> None:
    x = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 1e-9]])
    for matrix in (x, sp.csr_matrix(x)):
        groups = identical_row_groups(matrix)
        assert groups[0] == groups[2] and len(set(groups.tolist())) == 3


def test_sparse_latents_are_never_densified_to_all_latents() -> None:
    rng = np.random.default_rng(3)
    n, n_latents, active = 1500, 16384, 32
    cols = np.concatenate([rng.choice(n_latents, active, replace=False) for _ in range(n)])
    latents = sp.csr_matrix(
        (rng.uniform(0.1, 1.0, n * active), cols, np.arange(0, n * active + 1, active)),
        shape=(n, n_latents),
    )
    tracemalloc.start()
    prepared = preprocess_points(latents)
    exact_knn(prepared, 14, block_elements=2**18)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert prepared.active_columns.size > 0.9 * n_latents  # nearly every latent is active somewhere
    dense_bytes = n * prepared.active_columns.size * 8
    assert peak < dense_bytes / 10, (
        f"peak {peak / 2**20:.1f} MiB vs dense {dense_bytes / 2**20:.1f} MiB"
    )


@pytest.mark.parametrize("sparse_input", [False, True])
def test_nan_input_is_rejected_naming_the_cell(sparse_input: bool) -> None:
    x = np.ones((20, 4))
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="hook3/months/resid.*NaN"):
        analyse_structure(sp.csr_matrix(x) if sparse_input else x, cell="hook3/months/resid")


@pytest.mark.parametrize(
    "points",
    [np.tile([0.1, 2.0, 0.0], (30, 1)), np.full((30, 3), 0.3), sp.csr_matrix((30, 500))],
)
def test_identical_points_are_rejected_naming_the_cell(points: object) -> None:
    with pytest.raises(ValueError, match="'c7'.*identical"):
        analyse_structure(points, cell="c7")


def test_fewer_points_than_neighbours_is_rejected_naming_the_cell() -> None:
    x = np.random.default_rng(4).normal(size=(14, 5))
    with pytest.raises(ValueError, match="'tiny'.*14 points.*n_neighbors=15"):
        analyse_structure(x, cell="tiny")


def test_umap_components_are_clamped_for_small_point_sets() -> None:
    assert umap_components(1000, 50) == 50
    assert umap_components(20, 50) == 18


# ---------------------------------------------------------------- TwoNN


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_twonn_recovers_the_dimension_of_a_uniform_ball(d: int) -> None:
    points = uniform_ball(np.random.default_rng(10 + d), 2000, d, ambient=12)
    assert twonn_of_points(points) == pytest.approx(d, rel=0.15)


def test_twonn_matches_scikit_dimension() -> None:
    skdim = pytest.importorskip("skdim")
    points = uniform_ball(np.random.default_rng(5), 600, 4, ambient=9)
    distances, _ = NearestNeighbors(n_neighbors=2).fit(points).kneighbors()
    reference = skdim.id.TwoNN(dist=True).fit(distances).dimension_
    assert twonn_dimension(distances[:, 0], distances[:, 1]) == pytest.approx(reference, rel=1e-9)


def test_twonn_ignores_duplicate_points() -> None:
    points = uniform_ball(np.random.default_rng(6), 300, 3, ambient=5)
    assert twonn_of_points(np.vstack([points, points[:100]])) == twonn_of_points(points)


def test_twonn_degenerate_inputs() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        twonn_dimension(np.array([0.0, 1.0, 1.0]), np.array([1.0, 2.0, 2.0]))
    assert np.isnan(twonn_dimension(np.ones(50), np.ones(50)))  # lattice: ratios carry nothing
    assert np.isnan(twonn_of_points(np.zeros((10, 3))))  # one distinct point


@pytest.mark.parametrize("sparse_input", [False, True])
def test_twonn_in_original_space_equals_the_dense_oracle(sparse_input: bool) -> None:
    rng = np.random.default_rng(7)
    latents, _ = sparse_latent_clusters(rng, n_clusters=2, n=60, n_latents=200, pool=30, active=8)
    prepared = preprocess_points(latents if sparse_input else latents.toarray())
    members = np.arange(60)
    oracle = twonn_of_points(preprocessed_dense(prepared)[members])
    assert twonn_of_preprocessed(prepared, members) == pytest.approx(oracle, rel=1e-9)


# ---------------------------------------------------------------- MST and AGD


def naive_mst_weight(points: np.ndarray) -> float:
    """Prim's algorithm on the full distance matrix (zero distances are ordinary edges here)."""
    distances = np.linalg.norm(points[:, None] - points[None, :], axis=2)
    in_tree, best, total = {0}, distances[0].copy(), 0.0
    while len(in_tree) < len(points):
        best[list(in_tree)] = np.inf
        nxt = int(np.argmin(best))
        total += best[nxt]
        in_tree.add(nxt)
        best = np.minimum(best, distances[nxt])
    return total


def test_mst_weight_by_hand() -> None:
    assert mst_weight(np.array([[0.0], [1.0], [3.0], [6.0]])) == pytest.approx(6.0)
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert mst_weight(square) == pytest.approx(3.0)
    assert mst_weight(np.vstack([square, square[:2]])) == pytest.approx(3.0)  # duplicates join free
    assert mst_weight(square[:1]) == 0.0


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 3), st.integers(0, 10**6))
def test_mst_weight_matches_naive_prim(n: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    points = rng.integers(0, 3, size=(n, d)).astype(float)  # small grid: many duplicates and ties
    assert mst_weight(points) == pytest.approx(naive_mst_weight(points))


def test_agd_by_hand_on_a_line_a_square_and_two_components() -> None:
    line = np.array([[0.0], [1.0], [3.0], [6.0]])
    # k=1 edges 0-1, 1-3, 3-6: paths follow the line; pair lengths 1,3,6,2,5,3.
    assert average_geodesic_distance(line, k=1).agd == pytest.approx(20 / 6)
    square = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # k=2: the four sides; opposite corners are 2 apart along the sides, not sqrt(2).
    assert average_geodesic_distance(square, k=2).agd == pytest.approx(8 / 6)
    pairs = average_geodesic_distance(np.array([[0.0], [1.0], [100.0], [101.0]]), k=1)
    assert (pairs.agd, pairs.n_components, pairs.n_pairs) == (pytest.approx(1.0), 2, 4)


def test_agd_keeps_zero_length_edges_between_coincident_points() -> None:
    summary = average_geodesic_distance(np.array([[0.0], [0.0], [1.0]]), k=1)
    assert (summary.agd, summary.n_components) == (pytest.approx(2 / 3), 1)


def test_agd_sampled_sources_estimate_the_exact_mean() -> None:
    points = np.random.default_rng(8).uniform(size=(600, 2))
    exact = average_geodesic_distance(points, k=8)
    sampled = average_geodesic_distance(points, k=8, max_sources=150, seed=1)
    assert (exact.n_sources, sampled.n_sources) == (600, 150)
    assert sampled.agd == pytest.approx(exact.agd, rel=0.05)


# ---------------------------------------------------------------- matching and Procrustes


def test_contingency_and_matching_by_hand() -> None:
    a = np.array([0, 0, 0, 1, 1, 2, 2, -1])
    b = np.array([5, 5, 9, 9, 9, -1, 7, 7])
    np.testing.assert_array_equal(contingency_table(a, b), [[2, 0, 1], [0, 0, 2], [0, 1, 0]])
    matching = match_clusters(a, b)
    np.testing.assert_array_equal(matching.labels_a, [0, 1, 2])
    np.testing.assert_array_equal(matching.labels_b, [5, 9, 7])
    np.testing.assert_array_equal(matching.overlap, [2, 2, 1])


@st.composite
def planted_labellings(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Labelling a, and b = a relabelled with some tokens turned to noise (a unique optimum)."""
    k = draw(st.integers(3, 6))
    sizes = draw(st.lists(st.integers(4, 12), min_size=k, max_size=k))
    a = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)] + [np.full(3, -1)])
    new_ids = draw(st.lists(st.integers(0, 40), min_size=k, max_size=k, unique=True))
    relabel = dict(enumerate(new_ids))
    noise = draw(st.lists(st.booleans(), min_size=a.size, max_size=a.size))
    b = np.array([relabel[c] if c >= 0 and not z else -1 for c, z in zip(a, noise, strict=True)])
    b[np.flatnonzero(a >= 0)[[0, sizes[0] + 1, sizes[0] + sizes[1] + 2]]] = -1  # not all noise-free
    for c in range(k):  # every cluster keeps one token in both labellings
        b[np.flatnonzero(a == c)[-1]] = relabel[c]
    return a, b, relabel


@settings(max_examples=25, deadline=None)
@given(planted_labellings(), st.randoms(use_true_random=False))
def test_matching_and_disparity_do_not_depend_on_label_ids(
    labelling: tuple[np.ndarray, np.ndarray, dict[int, int]], random: object
) -> None:
    a, b, relabel = labelling
    matching = match_clusters(a, b)
    np.testing.assert_array_equal(matching.labels_b, [relabel[c] for c in matching.labels_a])
    # Relabel b again by an arbitrary permutation of its ids: matches follow, disparity unchanged.
    ids = sorted(set(b[b >= 0].tolist()))
    shuffled = random.sample(range(100, 200), len(ids))
    permute = dict(zip(ids, shuffled, strict=True))
    b2 = np.array([permute[c] if c >= 0 else -1 for c in b])
    again = match_clusters(a, b2)
    np.testing.assert_array_equal(again.labels_b, [permute[c] for c in matching.labels_b])
    np.testing.assert_array_equal(again.overlap, matching.overlap)
    rng = np.random.default_rng(len(a))
    resid = make_result(a, {c: rng.normal(size=4) for c in range(len(relabel))})
    latent_centroids = {c: rng.normal(size=4) for c in ids}
    latent = make_result(b, latent_centroids)
    latent2 = make_result(b2, {permute[c]: v for c, v in latent_centroids.items()})
    first, second = compare_spaces(resid, latent), compare_spaces(resid, latent2)
    assert first.procrustes_disparity == pytest.approx(second.procrustes_disparity, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(-1, 4), min_size=5, max_size=40),
    st.lists(st.integers(-1, 4), min_size=5, max_size=40),
    st.permutations(range(5)),
)
def test_matched_overlap_total_is_invariant_to_relabelling(
    a: list[int], b: list[int], perm: list[int]
) -> None:
    n = min(len(a), len(b))
    la, lb = np.array(a[:n]), np.array(b[:n])
    lb2 = np.where(lb >= 0, np.array(perm)[np.maximum(lb, 0)] * 3 + 1, -1)
    assert match_clusters(la, lb).overlap.sum() == match_clusters(la, lb2).overlap.sum()


def test_procrustes_disparity_vanishes_for_a_similar_copy() -> None:
    rng = np.random.default_rng(9)
    config = rng.normal(size=(6, 5))
    rotated = 2.5 * config @ special_ortho_group.rvs(5, random_state=1) + rng.normal(size=5)
    disparity, reason = matched_procrustes(config, rotated)
    assert disparity == pytest.approx(0.0, abs=1e-12) and reason == ""
    other, _ = matched_procrustes(config, rng.normal(size=(6, 5)))
    assert other > 0.1
    padded, _ = matched_procrustes(config[:, :3], 3.0 * config[:, :3] @ special_ortho_group.rvs(3))
    assert padded == pytest.approx(0.0, abs=1e-12)


def test_procrustes_needs_three_matched_clusters() -> None:
    disparity, reason = matched_procrustes(np.eye(2), np.eye(2))
    assert np.isnan(disparity) and "at least 3" in reason


def test_compare_spaces_matches_by_tokens_not_ids() -> None:
    rng = np.random.default_rng(11)
    resid_labels = np.repeat([0, 1, 2, 3], 10)
    latent_labels = np.repeat([3, 0, 1, 2], 10)  # same clusters, shifted ids
    centroids = rng.normal(size=(4, 3))
    moved = 0.5 * centroids @ special_ortho_group.rvs(3, random_state=2) + 1.0
    resid = make_result(resid_labels, {c: centroids[c] for c in range(4)}, "resid")
    latent = make_result(latent_labels, {(c + 3) % 4: moved[c] for c in range(4)}, "latent")
    comparison = compare_spaces(resid, latent)
    np.testing.assert_array_equal(comparison.matched_latent, [3, 0, 1, 2])
    assert comparison.procrustes_disparity == pytest.approx(0.0, abs=1e-12)
    assert comparison.overlap_fraction == 1.0
    with pytest.raises(ValueError, match="'resid'.*40 tokens.*'short'"):
        compare_spaces(resid, make_result(latent_labels[:30], {0: centroids[0]}, "short"))


# ---------------------------------------------------------------- results


def test_no_cluster_gives_zero_clusters_nan_metrics_and_a_reason() -> None:
    rng = np.random.default_rng(12)
    points = rng.normal(size=(40, 6))
    embedding = rng.normal(size=(40, 3)).astype(np.float32)
    labels = np.full(40, -1)
    result = summarise_structure(preprocess_points(points), embedding, labels, FAST, "empty", 42)
    assert result.metrics["n_clusters"] == 0 and result.metrics["noise_fraction"] == 1.0
    for name in ("avg_intrinsic_dim", "avg_intrinsic_dim_original", "mst_weight"):
        assert np.isnan(result.metrics[name])
    assert np.isfinite(result.metrics["agd"])  # needs no cluster
    assert "no cluster" in result.reason and result.centroids.shape == (0, 3)


def test_seed_spread_by_hand() -> None:
    results = [
        dataclasses.replace(make_result(np.zeros(3, int), {0: np.zeros(2)}), metrics=m)
        for m in ({"agd": 1.0}, {"agd": 3.0}, {"agd": float("nan")})
    ]
    for r in results:
        r.metrics.update({name: 0.0 for name in structure.METRIC_NAMES if name != "agd"})
    spread = seed_spread(results)["agd"]
    assert (spread.mean, spread.min, spread.max, spread.n_defined) == (2.0, 1.0, 3.0, 2)
    assert spread.std == pytest.approx(np.sqrt(2.0))


# ---------------------------------------------------------------- full pipeline (UMAP)


def test_planted_dense_clusters_are_recovered_with_their_dimensions() -> None:
    dims = (2, 3, 4, 5)
    points, truth = gaussian_subspace_clusters(np.random.default_rng(0), dims, n=400)
    result = analyse_structure(points, FAST, cell="planted", seed=43)
    assert result.seed == 43 and result.reason == ""
    assert result.metrics["n_clusters"] == 4
    matching = match_clusters(truth, result.labels)
    assert matching.overlap.sum() >= 0.95 * truth.size
    found = result.cluster_dims_original[np.searchsorted(result.cluster_ids, matching.labels_b)]
    np.testing.assert_allclose(found, np.array(dims)[matching.labels_a], rtol=0.15)
    assert result.metrics["mst_weight"] > 0 and result.metrics["agd"] > 0


def test_planted_sparse_latents_are_clustered_without_densifying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("sparse points were densified")

    monkeypatch.setattr(structure, "preprocessed_dense", refuse)
    latents, truth = sparse_latent_clusters(
        np.random.default_rng(1), n_clusters=4, n=120, n_latents=16384, pool=60, active=12
    )
    result = analyse_structure(latents, FAST, cell="sparse")
    assert result.metrics["n_clusters"] == 4
    assert match_clusters(truth, result.labels).overlap.sum() >= 0.95 * truth.size
    assert result.metrics["n_active_columns"] <= 4 * 60


def test_small_point_set_clamps_components_and_can_have_no_cluster() -> None:
    points = np.random.default_rng(13).normal(size=(20, 8))
    cfg = dataclasses.replace(StructureConfig(), min_cluster_size=25)
    result = analyse_structure(points, cfg, cell="small")
    assert result.metrics["n_components_used"] == 18 and result.embedding.shape == (20, 18)
    assert result.metrics["n_clusters"] == 0 and "no cluster" in result.reason
    assert umap_2d(points, cfg).shape == (20, 2)
