"""Intervention on the separability of local representations (DESIGN.md §7).

Given the latent points ``Z`` (n tokens × K latents) of one concept, their cluster labels (−1 = noise)
and the SAE decoder ``D``, we move every cluster by its own translation ``Δ_c`` and minimise

    L(Δ) = −direction · α · Sep(Z + Δ) + λ · MSE(D(Z + Δ), x)

with torch autograd and Adam (the paper's released code takes random steps instead; `saema_core.baselines`
has that search, literally and at Adam's budget). Noise tokens (label −1) are never moved but stay in the reconstruction
metrics, which are taken over all n tokens.

Separability measures
---------------------
``aedp``: the average Euclidean distance between all pairs of cluster centroids. ``gw``: a pairwise
union-vs-parts Gromov–Wasserstein separability (distance² units). Both live in `saema_core.separability`,
whose docstring explains the GW choice; they are re-exported here.

Recorded per step (step 0 = before any change; step k = after k Adam updates)
------------------------------------------------------------------------------
``objective`` L(Δ); ``separability`` Sep(Z + Δ) of the chosen measure; ``mse`` mean over tokens and d_model
of (x̂ − x)²; ``mse_zscored`` the same after z-scoring each token's x and x̂ over d_model (mean 0,
population std 1; ε = 1e-8 guards constant rows), which removes per-token offset and scale from the error;
``explained_variance`` 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the mean over tokens; ``displacement_norm`` the
Frobenius norm over tokens of the displacement actually applied, ‖clamp(Z + Δ) − Z‖_F (what the decoder
sees move); ``translation_norm`` the Frobenius norm of the per-token translation field before clamping,
sqrt(Σ_c n_c ‖Δ_c‖²). Without clamping the two coincide. With clamping the translation norm overstates
the movement: Adam moves every coordinate by about lr per step, and steps that push inactive latents
below 0 are cut off by the clamp but still counted in Δ.

Random control: isotropic Gaussian per-cluster translations along one seeded direction, scaled so that the
*applied* displacement norm equals the optimised intervention's (a closed form without clamping; Brent's
method on the scale with clamping, where the applied norm is continuous and non-decreasing in the scale).
Note that with clamping an isotropic random move cannot lower inactive latents, so it adds positive mass
to latents a cluster does not use, which tends to pull sparse clusters with disjoint supports together.

The active-latent subspace: the moves live on the latents that some token of the concept's sample
uses (the union of their supports, A), through the decoder restricted to them, D_A(z_A) = z_A·W_dec[A]
+ b (`saema_core.row_space.active_subspace`); a latent no sampled token uses is never switched on.
Adam moves every coordinate by about lr per step whatever the size of its gradient, so in the full
K-space the move and its displacement norm would be dominated by the K − |A| latents the concept never
uses (at K = 65 536 nearly all of them), and a seeded isotropic control would likewise spread its norm
over them: the subspace keeps both on the concept's own code, makes the displacement comparable across
SAE widths and costs |A| instead of K per token (|A| ≤ tokens × k for a TopK SAE). Within A, clamping
still lets the optimiser switch on a latent of A for tokens that do not use it. The paper-literal
search (`saema_core.baselines`) z-scores each token over all K latents, so it keeps the full space.

Clamping: SAE latents of ReLU/TopK SAEs are non-negative, so with ``clamp_nonnegative`` the moved latents
are ``clamp(Z + Δ, min=0)`` in the forward. torch's clamp passes the gradient where the input equals the
bound, so latents that are exactly 0 (inactive) can still be switched on by the optimiser; once pushed
below 0 a coordinate is cut off and receives no further gradient.
"""


from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import scipy.optimize
import torch

from saema_core.separability import (
    SEPARABILITY,
    Clusters,
    aedp,
    clusters_from_labels,
    gw,
    gw_intrinsic,
    gw_union_vs_parts,
    subsample_members,
)

