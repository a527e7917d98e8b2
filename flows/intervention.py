"""Flow: post-hoc interventions on the latent clusters (DESIGN.md §7) — cells on Dask, statistics here.

Descriptive evidence only: with a fixed decoder the moves cannot test the causal claim (the training-
time test in flows/causal.py does). Reported honestly: the pure separability move (λ = 0) beside the
optimised one, every move split into the decoder's row space (which alone changes the MSE) and null
space, a random control matched on the total and one matched on the row-space displacement, and the
slope of ΔMSE on ΔSep at fixed displacement with the concept as the replicate (α is a dose axis, not a
sample). The paper-literal random search runs beside them with several seeds.
"""

from __future__ import annotations

import itertools

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import InterventionStageConfig
from flows.grid import run_grid
from saema_core.intervention import PAPER, InterventionConfig
from saema_core.statistics import replicate_slope
from storage.locations import exists
from storage.plots import plot_intervention, plot_path
from storage.results import write_group
from tasks.artifacts import publish_plot, publish_table
from tasks.intervention import TRAJECTORY_FIELDS, inputs_fingerprint
from tasks.sae import SAERef

KINDS = ("optimised", "control", "control_row")
# Per-step quantities of a move (saema_core.intervention's docstring defines them).
TRAJECTORY_ATTRS = {
    "objective": {"long_name": "optimiser objective L(Δ)", "units": "1"},
    "separability": {"long_name": "separability of the moved clusters",
                     "description": "AEDP (centroid distance, activation units) or GW (distance²), per objective"},
    "mse": {"long_name": "mean squared reconstruction error", "units": "activation²",
            "description": "mean over tokens and d_model of (x̂ − x)² (sae_eval.mse sums over d_model instead)"},
    "mse_zscored": {"long_name": "mean squared error of z-scored reconstructions", "units": "1"},
    "explained_variance": {"long_name": "explained variance of the reconstruction", "units": "1"},
    "displacement_norm": {"long_name": "norm of the applied latent displacement", "units": "latent",
                          "description": "‖clamp(Z + Δ) − Z‖_F over the moved tokens"},
}
MOVE_FIELDS = {
    "row_norm": "‖row-space part‖ of the applied displacement (changes the reconstruction)",
    "null_norm": "‖null-space part‖ of the applied displacement (changes separability for free)",
    "delta_mse_row": "MSE change of the row-space part alone",
    "delta_mse_null": "MSE change of the null-space part alone (0 up to rounding: the check)",
}
PAPER_FIELDS = {"delta_sep": "ΔAEDP in the z-scored latent space", "delta_mse": "raw ΔMSE",
                "delta_mse_zscored": "ΔMSE of the z-scored reconstruction (the procedure's own loss term)",
                "accepted": "proposals accepted (of 10): 0 = the search left the latents unchanged"}
_SLOPE = {"slope": "slope", "slope_ci_low": "ci_low", "slope_ci_high": "ci_high", "n_replicates": "n_replicates"}


def intervention_calls(out: str, model_name: str, cells, sae_refs: list[SAERef], cfg: InterventionStageConfig,
                       structure_seed: int) -> list[dict]:
    """One `intervention_cell` call per (hook, concept, objective, direction), inputs fingerprinted."""
    saes = {ref.hook: ref for ref in sae_refs if ref.kind == "sae"}
    fingerprints: dict[tuple, str] = {}
    calls = []
    for i, (hook, concept, objective, direction) in enumerate(cells):
        sae = saes[hook]
        if (hook, concept) not in fingerprints:
            fingerprints[hook, concept] = inputs_fingerprint(out, model_name, hook, concept, sae.sae_id, sae.hash,
                                                             structure_seed)
        base = InterventionConfig(objective=objective, lam=cfg.lam, steps=cfg.steps, lr=cfg.lr,
                                  clamp_nonnegative=cfg.clamp, seed=cfg.seed)
        calls.append({"out": out, "model_name": model_name, "hook": hook, "concept": concept, "sae_path": sae.path,
                      "sae_id": sae.sae_id, "seed": structure_seed, "base": base, "direction": direction,
                      "alphas": tuple(cfg.alphas), "control_seed": cfg.seed + i * len(cfg.alphas),
                      "content": fingerprints[hook, concept], "sample": cfg.sample(),
                      "paper_seeds": cfg.paper_seed_values() if objective == PAPER else (),
                      "paper_step_scale": cfg.paper_step_scale})
    return calls


