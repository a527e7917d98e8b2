"""SAEMA stratification: rank variability of SSPD matrices under noise (DESIGN.md §5).

One cell of the sweep is (hook, concept, σ, replicate): `analyse_cell` runs noise → encode → mask →
spectra → rank estimates for it, deterministically given its seed (`derive_seed`), so a grid of cells can
be computed in any order, on any worker. `stratification_verdict` turns a (noise, replicate) table of
ranks into the verdict of §5.5; `support_strata` (from `saema_core.strata`) compares supports across σ.

The building blocks live in `noise`, `ranks` and `strata`; they are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from saema_core.noise import (
    DEFAULT_NOISE_LEVELS,
    DEFAULT_REPLICATES,
    NoiseScaleMode,
    add_noise,
    derive_seed,
    noise_scale,
    validate_noise_levels,
    validate_replicates,
)
from saema_core.ranks import (
    ESTIMATORS,
    MODES,
    LatentCode,
    Mode,
    SpectrumResult,
    latent_code,
    latent_code_from_tokens,
    mask_latents,
    numerical_tolerance,
    rank_estimates,
    sspd_spectrum,
    unfold,
)
from saema_core.strata import (
    StrataResult,
    Supports,
    count_distinct_supports,
    intersection_sizes,
    support_sizes,
    support_strata,
    token_supports,
)

__all__ = [
    "DEFAULT_NOISE_LEVELS",
    "DEFAULT_REPLICATES",
    "ESTIMATORS",
    "MODES",
    "CellResult",
    "LatentCode",
    "Mode",
    "NoiseScaleMode",
    "SpectrumResult",
    "StrataResult",
    "Supports",
    "Verdict",
    "add_noise",
    "analyse_cell",
    "count_distinct_supports",
    "derive_seed",
    "intersection_sizes",
    "latent_code",
    "latent_code_from_tokens",
    "mask_latents",
    "noise_scale",
    "numerical_tolerance",
    "rank_estimates",
    "sspd_spectrum",
    "stratification_verdict",
    "support_sizes",
    "support_strata",
    "token_supports",
    "unfold",
    "validate_noise_levels",
    "validate_replicates",
]

# Rank tables that are not integer-valued (effective rank, participation ratio) still need a floor on the
# resolution, or round-off differences between σ levels would count as strata when the spread is 0.
_RELATIVE_FLOAT_RESOLUTION = 1e-9
_INTEGER_RESOLUTION = 0.5

Encoder = Callable[[np.ndarray], np.ndarray]


class Verdict(NamedTuple):
    """Stratification verdict for one (hook, concept, mode, estimator) — see `stratification_verdict`."""

    stratified: bool
    n_strata: int
    transition_noise: float  # NaN when the rank never leaves its σ = 0 level
    spread: float  # max over σ of (max − min over replicates)


class CellResult(NamedTuple):
    """Everything computed for one (hook, concept, σ, replicate) cell."""

    cell: str
    sigma: float
    seed: int
    n_analysed: int  # analysed (mask True) tokens
    spectra: dict[str, SpectrumResult]  # mode → spectrum
    ranks: dict[str, dict[str, float]]  # mode → estimator → rank
    supports: Supports  # active latents of each analysed token, in x[mask] order


def _resolution(ranks: np.ndarray, spread: float) -> float:
    """The smallest difference of replicate-mean ranks that counts: the spread, with a floor.

    Integer-valued tables get a floor of 0.5 so that, with zero spread, a difference of 1 counts and
    nothing smaller exists; float tables get a relative round-off floor.
    """
    if np.all(ranks == np.round(ranks)):
        return max(spread, _INTEGER_RESOLUTION)
    return max(spread, _RELATIVE_FLOAT_RESOLUTION * max(1.0, float(np.abs(ranks).max())))


def _count_levels(means: np.ndarray, resolution: float) -> int:
    """Rank levels: from the lowest mean up, a level holds every mean within `resolution` of its first.

    (Unlike single-linkage chaining, a slow drift cannot hide a range wider than the resolution, so
    `n_strata >= 2` exactly when the means span more than the resolution.)
    """
    values = np.sort(means)
    n_levels, start = 1, values[0]
    for value in values[1:]:
        if value - start > resolution:
            n_levels, start = n_levels + 1, value
    return n_levels


def _checked_rank_table(noise_levels: Sequence[float], ranks: np.ndarray) -> np.ndarray:
    levels = validate_noise_levels(noise_levels)
    if levels != tuple(float(level) + 0.0 for level in noise_levels):
        raise ValueError(
            f"noise levels must be given in increasing order, got {list(noise_levels)}"
        )
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 2 or ranks.shape[0] != len(levels) or ranks.shape[1] < 1:
        raise ValueError(
            f"ranks must be (noise={len(levels)}, replicate>=1), got shape {ranks.shape}"
        )
    if not np.all(np.isfinite(ranks)):
        raise ValueError(f"ranks contain NaN or inf: {ranks.tolist()}")
    return ranks


def stratification_verdict(noise_levels: Sequence[float], ranks: np.ndarray) -> Verdict:
    """Verdict of §5.5 from `ranks (noise, replicate)`, rows in the order of increasing `noise_levels`.

    mean(σ) = replicate-mean rank; spread = max over σ of the replicate range (max − min, the worst
    case: with 3 replicates a standard deviation is too unstable to trust); resolution τ = spread with a
    floor (0.5 for integer ranks, round-off for float ranks).
    - `stratified`: the means take two values differing by more than τ (max − min > τ).
    - `n_strata`: number of rank levels, each level holding the means within τ of its lowest member.
      `stratified` ⇔ `n_strata >= 2`.
    - `transition_noise`: the smallest σ whose mean differs from the first level's (σ = 0) mean by more
      than τ; NaN if none (possible while stratified when the σ = 0 mean lies between two levels).
    """
    ranks = _checked_rank_table(noise_levels, ranks)
    means = ranks.mean(axis=1)
    spread = float((ranks.max(axis=1) - ranks.min(axis=1)).max())
    resolution = _resolution(ranks, spread)
    n_strata = _count_levels(means, resolution)
    moved = np.abs(means - means[0]) > resolution
    transition = float(noise_levels[int(np.argmax(moved))]) if moved.any() else math.nan
    return Verdict(n_strata >= 2, n_strata, transition, spread)


def _where(cell: str) -> str:
    return f" in cell {cell}" if cell else ""


def _checked_inputs(x: np.ndarray, mask: np.ndarray, cell: str) -> tuple[np.ndarray, np.ndarray]:
    """x (P, T, d) and a boolean mask (P, T) with >= 2 analysed, finite tokens (padding may be NaN)."""
    x, mask = np.asarray(x), np.asarray(mask, dtype=bool)
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise ValueError(
            f"x must be (P, T, d) with mask (P, T), got {x.shape} and {mask.shape}{_where(cell)}"
        )
    n_analysed = int(mask.sum())
    if n_analysed < 2:
        raise ValueError(f"need at least 2 analysed tokens, got {n_analysed}{_where(cell)}")
    if not np.all(np.isfinite(x[mask])):
        raise ValueError(f"activations x contain NaN or inf at analysed tokens{_where(cell)}")
    return x, mask


def _check_parameters(sigma: float, scale: float, modes: Sequence[str], cell: str) -> None:
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}{_where(cell)}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"noise scale must be finite and > 0, got {scale}{_where(cell)}")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}{_where(cell)}")


def _encoded(encode: Encoder, tokens: np.ndarray, cell: str) -> np.ndarray:
    """encode(tokens (n, d)) as a finite numpy (n, K) array, or a ValueError naming the cell."""
    try:
        latents = np.asarray(encode(tokens))
    except Exception as error:
        error.add_note(f"raised by the encoder{_where(cell)}")  # re-raised, with the cell named
        raise
    if latents.ndim != 2 or latents.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"encoder must map (n={tokens.shape[0]}, d) to (n, K), got {latents.shape}{_where(cell)}"
        )
    if not np.all(np.isfinite(latents)):
        raise ValueError(f"latents contain NaN or inf{_where(cell)}")
    return latents


def analyse_cell(
    x: np.ndarray,
    mask: np.ndarray,
    encode: Encoder,
    sigma: float,
    scale: float,
    seed: int,
    modes: Sequence[str] = MODES,
    cell: str = "",
) -> CellResult:
    """One SAEMA cell: x̃ = x + σ·scale·ε(seed), Z = encode(x̃[mask]), spectra and ranks per mode.

    `x (P, T, d)` activations, `mask (P, T)` analysed tokens, `encode` maps float32 `(n, d)` → `(n, K)`
    (an SAE, the dense AE, or the identity for the resid control). Only analysed tokens are encoded, so
    masked positions of Z are 0 without building the (P, T, K) tensor. `cell` names the cell in errors.
    Deterministic given `seed`: the same inputs give the same result in any process (bit for bit with
    the same BLAS thread count; threaded BLAS may reorder sums in the Gram and eigvalsh).
    """
    x, mask = _checked_inputs(x, mask, cell)
    _check_parameters(sigma, scale, modes, cell)
    noisy = add_noise(x, sigma, scale, seed)
    latents = _encoded(encode, noisy[mask], cell)
    code = latent_code_from_tokens(latents, mask)
    spectra = {mode: sspd_spectrum(code, mode) for mode in modes}
    # The code is CSR for sparse latents: reading supports from it skips a second dense scan.
    analysed = code.tokens[np.flatnonzero(mask)] if sp.issparse(code.tokens) else latents
    return CellResult(
        cell=cell,
        sigma=float(sigma),
        seed=int(seed),
        n_analysed=int(mask.sum()),
        spectra=spectra,
        ranks={mode: rank_estimates(spectrum) for mode, spectrum in spectra.items()},
        supports=token_supports(analysed),
    )
