"""Noise perturbation of residual activations for the SAEMA sweep (DESIGN.md §5.1).

`x̃ = x + σ·s·ε`, `ε ~ N(0, I)` drawn from `numpy.random.default_rng(seed)`, where the seed is derived from
(base seed, hook, concept, σ, replicate) so that any cell of the sweep can be recomputed alone, in any
process, and give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from typing import Literal

import numpy as np

NoiseScaleMode = Literal["absolute", "relative"]

#: The paper's noise levels (DESIGN.md §5.1).
DEFAULT_NOISE_LEVELS: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DEFAULT_REPLICATES = 3


def _where(cell: str) -> str:
    return f" (cell {cell})" if cell else ""


def derive_seed(base_seed: int, hook: str, concept: str, sigma: float, replicate: int) -> int:
    """A 64-bit seed for one (hook, concept, σ, replicate) cell, stable across processes and Pythons.

    The cell is written as a canonical JSON list (σ as the shortest round-trip `repr` of a float, so
    `0.1`, `np.float64(0.1)` and `1e-1` give one seed) and hashed with BLAKE2b; Python's `hash()` is salted
    per process and must not be used.
    """
    if not isinstance(hook, str) or not isinstance(concept, str):
        raise TypeError(f"hook and concept must be strings, got {hook!r} and {concept!r}")
    if replicate < 0:
        raise ValueError(f"replicate must be >= 0, got {replicate}")
    sigma = float(sigma) + 0.0  # + 0.0 folds -0.0 into 0.0
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    canonical = json.dumps([int(base_seed), hook, concept, repr(sigma), int(replicate)])
    digest = hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def noise_scale(x: np.ndarray, mask: np.ndarray, mode: NoiseScaleMode, cell: str = "") -> float:
    """The scale `s` of the noise for activations `x (P, T, d)` with analysed-token mask `(P, T)`.

    `absolute`: s = 1 (the paper's reading). `relative`: s = RMS over analysed tokens of ‖x_t‖/√d, i.e.
    the root mean square of every analysed entry, so that σ means the same thing across models.
    """
    if mode == "absolute":
        return 1.0
    if mode != "relative":
        raise ValueError(f"noise scale mode must be 'absolute' or 'relative', got {mode!r}")
    tokens = np.asarray(x)[np.asarray(mask, dtype=bool)]  # (n, d)
    if tokens.shape[0] == 0:
        raise ValueError(f"relative noise scale needs at least one analysed token{_where(cell)}")
    scale = float(np.sqrt(np.mean(np.square(tokens, dtype=np.float64))))
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"relative noise scale must be finite and > 0, got {scale}{_where(cell)}")
    return scale


def add_noise(x: np.ndarray, sigma: float, scale: float, seed: int) -> np.ndarray:
    """`x` (any shape) plus `sigma·scale·ε`, ε standard normal from `default_rng(seed)`; float32.

    ε is drawn in float32 for the whole array in C order. `analyse_cell` passes the analysed tokens
    `x[mask] (n, d)` only: drawing noise for padded positions cost more than the rest of a cell on
    corpus contexts. σ = 0 returns x (as float32, not copied).
    """
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"noise scale must be finite and > 0, got {scale}")
    x = np.asarray(x, dtype=np.float32)
    if sigma == 0:
        return x
    eps = np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32)
    # An explicit float32 factor keeps the product float32 (a float64 scalar would upcast it).
    return x + np.float32(sigma * scale) * eps


def validate_noise_levels(levels: Iterable[float]) -> tuple[float, ...]:
    """The noise levels as a sorted tuple of floats; ValueError on empty, negative, NaN, inf, duplicates."""
    values = [float(level) for level in levels]
    if not values:
        raise ValueError("noise levels must not be empty")
    for value in values:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"noise level {value} must be finite and >= 0 (levels: {values})")
    if len(set(values)) != len(values):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"duplicate noise levels {duplicates} in {values}")
    return tuple(sorted(v + 0.0 for v in values))


def validate_replicates(n: int) -> int:
    """The number of noise replicates per σ; ValueError unless it is an integer >= 1."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"replicates must be an integer >= 1, got {n!r}")
    return int(n)