class _Arrays:
    """The dataset's arrays, filled cell by cell."""

    def __init__(self, n_hooks: int, n_concepts: int, objectives: list[str], cfg: InterventionStageConfig) -> None:
        lead = (1, n_hooks, n_concepts)
        moves = lead + (len(objectives), len(KINDS), len(cfg.directions), len(cfg.alphas))
        self.trajectories = {f: np.full(moves + (cfg.steps + 1,), np.nan) for f in TRAJECTORY_FIELDS}
        self.moves = {f: np.full(moves, np.nan) for f in MOVE_FIELDS}
        self.pure = {f: np.full(lead + (len(objectives), len(cfg.directions)), np.nan)
                     for f in ("delta_sep", "delta_mse", "displacement_norm", *MOVE_FIELDS)}
        self.paper = {f: np.full(lead + (len(cfg.directions), len(cfg.alphas), cfg.paper_seeds), np.nan)
                      for f in PAPER_FIELDS}
        self.skipped = np.full(lead + (len(objectives) + 1,), "", dtype=object)
        self.latents = np.full(lead + (len(objectives) + 1,), np.nan)
        self.undecomposed = np.full(lead + (len(objectives),), "", dtype=object)


def _fill_moves(arrays: _Arrays, at: tuple, d: int, result: dict) -> None:
    for a, moves in enumerate(result["alphas"]):
        for k, kind in enumerate(KINDS):
            if kind not in moves:
                continue
            for f in TRAJECTORY_FIELDS:
                arrays.trajectories[f][at + (k, d, a)] = moves[kind][f]
            for f in MOVE_FIELDS:
                arrays.moves[f][at + (k, d, a)] = moves[kind][f]
    pure = result["pure"]
    arrays.pure["delta_sep"][at + (d,)] = pure["separability"][-1] - pure["separability"][0]
    arrays.pure["delta_mse"][at + (d,)] = pure["mse"][-1] - pure["mse"][0]
    arrays.pure["displacement_norm"][at + (d,)] = pure["displacement_norm"][-1]
    for f in MOVE_FIELDS:
        arrays.pure[f][at + (d,)] = pure[f]


def _fill_paper(arrays: _Arrays, at: tuple, d: int, result: dict) -> None:
    for a, runs in enumerate(result["paper"]):
        for s, run in enumerate(runs):
            for f in PAPER_FIELDS:
                arrays.paper[f][at + (d, a, s)] = run[f]


def _slopes(trajectories: dict, objectives: list[str], n_hooks: int, cfg: InterventionStageConfig) -> dict:
    """Per (hook, objective, kind): slope of ΔMSE on ΔSep with ‖δ‖ and ‖δ‖² as covariates; concepts are
    the replicates (cluster bootstrap)."""
    delta = {f: trajectories[f][..., -1] - trajectories[f][..., 0] for f in ("separability", "mse")}
    norm = trajectories["displacement_norm"][..., -1]
    out = {name: np.full((1, n_hooks, len(objectives), len(KINDS)), np.nan) for name in _SLOPE}
    reasons = np.full((1, n_hooks, len(objectives), len(KINDS)), "", dtype=object)
    for h, o, k in itertools.product(range(n_hooks), range(len(objectives)), range(len(KINDS))):
        if objectives[o] == PAPER:
            continue
        cell = (0, h, slice(None), o, k)
        concepts = np.broadcast_to(np.arange(norm.shape[2])[:, None, None], norm[cell].shape)
        estimate = replicate_slope(delta["mse"][cell].ravel(), delta["separability"][cell].ravel(),
                                   np.column_stack([norm[cell].ravel(), norm[cell].ravel() ** 2]),
                                   concepts.ravel(), n_boot=cfg.n_boot, seed=cfg.seed)
        for name, field in _SLOPE.items():
            out[name][0, h, o, k] = getattr(estimate, field)
        reasons[0, h, o, k] = estimate.reason or ""
    return {**out, "slope_reason": reasons}


