"""The training-time causal test of claim 3: does making local representations more separable improve
reconstruction? (DESIGN.md §7, revision.)

A post-hoc move of the latents under a fixed decoder cannot answer it (`saema_core.intervention`
explains why). Here the SAE itself is trained to be more (β > 0) or less (β < 0) separable, and its
reconstruction is measured on held-out tokens:

- **Local representations fixed before training.** k-means clusters of the *residual* activations
  (`fit_residual_clusters`); every token's label is its nearest residual centroid (`assign`). The
  clusters never look at the SAE being trained, so the SAE cannot make them separable by redefining
  them.
- **Separability** of a set of latents: AEDP, the mean Euclidean distance between the latent centroids
  of the clusters present (≥ 2 members) — the paper's measure (`centroid_separability`).
- **The training term** (`SeparabilityTerm`), added to the trainer's loss:

      L = MSE + penalty − β · sg(MSE) · log Sep(Z_batch)

  with sg the stop-gradient. Its gradient is −β · MSE · ∇Sep / Sep: β is a dimensionless exchange rate,
  at β = 1 a 1 % rise of separability is worth a 1 % fall of the MSE, whatever the units of x or the
  size of the latents. β = 0 is plain training.
- **The design.** Every (β, seed) SAE is fine-tuned from the same base SAE (or, with init "scratch",
  trained from the seed's random initialisation) for the same steps on the same stream of training
  batches (the seed fixes their order, so each seed is a paired block across β), at equal
  architecture, width and k (equal L0 for TopK).
- **Outcome.** Held-out MSE (summed over d_model, mean over tokens), explained variance and, where the
  model has an LM head, `ce_loss_score`; and the achieved held-out separability.
- **Statistics over seeds** (`dose_response`): per seed, the least-squares slope of held-out MSE on
  achieved separability across β, and the paired relative changes against β = 0 at the largest and the
  smallest β; means with Student-t 95 % CIs over seeds (the seed is the independent unit).
- **Verdict** (`causal_verdict`): the claim predicts that the separating SAE (largest β) reconstructs
  better than the plain one. *supported* when its relative MSE change has a CI below 0, *contradicted*
  when above 0, *inconclusive* otherwise — and inconclusive whenever the term failed to raise held-out
  separability (then nothing was manipulated). Caveat, stated with every verdict (`CAVEATS`):
  fine-tuning starts from an SAE trained on MSE, so any extra term pulls it away from an MSE optimum;
  the test asks whether separability helps reconstruction *at equal training*, not at convergence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.stats
import torch
from torch import Tensor

CONFIDENCE = 0.95
VERDICTS = ("supported", "contradicted", "inconclusive")


@dataclass(frozen=True)
class CausalDesign:
    """The β × seed grid of the training-time test."""

    betas: tuple[float, ...] = (-1.0, -0.3, 0.0, 0.3, 1.0)
    """Weights β of the separability term; must include 0 and both signs."""
    seeds: tuple[int, ...] = (1, 2, 3)
    """Seeds of the batch order (paired blocks across β); at least 2, ≥ 3 for a useful CI."""
    n_clusters: int = 16
    """k-means clusters of the residual activations: the local representations."""

    def __post_init__(self) -> None:
        betas = tuple(float(b) for b in self.betas)
        if len(set(betas)) != len(betas):
            raise ValueError(f"causal betas must be distinct, got {betas}")
        if 0.0 not in betas:
            raise ValueError(f"causal betas must include 0 (plain training, the reference), got {betas}")
        if not (min(betas) < 0 < max(betas)):
            raise ValueError(f"causal betas need both signs (merge and separate), got {betas}")
        if len(set(self.seeds)) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"causal seeds must be ≥ 2 distinct seeds (the CI is over seeds), got {self.seeds}")
        if self.n_clusters < 2:
            raise ValueError(f"causal clusters must be ≥ 2 (separability is between clusters), got {self.n_clusters}")
        object.__setattr__(self, "betas", tuple(sorted(betas)))
        object.__setattr__(self, "seeds", tuple(self.seeds))


# ----------------------------------------------------------------------------- local representations


def fit_residual_clusters(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """(n_clusters, d) k-means centroids of residual activations x (n, d); k-means++ and 3 restarts."""
    from sklearn.cluster import KMeans

    if x.shape[0] < n_clusters:
        raise ValueError(f"{x.shape[0]} residual tokens cannot form {n_clusters} clusters")
    fit = KMeans(n_clusters, n_init=3, random_state=seed).fit(np.asarray(x, dtype=np.float64))
    return fit.cluster_centers_.astype(np.float32)


def assign(x: Tensor, centroids: Tensor) -> Tensor:
    """(n,) index of the nearest centroid (C, d) of each row of x (n, d)."""
    squared = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    return squared.argmin(1)


def centroid_separability(latents: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """AEDP: mean distance between the latent centroids of the clusters with ≥ 2 tokens (0-d tensor).

    One (n, C) one-hot product gives every cluster's sum: cheap beside the SAE's own matmuls."""
    one_hot = torch.nn.functional.one_hot(labels, n_clusters).to(latents.dtype)
    counts = one_hot.sum(0)
    present = counts >= 2
    if int(present.sum()) < 2:
        raise ValueError(f"the batch has {int(present.sum())} cluster(s) with ≥ 2 tokens; separability "
                         f"needs 2 (use a larger batch or fewer clusters)")
    centroids = (one_hot.T @ latents)[present] / counts[present, None]
    return torch.pdist(centroids).mean()


class SeparabilityTerm:
    """The trainer's extra loss −β · sg(MSE) · log Sep(Z_batch) (module docstring); x in raw units."""

    def __init__(self, centroids: np.ndarray | Tensor, beta: float) -> None:
        self.centroids = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        self.beta = float(beta)

    def __call__(self, x: Tensor, latents: Tensor, mse: Tensor) -> Tensor:
        if self.beta == 0:
            return mse.new_zeros(())
        labels = assign(x.to(self.centroids.dtype), self.centroids)
        separability = centroid_separability(latents, labels, self.centroids.shape[0])
        return -self.beta * mse.detach() * torch.log(separability)


