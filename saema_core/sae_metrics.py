"""Reconstruction metrics of an SAE, under SAELens's names (DESIGN.md §4.7).

Definitions (x: activations [n, d_in], x̂: reconstructions [n, d_in], z: latents [n, d_sae]; leading
dimensions beyond the last are flattened into tokens):

- `mse`: mean over tokens of ‖x − x̂‖² summed over d_in (SAELens `evals.py`, the training convention).
- `explained_variance`: 1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), the variance summed over dimensions and every
  token weighted equally, accumulated in float64 (SAELens `ExplainedVarianceCalculator`, including its
  convention for a constant x: 1 if the error is also ~0, else 0).
- `cossim`: mean over tokens of cos(x, x̂); a zero vector has cosine 0 with everything (SAELens
  divides by the norm and gives NaN there).
- `l0`: mean number of non-zero latents per token (`!= 0`, so signed latents count too).
- `l1`: mean Σ|z| per token.
- Per latent, density = fraction of tokens on which it is non-zero (SAELens `feature_density`).
  `dead_fraction`: fraction of latents that never fire on the evaluated tokens (density 0).
  `dense_fraction`: fraction of latents firing on more than `dense_threshold` of tokens (default 10%,
  the "dense latents" cut of Gao et al. 2024 and SAEBench; SAELens reports densities but no cut).
  Both depend on how many tokens were evaluated; report `n_tokens` with them.
- `ce_loss_score` = (L_zero − L_sae) / (L_zero − L_clean): 1 when splicing in the SAE costs nothing, 0
  when it is as bad as zero-ablating the hook.

`ReconstructionMetricsAccumulator` computes all of them batch by batch with O(d_in + d_sae) memory,
so d_sae = 65 536 over millions of tokens is fine; the functions are the one-batch versions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Latents firing on more than this fraction of tokens count as dense.
DENSE_THRESHOLD = 0.1

#: Below this total variance, explained variance falls back to SAELens's 1-or-0 convention.
_TINY_VARIANCE = 1e-10

ArrayLike = Tensor | np.ndarray


def _tokens(a: ArrayLike, name: str) -> Tensor:
    """a [..., width] as a float64 [n_tokens, width] tensor."""
    t = torch.as_tensor(a).detach().to("cpu", torch.float64)
    if t.ndim == 0:
        raise ValueError(f"{name} must have a last (feature) dimension, got a scalar")
    return t.reshape(-1, t.shape[-1])


def _latent_tokens(latents: ArrayLike) -> Tensor:
    """latents [..., d_sae] as [n_tokens, d_sae] in their own dtype (a float64 copy would double memory)."""
    z = torch.as_tensor(latents).detach().to("cpu")
    if z.ndim == 0:
        raise ValueError("latents must have a last (latent) dimension, got a scalar")
    return z.reshape(-1, z.shape[-1])


def _pair(x: ArrayLike, x_hat: ArrayLike) -> tuple[Tensor, Tensor]:
    x_t, x_hat_t = _tokens(x, "x"), _tokens(x_hat, "x_hat")
    if x_t.shape != x_hat_t.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(torch.as_tensor(x).shape)} "
                         f"and {tuple(torch.as_tensor(x_hat).shape)}")
    return x_t, x_hat_t


def _cosines(x: Tensor, x_hat: Tensor) -> Tensor:
    eps = torch.finfo(torch.float64).tiny
    norms = x.norm(dim=-1).clamp_min(eps) * x_hat.norm(dim=-1).clamp_min(eps)
    return (x * x_hat).sum(-1) / norms


def _explained_variance(sum_sq_residual: float, sum_sq_norm: float, sum_x: Tensor, n: int) -> float:
    mse_value = sum_sq_residual / n
    total_variance = sum_sq_norm / n - float((sum_x / n).pow(2).sum())
    if total_variance < _TINY_VARIANCE:
        return 1.0 if mse_value < _TINY_VARIANCE else 0.0
    return 1.0 - mse_value / total_variance


def mse(x: ArrayLike, x_hat: ArrayLike) -> float:
    """Mean over tokens of ‖x − x̂‖² (summed over d_in)."""
    x_t, x_hat_t = _pair(x, x_hat)
    return float((x_t - x_hat_t).pow(2).sum(-1).mean())


def explained_variance(x: ArrayLike, x_hat: ArrayLike) -> float:
    """1 − E‖x − x̂‖² / total variance of x (summed over dimensions)."""
    x_t, x_hat_t = _pair(x, x_hat)
    return _explained_variance(float((x_t - x_hat_t).pow(2).sum()), float(x_t.pow(2).sum()),
                               x_t.sum(0), x_t.shape[0])


def cossim(x: ArrayLike, x_hat: ArrayLike) -> float:
    """Mean over tokens of the cosine between x and x̂ (0 for a zero vector)."""
    return float(_cosines(*_pair(x, x_hat)).mean())


def l0(latents: ArrayLike) -> float:
    """Mean number of non-zero latents per token."""
    return float((_latent_tokens(latents) != 0).sum(-1).mean(dtype=torch.float64))


def l1(latents: ArrayLike) -> float:
    """Mean Σ|z| per token."""
    return float(_latent_tokens(latents).abs().sum(-1, dtype=torch.float64).mean())


def feature_density(latents: ArrayLike) -> np.ndarray:
    """Per latent [d_sae], the fraction of tokens on which it is non-zero."""
    z = _latent_tokens(latents)
    return ((z != 0).sum(0).to(torch.float64) / z.shape[0]).numpy()


def dead_fraction(latents: ArrayLike) -> float:
    """Fraction of latents that are zero on every token given."""
    return float(np.mean(feature_density(latents) == 0))


def dense_fraction(latents: ArrayLike, threshold: float = DENSE_THRESHOLD) -> float:
    """Fraction of latents non-zero on more than `threshold` of the tokens given."""
    return float(np.mean(feature_density(latents) > threshold))


def ce_loss_score(clean_loss: float, sae_loss: float, zero_ablation_loss: float) -> float:
    """(L_zero − L_sae) / (L_zero − L_clean): the fraction of the ablation's CE-loss damage undone."""
    losses = (clean_loss, sae_loss, zero_ablation_loss)
    if not all(math.isfinite(v) for v in losses):
        raise ValueError(f"losses must be finite, got clean={clean_loss}, sae={sae_loss}, "
                         f"zero_ablation={zero_ablation_loss}")
    if zero_ablation_loss == clean_loss:
        raise ValueError(f"ce_loss_score is undefined: zero-ablation loss equals the clean loss "
                         f"({clean_loss})")
    return (zero_ablation_loss - sae_loss) / (zero_ablation_loss - clean_loss)


