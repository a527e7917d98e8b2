"""Latents as sparse (CSR) matrices, encoded a bounded number of tokens at a time.

An SAE's code of n tokens is n × d_sae, almost all zeros: at d_sae = 65 536 the dense float32 matrix
of 25 000 tokens is 6.5 GB, its CSR form (k = 32 active latents per token) 6.4 MB. `encode_csr` never
holds more than `max_elements` pre-activations (tokens × d_sae) at once:

- TopK SAEs select each token's k pre-activations (`TopKSAE.encode_topk`) and keep them as they are,
  without the dense scatter;
- every other architecture (ReLU, JumpReLU, gated) encodes a chunk densely and keeps its nonzeros.

The result equals `encode(x)` exactly (same values, same zeros), rows in x's order and column indices
sorted within each row (canonical CSR).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from saema_core.ranks import csr_of_dense
from saema_core.sae.base import SAE

#: Pre-activations held at once by `encode_csr` (64 MiB of float32): 256 tokens at d_sae = 65 536.
ENCODE_ELEMENTS = 1 << 24


def chunk_rows(d_sae: int, max_elements: int = ENCODE_ELEMENTS) -> int:
    """Tokens per chunk so that a chunk's tokens × d_sae stays within `max_elements` (at least 1)."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be ≥ 1, got {max_elements}")
    return max(1, max_elements // d_sae)


def _topk_chunk(sae: SAE, x: torch.Tensor) -> sp.csr_array:
    top = sae.encode_topk(x)
    indices, values = top.indices.numpy(), top.values.numpy()
    order = np.argsort(indices, axis=1)
    indices, values = np.take_along_axis(indices, order, 1), np.take_along_axis(values, order, 1)
    keep = values != 0  # ReLU'd: a selected pre-activation ≤ 0 is not an active latent
    indptr = np.r_[0, np.cumsum(keep.sum(axis=1))]
    return sp.csr_array((values[keep], indices[keep].astype(np.int32), indptr), shape=(len(x), sae.cfg.d_sae))


def encode_csr(sae: SAE, x: np.ndarray, max_elements: int = ENCODE_ELEMENTS) -> sp.csr_array:
    """The latents of x (n, d_in) as a CSR array (n, d_sae) of the SAE's dtype, equal to `sae.encode(x)`,
    holding at most `max_elements` pre-activations at a time."""
    rows, d_sae = chunk_rows(sae.cfg.d_sae, max_elements), sae.cfg.d_sae
    parts = []
    with torch.inference_mode():
        for start in range(0, len(x), rows):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + rows]))
            parts.append(_topk_chunk(sae, chunk) if hasattr(sae, "encode_topk")
                         else csr_of_dense(sae.encode(chunk).numpy()))
    if not parts:
        return sp.csr_array((0, d_sae), dtype=np.float32)
    return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]
