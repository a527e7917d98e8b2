"""Benchmark: wall time and peak memory of the structure stage as the number of tokens grows.

Spaces (one point set per size, synthetic with planted clusters):
- dense: residual-like points, width 384 (the embedded MiniLM's d_model): 20 Gaussian clusters, each
  on a random 8-dimensional subspace, plus small isotropic noise.
- sparse: SAE-like latents in CSR, K = 16 384 latents, 32 active per token: 64 clusters whose
  latent pools partition the dictionary, so every latent is active somewhere (dropping zero columns
  alone cannot shrink the problem).
- sparse-densified (baseline, sizes up to --densify-max): the same latents turned into a dense
  (n, K) array first and run through the dense path — what the sparse path avoids.

Each (space, size) runs the defaults (UMAP to 50 dimensions, HDBSCAN, every metric) in a fresh
subprocess after a warm-up run, which JIT-compiles numba (UMAP, pynndescent) so compilation is not
timed. Memory: the parent samples the child's resident set size (psutil, every 10 ms) and reports
`peak MiB`, the peak above the child's RSS just before the timed run, and `RSS MiB`, the absolute
peak (libraries included) (sampling from outside is not blocked by
numba code holding the GIL). The column `dense K MiB` is the size an (n, K) float32 array would
take.

    python benchmarks/structure.py --sizes 1000 8000 32000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import numpy as np
import psutil
import scipy.sparse as sp

from saema_core.structure import (
    StructureConfig,
    check_point_count,
    cluster_hdbscan,
    embed_umap,
    summarise_structure,
    umap_components,
)
from saema_core.structure_points import preprocess_points

SPACES = ("dense", "sparse", "sparse-densified")
D_MODEL, N_LATENTS, N_ACTIVE = 384, 16_384, 32


class Sample(NamedTuple):
    seconds: float  # time.time() of the sample
    rss: int  # bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000, 32000], help="tokens")
    parser.add_argument("--spaces", nargs="+", choices=SPACES, default=list(SPACES))
    parser.add_argument("--densify-max", type=int, default=8000, help="largest densified baseline")
    parser.add_argument("--seed", type=int, default=0, help="data seed (UMAP uses the default 42)")
    parser.add_argument("--child", nargs=2, metavar=("SPACE", "TOKENS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def dense_points(
    rng: np.random.Generator, n: int, n_clusters: int = 20, dim: int = 8
) -> np.ndarray:
    """(n, 384) float32: Gaussian clusters on random 8-dim subspaces plus isotropic noise."""
    centres = rng.normal(size=(n_clusters, D_MODEL)) * 3.0
    bases = np.linalg.qr(rng.normal(size=(n_clusters, D_MODEL, dim)))[0]
    cluster = rng.integers(0, n_clusters, size=n)
    coords = rng.normal(size=(n, dim, 1))
    points = (
        centres[cluster] + (bases[cluster] @ coords)[..., 0] + 0.05 * rng.normal(size=(n, D_MODEL))
    )
    return points.astype(np.float32)


def sparse_latents(rng: np.random.Generator, n: int, n_clusters: int = 64) -> sp.csr_matrix:
    """(n, 16384) float32 CSR, 32 active per token drawn from its cluster's pool of 256 latents."""
    pools = rng.permutation(N_LATENTS).reshape(n_clusters, -1)
    cluster = rng.integers(0, n_clusters, size=n)
    cols = np.stack([rng.choice(pools[c], N_ACTIVE, replace=False) for c in cluster])
    values = rng.uniform(0.5, 2.0, size=(n, N_ACTIVE)).astype(np.float32)
    indptr = np.arange(0, n * N_ACTIVE + 1, N_ACTIVE)
    return sp.csr_matrix((values.ravel(), cols.ravel(), indptr), shape=(n, N_LATENTS))


def make_points(space: str, n: int, seed: int) -> np.ndarray | sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return dense_points(rng, n) if space == "dense" else sparse_latents(rng, n)


def warm_up_points(space: str) -> np.ndarray | sp.csr_matrix:
    """Small data taking the same code paths as ``space`` (numba compiles per type, not shape).

    Dense input of >= 4096 points makes UMAP use pynndescent, so that is compiled too; the data are
    narrow so that the memory they free stays small next to the measured run.
    """
    rng = np.random.default_rng(1)
    if space == "dense":
        return rng.normal(size=(4200, 4)).astype(np.float32)
    return sparse_latents(rng, 300)


