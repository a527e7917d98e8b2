"""SAE quality on the embedded MiniLM: explained variance vs width and k, under a CPU time budget.

    python benchmarks/sae_quality.py --out saema-out [--hook blocks.3.hook_resid_post]
        [--expansions 4 8] [--ks 16 32] [--steps 3000] [--budget-s 600]

Reads the corpus activations of an existing store (run `saema extract --out DIR` first), trains TopK
SAEs on the training chunks and evaluates on the held-out chunks with the SAELens-named metrics.
Each run stops at `--steps` or when `--budget-s` of wall time is used, whichever comes first.
Target (8 × d_model, k = 32): explained variance ≥ 0.85, L0 ≤ 32, dead < 5% within 10 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import torch

from saema_core.sae_metrics import ReconstructionMetricsAccumulator
from saema_core.sae_training import TrainingConfig, train_sae, training_sae_config
from storage import activation_store as store


class _Budget(Exception):
    pass


def train_within(url, hook, d_model, expansion, k, steps, batch, budget_s, holdout):
    regions, _ = store.corpus_chunks(url, hook, holdout)
    batches = (torch.from_numpy(b) for b in store.training_batches(url, hook, regions, batch, seed=0))
    start, done = time.perf_counter(), {"steps": 0}

    def progress(step, stats):
        done["steps"] = step + 1

    cfg = training_sae_config(d_model, expansion * d_model, "topk", k)
    train_cfg = TrainingConfig(n_steps=steps, batch_size=batch, dead_tokens_threshold=200_000)
    # Honour the budget by capping the steps from a short timing probe.
    probe = train_sae(cfg, TrainingConfig(n_steps=5, batch_size=batch), batches, progress=progress)
    per_step = (time.perf_counter() - start) / 5
    n_steps = max(10, min(steps, int(budget_s / per_step)))
    start = time.perf_counter()
    result = train_sae(cfg, TrainingConfig(**{**train_cfg.__dict__, "n_steps": n_steps}), batches)
    del probe
    return result.sae, n_steps, time.perf_counter() - start


def evaluate(url, hook, sae, holdout):
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
    parser.add_argument("--expansions", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--budget-s", type=float, default=600)
    parser.add_argument("--holdout", type=float, default=0.05)
    args = parser.parse_args()
    url = store.activation_store_url(args.out, args.model)
    d_model = store.open_activations(url, args.hook).sizes["d_model"]
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"{args.model} {args.hook}, batch {args.batch}, budget {args.budget_s:.0f} s per SAE")
    print(f"{'width':>6} {'k':>4} {'steps':>6} {'train s':>8} {'EV':>6} {'L0':>6} {'dead':>6} {'cossim':>7}")
    for expansion, k in itertools.product(args.expansions, args.ks):
        sae, n_steps, seconds = train_within(url, args.hook, d_model, expansion, k, args.steps, args.batch,
                                             args.budget_s, args.holdout)
        m = evaluate(url, args.hook, sae, args.holdout)
        print(f"{expansion * d_model:>6} {k:>4} {n_steps:>6} {seconds:>8.0f} {m.explained_variance:>6.4f} "
              f"{m.l0:>6.1f} {m.dead_fraction:>6.3f} {m.cossim:>7.3f}", flush=True)


if __name__ == "__main__":
    main()
