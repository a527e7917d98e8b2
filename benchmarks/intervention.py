"""Benchmark of the intervention stage (saema_core.intervention).

1. Time per intervention cell (one optimised intervention: `steps` Adam steps + a final evaluation)
   against the number of tokens and clusters, K latents, for the objectives aedp and gw; for gw, the
   share of the time spent inside POT (time accumulated around `ot.gromov.gromov_wasserstein2`).
2. The optimised intervention against the official code's random search at an equal evaluation budget
   (steps + 1 objective evaluations each): final objective values, median over seeds.

Synthetic SAE: a linear decoder with unit-norm rows W_dec (K, d) and a bias; TopK-like non-negative
latents, each cluster sharing a support of `active` latents; x = decoder(Z) + noise, so MSE > 0.

    python benchmarks/intervention.py                   # the full grid
    python benchmarks/intervention.py --tokens 200 --clusters 2 --seeds 2   # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Self

import numpy as np
import ot
import torch
from threadpoolctl import threadpool_limits

from saema_core.baselines import random_search
from saema_core.intervention import InterventionConfig, optimise_intervention


@dataclass
class LinearDecoder:
    """x̂ = z W_dec + b_dec, with the SAELens weight names so the width check finds d_sae."""

    W_dec: torch.Tensor
    b_dec: torch.Tensor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec


@dataclass
class SyntheticConcept:
    latents: torch.Tensor
    labels: np.ndarray
    decoder: LinearDecoder
    target: torch.Tensor


def synthetic_concept(
    n_tokens: int, n_clusters: int, n_latents: int, d_model: int, active: int, seed: int
) -> SyntheticConcept:
    """Clustered sparse non-negative latents (n, K), a linear decoder (K → d) and targets (n, d)."""
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(n_latents, d_model, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    decoder = LinearDecoder(w_dec, 0.1 * torch.randn(d_model, generator=g))
    labels = np.arange(n_tokens) % n_clusters
    centres = torch.zeros(n_clusters, n_latents)
    for c in range(n_clusters):
        support = torch.randperm(n_latents, generator=g)[:active]
        centres[c, support] = torch.rand(active, generator=g) * 2 + 0.5
    # Tokens vary around their centre on the centre's support only, as TopK codes of one concept do.
    jitter = 0.3 * torch.randn(n_tokens, n_latents, generator=g) * (centres[labels] > 0)
    latents = torch.relu(centres[labels] + jitter)
    target = decoder.decode(latents) + 0.2 * torch.randn(n_tokens, d_model, generator=g)
    return SyntheticConcept(latents, labels, decoder, target)


class PotTimer:
    """Accumulates wall time spent inside ot.gromov.gromov_wasserstein2 while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._original: Callable | None = None

    def __enter__(self) -> Self:
        self._original = original = ot.gromov.gromov_wasserstein2

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        ot.gromov.gromov_wasserstein2 = timed
        return self

    def __exit__(self, *exc) -> None:
        ot.gromov.gromov_wasserstein2 = self._original


def time_cell(concept: SyntheticConcept, config: InterventionConfig) -> tuple[float, float, int]:
    """(seconds for one optimised intervention, seconds inside POT, POT calls)."""
    with PotTimer() as pot:
        start = time.perf_counter()
        optimise_intervention(
            concept.latents, concept.labels, concept.decoder.decode, concept.target, config
        )
        elapsed = time.perf_counter() - start
    return elapsed, pot.seconds, pot.calls


