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
    AffineMap,
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
    "VERDICTS",
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

Encoder = Callable[[np.ndarray], np.ndarray | sp.sparray]

VERDICTS = ("stratified", "not stratified", "saturated")


class Verdict(NamedTuple):
    """Stratification verdict for one (hook, concept, space, mode) — see `stratification_verdict`."""

    verdict: str  # "stratified" | "not stratified" | "saturated"
    n_strata: int  # rank levels among the unsaturated σ (0 when saturated)
    transition_noise: float  # NaN when the rank never leaves its first unsaturated level
    spread: float  # max over unsaturated σ of (max − min over replicates); NaN when saturated
    tau: float  # resolution max(spread, 1) + 0.5; NaN when saturated
    rank_range: float  # max − min of the replicate-mean ranks over unsaturated σ; NaN when saturated
    n_unsaturated: int  # σ levels none of whose replicates is saturated
    partially_saturated: bool  # some σ levels saturated, but at least two not
    reason: str  # the verdict in words, with the numbers it rests on


class CellResult(NamedTuple):
    """Everything computed for one (hook, concept, σ, replicate) cell."""

    cell: str
    sigma: float
    seed: int
    n_analysed: int  # analysed (mask True) tokens
    spectra: dict[str, SpectrumResult]  # mode → spectrum
    ranks: dict[str, dict[str, float]]  # mode → estimator → rank
    supports: Supports  # active latents of each analysed token, in x[mask] order


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


