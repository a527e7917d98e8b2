"""Benchmark: saema's latent-mode SSPD rank against the naive K×K route and the eigvalsh floor.

Problem (defaults): K = 16 384 latents, 2 048 tokens (P = 64 prompts × T = 32 positions), 32 active
latents per token on random supports with random positive values — an SAE-like code.

- saema: `sspd_spectrum(Z, "latent")` + `rank_estimates` on the dense (P, T, K) float32 tensor
  (nonzero scan, active block, smaller Gram, eigvalsh, every estimator). Median over repeats.
- naive: `numpy.linalg.matrix_rank(S)` of the explicit float64 K×K SSPD matrix S = Z(3) Z(3)ᵀ (timed
  once; building S is timed separately). Target: identical rank, saema ≥ 100× faster.
- floor: `numpy.linalg.eigvalsh` of the float64 smaller Gram alone (min(tokens, active latents)
  squared, built beforehand and not timed), timed in alternation with saema so that both see the same
  load on a shared machine. Target: saema within 1.5× of it.

The naive SVD of a 16 384² matrix takes tens of minutes on a small machine: `--naive-K` runs the naive
comparison on a smaller dictionary (same tokens and sparsity), `--hermitian` uses numpy's symmetric
route (`matrix_rank(S, hermitian=True)`, eigenvalues instead of the SVD: a faster, stricter baseline
that is feasible at K = 16 384), `--skip-naive` leaves it out.

    python benchmarks/sspd_rank.py --threads 1 --naive-K 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from saema_core.ranks import rank_estimates, sspd_spectrum, unfold


class Row(NamedTuple):
    case: str
    K: int
    n_active: int
    rank: int
    seconds: float
    note: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--latents", type=int, default=16_384, help="dictionary size K")
    parser.add_argument("--prompts", type=int, default=64, help="P")
    parser.add_argument("--positions", type=int, default=32, help="T (tokens = P·T)")
    parser.add_argument("--active", type=int, default=32, help="active latents per token")
    parser.add_argument(
        "--repeats", type=int, default=5, help="repeats for the median (saema, floor)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pool",
        type=int,
        default=None,
        help="draw supports from the first POOL latents (rank < tokens)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="BLAS threads (default: library's)"
    )
    parser.add_argument("--skip-naive", action="store_true", help="leave out the K×K matrix_rank")
    parser.add_argument("--naive-K", type=int, default=None, help="K for the naive comparison")
    parser.add_argument(
        "--hermitian",
        action="store_true",
        help="naive matrix_rank(S, hermitian=True): eigvalsh instead of the SVD (faster baseline)",
    )
    return parser.parse_args(argv)


def random_sparse_code(
    rng: np.random.Generator, n_tokens: int, K: int, active: int, pool: int | None = None
) -> np.ndarray:
    """(n_tokens, K) float32: `active` distinct random latents per token among the first `pool` (all K
    by default), values uniform in [0.1, 1)."""
    latents = np.zeros((n_tokens, K), dtype=np.float32)
    for row in latents:
        row[rng.choice(pool or K, size=active, replace=False)] = rng.uniform(0.1, 1.0, size=active)
    return latents


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def saema_rank(Z: np.ndarray) -> tuple[int, int]:
    """(numerical latent-mode rank, n_active) the way saema computes them."""
    spectrum = sspd_spectrum(Z, "latent")
    return int(rank_estimates(spectrum)["numerical"]), spectrum.n_active


def smaller_gram(latents: np.ndarray) -> np.ndarray:
    """The float64 smaller Gram of the active block, built independently of saema (not timed)."""
    code = sp.csr_array(latents.astype(np.float64))
    block = code[:, np.unique(code.indices)]
    return (block @ block.T if block.shape[0] <= block.shape[1] else block.T @ block).toarray()


def floor_rank(gram: np.ndarray, K: int) -> int:
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    return int(np.count_nonzero(lam > lam.max() * K * np.finfo(np.float64).eps))


def saema_and_floor_rows(latents: np.ndarray, Z: np.ndarray, repeats: int) -> list[Row]:
    """saema and the floor timed in alternation (same machine load for both), medians over repeats."""
    gram, K = smaller_gram(latents), Z.shape[2]
    saema_times, floor_times = [], []
    for _ in range(repeats):
        seconds, (rank, n_active) = timed(lambda: saema_rank(Z))
        saema_times.append(seconds)
        seconds, floor = timed(lambda: floor_rank(gram, K))
        floor_times.append(seconds)
    ratios = [a / b for a, b in zip(saema_times, floor_times)]
    note = f"Gram {gram.shape}; median of per-repeat saema/floor {statistics.median(ratios):.2f}"
    return [
        Row("saema", K, n_active, rank, statistics.median(saema_times), ""),
        Row("floor eigvalsh", K, n_active, floor, statistics.median(floor_times), note),
    ]


def saema_row(Z: np.ndarray, repeats: int) -> Row:
    times = [timed(lambda: saema_rank(Z)) for _ in range(repeats)]
    rank, n_active = times[-1][1]
    return Row("saema", Z.shape[2], n_active, rank, statistics.median(t for t, _ in times), "")


def naive_row(Z: np.ndarray, hermitian: bool = False) -> Row:
    """numpy.linalg.matrix_rank of the explicit K×K S = Z(3) Z(3)ᵀ, timed once (`hermitian`: numpy's
    symmetric route, eigenvalues instead of singular values, several times faster)."""
    start = time.perf_counter()
    unfolding = unfold(Z, "latent").astype(np.float64)
    S = unfolding @ unfolding.T
    build = time.perf_counter() - start
    start = time.perf_counter()
    rank = int(np.linalg.matrix_rank(S, hermitian=hermitian))
    seconds = time.perf_counter() - start
    n_active = int(np.count_nonzero(np.any(unfolding != 0, axis=1)))
    case = "naive matrix_rank(S, h)" if hermitian else "naive matrix_rank(S)"
    return Row(case, Z.shape[2], n_active, rank, seconds, f"+ {build:.1f} s to build S")


def print_table(rows: list[Row], reference: dict[int, float]) -> None:
    """One line per measurement; `vs saema` = its time / saema's time on the same K."""
    print(f"{'case':<25}{'K':>7}{'active':>8}{'rank':>7}{'seconds':>11}{'vs saema':>10}  note")
    for row in rows:
        ratio = row.seconds / reference[row.K]
        print(
            f"{row.case:<25}{row.K:>7}{row.n_active:>8}{row.rank:>7}"
            f"{row.seconds:>11.3f}{ratio:>10.2f}  {row.note}"
        )


