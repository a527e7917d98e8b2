"""Findings: the paper's three claims, read off the stored results with their caveats.

One `Finding` per (claim, space) of a (model, hook): a verdict in plain words — `supported`,
`not supported`, `not informative` (and why) or `not tested` — and the numbers it rests on. Every
verdict is computed from the results; nothing here is written by hand.

- **stratification** (claim 1): on the exact latent-mode rank (DESIGN.md §5.5). The SAE row is
  supported when most informative concepts are stratified and no control is stratified where the SAE
  is; a control row is supported when the control is never stratified. Saturated concepts are not
  informative, and the SAE row says how far the rank tracks the active support (the deficit
  n_active − rank), since growth of the support under noise is the plainest reason for a rank change.
- **local_global** (claim 2): local intrinsic dimension up (TwoNN in the original space) and global
  structure compressed (average geodesic distance down), each beyond the spread over UMAP seeds, in a
  majority of the concepts that have clusters in both spaces. If the dense-AE control changes the
  same way, the SAE row is not informative: the change is not specific to sparsity.
- **separability** (claim 3): the verdict of the training-time causal test (`saema_core.causal`):
  SAEs fine-tuned to be more separable reconstruct held-out tokens better (supported), worse (not
  supported: contradicted) or the CI over seeds covers 0 (not informative). The post-hoc fixed-decoder
  interventions are summarised beside it as description only: their random control with the same
  displacement correlates alike (DESIGN.md §7 revision).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import xarray as xr

CLAIMS = {
    "stratification": "the exact latent-mode SSPD rank changes with noise (stratified) in SAE latents, "
                      "not in the controls",
    "local_global": "sparse encoding raises local intrinsic dimension and compresses the global arrangement "
                    "(vs the residual stream)",
    "separability": "making local representations more separable lowers the reconstruction error",
}
VERDICTS = ("supported", "not supported", "not informative", "not tested")
MIN_CONCEPTS = 3  # concepts with evidence needed before a claim is read at all
NO_DENSE = "the dense-AE control was not run (--no-dense)"
NO_DENSE_CAVEAT = (f"; caveat: {NO_DENSE}, so this verdict cannot tell sparsity from any learned encoder of "
                   f"this width")


class Finding(NamedTuple):
    claim: str
    space: str
    verdict: str
    why: str
    numbers: str


def _median(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else float("nan")


def _verdict_counts(ds: xr.Dataset, space: str) -> dict[str, list[str]]:
    verdicts = ds["verdict"].sel(space=space, mode="latent")
    out: dict[str, list[str]] = {"stratified": [], "not stratified": [], "saturated": []}
    for concept, value in zip(verdicts.concept.values, verdicts.values):
        if value in out:
            out[value].append(str(concept))
    return out


def _counts_text(counts: dict[str, list[str]]) -> str:
    return ", ".join(f"{k} {len(v)}" for k, v in counts.items())


def _first_last_unsaturated(values: xr.DataArray, unsaturated: xr.DataArray) -> tuple[float, float]:
    kept = values.where(unsaturated).dropna("noise")
    return float(kept[0]), float(kept[-1])


def _support_growth(ds: xr.Dataset, concepts: list[str]) -> tuple[str, str]:
    """(numbers, caveat): median exact rank and deficit n_active − rank at the first and last
    unsaturated σ of the stratified concepts, and whether the rank follows the active support."""
    if not concepts:
        return "", ""
    cells = ds.sel(space="latent", mode="latent", concept=concepts)
    exact = cells["rank"].sel(estimator="numerical").mean("replicate")
    deficit, active = cells["deficit"].mean("replicate"), cells["n_active"].mean("replicate")
    unsat = ~cells["saturated"].any("replicate")
    ranks = [_first_last_unsaturated(exact.sel(concept=c), unsat.sel(concept=c)) for c in concepts]
    deficits = [_first_last_unsaturated(deficit.sel(concept=c), unsat.sel(concept=c)) for c in concepts]
    share = _median([d[0] / _first_last_unsaturated(active.sel(concept=c), unsat.sel(concept=c))[0]
                     for d, c in zip(deficits, concepts)])
    numbers = (f"; median exact rank {_median([r[0] for r in ranks]):.0f} → {_median([r[1] for r in ranks]):.0f} "
               f"over the unsaturated σ, deficit n_active − rank {_median([d[0] for d in deficits]):.0f} → "
               f"{_median([d[1] for d in deficits]):.0f}")
    caveat = (f"; caveat: the rank follows the active support that noise switches on (deficit {share:.0%} of "
              f"the active latents at the lowest σ)" if share < 0.1 else
              f"; the rank sits below the active support (deficit {share:.0%} of the active latents at the "
              f"lowest σ), a genuine rank deficit")
    return numbers, caveat


def stratification_findings(ds: xr.Dataset) -> list[Finding]:
    """Claim 1 per space, from the stratification group of one (model, hook)."""
    spaces = [str(s) for s in ds.space.values]
    counts = {s: _verdict_counts(ds, s) for s in spaces}
    tokens = ds["n_analysed"].values
    base = f"analysed tokens per concept {int(np.nanmin(tokens))}–{int(np.nanmax(tokens))}"
    rows = []
    for space in spaces:
        c = counts[space]
        informative = len(c["stratified"]) + len(c["not stratified"])
        numbers = f"{_counts_text(c)} (latent mode, exact rank); {base}"
        if informative == 0:
            why = (f"saturated in all {len(c['saturated'])} concepts: the rank reaches the number of analysed "
                   f"tokens at (almost) every σ" if c["saturated"] else "no concept computed")
            rows.append(Finding("stratification", space, "not informative", why, numbers))
        elif space == "latent":
            extra, caveat = _support_growth(ds, c["stratified"])
            finding = _sae_stratification(c, counts, informative, numbers + extra)
            rows.append(finding._replace(why=finding.why + caveat) if finding.verdict == "supported" else finding)
        else:
            rows.append(_control_stratification(space, c, informative, numbers))
    return _without_dense_control("stratification", rows, spaces)


def _without_dense_control(claim: str, rows: list[Finding], spaces: list[str]) -> list[Finding]:
    """`rows` as they are when the dense control ran; else its row says `not tested` and the SAE row
    carries the caveat that sparsity was not told apart from a dense encoder."""
    if "dense_ae" in spaces or "latent" not in spaces:
        return rows
    rows = [f._replace(why=f.why + NO_DENSE_CAVEAT) if f.space == "latent" else f for f in rows]
    return rows + [Finding(claim, "dense_ae", "not tested", NO_DENSE, "")]


def _sae_stratification(c: dict, counts: dict, informative: int, numbers: str) -> Finding:
    faked = sorted({concept for space, other in counts.items() if space != "latent"
                    for concept in other["stratified"]} & set(c["stratified"]))
    if faked:
        return Finding("stratification", "latent", "not informative",
                       f"a control is stratified too in {', '.join(faked)}: there the verdict cannot tell the "
                       f"SAE from its control", numbers)
    saturated = f"; {len(c['saturated'])} concept(s) saturated and left out" if c["saturated"] else ""
    if len(c["stratified"]) * 2 > informative:
        return Finding("stratification", "latent", "supported",
                       f"stratified in {len(c['stratified'])} of {informative} informative concepts, no control "
                       f"stratified there{saturated}", numbers)
    return Finding("stratification", "latent", "not supported",
                   f"stratified in only {len(c['stratified'])} of {informative} informative concepts{saturated}",
                   numbers)


def _control_stratification(space: str, c: dict, informative: int, numbers: str) -> Finding:
    if c["stratified"]:
        return Finding("stratification", space, "not supported",
                       f"the control is stratified in {', '.join(c['stratified'])}", numbers)
    return Finding("stratification", space, "supported",
                   f"the control is not stratified in any of {informative} informative concepts, as the claim "
                   f"requires", numbers)


def _beyond_spread(a: xr.DataArray, b: xr.DataArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per concept: a's seeds all above b's (up), all below (down), and both defined (valid)."""
    valid = (a.notnull().any("seed") & b.notnull().any("seed")).values
    up = (a.min("seed") > b.max("seed")).values & valid
    down = (a.max("seed") < b.min("seed")).values & valid
    return up, down, valid


