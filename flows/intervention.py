"""Flow: does separability cause better reconstruction? (DESIGN.md §7) — cells on Dask, statistics here."""

from __future__ import annotations

import itertools

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import InterventionStageConfig
from flows.grid import run_grid
from saema_core.intervention import InterventionConfig
from saema_core.statistics import correlate, verdict
from storage.locations import exists
from storage.plots import plot_intervention
from storage.results import write_group
from tasks.artifacts import publish_plot, publish_table
from tasks.intervention import TRAJECTORY_FIELDS, inputs_fingerprint
from tasks.sae import SAERef

KINDS = ("optimised", "control")
_STATS = ("pearson_r", "pearson_p", "pearson_ci_low", "pearson_ci_high",
          "spearman_r", "spearman_p", "spearman_ci_low", "spearman_ci_high", "n")


def intervention_calls(out: str, model_name: str, cells, sae_refs: list[SAERef], cfg: InterventionStageConfig,
                       structure_seed: int) -> list[dict]:
    """One `intervention_cell` call per (hook, concept, objective, direction, α), inputs fingerprinted."""
    saes = {ref.hook: ref for ref in sae_refs if ref.kind == "sae"}
    fingerprints: dict[tuple, str] = {}
    calls = []
    for i, (hook, concept, objective, direction, alpha) in enumerate(cells):
        sae = saes[hook]
        if (hook, concept) not in fingerprints:
            fingerprints[hook, concept] = inputs_fingerprint(out, model_name, hook, concept, sae.sae_id, sae.hash,
                                                             structure_seed)
        base = InterventionConfig(objective=objective, lam=cfg.lam, steps=cfg.steps, lr=cfg.lr,
                                  clamp_nonnegative=cfg.clamp, seed=cfg.seed)
        calls.append({"out": out, "model_name": model_name, "hook": hook, "concept": concept, "sae_path": sae.path,
                      "sae_id": sae.sae_id, "seed": structure_seed, "base": base, "direction": direction,
                      "alpha": alpha, "control_seed": cfg.seed + i, "content": fingerprints[hook, concept],
                      "sample": cfg.sample()})
    return calls


def _stats_row(stats) -> list[float]:
    p, s = stats.pearson, stats.spearman
    return [p.statistic, p.p_value, p.ci_low, p.ci_high, s.statistic, s.p_value, s.ci_low, s.ci_high, stats.n]


def _deltas(results: list[dict], kind: str, field: str) -> np.ndarray:
    return np.array([r[kind][field][-1] - r[kind][field][0] for r in results])


def intervention_dataset(model, cells, results, cfg: InterventionStageConfig, hooks, concepts) -> xr.Dataset:
    objectives, dirs, alphas = list(cfg.objectives), list(cfg.directions), list(cfg.alphas)
    lead = (1, len(hooks), len(concepts), len(objectives))
    traj = {f: np.full(lead + (len(KINDS), len(dirs), len(alphas), cfg.steps + 1), np.nan) for f in TRAJECTORY_FIELDS}
    stats = np.full(lead + (len(KINDS), len(_STATS)), np.nan)
    verdicts, skipped = np.full(lead, "", dtype=object), np.full(lead, "", dtype=object)
    groups: dict[tuple, list] = {}
    for (hook, concept, objective, direction, alpha), result in zip(cells, results):
        at = (0, hooks.index(hook), concepts.index(concept), objectives.index(objective))
        if result["skipped"]:
            skipped[at] = result["skipped"]
            continue
        groups.setdefault(at, []).append(result)
        for k, kind in enumerate(KINDS):
            for f in TRAJECTORY_FIELDS:
                traj[f][at + (k, dirs.index(direction), alphas.index(alpha))] = result[kind][f]
    for at, group in groups.items():
        pair = [correlate(_deltas(group, kind, "separability"), _deltas(group, kind, "mse"),
                          n_boot=cfg.n_boot, seed=cfg.seed) for kind in KINDS]
        for k, kind_stats in enumerate(pair):
            stats[at + (k,)] = _stats_row(kind_stats)
        verdicts[at] = verdict(*pair)
    dims = ("model", "hook", "concept", "objective")
    # The optimiser's objective value L(Δ) is stored as `loss`: `objective` names the dimension.
    data = {("loss" if f == "objective" else f): (dims + ("intervention", "direction", "alpha", "step"), v,
                                                  {"long_name": f, "units": "1"}) for f, v in traj.items()}
    for j, name in enumerate(_STATS):
        data[name] = (dims + ("intervention",), stats[..., j], {"long_name": name, "units": "1",
                      "description": f"{name} of the correlation between ΔSep and ΔMSE across (direction, α)"})
    data["verdict"] = (dims, verdicts, {"description": "plain-language reading: do the data support the claim?"})
    data["skipped"] = (dims, skipped, {"description": "why a cell was not run (empty = it ran)"})
    return xr.Dataset(data, coords={"model": [model], "hook": hooks, "concept": concepts, "objective": objectives,
                                    "intervention": list(KINDS), "direction": dirs, "alpha": alphas,
                                    "step": np.arange(cfg.steps + 1)})


@flow(name="saema-intervention", log_prints=True)
def intervention_flow(out: str, model_name: str, hooks: tuple[str, ...], concepts: tuple[str, ...],
                      sae_refs: list[SAERef], cfg: InterventionStageConfig = InterventionStageConfig(),
                      structure_seed: int = 42, dask_address: str | None = None, n_workers: int = 2,
                      refresh: bool = False) -> None:
    """Optimised interventions and controls per cell; correlations, verdicts and a plot per hook."""
    cells = list(itertools.product(hooks, concepts, cfg.objectives, cfg.directions, cfg.alphas))
    calls = intervention_calls(out, model_name, cells, sae_refs, cfg, structure_seed)
    results = run_grid("intervention", out, calls, refresh, dask_address, n_workers)
    ds = intervention_dataset(model_name, cells, results, cfg, list(hooks), list(concepts))
    changed = write_group(out, "intervention", ds)
    for hook in hooks:
        png = f"{out}/plots/intervention_{hook}.png"
        if changed or not exists(png):
            plot_intervention(ds.sel(model=model_name, hook=hook), png)
        publish_plot(f"intervention-{hook}", png, f"ΔMSE vs ΔSep at {hook}: optimised vs random control")
    publish_table("intervention-statistics", ds[["pearson_r", "pearson_p", "spearman_r", "spearman_p"]].to_dataframe(),
                  "correlation of ΔSep and ΔMSE per (model, hook, concept, objective, intervention)")
    for (hook, concept, objective), text in np.ndenumerate(ds.verdict.sel(model=model_name).values):
        if text:
            print(f"{hooks[hook]} {concepts[concept]} {cfg.objectives[objective]}: {text}")
