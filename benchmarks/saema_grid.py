"""Speed-up of the SAEMA stratification grid with 2 Dask workers vs 1, on the embedded model.

    python benchmarks/saema_grid.py --out saema-out [--repeats 1]

Needs a store with activations and SAEs (`saema train-sae --out DIR` or `saema run --out DIR`). Runs
the default grid (every concept × 3 spaces × 10 σ × 3 replicates) through `stratify_flow` on a local
cluster of 1 and then 2 single-threaded worker processes, and checks both give identical ranks.
Target: ≥ 1.7× with 2 workers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from flows.backend import prefect_backend
from flows.config import SAEStageConfig, StratifyConfig
from flows.stratify import stratify_flow
from storage.results import read_group
from storage.models import DEFAULT_MODEL
from storage.prompts import BUILTIN_CONCEPTS
from tasks.sae import train_or_load_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="saema-out")
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    sae_cfg = SAEStageConfig()
    refs = [train_or_load_sae.fn(args.out, DEFAULT_MODEL, args.hook, kind, sae_cfg) for kind in ("sae", "dense_ae")]
    times, ranks = {1: [], 2: []}, {}
    with prefect_backend():  # as `saema run`: one temporary Prefect server, shared with the workers
        for _ in range(args.repeats):
            for workers in (1, 2):
                start = time.perf_counter()
                stratify_flow(args.out, DEFAULT_MODEL, (args.hook,), BUILTIN_CONCEPTS, refs,
                              StratifyConfig(n_workers=workers), refresh=True)
                times[workers].append(time.perf_counter() - start)
                ranks[workers] = read_group(args.out, "stratification").sel(hook=args.hook)["rank"].values
    one, two = statistics.median(times[1]), statistics.median(times[2])
    cells = len(BUILTIN_CONCEPTS) * 3 * 10 * 3
    print(f"machine: {os.cpu_count()} cores; grid: 1 hook × {len(BUILTIN_CONCEPTS)} concepts × 3 spaces × "
          f"10 σ × 3 replicates = {cells} cells (27 Prefect tasks)")
    print(f"1 worker : {one:7.1f} s\n2 workers: {two:7.1f} s\nspeed-up : {one / two:7.2f}  (target >= 1.7)")
    print(f"identical ranks with 1 and 2 workers: {np.array_equal(ranks[1], ranks[2], equal_nan=True)}")


if __name__ == "__main__":
    main()
