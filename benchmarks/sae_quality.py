"""SAE quality on the embedded MiniLM: explained variance, L0 and dead latents vs width and k.

    python benchmarks/sae_quality.py --out saema-out [--hook blocks.3.hook_resid_post]
        [--expansions 4 8 16] [--ks 16 32 64] [--steps 3000] [--batch 1024]

Reads the corpus activations of an existing store (run `saema extract --out DIR` first), trains one
TopK SAE per (expansion, k) on the training chunks for exactly `--steps` steps of `--batch` tokens, and
evaluates it on the held-out chunks with the SAELens-named metrics. The step budget is fixed, so the
quality numbers do not depend on how busy the machine is; only the wall times do (the load average
is printed with each row). Every SAE sees the same seeded stream of batches.
Target (8 × d_model, k = 32): explained variance ≥ 0.85, L0 ≤ 32, dead < 5%.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import NamedTuple

import torch

from saema_core.sae import SAE
from saema_core.sae_metrics import ReconstructionMetrics, ReconstructionMetricsAccumulator
from saema_core.sae_training import TrainingConfig, train_sae, training_sae_config
from storage import activation_store as store


class Trained(NamedTuple):
    sae: SAE
    seconds: float


def train(url: str, hook: str, d_model: int, expansion: int, k: int, steps: int, batch: int,
          holdout: float) -> Trained:
    """A TopK SAE of width expansion × d_model trained for exactly `steps` steps, and the wall time."""
    regions, _ = store.corpus_chunks(url, hook, holdout)
    batches = (torch.from_numpy(b) for b in store.training_batches(url, hook, regions, batch, seed=0))
    cfg = training_sae_config(d_model, expansion * d_model, "topk", k)
    train_cfg = TrainingConfig(n_steps=steps, batch_size=batch, dead_tokens_threshold=200_000)
    start = time.perf_counter()
    result = train_sae(cfg, train_cfg, batches)
    return Trained(result.sae, time.perf_counter() - start)


def evaluate(url: str, hook: str, sae: SAE, holdout: float) -> ReconstructionMetrics:
    """SAELens-named metrics on every held-out corpus token."""
    _, held_out = store.corpus_chunks(url, hook, holdout)
    metrics = ReconstructionMetricsAccumulator(sae.cfg.d_sae)
    with torch.inference_mode():
        for region in held_out:
            x = torch.from_numpy(store.read_region(url, hook, region))
            latents, reconstruction = sae(x)
            metrics.update(x, reconstruction, latents)
    return metrics.compute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="saema-out")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--expansions", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--steps", type=int, default=3000, help="training steps of every SAE (fixed)")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--holdout", type=float, default=0.05)
    args = parser.parse_args()
    url = store.activation_store_url(args.out, args.model)
    d_model = store.open_activations(url, args.hook).sizes["d_model"]
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{args.model} {args.hook}, {args.steps} steps × {args.batch} tokens per SAE")
    print(f"{'width':>6} {'k':>4} {'steps':>6} {'train s':>8} {'steps/s':>8} {'EV':>6} {'L0':>6} "
          f"{'dead':>6} {'cossim':>7} {'load':>5}")
    for expansion, k in itertools.product(args.expansions, args.ks):
        trained = train(url, args.hook, d_model, expansion, k, args.steps, args.batch, args.holdout)
        m = evaluate(url, args.hook, trained.sae, args.holdout)
        print(f"{expansion * d_model:>6} {k:>4} {args.steps:>6} {trained.seconds:>8.0f} "
              f"{args.steps / trained.seconds:>8.2f} {m.explained_variance:>6.4f} {m.l0:>6.1f} "
              f"{m.dead_fraction:>6.3f} {m.cossim:>7.3f} {os.getloadavg()[0]:>5.1f}", flush=True)


if __name__ == "__main__":
    main()