class SeparabilityAccumulator:
    """Held-out separability streamed over batches: per-cluster latent sums, squared norms, counts.

    `compute()` gives (aedp, ratio): AEDP of the cluster centroids, and AEDP divided by the RMS distance
    of a token to its own cluster's centroid — a scale-free separability that does not rise when the
    latents merely grow."""

    def __init__(self, centroids: np.ndarray | Tensor, d_sae: int) -> None:
        self.centroids = torch.as_tensor(np.asarray(centroids), dtype=torch.float64)
        n = self.centroids.shape[0]
        self.sums = torch.zeros(n, d_sae, dtype=torch.float64)
        self.squares = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)

    def update(self, x: Tensor, latents: Tensor) -> None:
        labels = assign(x.to(torch.float64), self.centroids)
        one_hot = torch.nn.functional.one_hot(labels, self.centroids.shape[0]).to(torch.float64)
        z = latents.to(torch.float64)
        self.sums += one_hot.T @ z
        self.squares += one_hot.T @ (z * z).sum(1)
        self.counts += one_hot.sum(0)

    def compute(self) -> tuple[float, float]:
        present = self.counts >= 2
        if int(present.sum()) < 2:
            return float("nan"), float("nan")
        counts = self.counts[present]
        centroids = self.sums[present] / counts[:, None]
        aedp = float(torch.pdist(centroids).mean())
        within = (self.squares[present] - counts * (centroids * centroids).sum(1)).sum() / counts.sum()
        return aedp, aedp / float(within.clamp_min(0).sqrt().clamp_min(1e-12))


# ----------------------------------------------------------------------------- statistics


class Interval(NamedTuple):
    """A mean over seeds with its Student-t CI (NaN when fewer than 2 finite values)."""

    mean: float
    low: float
    high: float
    n: int


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided Student-t interval of independent replicates."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return Interval(float(v.mean()) if v.size else float("nan"), float("nan"), float("nan"), int(v.size))
    half = scipy.stats.t.ppf((1 + confidence) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), int(v.size))


class DoseResponse(NamedTuple):
    """The test's statistics; relative changes are (value(β) − value(0)) / value(0), paired by seed."""

    slope: Interval
    """Per-seed least-squares slope of held-out MSE on achieved separability."""
    separate_mse: Interval
    """Relative MSE change at the largest β (the separating SAE)."""
    separate_sep: Interval
    """Relative separability change at the largest β."""
    merge_mse: Interval
    """Relative MSE change at the smallest β (the merging SAE)."""
    merge_sep: Interval
    """Relative separability change at the smallest β."""
    best_beta: float
    """The β with the lowest mean held-out MSE over seeds."""