def timing_table(args: argparse.Namespace) -> None:
    print(f"\n## Time per intervention cell (K={args.latents}, d={args.d_model}, steps={args.steps})\n")
    print("| objective | gw_max_points | tokens | clusters | seconds | inside POT | POT calls |")
    print("|---|---|---|---|---|---|---|")
    warm_up = synthetic_concept(50, 2, args.latents, args.d_model, args.active, 0)
    time_cell(warm_up, InterventionConfig(objective="gw", steps=1))  # first-call costs out of the table
    rows = itertools.product(args.objectives, args.tokens, args.clusters)
    for objective, n_tokens, n_clusters in rows:
        concept = synthetic_concept(n_tokens, n_clusters, args.latents, args.d_model, args.active, 0)
        limits = [args.gw_max_points] if objective == "gw" else [None]
        if objective == "gw" and n_tokens <= args.gw_exact_max_tokens:
            limits.append(None)
        for limit in limits:
            config = InterventionConfig(objective=objective, steps=args.steps, lr=args.lr,
                                        gw_max_points=limit)
            seconds, pot, calls = time_cell(concept, config)
            share = f"{100 * pot / seconds:.0f}%" if calls else "-"
            shown = "-" if objective == "aedp" else (limit or "all")
            print(f"| {objective} | {shown} | {n_tokens} | {n_clusters} | {seconds:.2f} | {share} | "
                  f"{calls} |", flush=True)


def search_comparison(args: argparse.Namespace) -> None:
    n_tokens, n_clusters = args.compare_tokens, args.compare_clusters
    print(f"\n## Optimised (Adam) vs the official random search, equal budget of {args.steps + 1} "
          f"objective evaluations ({n_tokens} tokens, {n_clusters} clusters, median over "
          f"{args.seeds} seeds)\n")
    print("| objective | direction | L before | L Adam | L random search | s Adam | s search |")
    print("|---|---|---|---|---|---|---|")
    for objective, direction in itertools.product(args.objectives, (1, -1)):
        base = InterventionConfig(objective=objective, direction=direction, steps=args.steps,
                                  lr=args.lr, gw_max_points=args.gw_max_points)
        results = [compare_once(args, base, n_tokens, n_clusters, seed) for seed in range(args.seeds)]
        med = [statistics.median(column) for column in zip(*results, strict=True)]
        print(f"| {objective} | {direction:+d} | {med[0]:.4g} | {med[1]:.4g} | {med[2]:.4g} | "
              f"{med[3]:.2f} | {med[4]:.2f} |", flush=True)


def compare_once(
    args: argparse.Namespace, base: InterventionConfig, n_tokens: int, n_clusters: int, seed: int
) -> tuple[float, float, float, float, float]:
    """(L before, L after Adam, L after random search, seconds Adam, seconds search) for one seed."""
    concept = synthetic_concept(n_tokens, n_clusters, args.latents, args.d_model, args.active, seed)
    config = replace(base, seed=seed)
    inputs = (concept.latents, concept.labels, concept.decoder.decode, concept.target, config)
    start = time.perf_counter()
    adam = optimise_intervention(*inputs)
    middle = time.perf_counter()
    search = random_search(*inputs, seed=seed, step_scale=args.search_scale)
    end = time.perf_counter()
    return (adam.objective[0], adam.objective[-1], search.objective[-1], middle - start,
            end - middle)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[200, 800, 3200])
    parser.add_argument("--clusters", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--objectives", nargs="+", default=["aedp", "gw"], choices=["aedp", "gw"])
    parser.add_argument("--latents", type=int, default=3072, help="K, the SAE width")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--active", type=int, default=32, help="active latents per cluster centre")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--gw-max-points", type=int, default=128)
    parser.add_argument("--gw-exact-max-tokens", type=int, default=800,
                        help="also time exact gw (no subsampling) up to this many tokens")
    parser.add_argument("--compare-tokens", type=int, default=800)
    parser.add_argument("--compare-clusters", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the search comparison")
    parser.add_argument("--search-scale", type=float, default=None,
                        help="per-coordinate proposal std of the random search (default: --lr)")
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Pin torch's and the BLAS pools: on a shared 2-core machine oversubscribed BLAS threads made
    # POT's small numpy matmuls ~50x slower than single-threaded ones.
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):
        timing_table(args)
        search_comparison(args)


if __name__ == "__main__":
    main()
