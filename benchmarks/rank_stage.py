"""The rank stage's task at ≥ 2 000 tokens per concept against its floor, `eigvalsh` of the smaller Gram.

One stratify task is one (hook, concept, space) with every (σ, replicate) cell: noise, encoding (CSR,
bounded chunks), the three modes' spectra, rank estimates and support strata (`tasks.stratify._sweep`,
the function the task runs). Its floor is the one step no exact route avoids: for every cell, the
eigenvalues of the smaller of Z Zᵀ and Zᵀ Z over the active block of the latent-mode unfolding
(`scipy.linalg.eigh(eigvals_only=True)`, the same LAPACK driver), timed on the same codes in the same
run. Target: task / floor ≤ 1.5.

Synthetic concept: P prompts × T positions with `--analysed` analysed tokens per prompt, activations
N(0, 1) in d_model 384, a random TopK SAE (k 32) of width `--d-sae`; the default grid's 10 σ × 3
replicates. One BLAS thread (as a Dask worker runs it), medians over repeats.

    python benchmarks/rank_stage.py [--tokens 2000] [--d-sae 3072] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

from flows.config import StratifyConfig
from saema_core.noise import add_noise, derive_seed
from saema_core.ranks import _active_block, _eigvalsh, _smaller_gram
from saema_core.sae.sparse import encode_csr
from tasks.stratify import StratifyParams, _sweep

from sae_encode import D_IN, random_topk_sae  # benchmarks/ is the script's folder



def _concept(tokens: int, analysed: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    prompts = -(-tokens // analysed)
    rng = np.random.default_rng(0)
    mask = np.zeros((prompts, positions), dtype=bool)
    mask[:, 1:analysed + 1] = True
    return rng.normal(size=(prompts, positions, D_IN)).astype(np.float32), mask


def _floor(x, mask, sae, params: StratifyParams) -> float:
    """Seconds of the latent-mode eigvalsh alone over the task's distinct cells (σ = 0 once)."""
    total = 0.0
    for sigma in params.noise_levels:
        for r in range(1 if sigma == 0 else params.replicates):
            noisy = add_noise(x[mask], sigma, 1.0, derive_seed(params.base_seed, "h", "c", sigma, r))
            gram = _smaller_gram(_active_block(sp.csr_array(encode_csr(sae, noisy))))
            start = time.perf_counter()
            _eigvalsh(gram)
            total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2000])
    parser.add_argument("--analysed", type=int, default=10, help="analysed tokens per prompt")
    parser.add_argument("--positions", type=int, default=16)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sae = random_topk_sae(args.d_sae)
    cfg = StratifyConfig()
    params = StratifyParams(cfg.noise_levels, cfg.replicates, "absolute", 0)

    def encode(tokens):
        return encode_csr(sae, tokens)

    print(f"{'tokens':>6} {'task s':>7} {'floor s':>8} {'task / floor':>12}")
    with threadpool_limits(1), torch.inference_mode():
        torch.set_num_threads(1)
        for tokens in args.tokens:
            x, mask = _concept(tokens, args.analysed, args.positions)
            task, floor = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                _sweep(x, mask, encode, params, "h", "c", "latent")
                task.append(time.perf_counter() - start)
                floor.append(_floor(x, mask, sae, params))
            t, f = statistics.median(task), statistics.median(floor)
            print(f"{int(mask.sum()):>6} {t:>7.2f} {f:>8.2f} {t / f:>12.2f}")


if __name__ == "__main__":
    main()
