"""Separability of the clusters of local representations (DESIGN.md §7), used by `intervention`.

Clusters are given by integer labels over the n tokens (−1 = noise, excluded); every measure takes the
latent points ``Z`` (n tokens × K latents) and is differentiable in them. The cluster bookkeeping
(`clusters_from_labels`, `subsample_members`) lives here too, shared with the intervention.

Separability measures
---------------------
``aedp``: the average Euclidean distance between all pairs of cluster centroids.

``gw``: Gromov–Wasserstein (POT ``ot.gromov.gromov_wasserstein2``, square loss, uniform weights, Euclidean
distance matrices). The literal reading — GW between two clusters as metric-measure spaces — compares
only the clusters' *shapes*: intra-cluster distances do not change when a cluster is translated, so that
quantity (`gw_intrinsic`, kept as a diagnostic) is blind to the intervention and its gradient with
respect to every ``Δ_c`` is exactly zero. We therefore measure, for each pair of clusters (A, B), how far
the pair seen as one metric-measure space is from each of its parts:

    gw_AB = ½ [GW(A ∪ B, A) + GW(A ∪ B, B)],     gw = mean over pairs of gw_AB,

where ``A ∪ B`` carries its Euclidean distance matrix and weight ½ on each cluster (uniform within
it), so unequal cluster sizes do not hide the smaller cluster; ``A`` and ``B`` carry uniform weights.
The union's distance matrix contains the cross-cluster distances, so ``gw`` depends on the clusters'
relative positions, while staying invariant to a translation of the whole configuration. It is 0 when
two identical clusters coincide and grows with their separation: for two single points at distance D
it equals D²/2 (POT returns the squared-loss discrepancy, no square root, so ``gw`` has units of
distance²). Its gradient comes through POT's torch backend (the envelope theorem: the optimal coupling
is held fixed, POT attaches ∂GW/∂C to the value) and then through the distance matrix to ``Δ``.
GW costs O(N²M) per solver iteration, so clusters may be subsampled to ``gw_max_points`` members
(seeded, fixed for a whole run, so the objective is a deterministic function of Δ); each subsample is
translated with its cluster, so the gradient is exact for the subsampled measure.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

_MIN_SQUARED_DISTANCE = 1e-24


class Clusters(NamedTuple):
    """Cluster membership of n tokens, noise excluded."""

    ids: np.ndarray
    """(C,) sorted cluster labels."""
    token_cluster: torch.Tensor
    """(n,) long: row of `ids` for each token, C for noise tokens."""
    members: tuple[torch.Tensor, ...]
    """C long tensors of token indices."""
    counts: torch.Tensor
    """(C,) float64 cluster sizes."""


# ----------------------------------------------------------------------------- clusters


def clusters_from_labels(labels: np.ndarray | torch.Tensor | Sequence[int], n_tokens: int) -> Clusters:
    """Group token indices by cluster label; −1 is noise. Needs ≥ 2 clusters and n_tokens labels."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if labels.ndim != 1 or labels.shape[0] != n_tokens:
        raise ValueError(f"labels have shape {labels.shape}, expected ({n_tokens},) to match the latents")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    ids = np.unique(labels[labels >= 0])
    if ids.size < 2:
        raise ValueError(f"need at least 2 non-noise clusters, got {ids.size} (labels {np.unique(labels)})")
    row = np.full(n_tokens, ids.size, dtype=np.int64)
    row[labels >= 0] = np.searchsorted(ids, labels[labels >= 0])
    members = tuple(torch.from_numpy(np.flatnonzero(row == c)) for c in range(ids.size))
    counts = torch.tensor([m.numel() for m in members], dtype=torch.float64)
    return Clusters(ids, torch.from_numpy(row), members, counts)


def subsample_members(
    members: tuple[torch.Tensor, ...], max_points: int | None, seed: int
) -> tuple[torch.Tensor, ...]:
    """Keep at most `max_points` members per cluster, chosen without replacement from `seed`."""
    if max_points is None:
        return members
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        m if m.numel() <= max_points else m[torch.randperm(m.numel(), generator=generator)[:max_points]]
        for m in members
    )


# ----------------------------------------------------------------------------- separability