def _structure_row(ds: xr.Dataset, space: str) -> tuple[Finding, bool]:
    dim, agd = ds["avg_intrinsic_dim_original"], ds["agd"]
    up, lower, valid_dim = _beyond_spread(dim.sel(space=space), dim.sel(space="resid"))
    _, down, valid_agd = _beyond_spread(agd.sel(space=space), agd.sel(space="resid"))
    n = int(valid_dim.sum())
    ari = ds["ari_token"].sel(space=space) if "ari_token" in ds else None
    ari_text = f"; clusters vs the word itself: median ARI {_median(ari.values):.2f}" if ari is not None else ""
    numbers = (f"TwoNN dim (original space) up beyond the seed spread in {int(up.sum())} of {n}, "
               f"average geodesic distance down in {int(down.sum())} of {int(valid_agd.sum())} concepts; "
               f"median dim {_median(dim.sel(space=space).mean('seed').values):.2f} vs resid "
               f"{_median(dim.sel(space='resid').mean('seed').values):.2f}{ari_text}")
    if n < MIN_CONCEPTS:
        return Finding("local_global", space, "not informative",
                       f"only {n} concept(s) have clusters in both spaces (need {MIN_CONCEPTS})", numbers), False
    both = up.sum() * 2 > n and down.sum() * 2 > int(valid_agd.sum())
    verdict = "supported" if both else "not supported"
    why = (f"local dimension higher than in the residual stream in {int(up.sum())} of {n} concepts (lower in "
           f"{int(lower.sum())}), global arrangement compressed in {int(down.sum())} of {int(valid_agd.sum())}: "
           + ("both in a majority" if both else "not both in a majority"))
    return Finding("local_global", space, verdict, why, numbers), bool(both)


