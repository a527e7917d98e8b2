"""Flow: SAEMA stratification (DESIGN.md §5) on Dask — a local cluster or an existing scheduler."""

from __future__ import annotations

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import StratifyConfig
from flows.grid import run_grid
from saema_core.ranks import ESTIMATORS, MODES
from saema_core.stratification import stratification_verdict
from storage.activation_store import activation_store_url, content_hash
from storage.locations import exists
from storage.plots import plot_rank_vs_noise
from storage.results import write_group
from tasks.artifacts import publish_plot, publish_table
from tasks.sae import SAERef
from tasks.stratify import StratifyParams

_SPACE_SAE_KIND = {"latent": "sae", "dense_ae": "dense_ae"}


def _cells(hooks, concepts, spaces):
    return [(h, c, s) for h in hooks for c in concepts for s in spaces]


def _verdicts(noise, rank: np.ndarray) -> dict[str, np.ndarray]:
    """Verdict variables over the leading dims of rank (..., noise, replicate, mode, estimator)."""
    lead = rank.shape[:-4]
    out = {"stratified": np.zeros(lead + rank.shape[-2:], bool),
           "n_strata": np.zeros(lead + rank.shape[-2:], np.int64),
           "transition_noise": np.full(lead + rank.shape[-2:], np.nan)}
    for index in np.ndindex(*lead, *rank.shape[-2:]):
        table = rank[index[:-2] + (slice(None), slice(None)) + index[-2:]]
        verdict = stratification_verdict(noise, table)
        out["stratified"][index] = verdict.stratified
        out["n_strata"][index] = verdict.n_strata
        out["transition_noise"][index] = verdict.transition_noise
    return out


_ATTRS = {
    "rank": ("rank of the SSPD matrix S(n) = Z(n) Z(n)ᵀ of the mode-n unfolding", "1"),
    "n_active": ("rows of Z(n) that are nonzero somewhere (active latents for the latent mode)", "1"),
    "n_tokens": ("columns of the smaller Gram's other side that are nonzero (rank bound)", "1"),
    "stratified": ("replicate-mean rank takes ≥ 2 levels further apart than the replicate spread", "1"),
    "n_strata": ("number of distinct rank levels across σ", "1"),
    "transition_noise": ("smallest σ at which the rank leaves its σ=0 level (NaN: never)", "σ"),
}


def stratification_dataset(model: str, cells, results, cfg: StratifyConfig, hooks, concepts) -> xr.Dataset:
    dims = ("model", "hook", "concept", "space", "noise", "replicate", "mode", "estimator")
    spaces = list(cfg.spaces)
    shape = (1, len(hooks), len(concepts), len(spaces), len(cfg.noise_levels), cfg.replicates)
    rank = np.full(shape + (len(MODES), len(ESTIMATORS)), np.nan)
    counts = {k: np.full(shape + (len(MODES),), np.nan) for k in ("n_active", "n_tokens")}
    for (hook, concept, space), result in zip(cells, results):
        at = (0, hooks.index(hook), concepts.index(concept), spaces.index(space))
        rank[at] = result["rank"]
        for k in counts:
            counts[k][at] = result[k]
    verdicts = _verdicts(cfg.noise_levels, rank)
    data = {"rank": (dims, rank), **{k: (dims[:-1], v) for k, v in counts.items()},
            **{k: (dims[:4] + dims[-2:], v) for k, v in verdicts.items()}}
    ds = xr.Dataset(data, coords={"model": [model], "hook": hooks, "concept": concepts, "space": spaces,
                                  "noise": list(cfg.noise_levels), "replicate": np.arange(cfg.replicates),
                                  "mode": list(MODES), "estimator": list(ESTIMATORS)})
    for name, (description, units) in _ATTRS.items():
        ds[name].attrs = {"long_name": name, "description": description, "units": units}
    ds.attrs = {"noise_scale": cfg.noise_scale, "base_seed": cfg.seed}
    return ds