def run(args: argparse.Namespace) -> list[Row]:
    rng = np.random.default_rng(args.seed)
    n_tokens = args.prompts * args.positions
    latents = random_sparse_code(rng, n_tokens, args.latents, args.active, args.pool)
    Z = latents.reshape(args.prompts, args.positions, args.latents)
    rows = saema_and_floor_rows(latents, Z, args.repeats)
    if not args.skip_naive:
        naive_K = args.naive_K or args.latents
        if naive_K != args.latents:
            small = random_sparse_code(rng, n_tokens, naive_K, args.active, args.pool)
            Z = small.reshape(args.prompts, args.positions, naive_K)
            rows.append(saema_row(Z, args.repeats))
        rows.append(naive_row(Z, args.hermitian))
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"cores: {os.cpu_count()}  load average: {load}  BLAS threads: {args.threads or 'default'}"
    )
    print(
        f"tokens {args.prompts}×{args.positions} = {args.prompts * args.positions}, "
        f"{args.active} active per token among {args.pool or 'all'} latents, repeats {args.repeats}"
    )
    with threadpool_limits(limits=args.threads):
        rows = run(args)
    reference = {row.K: row.seconds for row in rows if row.case == "saema"}
    print_table(rows, reference)
    naive = [row for row in rows if row.case.startswith("naive")]
    for row in naive:
        saema = next(r for r in rows if r.case == "saema" and r.K == row.K)
        verdict = "identical" if saema.rank == row.rank else "DIFFERENT"
        print(f"K={row.K}: rank {verdict}; speed-up {row.seconds / saema.seconds:.0f}×")
    floor = next(row for row in rows if row.case.startswith("floor"))
    print(f"saema / floor = {reference[floor.K] / floor.seconds:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