def _checked_table(levels: tuple[float, ...], name: str, table) -> np.ndarray:
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2 or table.shape[0] != len(levels) or table.shape[1] < 1:
        raise ValueError(f"{name} must be (noise={len(levels)}, replicate>=1), got shape {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError(f"{name} contain NaN or inf: {table.tolist()}")
    return table


def _checked_rank_table(noise_levels: Sequence[float], ranks, bounds) -> tuple[np.ndarray, np.ndarray]:
    levels = validate_noise_levels(noise_levels)
    if levels != tuple(float(level) + 0.0 for level in noise_levels):
        raise ValueError(
            f"noise levels must be given in increasing order, got {list(noise_levels)}"
        )
    ranks = _checked_table(levels, "ranks", ranks)
    bounds = np.full_like(ranks, np.inf) if bounds is None else _checked_table(levels, "rank bounds", bounds)
    if bounds.shape != ranks.shape:
        raise ValueError(f"rank bounds have shape {bounds.shape}, ranks {ranks.shape}")
    return ranks, bounds


def _saturated_verdict(ranks: np.ndarray, bounds: np.ndarray, n_unsaturated: int) -> Verdict:
    needed = int(np.max(np.where(np.isfinite(bounds), bounds, ranks)))
    reason = (f"not informative: the rank reaches its bound (the analysed tokens for the latent mode, the "
              f"prompts or positions otherwise) at {len(ranks) - n_unsaturated} of {len(ranks)} σ levels "
              f"(fewer than 2 left); needs more than {needed} of them")
    nan = math.nan
    return Verdict("saturated", 0, nan, nan, nan, nan, n_unsaturated, False, reason)


def stratification_verdict(noise_levels: Sequence[float], ranks, bounds=None) -> Verdict:
    """Verdict of DESIGN.md §5.5 from the exact ranks `(noise, replicate)` (rows in increasing σ).

    `bounds (noise, replicate)` are the sample bounds of each cell's rank (the analysed tokens with an
    active latent, for the latent mode); a cell is saturated when rank ≥ bound, and a σ level is
    unsaturated when none of its replicates is. On the unsaturated levels only:
    - fewer than two of them: `saturated` — not informative, whatever the ranks do;
    - spread = max over them of the replicate range (max − min: with 3 replicates a standard
      deviation is too unstable to trust); τ = max(spread, 1) + 0.5;
    - `stratified` when the replicate-mean ranks span more than τ (max − min > τ), else
      `not stratified`; `partially_saturated` when some σ levels were left out.
    `n_strata` counts rank levels (each holds the means within τ of its lowest member);
    `transition_noise` is the smallest unsaturated σ whose mean differs from the first unsaturated
    level's by more than τ.
    """
    ranks, bounds = _checked_rank_table(noise_levels, ranks, bounds)
    unsaturated = ~np.any(ranks >= bounds, axis=1)
    n_unsaturated = int(unsaturated.sum())
    if n_unsaturated < 2:
        return _saturated_verdict(ranks, bounds, n_unsaturated)
    kept, sigmas = ranks[unsaturated], np.asarray(noise_levels, dtype=float)[unsaturated]
    means = kept.mean(axis=1)
    spread = float((kept.max(axis=1) - kept.min(axis=1)).max())
    tau = max(spread, 1.0) + 0.5
    rank_range = float(means.max() - means.min())
    n_strata = _count_levels(means, tau)
    moved = np.abs(means - means[0]) > tau
    transition = float(sigmas[int(np.argmax(moved))]) if moved.any() else math.nan
    verdict = "stratified" if rank_range > tau else "not stratified"
    partial = n_unsaturated < len(ranks)
    reason = (f"{verdict}: the mean rank spans {rank_range:g} over {n_unsaturated} unsaturated σ levels "
              f"({'>' if rank_range > tau else '≤'} τ = {tau:g})" + (" — partially saturated" if partial else ""))
    return Verdict(verdict, n_strata, transition, spread, tau, rank_range, n_unsaturated, partial, reason)


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


def _encoded(encode: Encoder, tokens: np.ndarray, cell: str) -> np.ndarray | sp.sparray:
    """encode(tokens (n, d)) as a finite (n, K) array — numpy, or scipy sparse when the encoder returns
    one (SAE codes, `saema_core.sae.sparse`) — or a ValueError naming the cell."""
    try:
        latents = encode(tokens)
        latents = latents if sp.issparse(latents) else np.asarray(latents)
    except Exception as error:
        error.add_note(f"raised by the encoder{_where(cell)}")  # re-raised, with the cell named
        raise
    if latents.ndim != 2 or latents.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"encoder must map (n={tokens.shape[0]}, d) to (n, K), got {latents.shape}{_where(cell)}"
        )
    if not np.all(np.isfinite(latents.data if sp.issparse(latents) else latents)):
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
    (an SAE, the dense AE, or the identity for the resid control); an encoder with an `affine`
    attribute `(W (d, K), b (K,))` computes exactly `x @ W + b`, and its latent-mode spectrum is taken
    from that factorisation. Noise is drawn for the analysed tokens only. Only analysed tokens are encoded, so
    masked positions of Z are 0 without building the (P, T, K) tensor. `cell` names the cell in errors.
    Deterministic given `seed`: the same inputs give the same result in any process (bit for bit with
    the same BLAS thread count; threaded BLAS may reorder sums in the Gram and eigvalsh).
    """
    x, mask = _checked_inputs(x, mask, cell)
    _check_parameters(sigma, scale, modes, cell)
    noisy = add_noise(x[mask], sigma, scale, seed)  # only analysed tokens are encoded
    latents = _encoded(encode, noisy, cell)
    code = latent_code_from_tokens(latents, mask)
    weights = getattr(encode, "affine", None)  # (W, b[, factor]) of an affine encoder: the dense AE
    affine = AffineMap(noisy, *weights) if weights is not None else None
    spectra = {mode: sspd_spectrum(code, mode, affine) for mode in modes}
    # The code is CSR for sparse latents: reading supports from it skips a second dense scan.
    analysed = code.tokens if sp.issparse(code.tokens) else latents
    return CellResult(
        cell=cell,
        sigma=float(sigma),
        seed=int(seed),
        n_analysed=int(mask.sum()),
        spectra=spectra,
        ranks={mode: rank_estimates(spectrum) for mode, spectrum in spectra.items()},
        supports=token_supports(analysed),
    )