def analyse_timed(points: np.ndarray | sp.csr_matrix, cfg: StructureConfig) -> dict[str, float]:
    """The stages of ``analyse_structure`` with a wall time each, plus a few result figures."""
    seconds = {}
    start = time.perf_counter()
    prepared = preprocess_points(points, "benchmark")
    check_point_count(prepared.n_points, cfg, "benchmark")
    seconds["preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    embedding = embed_umap(prepared, umap_components(prepared.n_points, cfg.n_components), cfg, 42)
    seconds["umap"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = cluster_hdbscan(embedding, cfg.min_cluster_size)
    seconds["hdbscan"] = time.perf_counter() - start
    start = time.perf_counter()
    result = summarise_structure(prepared, embedding, labels, cfg, "benchmark", 42)
    seconds["metrics"] = time.perf_counter() - start
    figures = {
        name: result.metrics[name] for name in ("n_active_columns", "n_clusters", "noise_fraction")
    }
    return seconds | figures


def child(space: str, n: int, seed: int) -> None:
    """Warm up, announce the baseline, run one timed case, print it as a JSON line."""
    cfg = StructureConfig()
    analyse_timed(warm_up_points(space), dataclasses.replace(cfg, n_components=2))
    points = make_points(space, n, seed)
    print(json.dumps({"event": "ready", "time": time.time()}), flush=True)
    start = time.perf_counter()
    if space == "sparse-densified":
        points = points.toarray()  # the naive route: part of the measured run
    row = analyse_timed(points, cfg)
    row["total"] = time.perf_counter() - start
    print(json.dumps({"event": "result", **row}), flush=True)


def sample_rss(pid: int, samples: list[Sample], stop: threading.Event) -> None:
    """Append the RSS of process ``pid`` every 10 ms until ``stop`` is set or it exits."""
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            samples.append(Sample(time.time(), process.memory_info().rss))
        except psutil.NoSuchProcess:
            return
        time.sleep(0.01)


def measure(space: str, n: int, seed: int) -> dict[str, float]:
    """Run one case in a subprocess; its stage times and peak RSS above its pre-run baseline."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        space,
        str(n),
        "--seed",
        str(seed),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    samples: list[Sample] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(process.pid, samples, stop))
    sampler.start()
    output, _ = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(
            f"benchmark case {space} × {n} failed with exit code {process.returncode}"
        )
    events = {e["event"]: e for e in map(json.loads, output.splitlines())}
    before = [s.rss for s in samples if s.seconds <= events["ready"]["time"]]
    during = [s.rss for s in samples if s.seconds > events["ready"]["time"]]
    if not (before and during):
        raise RuntimeError(f"benchmark case {space} × {n}: no memory samples around the run")
    extra = {"peak_mib": (max(during) - before[-1]) / 2**20, "peak_rss_mib": max(during) / 2**20}
    return events["result"] | extra


def print_row(space: str, n: int, row: dict[str, float]) -> None:
    dense_k = n * N_LATENTS * 4 / 2**20 if space != "dense" else float("nan")
    cells = [
        f"{space:<17}{n:>7}{row['n_active_columns']:>8.0f}{row['preprocess']:>8.2f}",
        f"{row['umap']:>8.1f}{row['hdbscan']:>8.2f}{row['metrics']:>8.1f}{row['total']:>9.1f}",
        f"{row['peak_mib']:>10.0f}{row['peak_rss_mib']:>9.0f}{dense_k:>13.0f}",
        f"{row['n_clusters']:>6.0f}",
        f"{row['noise_fraction']:>7.2f}",
    ]
    print("".join(cells), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.seed)
        return
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"cores: {os.cpu_count()}  load average: {load}  (UMAP runs single-threaded: fixed seed)")
    print(
        f"{'space':<17}{'tokens':>7}{'cols':>8}{'prep s':>8}{'umap s':>8}{'hdb s':>8}{'metr s':>8}"
        f"{'total s':>9}{'peak MiB':>10}{'RSS MiB':>9}{'dense K MiB':>13}{'clus':>6}{'noise':>7}"
    )
    for n in args.sizes:
        for space in args.spaces:
            if space == "sparse-densified" and n > args.densify_max:
                continue
            print_row(space, n, measure(space, n, args.seed))


if __name__ == "__main__":
    main()
