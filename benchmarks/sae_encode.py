"""Encoding throughput of `TopKSAE.encode` against bare references, measured in the same run.

References (same weights, same input, same thread count):
- `matmul`: x @ W_enc + b_enc alone, the floor any encoder pays;
- `matmul+topk`: that, then torch.topk, ReLU and a scatter into a dense [batch, d_sae] tensor, i.e. the
  minimal TopK encoder written inline.

`TopKSAE.encode` adds input casting, the width check and (here) the b_dec subtraction; the ratio
encode / reference shows what the module costs over hand-written torch. Median over repeats,
timed round-robin.

    python benchmarks/sae_encode.py [--repeats 7] [--batch 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from saema_core.sae import SAE, SAEConfig, build_sae

D_IN = 384
D_SAES = (3072, 16384)
K = 32


def random_topk_sae(d_sae: int, seed: int = 0) -> SAE:
    sae = build_sae(SAEConfig(architecture="topk", d_in=D_IN, d_sae=d_sae, k=K))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) / D_IN**0.5)
    return sae.requires_grad_(False)


def interleaved_medians(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, float]:
    """Median seconds per function, timed round-robin so that load drift on a shared machine hits
    every function alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator and thread pool
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_one(d_sae: int, batch: int, repeats: int) -> None:
    sae = random_topk_sae(d_sae)
    x = torch.randn(batch, D_IN, generator=torch.Generator().manual_seed(1))
    W_enc, b_enc, b_dec = sae.W_enc, sae.b_enc, sae.b_dec

    def matmul() -> torch.Tensor:
        return (x - b_dec) @ W_enc + b_enc

    def matmul_topk() -> torch.Tensor:
        pre = (x - b_dec) @ W_enc + b_enc
        top = pre.topk(K, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())

    with torch.inference_mode():
        assert torch.equal(sae.encode(x), matmul_topk())
        medians = interleaved_medians(
            {"encode": lambda: sae.encode(x), "matmul": matmul, "matmul_topk": matmul_topk}, repeats
        )
    t_encode, t_matmul, t_topk = medians["encode"], medians["matmul"], medians["matmul_topk"]
    print(f"d_sae={d_sae:6d} batch={batch}: "
          f"encode {t_encode * 1e3:7.1f} ms ({batch / t_encode:9.0f} tok/s) | "
          f"matmul {t_matmul * 1e3:7.1f} ms | matmul+topk {t_topk * 1e3:7.1f} ms | "
          f"encode/matmul {t_encode / t_matmul:4.2f} | encode/(matmul+topk) {t_encode / t_topk:4.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_in={D_IN}, k={K}, "
          f"median of {args.repeats}")
    for d_sae in D_SAES:
        bench_one(d_sae, args.batch, args.repeats)


if __name__ == "__main__":
    main()
