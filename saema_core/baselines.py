"""Random-search baselines of the intervention (DESIGN.md §7): the released code's procedure, literally
(`paper_search`, z-scored, best of 1/AEDP + λ·MSE), and the same kind of search on saema's own
objective at Adam's budget of evaluations (`random_search`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from saema_core.intervention import (
    DIRECTIONS,
    SEPARABILITY,
    ZSCORE_EPS,
    Decoder,
    InterventionConfig,
    InterventionTrajectory,
    StepMetrics,
    clusters_from_labels,
    displacement_norm,
    evaluate,
    explained_variance,
    mse,
    prepare_problem,
    stack_trajectory,
    translate,
    translation_norm,
    zscore_rows,
)
from saema_core.row_space import linear_decoder

PAPER_STEPS = 10
PAPER_STEP_SCALE = 0.03
"""Default per-latent proposal std (in z-scored units) per unit of α. The released code's step size is
not known to us. At 1 (α per z-scored latent) no proposal was ever accepted on the default run
(MiniLM blocks.3, K = 3 072: every step raises the reconstruction term more than it lowers 1/AEDP), so the
baseline would be a no-op; 0.03 is the largest of 1, 0.1, 0.03, 0.01 at which every seed accepted steps."""


def paper_search(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    decode: Decoder,
    target: torch.Tensor,
    alpha: float,
    lam: float = 1.0,
    direction: int = 1,
    steps: int = PAPER_STEPS,
    seed: int = 0,
    step_scale: float = PAPER_STEP_SCALE,
) -> InterventionTrajectory:
    """The released code's procedure (DESIGN.md §7): the paper-literal baseline.

    Many (α, seed) searches of one problem: `PaperSearch` prepares it once (an affine decoder's W is read
    and checked once, with `row_space.linear_decoder`).

    1. Z-score every token: Z̃ = (Z − μ_t) / s_t over its K latents and x̃ likewise over d_model.
    2. Start from Δ = 0 (per-cluster centre shifts in the z-scored latent space).
    3. `steps` times: propose Δ' = Δ + α·step_scale·N(0, I) (one draw per cluster and latent, seeded)
       and keep it when it lowers L(Δ') = Sep(Z̃ + Δ')^(−direction) + λ·MSE(z(D(μ_t + s_t (Z̃ + Δ'))), x̃),
       with Sep = AEDP and z(·) the per-token z-score: 1/AEDP + λ·MSE when separating, AEDP + λ·MSE
       when merging. No clamp, no gradient.
    The trajectory records the best-so-far state: `separability` is AEDP in the z-scored space, `mse`
    the raw MSE, `mse_zscored` the procedure's own MSE, `objective` L, `displacement_norm` the move in
    raw latent units and `translation_norm` in z-scored units.
    """
    return PaperSearch(latents, labels, decode, target).run(alpha, lam, direction, steps, seed, step_scale)


class PaperSearch:
    """`paper_search`'s problem prepared once — the z-scoring, and for an affine decoder D(Z) and the
    cluster-shift closed forms (`_cluster_shift_measures`) — for many (α, seed) runs.

    With an affine decoder a proposal's decoded shift is (Δ + a·ε)W = ΔW + a·(εW): the `steps` draws ε
    of a seed do not depend on α or on which proposals were accepted, so their projections εW are
    computed in one product per seed and shared by every α (one pass over the K × d decoder per seed,
    not one per proposal). The values are those of the step-by-step search up to rounding."""

    def __init__(self, latents: torch.Tensor, labels, decode: Decoder, target: torch.Tensor) -> None:
        self.latents, self.decode, self.target = latents, decode, target
        self.clusters = clusters_from_labels(labels, latents.shape[0])
        self.mean = latents.mean(dim=1, keepdim=True)
        self.spread = latents.std(dim=1, unbiased=False, keepdim=True) + ZSCORE_EPS
        self.scored, self.x_scored = (latents - self.mean) / self.spread, zscore_rows(target)
        self.weights, self.from_shifts = _cluster_shift_measures(decode, latents, self.scored, self.spread,
                                                                 self.clusters)
        self._draws: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def draws(self, seed: int, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The seed's `steps` proposal draws ε (steps, C, K), in the generator's order, and εW."""
        if (seed, steps) not in self._draws:
            generator = torch.Generator().manual_seed(seed)
            shape = (len(self.clusters.members), self.latents.shape[1])
            noise = torch.stack([torch.randn(shape, generator=generator, dtype=self.latents.dtype)
                                 for _ in range(steps)])
            projected = None if self.weights is None else (noise.reshape(-1, shape[1]) @ self.weights).reshape(
                steps, shape[0], -1)
            self._draws[seed, steps] = noise, projected
        return self._draws[seed, steps]

    def state(self, shifts: torch.Tensor, projected: torch.Tensor | None, lam: float, direction: int) -> StepMetrics:
        """The recorded metrics of cluster shifts Δ (C, K); `projected` = ΔW for an affine decoder."""
        if self.from_shifts is not None:
            x_hat, separability, displacement = self.from_shifts(shifts, projected)
        else:
            moved = translate(self.scored, self.clusters.token_cluster, shifts, clamp=False)
            displaced = self.mean + self.spread * moved
            x_hat, separability = self.decode(displaced), SEPARABILITY["aedp"](moved, self.clusters.members)
            displacement = displacement_norm(displaced, self.latents)
        error = mse(zscore_rows(x_hat), self.x_scored)
        objective = separability ** (-direction) + lam * error
        return StepMetrics(objective, separability, mse(x_hat, self.target), error,
                           explained_variance(x_hat, self.target), displacement,
                           translation_norm(shifts, self.clusters.counts))

    def run(self, alpha: float, lam: float = 1.0, direction: int = 1, steps: int = PAPER_STEPS, seed: int = 0,
            step_scale: float = PAPER_STEP_SCALE) -> InterventionTrajectory:
        """One search (`paper_search`'s steps 2–3)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be +1 or -1, got {direction!r}")
        if not alpha > 0 or not lam >= 0 or steps < 1 or not step_scale > 0:
            raise ValueError(f"need alpha > 0, lam >= 0, steps >= 1 and step_scale > 0, got {alpha}, {lam}, "
                             f"{steps}, {step_scale}")
        noise, projected = self.draws(seed, steps)
        size = alpha * step_scale
        best = self.latents.new_zeros(noise.shape[1:])
        best_projected = None if projected is None else projected.new_zeros(projected.shape[1:])
        with torch.no_grad():
            trajectory = [self.state(best, best_projected, lam, direction)]
            for step in range(steps):
                proposal = best + size * noise[step]
                proposal_projected = None if projected is None else best_projected + size * projected[step]
                metrics = self.state(proposal, proposal_projected, lam, direction)
                if metrics.objective < trajectory[-1].objective:
                    best, best_projected = proposal, proposal_projected
                trajectory.append(metrics if best is proposal else trajectory[-1])
        return stack_trajectory(trajectory, best, self.clusters)


def _cluster_shift_measures(decode: Decoder, latents: torch.Tensor, scored: torch.Tensor, spread: torch.Tensor,
                            clusters) -> tuple[torch.Tensor | None, Callable[..., tuple[torch.Tensor, ...]] | None]:
    """For an affine decoder D(z) = zW + b: W, and the cluster shifts Δ (C, K) with their decoded ΔW
    (C, d) ↦ (x̂, AEDP, applied displacement norm), without the n × K moved latents (the same values up
    to rounding; at K = 65 536 seconds instead of minutes per search). A token t of cluster c moves by
    s_t·Δ_c in raw units, so

        x̂_t = D(z_t) + s_t·(Δ_c W),   centroid_c(Z̃ + Δ) = centroid_c(Z̃) + Δ_c,
        ‖displacement‖² = Σ_c ‖Δ_c‖² Σ_{t ∈ c} s_t².

    (None, None) for any other decoder (then every moved latent is decoded)."""
    try:
        weights = linear_decoder(decode, latents.shape[1])[0].to(latents.dtype)
    except ValueError:
        return None, None
    # D(Z) = ZW + D(0), Z's nonzeros only (a TopK code has k of K per token)
    base = torch.sparse.mm(latents.to_sparse(), weights) + decode(latents.new_zeros(1, latents.shape[1]))
    centroids = torch.stack([scored[m].mean(dim=0) for m in clusters.members])
    spread_sq = torch.stack([(spread[m].to(torch.float64) ** 2).sum() for m in clusters.members])
    singletons = tuple(torch.tensor([c]) for c in range(len(clusters.members)))

    def measures(shifts: torch.Tensor, projected: torch.Tensor) -> tuple[torch.Tensor, ...]:
        padded = torch.cat([projected, projected.new_zeros(1, projected.shape[1])])  # noise tokens stay
        x_hat = base + spread * padded[clusters.token_cluster]
        displacement = torch.sqrt((spread_sq * (shifts.to(torch.float64) ** 2).sum(dim=1)).sum())
        return x_hat, SEPARABILITY["aedp"](centroids + shifts, singletons), displacement

    return weights, measures


def random_search(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    decode: Decoder,
    target: torch.Tensor,
    config: InterventionConfig,
    seed: int = 0,
    step_scale: float | None = None,
) -> InterventionTrajectory:
    """The official code's search: propose Δ + step_scale·N(0, I) per cluster, keep it if L improves.

    Budget: config.steps + 1 objective evaluations (the start and one proposal per step), the same
    count as `optimise_intervention` (whose evaluations each add a backward pass). `step_scale`
    defaults to config.lr, the per-coordinate size of an Adam step. Step k records the best so far.
    """
    problem = prepare_problem(latents, labels, decode, target, config)
    scale = config.lr if step_scale is None else step_scale
    generator = torch.Generator().manual_seed(seed)
    best = latents.new_zeros(len(problem.clusters.members), latents.shape[1])
    with torch.no_grad():
        steps = [evaluate(problem, best, config)]
        for _ in range(config.steps):
            noise = torch.randn(best.shape, generator=generator, dtype=best.dtype)
            proposal = best + scale * noise
            metrics = evaluate(problem, proposal, config)
            if metrics.objective < steps[-1].objective:
                best = proposal
            steps.append(metrics if best is proposal else steps[-1])
    return stack_trajectory(steps, best, problem.clusters)