def _relative(values: np.ndarray, betas: np.ndarray, beta: float) -> np.ndarray:
    """Per seed (columns), (value(β) − value(0)) / value(0) of a (β, seed) table."""
    zero = values[list(betas).index(0.0)]
    return (values[list(betas).index(beta)] - zero) / zero


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 2 or np.ptp(x[keep]) == 0:
        return float("nan")
    return float(np.polyfit(x[keep], y[keep], 1)[0])


def dose_response(betas: Sequence[float], mse: np.ndarray, separability: np.ndarray) -> DoseResponse:
    """Statistics of a (β, seed) grid: `mse` and `separability` have shape (len(betas), n_seeds)."""
    betas = np.asarray(betas, dtype=float)
    mse, separability = np.asarray(mse, dtype=float), np.asarray(separability, dtype=float)
    if mse.shape != separability.shape or mse.shape[0] != betas.size:
        raise ValueError(f"mse {mse.shape} and separability {separability.shape} must both be (β={betas.size}, seeds)")
    if 0.0 not in betas:
        raise ValueError(f"the β grid must include 0 (the reference), got {betas.tolist()}")
    slopes = [_slope(separability[:, s], mse[:, s]) for s in range(mse.shape[1])]
    top, bottom = float(betas.max()), float(betas.min())
    mean_mse = np.nanmean(mse, axis=1) if np.isfinite(mse).any() else np.full(betas.size, np.nan)
    best = float(betas[np.nanargmin(mean_mse)]) if np.isfinite(mean_mse).any() else float("nan")
    return DoseResponse(
        slope=t_interval(slopes),
        separate_mse=t_interval(_relative(mse, betas, top)),
        separate_sep=t_interval(_relative(separability, betas, top)),
        merge_mse=t_interval(_relative(mse, betas, bottom)),
        merge_sep=t_interval(_relative(separability, betas, bottom)),
        best_beta=best,
    )


class CausalVerdict(NamedTuple):
    verdict: str
    """supported | contradicted | inconclusive."""
    reason: str
    effect: float
    """Relative held-out MSE change of the separating SAE against β = 0 (mean over seeds)."""


def _pct(i: Interval) -> str:
    return f"{i.mean:+.1%} (95% CI {i.low:+.1%} to {i.high:+.1%}, {i.n} seeds)"


INITS = ("base", "scratch")
CAVEATS = {
    "base": ("fine-tuning starts from an SAE trained on MSE, so the test asks whether separability helps "
             "reconstruction at equal training steps, not at convergence"),
    "scratch": ("every SAE of a seed starts from the same random initialisation and trains for the same steps, "
                "so the test asks about equal training, not about convergence"),
}


def causal_verdict(stats: DoseResponse, top_beta: float, init: str = "base") -> CausalVerdict:
    """Plain-words verdict of the test (module docstring) with its effect size and the caveat of the
    start (`init`: "base" = fine-tuned from the hook's SAE, "scratch" = trained from a seeded init)."""
    sep, mse = stats.separate_sep, stats.separate_mse
    u_shape = (" — a U: any push away from plain training costs reconstruction, so the overall slope is not "
               "the claim's effect" if stats.best_beta == 0 and mse.low > 0 and stats.merge_mse.low > 0 else "")
    shape = (f"; across the grid held-out MSE is lowest at β = {stats.best_beta:g}{u_shape}; merging (smallest β) "
             f"changes MSE by {_pct(stats.merge_mse)}; per-seed slope of MSE on separability "
             f"{stats.slope.mean:.3g} (CI {stats.slope.low:.3g} to {stats.slope.high:.3g}); caveat: {CAVEATS[init]}")
    if not np.isfinite(mse.low) or not np.isfinite(sep.low):
        return CausalVerdict("inconclusive", f"too few seeds with finite results for a CI{shape}", mse.mean)
    if sep.low <= 0:
        return CausalVerdict("inconclusive", f"the separability term at β = {top_beta:g} did not raise held-out "
                             f"separability reliably ({_pct(sep)}): nothing was manipulated{shape}", mse.mean)
    raised = f"raising held-out separability by {_pct(sep)} (β = {top_beta:g})"
    if mse.high < 0:
        return CausalVerdict("supported", f"{raised} lowered held-out MSE by {_pct(mse)}{shape}", mse.mean)
    if mse.low > 0:
        return CausalVerdict("contradicted", f"{raised} raised held-out MSE by {_pct(mse)}{shape}", mse.mean)
    return CausalVerdict("inconclusive", f"{raised} changed held-out MSE by {_pct(mse)}, a CI that covers 0{shape}",
                         mse.mean)
