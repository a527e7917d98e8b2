"""Concept encoding at d_sae 65 536: memory and time of `encode_csr` against the dense path it replaced.

Each measurement runs in a fresh process (peak RSS is per process): it builds a random TopK SAE
(d_in 384, k 32), draws the tokens, records its RSS, encodes, and reports the peak RSS above that
starting point and the seconds taken.

- `dense`: the old concept encoding — `sae.encode` in 4 096-token batches, concatenated into one dense
  (tokens × d_sae) float32 matrix, then its nonzeros kept (what `tasks/sae.py` did before);
- `csr`: `saema_core.sae.sparse.encode_csr` (chunks of at most 2²⁴ pre-activations, k pairs kept per
  token);
- `floor`: the pre-activation matmul and topk alone in the same chunks, keeping nothing (the time floor).

    python benchmarks/sparse_encode.py [--tokens 2048 8192 25000] [--d-sae 65536]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from sae_encode import D_IN, K, random_topk_sae  # benchmarks/ is the script's folder



def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _dense(sae, x):
    from saema_core.ranks import csr_of_dense

    with torch.inference_mode():
        dense = np.concatenate([sae.encode(torch.from_numpy(x[i:i + 4096])).numpy() for i in range(0, len(x), 4096)])
    return csr_of_dense(dense)


def _floor(sae, x):
    from saema_core.sae.sparse import chunk_rows

    with torch.inference_mode():
        for chunk in torch.from_numpy(x).split(chunk_rows(sae.cfg.d_sae)):
            sae.hidden_pre(sae.sae_input(chunk)).topk(K, dim=-1, sorted=False)


def measure(method: str, tokens: int, d_sae: int) -> dict:
    """One measurement, in this process: peak RSS above the start (MiB) and seconds."""
    from saema_core.sae.sparse import encode_csr

    sae = random_topk_sae(d_sae)
    x = np.random.default_rng(0).normal(size=(tokens, D_IN)).astype(np.float32)
    fn = {"dense": _dense, "csr": encode_csr, "floor": _floor}[method]
    fn(sae, x[:64])  # warm-up: thread pool, allocator
    start_rss = _rss_mib()
    start = time.perf_counter()
    fn(sae, x)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "tokens": tokens, "d_sae": d_sae, "seconds": seconds,
            "peak_above_start_mib": max(peak - start_rss, 0.0)}


def run(method: str, tokens: int, d_sae: int) -> dict:
    cmd = [sys.executable, __file__, "--one", method, str(tokens), str(d_sae)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"method": method, "tokens": tokens, "d_sae": d_sae, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 25000])
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--dense-max-tokens", type=int, default=8192, help="largest token count for `dense`")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, tokens, d_sae = args.one
        print(json.dumps(measure(method, int(tokens), int(d_sae))))
        return
    torch.set_num_threads(2)
    print(f"{'tokens':>7} {'method':>6} {'seconds':>8} {'peak MiB':>9} {'time / floor':>12}")
    for tokens in args.tokens:
        rows = {m: run(m, tokens, args.d_sae) for m in ("floor", "csr", "dense")
                if m != "dense" or tokens <= args.dense_max_tokens}
        for method, row in rows.items():
            if "error" in row:
                print(f"{tokens:>7} {method:>6} failed: {row['error']}")
                continue
            ratio = row["seconds"] / rows["floor"]["seconds"]
            print(f"{tokens:>7} {method:>6} {row['seconds']:>8.2f} {row['peak_above_start_mib']:>9.0f} {ratio:>12.2f}")


if __name__ == "__main__":
    main()