__all__ = [
    "ALPHAS", "DIRECTIONS", "OBJECTIVES", "SEPARABILITY", "ZSCORE_EPS", "Clusters", "Decoder",
    "InterventionConfig", "InterventionProblem", "InterventionTrajectory", "StepMetrics", "SweepCell", "aedp",
    "check_decoder", "clusters_from_labels", "control_path", "decoder_input_width", "displacement_norm",
    "evaluate", "explained_variance", "gw", "gw_intrinsic", "gw_union_vs_parts", "intervention_deltas", "mse",
    "mse_zscored", "optimise_intervention", "prepare_problem", "random_control", "random_direction",
    "run_sweep", "scale_to_displacement", "scale_to_norm", "stack_trajectory",
    "subsample_members", "translate", "translation_norm", "zscore_rows",
]


ALPHAS: tuple[float, ...] = (0.5, 0.8, 1.0, 1.2, 1.5)
"""The paper's grid of separability weights α."""
DIRECTIONS: tuple[int, ...] = (1, -1)
"""+1 separates the clusters, −1 merges them."""
OBJECTIVES: tuple[str, ...] = ("aedp", "gw")
PAPER = "paper"
"""The paper-literal random search (`paper_search`), a stage objective beside the two measures."""
ZSCORE_EPS = 1e-8
_MAX_DOUBLINGS = 60

Decoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class InterventionConfig:
    """One intervention cell: which separability, which way, how hard, how long."""

    objective: str = "aedp"
    """Separability measure: "aedp" or "gw" (module docstring); "paper" selects `paper_search`."""
    direction: int = 1
    """+1 maximises separability (separate), −1 minimises it (merge)."""
    alpha: float = 1.0
    """Weight α > 0 of the separability term."""
    lam: float = 1.0
    """Weight λ ≥ 0 of the reconstruction MSE term."""
    steps: int = 10
    """Number of optimiser steps (the paper's 10); the trajectory has steps + 1 entries."""
    lr: float = 0.01
    """Adam learning rate; also the per-coordinate proposal scale of `random_search`."""
    clamp_nonnegative: bool = True
    """Clamp moved latents to ≥ 0 (ReLU/TopK SAEs); False for dense autoencoders."""
    gw_max_points: int | None = 128
    """Subsample each cluster to at most this many members for `gw` (None = all members)."""
    seed: int = 0
    """Seed of the `gw` subsample."""

    def __post_init__(self) -> None:
        if self.objective not in (*OBJECTIVES, PAPER):
            raise ValueError(f"objective must be one of {(*OBJECTIVES, PAPER)}, got {self.objective!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be +1 (separate) or -1 (merge), got {self.direction!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r}")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0, got {self.lam!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.gw_max_points is not None and self.gw_max_points < 2:
            raise ValueError(f"gw_max_points must be >= 2 or None, got {self.gw_max_points!r}")


@dataclass(frozen=True)
class InterventionTrajectory:
    """Metrics along one intervention; every per-step array has shape (steps + 1,), index 0 = before."""

    objective: np.ndarray
    separability: np.ndarray
    mse: np.ndarray
    mse_zscored: np.ndarray
    explained_variance: np.ndarray
    displacement_norm: np.ndarray
    translation_norm: np.ndarray
    translations: np.ndarray
    """(n_clusters, K) final per-cluster translations Δ_c."""
    cluster_ids: np.ndarray
    """(n_clusters,) cluster labels, in the row order of `translations`."""

    @property
    def delta_separability(self) -> float:
        """Sep(final) − Sep(before)."""
        return float(self.separability[-1] - self.separability[0])

    @property
    def delta_mse(self) -> float:
        """MSE(final) − MSE(before)."""
        return float(self.mse[-1] - self.mse[0])



class InterventionProblem(NamedTuple):
    """Validated inputs of one intervention."""

    latents: torch.Tensor
    """(n, K) latent points Z, detached."""
    target: torch.Tensor
    """(n, d) residual activations x, detached."""
    decode: Decoder
    clusters: Clusters
    sep_members: tuple[torch.Tensor, ...]
    """Members entering the separability (all for aedp, a fixed subsample for gw)."""


class StepMetrics(NamedTuple):
    """The quantities recorded at one step (0-d tensors; `objective` may carry a graph)."""

    objective: torch.Tensor
    separability: torch.Tensor
    mse: torch.Tensor
    mse_zscored: torch.Tensor
    explained_variance: torch.Tensor
    displacement_norm: torch.Tensor
    translation_norm: torch.Tensor


class SweepCell(NamedTuple):
    """One (direction, α) cell of a sweep: the optimised intervention and its random control."""

    direction: int
    alpha: float
    optimised: InterventionTrajectory
    control: InterventionTrajectory


# ----------------------------------------------------------------------------- inputs




def decoder_input_width(decode: Decoder) -> int | None:
    """The decoder's declared latent width (`d_sae`, `cfg.d_sae`, `in_features`, `W_dec`), if any."""
    for owner in (decode, getattr(decode, "__self__", None)):
        for width in (
            getattr(owner, "d_sae", None),
            getattr(getattr(owner, "cfg", None), "d_sae", None),
            getattr(owner, "in_features", None),
        ):
            if isinstance(width, int):
                return width
        w_dec = getattr(owner, "W_dec", None)
        if isinstance(w_dec, torch.Tensor) and w_dec.ndim == 2:
            return int(w_dec.shape[0])
    return None


def check_decoder(decode: Decoder, n_latents: int, d_model: int, dtype: torch.dtype) -> None:
    """Raise ValueError unless `decode` maps (1, n_latents) rows to (1, d_model) rows."""
    width = decoder_input_width(decode)
    if width is not None and width != n_latents:
        raise ValueError(f"decoder expects d_sae={width} latents but Z has K={n_latents} columns")
    try:
        with torch.no_grad():
            out = decode(torch.zeros(1, n_latents, dtype=dtype))
    except RuntimeError as err:
        raise ValueError(f"decoder cannot decode a row of K={n_latents} latents: {err}") from err
    if tuple(out.shape) != (1, d_model):
        raise ValueError(
            f"decoder maps a (1, {n_latents}) row to shape {tuple(out.shape)}, "
            f"expected (1, {d_model}) to match x"
        )


def prepare_problem(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    decode: Decoder,
    target: torch.Tensor,
    config: InterventionConfig,
) -> InterventionProblem:
    """Validate Z (n, K), labels (n,), x (n, d) and the decoder; fix the gw subsample."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective {config.objective!r} has no differentiable separability; "
                         f"{PAPER!r} runs through paper_search")
    if latents.ndim != 2 or target.ndim != 2:
        raise ValueError(f"Z and x must be 2-D, got shapes {tuple(latents.shape)}, {tuple(target.shape)}")
    if latents.shape[0] != target.shape[0]:
        raise ValueError(f"Z has {latents.shape[0]} tokens but x has {target.shape[0]}")
    clusters = clusters_from_labels(labels, latents.shape[0])
    check_decoder(decode, latents.shape[1], target.shape[1], latents.dtype)
    sep_members = clusters.members
    if config.objective == "gw":
        sep_members = subsample_members(clusters.members, config.gw_max_points, config.seed)
    return InterventionProblem(latents.detach(), target.detach(), decode, clusters, sep_members)


# ----------------------------------------------------------------------------- reconstruction


def mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over tokens and d_model of (x̂ − x)²."""
    return ((x_hat - x) ** 2).mean()


def zscore_rows(a: torch.Tensor) -> torch.Tensor:
    """Each row of (n, d) shifted to mean 0 and scaled to population std 1 (ε guards constant rows)."""
    centred = a - a.mean(dim=1, keepdim=True)
    return centred / (centred.std(dim=1, unbiased=False, keepdim=True) + ZSCORE_EPS)


def mse_zscored(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE after z-scoring every token of x and x̂ over d_model."""
    return mse(zscore_rows(x_hat), zscore_rows(x))


def explained_variance(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean token."""
    return 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum()


# ----------------------------------------------------------------------------- one evaluation


def translate(
    latents: torch.Tensor, token_cluster: torch.Tensor, translations: torch.Tensor, clamp: bool
) -> torch.Tensor:
    """Z (n, K) with row t moved by translations[token_cluster[t]] (C, K); noise rows (index C) stay."""
    padded = torch.cat([translations, translations.new_zeros(1, translations.shape[1])])
    moved = latents + padded[token_cluster]
    return moved.clamp(min=0) if clamp else moved


def translation_norm(translations: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of the per-token translation field before clamping: sqrt(Σ_c n_c ‖Δ_c‖²)."""
    return torch.sqrt((counts.to(translations.dtype)[:, None] * translations**2).sum())


def displacement_norm(moved: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """‖moved − Z‖_F over tokens, in float64: the displacement the decoder actually sees."""
    return torch.linalg.norm(moved.to(torch.float64) - latents.to(torch.float64))


def evaluate(
    problem: InterventionProblem, translations: torch.Tensor, config: InterventionConfig
) -> StepMetrics:
    """All recorded quantities at translations (C, K); `objective` keeps the autograd graph."""
    moved = translate(
        problem.latents, problem.clusters.token_cluster, translations, config.clamp_nonnegative
    )
    separability = SEPARABILITY[config.objective](moved, problem.sep_members)
    x_hat = problem.decode(moved)
    error = mse(x_hat, problem.target)
    objective = -config.direction * config.alpha * separability + config.lam * error
    with torch.no_grad():
        return StepMetrics(
            objective,
            separability.detach(),
            error.detach(),
            mse_zscored(x_hat, problem.target),
            explained_variance(x_hat, problem.target),
            displacement_norm(moved, problem.latents),
            translation_norm(translations, problem.clusters.counts),
        )


def stack_trajectory(
    steps: list[StepMetrics], translations: torch.Tensor, clusters: Clusters
) -> InterventionTrajectory:
    """Stack per-step metrics into numpy arrays of shape (len(steps),)."""
    columns = {
        name: np.array([float(getattr(s, name)) for s in steps]) for name in StepMetrics._fields
    }
    return InterventionTrajectory(
        **columns, translations=translations.detach().numpy().copy(), cluster_ids=clusters.ids
    )


# ----------------------------------------------------------------------------- interventions


def bounded_sample(labels: np.ndarray, max_clusters: int, max_per_cluster: int, seed: int) -> np.ndarray:
    """Sorted token indices of the `max_clusters` largest clusters (ties: the lower label), at most
    `max_per_cluster` tokens of each drawn without replacement from `seed`; noise (−1) left out.

    Bounds an intervention cell's cost whatever the concept's size: every step moves n × K latents,
    and GW compares every pair of clusters."""
    labels = np.asarray(labels)
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    largest = ids[np.lexsort((ids, -counts))][:max_clusters]
    rng = np.random.default_rng(seed)
    picked = []
    for cluster in largest:
        members = np.flatnonzero(labels == cluster)
        picked.append(members if members.size <= max_per_cluster
                      else rng.choice(members, max_per_cluster, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def optimise_intervention(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    decode: Decoder,
    target: torch.Tensor,
    config: InterventionConfig,
) -> InterventionTrajectory:
    """Minimise L(Δ) over per-cluster translations with Adam; Z (n, K), x (n, d)."""
    problem = prepare_problem(latents, labels, decode, target, config)
    n_clusters = len(problem.clusters.members)
    translations = latents.new_zeros(n_clusters, latents.shape[1]).requires_grad_()
    optimiser = torch.optim.Adam([translations], lr=config.lr)
    steps = []
    for _ in range(config.steps):
        metrics = evaluate(problem, translations, config)
        # autograd.grad, not backward(): the caller's decoder parameters must not collect gradients.
        (translations.grad,) = torch.autograd.grad(metrics.objective, translations)
        steps.append(metrics._replace(objective=metrics.objective.detach()))
        optimiser.step()
    with torch.no_grad():
        steps.append(evaluate(problem, translations, config))
    return stack_trajectory(steps, translations, problem.clusters)


def random_direction(n_clusters: int, n_latents: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Seeded isotropic Gaussian per-cluster translations (C, K)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_clusters, n_latents, generator=generator, dtype=dtype)


def scale_to_displacement(
    problem: InterventionProblem, direction: torch.Tensor, target_norm: float, clamp: bool
) -> float:
    """The scale s ≥ 0 at which translations s·direction (C, K) displace Z by exactly target_norm."""
    if target_norm == 0:
        return 0.0
    unit = float(translation_norm(direction, problem.clusters.counts))
    if not clamp:
        return target_norm / unit

    def applied_norm(s: float) -> float:
        moved = translate(problem.latents, problem.clusters.token_cluster, s * direction, clamp)
        return float(displacement_norm(moved, problem.latents))

    # Clamping only shortens moves, so the unclamped scale is a lower bound to double from.
    return scale_to_norm(applied_norm, target_norm, unit)


def random_control(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    decode: Decoder,
    target: torch.Tensor,
    config: InterventionConfig,
    target_norm: float,
    seed: int = 0,
    path: bool = True,
) -> InterventionTrajectory:
    """Random per-cluster translations whose applied displacement norm is `target_norm`.

    The trajectory has config.steps + 1 entries like an optimised one: step k applies the fraction
    k/steps of the final random translation (norms in between are exact only without clamping).
    `path=False` evaluates the start and the end only (the steps between are NaN): a GW evaluation
    is costly and the controls' endpoints are what the statistics use.
    """
    if not target_norm >= 0:
        raise ValueError(f"target_norm must be >= 0, got {target_norm!r}")
    problem = prepare_problem(latents, labels, decode, target, config)
    direction = random_direction(len(problem.clusters.members), latents.shape[1], seed, latents.dtype)
    with torch.no_grad():
        final = direction * scale_to_displacement(
            problem, direction, target_norm, config.clamp_nonnegative
        )
        steps = control_path(problem, final, config, path)
    return stack_trajectory(steps, final, problem.clusters)


def run_sweep(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    decode: Decoder,
    target: torch.Tensor,
    base: InterventionConfig,
    alphas: Sequence[float] = ALPHAS,
    directions: Sequence[int] = DIRECTIONS,
    control_seed: int = 0,
) -> list[SweepCell]:
    """Every (direction, α) intervention of `base`, each with a random control of equal displacement.

    Cell i's control uses seed control_seed + i: one shared direction would put all controls on one
    line, and their ΔSep–ΔMSE correlation would be that of a single path, not of random moves.
    """
    cells = []
    for i, (direction, alpha) in enumerate(itertools.product(directions, alphas)):
        config = replace(base, direction=direction, alpha=alpha)
        optimised = optimise_intervention(latents, labels, decode, target, config)
        norm = float(optimised.displacement_norm[-1])
        control = random_control(latents, labels, decode, target, config, norm, control_seed + i)
        cells.append(SweepCell(direction, alpha, optimised, control))
    return cells


def intervention_deltas(trajectories: Sequence[InterventionTrajectory]) -> tuple[np.ndarray, np.ndarray]:
    """(ΔSep, ΔMSE) arrays, one entry per trajectory, final minus before."""
    delta_sep = np.array([t.delta_separability for t in trajectories])
    delta_mse = np.array([t.delta_mse for t in trajectories])
    return delta_sep, delta_mse


def control_path(problem: InterventionProblem, final: torch.Tensor, config: InterventionConfig,
                  path: bool) -> list[StepMetrics]:
    """Metrics at the fractions k/steps of `final` (every k, or only the start and the end)."""
    if path:
        return [evaluate(problem, final * (k / config.steps), config) for k in range(config.steps + 1)]
    start, end = evaluate(problem, final * 0, config), evaluate(problem, final, config)
    gap = StepMetrics(*(torch.tensor(float("nan")) for _ in StepMetrics._fields))
    return [start, *[gap] * (config.steps - 1), end]


def scale_to_norm(norm_at: Callable[[float], float], target: float, unit_norm: float) -> float:
    """The scale s ≥ 0 with norm_at(s) = target: bracketed by doubling, then Brent's method."""
    if target == 0:
        return 0.0
    low, high = 0.0, target / unit_norm
    for _ in range(_MAX_DOUBLINGS):
        if norm_at(high) >= target:
            return scipy.optimize.brentq(lambda s: norm_at(s) - target, low, high, xtol=1e-15 * high, rtol=1e-15)
        low, high = high, 2 * high
    raise ValueError(f"no scale reaches norm {target} along this random direction")