def _aedp(latents: torch.Tensor, members: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean Euclidean distance over all pairs of cluster centroids (0-d tensor)."""
    centroids = torch.stack([latents[m].mean(dim=0) for m in members])
    return torch.pdist(centroids).mean()


def _distances(points: torch.Tensor) -> torch.Tensor:
    """(m, m) float64 Euclidean distances of (m, K) points: exactly symmetric, exact-0 diagonal.

    Through the Gram matrix (one matmul; cdist's direct kernel is ~10× slower at K = 3072), in float64
    after centring to keep the cancellation in ‖a‖² + ‖b‖² − 2a·b small. Squared distances below 1e-24
    (duplicate points) are floored before the square root, whose gradient at 0 would be infinite.
    """
    centred = points.to(torch.float64) - points.to(torch.float64).mean(dim=0)
    squared_norms = (centred**2).sum(dim=1)
    gram = centred @ centred.T
    squared = squared_norms[:, None] + squared_norms[None, :] - (gram + gram.T)
    off_diagonal = ~torch.eye(points.shape[0], dtype=torch.bool, device=points.device)
    return torch.where(off_diagonal, torch.sqrt(squared.clamp(min=_MIN_SQUARED_DISTANCE)), 0.0)


def _uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def _gw2(c1: torch.Tensor, c2: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """POT's squared-loss GW discrepancy, differentiable in c1, c2 through POT's torch backend."""
    import ot  # on first use: POT is slow to import and a cached re-run never needs it

    return ot.gromov.gromov_wasserstein2(c1, c2, p, q, loss_fun="square_loss", symmetric=True)


def gw_union_vs_parts(c_union: torch.Tensor, n_a: int) -> torch.Tensor:
    """½[GW(A ∪ B, A) + GW(A ∪ B, B)] from the (n_a + n_b)² distances of A ∪ B, A's points first."""
    n_b = c_union.shape[0] - n_a
    w_union = torch.cat([_uniform(n_a, c_union), _uniform(n_b, c_union)]) / 2
    to_a = _gw2(c_union, c_union[:n_a, :n_a], w_union, _uniform(n_a, c_union))
    to_b = _gw2(c_union, c_union[n_a:, n_a:], w_union, _uniform(n_b, c_union))
    return (to_a + to_b) / 2


def _gw(latents: torch.Tensor, members: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over cluster pairs of `gw_union_vs_parts` (0-d tensor).

    One distance matrix over all members, sliced per pair: one large matmul instead of C(C−1)/2
    small ones, and no more arithmetic (each pair's union block is a sub-block of it).
    """
    distances = _distances(latents[torch.cat(members)])
    ends = np.cumsum([0] + [m.numel() for m in members])
    blocks = [torch.arange(start, end) for start, end in itertools.pairwise(ends)]
    values = []
    for a, b in itertools.combinations(range(len(members)), 2):
        union = torch.cat([blocks[a], blocks[b]])
        values.append(gw_union_vs_parts(distances[union][:, union], blocks[a].numel()))
    return torch.stack(values).mean().to(latents.dtype)


def aedp(latents: torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Average Euclidean distance between pairs of cluster centroids of Z (n, K); noise excluded."""
    return _aedp(latents, clusters_from_labels(labels, latents.shape[0]).members)


def gw(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    max_points: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Pairwise union-vs-parts Gromov–Wasserstein separability of Z (n, K) (module docstring)."""
    members = clusters_from_labels(labels, latents.shape[0]).members
    return _gw(latents, subsample_members(members, max_points, seed))


def gw_intrinsic(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    max_points: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Mean pairwise GW between clusters as metric-measure spaces: shape only, blind to translations."""
    members = subsample_members(clusters_from_labels(labels, latents.shape[0]).members, max_points, seed)
    values = []
    for a, b in itertools.combinations(members, 2):
        c_a, c_b = _distances(latents[a]), _distances(latents[b])
        values.append(_gw2(c_a, c_b, _uniform(a.numel(), c_a), _uniform(b.numel(), c_b)))
    return torch.stack(values).mean().to(latents.dtype)


SEPARABILITY: dict[str, Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]] = {
    "aedp": _aedp,
    "gw": _gw,
}
