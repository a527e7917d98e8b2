"""Speed-up of the SAEMA stratification grid with 2 Dask workers vs 1, on the embedded model, beside
the speed-up this machine gives two processes at that moment.

    python benchmarks/saema_grid.py --out saema-out [--repeats 3]

Needs a store with activations and SAEs (`saema train-sae --out DIR` or `saema run --out DIR`). Each
repeat runs, interleaved:

- grid: the default grid (every concept × 3 spaces × 10 σ × 3 replicates) through `stratify_flow`
  with `refresh=True`, on a local cluster of 1 and then 2 single-threaded worker processes shared
  for the run as in `saema run` (Prefect task runs, results written). Timed twice per cluster: the
  first stage of a run (it starts the cluster: worker processes, their imports) and a stage on the
  running cluster (as the later stages of a run). Target: ≥ 1.7× with 2.
- ceiling: the same cells computed bare (`stratify_cells.fn`, no Prefect, no Dask) by 1 process,
  then split between 2 processes that start computing at the same instant. Their ratio is what the
  machine's two cores give at that moment — on a shared virtual machine two busy processes can get
  much less than twice the throughput of one, and no scheduler can beat that.

Ranks must be identical with 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from flows.backend import prefect_backend
from flows.config import SAEStageConfig, StratifyConfig
from flows.dask_runner import cluster_per_run
from flows.grid import longest_first
from flows.stratify import _cells, stratify_calls, stratify_flow
from storage.models import DEFAULT_MODEL
from storage.prompts import BUILTIN_CONCEPTS
from storage.results import read_group
from tasks.sae import train_or_load_sae
from tasks.stratify import StratifyParams, stratify_cells


def default_calls(out: str, hook: str):
    cfg = StratifyConfig()
    refs = [train_or_load_sae.fn(out, DEFAULT_MODEL, hook, kind, SAEStageConfig()) for kind in ("sae", "dense_ae")]
    params = StratifyParams(cfg.noise_levels, cfg.replicates, cfg.noise_scale, cfg.seed)
    cells = _cells([hook], list(BUILTIN_CONCEPTS), cfg.spaces)
    return refs, stratify_calls(out, DEFAULT_MODEL, cells, refs, params)


def run_share(out: str, hook: str, part: int, parts: int, start_at: float) -> None:
    """Child: wait for the common start instant, compute this part's cells bare, print the seconds."""
    _, calls = default_calls(out, hook)
    share = [calls[i] for n, i in enumerate(longest_first("stratify", calls)) if n % parts == part]
    time.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    for call in share:
        stratify_cells.fn(**call)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def bare_cells(out: str, hook: str, processes: int) -> float:
    """Wall time of every cell computed bare by `processes` processes that start together."""
    start_at = time.time() + 15.0  # after every child has imported and read its inputs
    children = [subprocess.Popen([sys.executable, __file__, "--out", out, "--hook", hook, "--share",
                                  f"{part}/{processes}/{start_at}"], stdout=subprocess.PIPE, text=True)
                for part in range(processes)]
    seconds = [json.loads(child.communicate()[0].strip().splitlines()[-1])["seconds"] for child in children]
    return max(seconds)


def grid_stage(out: str, hook: str, refs, workers: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    stratify_flow(out, DEFAULT_MODEL, (hook,), BUILTIN_CONCEPTS, refs, StratifyConfig(n_workers=workers),
                  refresh=True)
    seconds = time.perf_counter() - start
    return seconds, read_group(out, "stratification").sel(hook=hook)["rank"].values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="saema-out")
    parser.add_argument("--hook", default="blocks.3.hook_resid_post")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--share", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.share:
        part, parts, start_at = args.share.split("/")
        return run_share(args.out, args.hook, int(part), int(parts), float(start_at))
    refs, calls = default_calls(args.out, args.hook)
    first, grid, bare, ranks = {1: [], 2: []}, {1: [], 2: []}, {1: [], 2: []}, {}
    with prefect_backend():  # as `saema run`: one temporary Prefect server, shared with the workers
        for _ in range(args.repeats):
            for n in (1, 2):
                bare[n].append(bare_cells(args.out, args.hook, n))
            for n in (1, 2):
                with cluster_per_run():
                    first[n].append(grid_stage(args.out, args.hook, refs, n)[0])
                    seconds, ranks[n] = grid_stage(args.out, args.hook, refs, n)
                    grid[n].append(seconds)
    f1, f2 = statistics.median(first[1]), statistics.median(first[2])
    g1, g2 = statistics.median(grid[1]), statistics.median(grid[2])
    b1, b2 = statistics.median(bare[1]), statistics.median(bare[2])
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; grid: 1 hook × "
          f"{len(BUILTIN_CONCEPTS)} concepts × 3 spaces × 10 σ × 3 replicates = {len(calls) * 30} cells "
          f"({len(calls)} Prefect tasks); medians of {args.repeats}")
    print(f"bare cells, 1 process : {b1:7.1f} s   (all runs: {', '.join(f'{t:.1f}' for t in bare[1])})")
    print(f"bare cells, 2 processes: {b2:7.1f} s   (all runs: {', '.join(f'{t:.1f}' for t in bare[2])})")
    print(f"ceiling (machine speed-up for 2 processes): {b1 / b2:5.2f}")
    print(f"first stage (starts the cluster), 1 worker : {f1:7.1f} s   (all runs: {', '.join(f'{t:.1f}' for t in first[1])})")
    print(f"first stage (starts the cluster), 2 workers: {f2:7.1f} s   (all runs: {', '.join(f'{t:.1f}' for t in first[2])})")
    print(f"  speed-up with the cluster start: {f1 / f2:5.2f}")
    print(f"grid on the running cluster, 1 worker : {g1:7.1f} s   (all runs: {', '.join(f'{t:.1f}' for t in grid[1])})")
    print(f"grid on the running cluster, 2 workers: {g2:7.1f} s   (all runs: {', '.join(f'{t:.1f}' for t in grid[2])})")
    print(f"  speed-up: {g1 / g2:5.2f}  (target >= 1.7; {g1 / g2 / (b1 / b2):.0%} of the ceiling)")
    print(f"identical ranks with 1 and 2 workers: {np.array_equal(ranks[1], ranks[2], equal_nan=True)}")


if __name__ == "__main__":
    main()