def structure_findings(ds: xr.Dataset) -> list[Finding]:
    """Claim 2 for latent (and dense_ae as the control), each against resid."""
    spaces = [s for s in ("latent", "dense_ae") if s in ds.space.values]
    rows = {space: _structure_row(ds, space) for space in spaces}
    if "latent" in rows and rows.get("dense_ae", (None, False))[1] and rows["latent"][1]:
        f = rows["latent"][0]
        rows["latent"] = (f._replace(verdict="not informative",
                                     why="the dense-AE control changes the same way: not specific to sparsity"), True)
    return _without_dense_control("local_global", [rows[s][0] for s in spaces], [str(s) for s in ds.space.values])


def _slope_text(ds: xr.Dataset, objective: str, kind: str) -> str:
    cell = ds.sel(objective=objective, intervention=kind)
    if not np.isfinite(float(cell["slope"])):
        return f"{kind} undefined"
    return (f"{kind} {float(cell['slope']):.2g} (CI {float(cell['slope_ci_low']):.2g} to "
            f"{float(cell['slope_ci_high']):.2g})")


def _pure_text(ds: xr.Dataset, objective: str) -> str:
    """Median ΔSep and ΔMSE over concepts of the λ = 0 moves, per direction."""
    names = {1: "separating", -1: "merging"}
    parts = []
    for direction in ds.direction.values:
        cell = ds.sel(objective=objective, direction=direction)
        parts.append(f"{names.get(int(direction), direction)} ΔSep {_median(cell['pure_delta_sep'].values):+.3g}, "
                     f"ΔMSE {_median(cell['pure_delta_mse'].values):+.3g}")
    return "λ = 0 moves " + ", ".join(parts)


def _paper_text(ds: xr.Dataset) -> str:
    """Per direction: how often the paper-literal search moved the latents and lowered the MSE."""
    accepted, lowered = ds["paper_accepted"], ds["paper_delta_mse"] < 0
    if not np.isfinite(accepted.values).any():
        return "paper-literal search: not run"
    if not (accepted.values > 0).any():
        return ("paper-literal search accepted no step in any run (not informative: every proposal raised the "
                "reconstruction term more than it lowered 1/AEDP)")
    names = {1: "separating", -1: "merging"}
    parts = []
    for direction in ds.direction.values:
        share = lowered.sel(direction=direction).mean(["alpha", "paper_seed"]).values
        moved = float((accepted.sel(direction=direction).values > 0).mean())
        parts.append(f"{names.get(int(direction), direction)} moved the latents in {moved:.0%} of runs and lowered "
                     f"the MSE in {np.mean(share):.0%} (concepts {np.min(share):.0%}–{np.max(share):.0%})")
    return f"paper-literal search (step scale {ds.attrs.get('paper_step_scale', '?')}, {ds.sizes['alpha']} α × {ds.sizes['paper_seed']} seeds): " + "; ".join(parts)


def posthoc_summary(ds: xr.Dataset) -> str:
    """One line on the fixed-decoder interventions of one (model, hook): descriptive evidence only."""
    parts = []
    for objective in map(str, ds.objective.values):
        optimised = ds.sel(objective=objective, intervention="optimised")
        null_share = optimised["null_norm"] / (optimised["null_norm"] + optimised["row_norm"])
        parts.append(f"{objective}: slope of ΔMSE on ΔSep at fixed ‖δ‖ {_slope_text(ds, objective, 'optimised')} vs "
                     f"{_slope_text(ds, objective, 'control_row')}; median null-space share of the optimised moves "
                     f"{_median(null_share.values):.0%}; {_pure_text(ds, objective)}")
    if "paper_accepted" in ds:
        parts.append(_paper_text(ds))
    return "post-hoc, descriptive only — " + "; ".join(parts) if parts else "post-hoc interventions: none run"


_CAUSAL_VERDICTS = {"supported": "supported", "contradicted": "not supported", "inconclusive": "not informative"}


def separability_findings(causal: xr.Dataset | None, posthoc: xr.Dataset | None = None) -> list[Finding]:
    """Claim 3 of one (model, hook): the verdict of the training-time test (the `causal` group), with
    the post-hoc interventions beside it as description."""
    extra = posthoc_summary(posthoc) if posthoc is not None else ""
    if causal is None:
        return [Finding("separability", "latent", "not tested", "the training-time causal test has not run "
                        "(saema causal); the post-hoc interventions alone cannot test the claim", extra)]
    verdict, reason = str(causal["verdict"].values), str(causal["verdict_reason"].values)
    numbers = (f"held-out MSE change of the separating SAE {float(causal['effect']):+.1%} "
               f"(CI {float(causal['effect_ci_low']):+.1%} to {float(causal['effect_ci_high']):+.1%}), separability "
               f"change {float(causal['separability_change']):+.1%}; {causal.sizes['beta']} β × "
               f"{causal.sizes['seed']} seeds")
    numbers = f"{numbers}; {extra}" if extra else numbers
    return [Finding("separability", "latent", _CAUSAL_VERDICTS.get(verdict, "not informative"),
                    f"training-time test {verdict}: {reason}", numbers)]


def not_tested(claim: str, why: str) -> Finding:
    return Finding(claim, "latent", "not tested", why, "")
