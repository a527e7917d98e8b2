"""Causal statistics of the intervention stage (DESIGN.md §7).

Across interventions i we have ΔSep_i (separability after − before) and ΔMSE_i (reconstruction MSE after −
before). The paper claims that higher separability causes lower MSE, i.e. a significantly NEGATIVE
correlation between ΔSep and ΔMSE. `correlate` gives Pearson and Spearman coefficients with scipy's
p-values and percentile-bootstrap confidence intervals (pairs resampled with replacement, seeded);
`verdict` turns the optimised interventions' and the random control's statistics into plain language.

A correlation is undefined when either variable is constant (e.g. a decoder that ignores its input leaves
MSE unchanged) or with fewer than 3 interventions; the estimates are then NaN and `reason` says why.
Bootstrap resamples that happen to be constant are dropped from the percentile interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.stats

_MIN_POINTS = 3
_CONSTANT_RTOL = 1e-12
_STRENGTH_BOUNDS = ((0.3, "weak"), (0.6, "moderate"))


@dataclass(frozen=True)
class CorrelationEstimate:
    """One correlation coefficient with its two-sided p-value and bootstrap CI (NaN if undefined)."""

    statistic: float
    p_value: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class CorrelationStats:
    """Pearson and Spearman correlation between ΔSep and ΔMSE over n interventions."""

    n: int
    pearson: CorrelationEstimate
    spearman: CorrelationEstimate
    confidence: float
    reason: str | None = None
    """Why the correlation is undefined; None when it is defined."""

    @property
    def defined(self) -> bool:
        return self.reason is None


_UNDEFINED = CorrelationEstimate(np.nan, np.nan, np.nan, np.nan)


def _is_constant(values: np.ndarray) -> bool:
    """True when all values agree up to a relative 1e-12 (float noise of an unchanged quantity)."""
    return bool(np.ptp(values) <= _CONSTANT_RTOL * max(1.0, float(np.max(np.abs(values)))))


def undefined_reason(delta_sep: np.ndarray, delta_mse: np.ndarray) -> str | None:
    """Why a correlation between the two arrays cannot be computed, or None if it can."""
    if delta_sep.size < _MIN_POINTS:
        return f"only {delta_sep.size} interventions; a correlation needs at least {_MIN_POINTS}"
    if _is_constant(delta_mse):
        return f"ΔMSE is constant ({delta_mse[0]:.3g}) across all {delta_mse.size} interventions"
    if _is_constant(delta_sep):
        return f"ΔSep is constant ({delta_sep[0]:.3g}) across all {delta_sep.size} interventions"
    return None


def rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (b, n) arrays; NaN for rows where x or y is constant."""
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((xc**2).sum(axis=1) * (yc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xc * yc).sum(axis=1) / denominator
    return np.where(denominator > 0, r, np.nan)


def rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row pair of (b, n) arrays (Pearson on average ranks)."""
    return rowwise_pearson(scipy.stats.rankdata(x, axis=1), scipy.stats.rankdata(y, axis=1))


def bootstrap_ci(
    x: np.ndarray,
    y: np.ndarray,
    rowwise_statistic: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_boot: int,
    seed: int,
    confidence: float,
) -> tuple[float, float]:
    """Percentile bootstrap CI of a paired statistic; constant (NaN) resamples are dropped."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, x.size, size=(n_boot, x.size))
    values = rowwise_statistic(x[index], y[index])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.nan, np.nan
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _estimate(result, ci: tuple[float, float]) -> CorrelationEstimate:
    return CorrelationEstimate(float(result.statistic), float(result.pvalue), *ci)


def correlate(
    delta_sep: np.ndarray,
    delta_mse: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> CorrelationStats:
    """Pearson and Spearman correlation of ΔSep (n,) with ΔMSE (n,), p-values and bootstrap CIs."""
    x = np.asarray(delta_sep, dtype=np.float64)
    y = np.asarray(delta_mse, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"ΔSep and ΔMSE must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        bad = np.flatnonzero(~(np.isfinite(x) & np.isfinite(y)))
        raise ValueError(f"non-finite ΔSep/ΔMSE at interventions {bad.tolist()}")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    reason = undefined_reason(x, y)
    if reason is not None:
        return CorrelationStats(x.size, _UNDEFINED, _UNDEFINED, confidence, reason)
    pearson = _estimate(
        scipy.stats.pearsonr(x, y), bootstrap_ci(x, y, rowwise_pearson, n_boot, seed, confidence)
    )
    spearman = _estimate(
        scipy.stats.spearmanr(x, y), bootstrap_ci(x, y, rowwise_spearman, n_boot, seed, confidence)
    )
    return CorrelationStats(x.size, pearson, spearman, confidence)


# ----------------------------------------------------------------------------- verdict


def strength(r: float) -> str:
    """"weak" for |r| < 0.3, "moderate" for 0.3 ≤ |r| < 0.6, "strong" above."""
    for bound, label in _STRENGTH_BOUNDS:
        if abs(r) < bound:
            return label
    return "strong"


def describe(stats: CorrelationStats) -> str:
    """One line of numbers: Pearson r with CI and p, Spearman ρ with p, n."""
    if not stats.defined:
        return f"undefined: {stats.reason}"
    p, s = stats.pearson, stats.spearman
    level = round(100 * stats.confidence)
    return (
        f"Pearson r = {p.statistic:+.2f} ({level}% CI [{p.ci_low:+.2f}, {p.ci_high:+.2f}], "
        f"p = {p.p_value:.2g}), Spearman ρ = {s.statistic:+.2f} (p = {s.p_value:.2g}), n = {stats.n}"
    )


def _significant(stats: CorrelationStats, alpha: float) -> bool:
    return stats.defined and stats.pearson.p_value < alpha


def _claim_sentence(stats: CorrelationStats, alpha: float) -> str:
    """What the optimised interventions say about 'higher separability → lower MSE'."""
    if not stats.defined:
        return f"No relationship between separability and MSE can be shown: {stats.reason}."
    if not _significant(stats, alpha):
        return (
            "No relationship: ΔSep and ΔMSE are not significantly correlated "
            f"at α = {alpha} ({describe(stats)}); the data do not support the paper's claim."
        )
    if stats.pearson.statistic < 0:
        return (
            "The data support the paper's claim: higher separability goes with lower MSE, "
            f"a {strength(stats.pearson.statistic)} negative correlation ({describe(stats)})."
        )
    return (
        "The data contradict the paper's claim: higher separability goes with higher MSE, "
        f"a {strength(stats.pearson.statistic)} positive correlation ({describe(stats)})."
    )


def _spearman_note(stats: CorrelationStats, alpha: float) -> str:
    """A warning when the rank correlation does not back a significant Pearson correlation."""
    if not _significant(stats, alpha):
        return ""
    s = stats.spearman
    agrees = s.p_value < alpha and np.sign(s.statistic) == np.sign(stats.pearson.statistic)
    return "" if agrees else " The rank correlation does not confirm it, so a few interventions may drive it."


def _control_sentence(opt: CorrelationStats, control: CorrelationStats, alpha: float) -> str:
    """Whether random translations of equal displacement show the same relationship."""
    if not _significant(control, alpha):
        detail = describe(control)
        if _significant(opt, alpha):
            return (
                f"The random control of equal displacement shows no significant relationship ({detail}), "
                "consistent with a causal reading."
            )
        return f"The random control shows no significant relationship either ({detail})."
    same_sign = _significant(opt, alpha) and (
        np.sign(control.pearson.statistic) == np.sign(opt.pearson.statistic)
    )
    if same_sign:
        return (
            f"The random control of equal displacement shows the same relationship ({describe(control)}), "
            "which undercuts the causal reading: the association is not specific to the optimised "
            "separability changes, and displacement alone may explain the change in MSE."
        )
    return f"The random control shows a significant relationship of its own ({describe(control)})."


def verdict(stats_opt: CorrelationStats, stats_control: CorrelationStats, alpha: float = 0.05) -> str:
    """Plain-language verdict on 'higher separability → lower MSE' (a significantly negative
    correlation between ΔSep and ΔMSE), its strength, and what the random control says."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    claim = _claim_sentence(stats_opt, alpha) + _spearman_note(stats_opt, alpha)
    return f"{claim} {_control_sentence(stats_opt, stats_control, alpha)}"


# ----------------------------------------------------------------------------- replicate regression


@dataclass(frozen=True)
class SlopeEstimate:
    """The coefficient of x in y ~ 1 + x + covariates, with a CI from resampling replicates."""

    slope: float
    ci_low: float
    ci_high: float
    n_replicates: int
    n_points: int
    reason: str | None = None
    """Why the slope is undefined; None when it is defined."""


def _ols_coefficient(y: np.ndarray, design: np.ndarray) -> float:
    """Coefficient of column 1 of the design (column 0 = intercept); NaN when the design is singular."""
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return float("nan")
    return float(np.linalg.lstsq(design, y, rcond=None)[0][1])


def _design(x: np.ndarray, covariates: np.ndarray) -> np.ndarray:
    """Columns [1, x, covariates…], each covariate standardised so the rank test is scale-free."""
    cov = covariates.reshape(len(x), -1)
    scale = cov.std(axis=0)
    cov = (cov - cov.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    return np.column_stack([np.ones(len(x)), x, cov])


def replicate_slope(y, x, covariates, replicates, n_boot: int = 2000, seed: int = 0,
                    confidence: float = 0.95) -> SlopeEstimate:
    """OLS slope of y on x with `covariates` (n, c) held fixed; percentile CI from a cluster bootstrap
    that resamples whole replicates (e.g. concepts) with replacement — the replicate, not the point, is
    the independent unit. Needs ≥ 3 replicates and a non-singular design; else NaN and the reason."""
    y, x = np.asarray(y, dtype=float), np.asarray(x, dtype=float)
    covariates, replicates = np.asarray(covariates, dtype=float), np.asarray(replicates)
    keep = np.isfinite(y) & np.isfinite(x) & np.isfinite(covariates.reshape(len(x), -1)).all(axis=1)
    y, x, covariates, replicates = y[keep], x[keep], covariates.reshape(len(keep), -1)[keep], replicates[keep]
    groups = np.unique(replicates)
    undefined = SlopeEstimate(np.nan, np.nan, np.nan, int(groups.size), int(y.size))
    if groups.size < _MIN_POINTS:
        return SlopeEstimate(**{**undefined.__dict__, "reason": f"{groups.size} replicate(s); need ≥ {_MIN_POINTS}"})
    slope = _ols_coefficient(y, _design(x, covariates))
    if not np.isfinite(slope):
        return SlopeEstimate(**{**undefined.__dict__, "reason": "x is collinear with the covariates (or constant)"})
    members = [np.flatnonzero(replicates == g) for g in groups]
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        rows = np.concatenate([members[i] for i in rng.integers(0, groups.size, groups.size)])
        boot.append(_ols_coefficient(y[rows], _design(x[rows], covariates[rows])))
    boot = np.asarray(boot)
    boot = boot[np.isfinite(boot)]
    tail = (1 - confidence) / 2
    low, high = (np.quantile(boot, [tail, 1 - tail]) if boot.size else (np.nan, np.nan))
    return SlopeEstimate(slope, float(low), float(high), int(groups.size), int(y.size))
