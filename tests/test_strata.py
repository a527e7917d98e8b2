"""Tests for saema_core.strata: supports, distinct strata, Jaccard to σ = 0, fraction changed."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from saema_core.strata import (
    count_distinct_supports,
    support_sizes,
    support_strata,
    token_supports,
)


def dense_from_sets(sets, K):
    out = np.zeros((len(sets), K), dtype=np.float32)
    for row, support in enumerate(sets):
        out[row, sorted(support)] = 1.0 + np.arange(len(support))
    return out


REFERENCE = [{0, 1}, {2}, set(), {3, 4, 5}]
NOISY = [{0, 1}, {2, 3}, set(), {5}]


def test_support_strata_by_hand():
    result = support_strata(
        token_supports(dense_from_sets(NOISY, 6)), token_supports(dense_from_sets(REFERENCE, 6))
    )
    # Jaccard per token: 2/2, 1/2, empty-vs-empty 1, 1/3.
    assert result.mean_jaccard == pytest.approx((1 + 0.5 + 1 + 1 / 3) / 4)
    assert result.fraction_changed == 0.5
    assert result.n_supports == 4
    np.testing.assert_array_equal(result.size_histogram, [1, 1, 2])  # sizes 2, 2, 0, 1


def test_support_strata_against_itself():
    supports = token_supports(dense_from_sets(REFERENCE, 6))
    result = support_strata(supports, supports, min_bins=8)
    assert result.mean_jaccard == 1.0 and result.fraction_changed == 0.0
    np.testing.assert_array_equal(result.size_histogram, [1, 1, 1, 1, 0, 0, 0, 0])


def test_distinct_supports_ignore_values_and_count_duplicates_once():
    latents = np.array([[1.0, 0, 2], [5.0, 0, 0.1], [0, 0, 0], [0, 0, 0], [0, 3, 0]])
    supports = token_supports(latents)
    assert count_distinct_supports(supports) == 3
    np.testing.assert_array_equal(support_sizes(supports), [2, 2, 0, 0, 1])


def test_sparse_input_gives_the_same_supports():
    latents = dense_from_sets(NOISY, 6)
    csr = sp.csr_array(latents)
    csr.data[0] = 0.0  # an explicit zero is not active
    dense = latents.copy()
    dense[0, 0] = 0.0
    for a, b in zip(token_supports(csr), token_supports(dense)):
        np.testing.assert_array_equal(a, b)


def test_support_strata_rejects_misaligned_supports():
    a = token_supports(np.ones((3, 4)))
    with pytest.raises(ValueError, match="not row-aligned"):
        support_strata(a, token_supports(np.ones((2, 4))))
    with pytest.raises(ValueError, match="not row-aligned"):
        support_strata(a, token_supports(np.ones((3, 5))))
    with pytest.raises(ValueError, match=r"\(n_tokens, K\)"):
        token_supports(np.ones((1, 2, 3)))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 10), st.integers(0, 2**32 - 1))
def test_support_strata_equal_naive_set_computation(n, K, seed):
    rng = np.random.default_rng(seed)
    latents, reference = (rng.random((n, K)) * (rng.random((n, K)) < 0.3) for _ in range(2))
    result = support_strata(token_supports(latents), token_supports(reference))
    sets = [frozenset(np.flatnonzero(row)) for row in latents]
    sets0 = [frozenset(np.flatnonzero(row)) for row in reference]
    jaccard = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in zip(sets, sets0)]
    assert result.n_supports == len(set(sets))
    assert result.mean_jaccard == pytest.approx(np.mean(jaccard))
    assert result.fraction_changed == pytest.approx(np.mean([a != b for a, b in zip(sets, sets0)]))
    np.testing.assert_array_equal(result.size_histogram, np.bincount([len(a) for a in sets]))


def test_intersections_by_table_and_by_sorted_keys_agree(monkeypatch):
    import saema_core.strata as strata

    rng = np.random.default_rng(3)
    a = token_supports(rng.random((40, 30)) * (rng.random((40, 30)) < 0.3))
    b = token_supports(rng.random((40, 30)) * (rng.random((40, 30)) < 0.3))
    naive = [len(set(a.indices[a.indptr[i]:a.indptr[i + 1]]) & set(b.indices[b.indptr[i]:b.indptr[i + 1]]))
             for i in range(40)]
    table = strata.intersection_sizes(a, b)
    monkeypatch.setattr(strata, "_TABLE_CELLS", 0)
    np.testing.assert_array_equal(table, naive)
    np.testing.assert_array_equal(strata.intersection_sizes(a, b), naive)


def test_fully_dense_supports_intersect_completely():
    dense = token_supports(np.ones((5, 7)))
    np.testing.assert_array_equal(support_strata(dense, dense).size_histogram[-1:], [5])
    result = support_strata(dense, dense)
    assert result.n_supports == 1 and result.mean_jaccard == 1.0 and result.fraction_changed == 0.0
