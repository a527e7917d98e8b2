"""Benchmark: the cost of the causal test's separability term per training step.

One SAE fine-tuning run with the term (β ≠ 0: nearest residual centroid per token, one (B, C) one-hot
product for the cluster centroids of the latents, pdist over C centroids) against the same run without
it (β = 0, plain training), on the same batches and the same start. Synthetic activations with the
default run's shapes (d_model 384, TopK width 3 072, k 32, batch 1 024, 16 clusters); medians over
repeats, interleaved, one torch thread (as on a Dask worker). Target: ratio ≤ 1.15.

    python benchmarks/causal_term.py --steps 40 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saema_core.causal import SeparabilityTerm
from saema_core.sae import build_sae
from saema_core.sae_training import TrainingConfig, train_sae, training_sae_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def clustered_batches(n: int, batch_size: int, d: int, centres: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """Tokens around random centres, like residual activations around their k-means centroids."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, centres.shape[0], (n, batch_size), generator=g)
    return [centres[row] + torch.randn(batch_size, d, generator=g) for row in labels]


def timed_run(init, batches, centres, beta: float, steps: int, batch_size: int) -> float:
    config = TrainingConfig(n_steps=steps, batch_size=batch_size, seed=0)
    start = time.perf_counter()
    train_sae(init.cfg, config, iter(batches), init=init, extra_loss=SeparabilityTerm(centres, beta))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    centres = 3 * torch.randn(args.clusters, args.d_model, generator=torch.Generator().manual_seed(1))
    batches = clustered_batches(args.steps, args.batch_size, args.d_model, centres, seed=2)
    cfg = training_sae_config(args.d_model, args.expansion * args.d_model, "topk", args.k)
    init = train_sae(cfg, TrainingConfig(n_steps=2, batch_size=args.batch_size), iter(batches)).sae
    times: dict[float, list[float]] = {0.0: [], 1.0: []}
    for _ in range(args.repeats):
        for beta in times:
            times[beta].append(timed_run(init, batches, centres, beta, args.steps, args.batch_size))
    plain, term = statistics.median(times[0.0]), statistics.median(times[1.0])
    print(f"d_model {args.d_model}, width {args.expansion * args.d_model}, k {args.k}, batch {args.batch_size}, "
          f"{args.clusters} clusters, {args.steps} steps, {args.repeats} repeats (medians, one thread)")
    print(f"plain training (β = 0):        {plain:.2f} s  ({1000 * plain / args.steps:.0f} ms/step)")
    print(f"with the separability term:    {term:.2f} s  ({1000 * term / args.steps:.0f} ms/step)")
    print(f"ratio: {term / plain:.3f}  (target ≤ 1.15)")


if __name__ == "__main__":
    main()