def intervention_dataset(model, cells, results, cfg: InterventionStageConfig, hooks, concepts) -> xr.Dataset:
    objectives, dirs, alphas = list(cfg.objectives), list(cfg.directions), list(cfg.alphas)
    moving = [o for o in objectives if o != PAPER]
    arrays = _Arrays(len(hooks), len(concepts), moving, cfg)
    for (hook, concept, objective, direction), result in zip(cells, results):
        at, d = (0, hooks.index(hook), concepts.index(concept)), dirs.index(direction)
        o = moving.index(objective) if objective != PAPER else len(moving)
        arrays.latents[at + (o,)] = result.get("n_latents", np.nan)
        if result["skipped"]:
            arrays.skipped[at + (o,)] = result["skipped"]
        elif objective == PAPER:
            _fill_paper(arrays, at, d, result)
        else:
            _fill_moves(arrays, at + (o,), d, result)
            arrays.undecomposed[at + (o,)] = result["decomposition_reason"]
    lead = ("model", "hook", "concept")
    move_dims = (*lead, "objective", "intervention", "direction", "alpha")
    # The optimiser's objective value L(Δ) is stored as `loss`: `objective` names the dimension.
    data = {("loss" if f == "objective" else f): ((*move_dims, "step"), v, TRAJECTORY_ATTRS.get(f, {}))
            for f, v in arrays.trajectories.items()}
    data.update({f: (move_dims, v, {"description": MOVE_FIELDS[f]}) for f, v in arrays.moves.items()})
    data.update({f"pure_{f}": ((*lead, "objective", "direction"), v,
                               {"description": f"pure separability move (λ = 0, α-free): {MOVE_FIELDS.get(f, f)}"})
                 for f, v in arrays.pure.items()})
    slopes = _slopes(arrays.trajectories, moving, len(hooks), cfg)
    for name, value in slopes.items():
        data[name] = (("model", "hook", "objective", "intervention"), value,
                      {"description": f"{name}: ΔMSE ~ 1 + ΔSep + ‖δ‖ + ‖δ‖², coefficient of ΔSep; CI from "
                                      f"resampling concepts (the replicates), not (direction, α) cells"})
    data["skipped"] = ((*lead, "stage_objective"), arrays.skipped, {"description": "why a cell was not run"})
    data["n_latents"] = ((*lead, "stage_objective"), arrays.latents, {
        "units": "latents", "description": "latents the moves live on: the union of the sampled tokens' supports "
                                           "(the active-latent subspace); all K for the paper-literal search"})
    data["decomposition_reason"] = ((*lead, "objective"), arrays.undecomposed, {
        "description": "why the row/null-space variables are NaN (a decoder that is not linear); '' = split"})
    coords = {"model": [model], "hook": hooks, "concept": concepts, "objective": moving,
              "intervention": list(KINDS), "direction": dirs, "alpha": alphas, "step": np.arange(cfg.steps + 1),
              "stage_objective": [*moving, PAPER]}
    if PAPER in objectives:
        for f, v in arrays.paper.items():
            data[f"paper_{f}"] = ((*lead, "direction", "alpha", "paper_seed"), v,
                                  {"description": f"paper-literal random search: {PAPER_FIELDS[f]}"})
        coords["paper_seed"] = list(cfg.paper_seed_values())
        delta_mse = arrays.paper["delta_mse"]
        lower = np.where(np.isfinite(delta_mse).all(axis=(-1, -2)), (delta_mse < 0).mean(axis=(-1, -2)), np.nan)
        data["paper_lower_mse_fraction"] = ((*lead, "direction"), lower, {
            "description": "share of the paper-literal runs (α × seeds) that lowered the raw MSE"})
    return xr.Dataset(data, coords=coords, attrs={"design": __doc__, "paper_step_scale": cfg.paper_step_scale})


@flow(name="saema-intervention", flow_run_name="intervention · {model_name}", log_prints=True)
def intervention_flow(out: str, model_name: str, hooks: tuple[str, ...], concepts: tuple[str, ...],
                      sae_refs: list[SAERef], cfg: InterventionStageConfig = InterventionStageConfig(),
                      structure_seed: int = 42, dask_address: str | None = None, n_workers: int = 2,
                      refresh: bool = False) -> None:
    """Post-hoc moves, controls and the paper-literal search per cell; replicate slopes and a plot per hook."""
    cells = list(itertools.product(hooks, concepts, cfg.objectives, cfg.directions))
    calls = intervention_calls(out, model_name, cells, sae_refs, cfg, structure_seed)
    results = run_grid("intervention", out, calls, refresh, dask_address, n_workers)
    ds = intervention_dataset(model_name, cells, results, cfg, list(hooks), list(concepts))
    changed = write_group(out, "intervention", ds)
    for hook in hooks:
        png = plot_path(out, model_name, "intervention", hook)
        if changed or not exists(png):
            plot_intervention(ds.sel(model=model_name, hook=hook), png)
        publish_plot(f"intervention-{model_name}-{hook}", png, f"{model_name}: post-hoc moves at {hook}: ΔMSE vs ΔSep and vs α")
    slopes = ds[["slope", "slope_ci_low", "slope_ci_high", "n_replicates"]].to_dataframe()
    publish_table(f"intervention-slopes-{model_name}", slopes, "slope of ΔMSE on ΔSep at fixed displacement, concepts as replicates")
    for (m, hook, objective, kind), row in slopes.iterrows():
        print(f"{hook} {objective} {kind}: slope {row.slope:.3g} (95% CI {row.slope_ci_low:.3g} to "
              f"{row.slope_ci_high:.3g}, {int(row.n_replicates)} concepts)")
