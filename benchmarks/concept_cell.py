"""Benchmark: one SAEMA cell's spectra on a corpus-context concept, saema against the unfolding route.

A corpus concept is P contexts padded to T positions with one analysed token each, at positions that
vary with the context (default P = 2 000, T = 54, as `months` on MiniLM). Two codes of its n = P
analysed tokens (K = 3 072): an SAE-like TopK code (32 active latents per token) and the dense AE's
affine code Z = X W + b (X on an affine hyperplane of d = 384, as post-LayerNorm residuals).

- saema: `sspd_spectrum(code, mode)` per mode — the latent mode from the smaller Gram of the active
  block (the affine code from its (d + 1)-sized factor), the prompt and position modes from
  same-position / same-prompt token pairs split into independent blocks.
- baseline (the route before): the smaller Gram of the active block of each explicit mode-n unfolding,
  held sparse when it is, and `eigvalsh` of it — for the latent mode of the dense code that is the
  n × n Gram of an n × K matrix.

Both give the same exact ranks (checked); medians over repeats, one BLAS thread, interleaved.

    python benchmarks/concept_cell.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from saema_core.ranks import AffineMap, latent_code_from_tokens, rank_estimates, sspd_spectrum


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--positions", type=int, default=54)
    parser.add_argument("--latents", type=int, default=3072)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--active", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def concept(args, rng):
    """Mask (P, T) with one analysed token per prompt at a position in [8, T − 8), and the two codes."""
    P, T, K, d = args.prompts, args.positions, args.latents, args.d_model
    mask = np.zeros((P, T), dtype=bool)
    mask[np.arange(P), rng.integers(8, T - 8, P)] = True
    x = rng.standard_normal((P, d))
    x += (1.0 - x.sum(axis=1, keepdims=True)) / d  # on the hyperplane sum(x) = 1
    W, b = rng.standard_normal((d, K)) / np.sqrt(d), rng.standard_normal(K)
    dense = (x @ W + b).astype(np.float32)
    topk = np.zeros((P, K), dtype=np.float32)
    np.put_along_axis(topk, rng.random((P, K)).argsort(axis=1)[:, :args.active], 1.0 + rng.random((P, args.active)), 1)
    return mask, {"topk": (topk, None), "dense": (dense, AffineMap(x, W, b))}


def unfolding(latents: np.ndarray, mask: np.ndarray, mode: str) -> sp.csr_array:
    """The explicit mode-n unfolding of the masked tensor, as a sparse matrix (rows = the mode)."""
    P, T = mask.shape
    K = latents.shape[1]
    p, t = np.nonzero(mask)
    coo = sp.coo_array(latents)
    row = {"prompt": p[coo.row], "position": t[coo.row], "latent": coo.col}[mode]
    col = {"prompt": t[coo.row] * K + coo.col, "position": p[coo.row] * K + coo.col,
           "latent": p[coo.row] * T + t[coo.row]}[mode]
    size = {"prompt": (P, T * K), "position": (T, P * K), "latent": (K, P * T)}[mode]
    return sp.csr_array((coo.data.astype(np.float64), (row, col)), shape=size)


def baseline_rank(latents: np.ndarray, mask: np.ndarray, mode: str) -> int:
    A = unfolding(latents, mask, mode)
    rows, cols = np.unique(A.nonzero()[0]), np.unique(A.nonzero()[1])
    A = A[rows][:, cols]
    if A.shape[0] > A.shape[1]:
        A = A.T
    dense_enough = A.nnz > 0.05 * A.shape[0] * A.shape[1]
    gram = (A.toarray() @ A.toarray().T) if dense_enough else (A @ A.T).toarray()
    lam = np.linalg.eigvalsh(gram)[::-1]
    return int(np.count_nonzero(lam > lam[0] * max(unfolding(latents, mask, mode).shape[0], 1) * np.finfo(float).eps))


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mask, codes = concept(args, np.random.default_rng(0))
    print(f"P {args.prompts} × T {args.positions}, {int(mask.sum())} analysed tokens, K {args.latents}, "
          f"one BLAS thread, medians of {args.repeats}")
    print(f"{'code':6} {'mode':9} {'rank':>6} {'saema s':>9} {'baseline s':>11} {'ratio':>7}")
    with threadpool_limits(1):
        for name, (latents, affine) in codes.items():
            code = latent_code_from_tokens(latents, mask)
            for mode in ("latent", "prompt", "position"):
                ours, theirs = [], []
                for _ in range(args.repeats):
                    seconds, spectrum = timed(lambda: sspd_spectrum(code, mode, affine))
                    ours.append(seconds)
                    seconds, expected = timed(lambda: baseline_rank(latents, mask, mode))
                    theirs.append(seconds)
                rank = int(rank_estimates(spectrum)["numerical"])
                assert rank == expected, (name, mode, rank, expected)
                a, b = statistics.median(ours), statistics.median(theirs)
                print(f"{name:6} {mode:9} {rank:6d} {a:9.3f} {b:11.3f} {b / a:6.1f}×")


if __name__ == "__main__":
    main()