@dataclass(frozen=True)
class ReconstructionMetrics:
    """The metrics of one SAE on one set of tokens (see the module docstring)."""

    mse: float
    explained_variance: float
    cossim: float
    l0: float
    l1: float
    dead_fraction: float
    dense_fraction: float
    n_tokens: int
    feature_density: np.ndarray
    """[d_sae] fraction of tokens on which each latent fires."""


class ReconstructionMetricsAccumulator:
    """Streams (x, x̂, z) batches into the metrics of all of them together, in bounded memory."""

    def __init__(self, d_sae: int, dense_threshold: float = DENSE_THRESHOLD) -> None:
        if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae <= 0:
            raise ValueError(f"d_sae must be a positive integer, got {d_sae!r}")
        if not 0 <= dense_threshold < 1:
            raise ValueError(f"dense_threshold must be in [0, 1), got {dense_threshold!r}")
        self.d_sae = d_sae
        self.dense_threshold = dense_threshold
        self.n_tokens = 0
        self._sums = dict.fromkeys(("sq_residual", "sq_norm", "cos", "l0", "l1"), 0.0)
        self._sum_x: Tensor | None = None
        self._fires = torch.zeros(d_sae, dtype=torch.int64)

    def update(self, x: ArrayLike, x_hat: ArrayLike, latents: ArrayLike) -> None:
        """Add a batch: x, x̂ [..., d_in] and its latents [..., d_sae] (same leading dimensions)."""
        x_t, x_hat_t = _pair(x, x_hat)
        z = _latent_tokens(latents)
        if z.shape != (x_t.shape[0], self.d_sae):
            raise ValueError(f"latents must be [{x_t.shape[0]} tokens, d_sae={self.d_sae}], "
                             f"got {tuple(z.shape)}")
        nonzero = z != 0
        self._sums["sq_residual"] += float((x_t - x_hat_t).pow(2).sum())
        self._sums["sq_norm"] += float(x_t.pow(2).sum())
        self._sums["cos"] += float(_cosines(x_t, x_hat_t).sum())
        self._sums["l0"] += float(nonzero.sum())
        self._sums["l1"] += float(z.abs().sum(dtype=torch.float64))
        self._sum_x = x_t.sum(0) if self._sum_x is None else self._sum_x + x_t.sum(0)
        self._fires += nonzero.sum(0)
        self.n_tokens += x_t.shape[0]

    def compute(self) -> ReconstructionMetrics:
        """The metrics over every token added so far."""
        n = self.n_tokens
        if n == 0 or self._sum_x is None:
            raise ValueError("no tokens were added to the metrics accumulator")
        density = (self._fires.to(torch.float64) / n).numpy()
        return ReconstructionMetrics(
            mse=self._sums["sq_residual"] / n,
            explained_variance=_explained_variance(
                self._sums["sq_residual"], self._sums["sq_norm"], self._sum_x, n),
            cossim=self._sums["cos"] / n,
            l0=self._sums["l0"] / n,
            l1=self._sums["l1"] / n,
            dead_fraction=float(np.mean(density == 0)),
            dense_fraction=float(np.mean(density > self.dense_threshold)),
            n_tokens=n,
            feature_density=density,
        )