def strata_dataset(model: str, cells, results, cfg: StratifyConfig, hooks, concepts) -> xr.Dataset:
    dims = ("model", "hook", "concept", "space", "noise", "replicate")
    spaces = list(cfg.spaces)
    shape = (1, len(hooks), len(concepts), len(spaces), len(cfg.noise_levels), cfg.replicates)
    names = {"n_supports": "distinct supports (sets of active latents) among the tokens",
             "mean_jaccard": "mean Jaccard similarity of each token's support to its σ=0 support",
             "fraction_changed": "fraction of tokens whose support differs from its σ=0 support"}
    data = {name: np.full(shape, np.nan) for name in names}
    for (hook, concept, space), result in zip(cells, results):
        for name in names:
            data[name][(0, hooks.index(hook), concepts.index(concept), spaces.index(space))] = result[name]
    ds = xr.Dataset({name: (dims, value, {"long_name": name, "description": names[name], "units": "1"})
                     for name, value in data.items()},
                    coords={"model": [model], "hook": hooks, "concept": concepts, "space": spaces,
                            "noise": list(cfg.noise_levels), "replicate": np.arange(cfg.replicates)})
    return ds


def stratify_calls(out: str, model_name: str, cells, sae_refs: list[SAERef], params: StratifyParams) -> list[dict]:
    """One `stratify_cells` call per (hook, concept, space), with the content it reads fingerprinted."""
    refs = {(ref.hook, ref.kind): ref for ref in sae_refs}
    url = activation_store_url(out, model_name)
    calls = []
    for hook, concept, space in cells:
        ref = refs.get((hook, _SPACE_SAE_KIND.get(space)))
        content = f"{content_hash(url, hook, concept)}|{ref.hash if ref else 'identity'}"
        calls.append({"out": out, "model_name": model_name, "hook": hook, "concept": concept, "space": space,
                      "sae_path": ref.path if ref else None, "params": params, "content": content})
    return calls


@flow(name="saema-stratify", log_prints=True)
def stratify_flow(out: str, model_name: str, hooks: tuple[str, ...], concepts: tuple[str, ...],
                  sae_refs: list[SAERef], cfg: StratifyConfig = StratifyConfig(), refresh: bool = False) -> None:
    """Rank vs noise for every (hook, concept, space); verdicts and strata to results.zarr."""
    params = StratifyParams(cfg.noise_levels, cfg.replicates, cfg.noise_scale, cfg.seed)
    kinds = {(ref.hook, ref.kind) for ref in sae_refs}
    cells = _cells(list(hooks), list(concepts), cfg.spaces)
    missing = [(h, s) for h, _, s in cells if s != "resid" and (h, _SPACE_SAE_KIND[s]) not in kinds]
    if missing:
        raise ValueError(f"no SAE for (hook, space) {sorted(set(missing))}; train or pass them first")
    calls = stratify_calls(out, model_name, cells, sae_refs, params)
    results = run_grid("stratify", out, calls, refresh, cfg.dask_address, cfg.n_workers)
    ds = stratification_dataset(model_name, cells, results, cfg, list(hooks), list(concepts))
    changed = write_group(out, "stratification", ds)
    write_group(out, "strata", strata_dataset(model_name, cells, results, cfg, list(hooks), list(concepts)))
    for hook in hooks:
        png = f"{out}/plots/stratification_{hook}.png"
        if changed or not exists(png):
            plot_rank_vs_noise(ds.sel(model=model_name, hook=hook), png)
        publish_plot(f"stratification-{hook}", png, f"SAEMA latent-mode rank vs noise at {hook}")
    verdicts = ds[["stratified", "n_strata", "transition_noise"]].sel(mode="latent", estimator="numerical")
    publish_table("stratification-verdicts", verdicts.to_dataframe(),
                  "SAEMA verdicts per (model, hook, concept, space), latent mode, numerical rank")
    latent = ds.sel(mode="latent", estimator="numerical", space="latent" if "latent" in cfg.spaces else cfg.spaces[0])
    print(f"stratified (latent mode, numerical rank): {int(latent.stratified.sum())} of {latent.stratified.size} "
          f"(hook, concept) cells")
