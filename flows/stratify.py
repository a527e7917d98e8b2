"""Flow: SAEMA stratification (DESIGN.md §5) on Dask — a local cluster or an existing scheduler."""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import StratifyConfig
from flows.dask_runner import cluster_workers
from flows.grid import run_grid
from saema_core.ranks import ESTIMATORS, MODES
from saema_core.stratification import stratification_verdict
from storage.activation_store import (
    activation_store_url,
    concept_prompt_set,
    concept_source,
    content_hash,
)
from storage.locations import exists
from storage.plots import plot_path, plot_rank_vs_noise
from storage.results import write_group
from tasks.artifacts import publish_plot, publish_table
from tasks.sae import SAERef
from tasks.stratify import StratifyParams

_SPACE_SAE_KIND = {"latent": "sae", "dense_ae": "dense_ae"}


def _cells(hooks, concepts, spaces):
    return [(h, c, s) for h in hooks for c in concepts for s in spaces]


_VERDICT_VARS = {
    "verdict": ("stratified | not stratified | saturated: DESIGN.md §5.5 on the exact (numerical) rank", "", object),
    "verdict_reason": ("the verdict in words, with the numbers it rests on", "", object),
    "n_strata": ("rank levels among the unsaturated σ (levels hold means within τ)", "1", np.int64),
    "transition_noise": ("smallest unsaturated σ at which the mean rank leaves its first level (NaN: never)", "σ", float),
    "rank_range": ("max − min of the replicate-mean ranks over unsaturated σ", "1", float),
    "tau": ("resolution τ = max(replicate spread over unsaturated σ, 1) + 0.5", "1", float),
    "n_unsaturated": ("σ levels where no replicate's rank reaches the rank bound", "1", np.int64),
    "partially_saturated": ("some σ levels saturated, at least two not", "1", bool),
}


def _verdicts(noise, rank: np.ndarray, bound: np.ndarray) -> dict[str, np.ndarray]:
    """Verdicts over the leading dims of the numerical rank (..., noise, replicate, mode)."""
    lead = rank.shape[:-3] + rank.shape[-1:]
    out = {name: np.zeros(lead, dtype) for name, (_, _, dtype) in _VERDICT_VARS.items()}
    for index in np.ndindex(*lead):
        at = index[:-1] + (slice(None), slice(None), index[-1])
        if np.isnan(rank[at]).any():
            out["verdict"][index], out["verdict_reason"][index] = "", "not computed"
            out["transition_noise"][index] = out["rank_range"][index] = out["tau"][index] = np.nan
            continue
        verdict = stratification_verdict(noise, rank[at], bound[at])._asdict()
        verdict["verdict_reason"] = verdict.pop("reason")
        for name in out:
            out[name][index] = verdict[name]
    return out


_ATTRS = {
    "rank": ("rank of the SSPD matrix S(n) = Z(n) Z(n)ᵀ of the mode-n unfolding", "1"),
    "n_active": ("latents active (nonzero) for at least one analysed token", "1"),
    "n_tokens": ("analysed tokens with at least one active latent", "1"),
    "rank_bound": ("samples of the mode with data: tokens (latent), prompts (prompt), positions (position)", "1"),
    "saturated": ("exact rank ≥ rank_bound: the cell says nothing about the code", "1"),
    "deficit": ("n_active − exact rank: a genuine rank deficit of the active latents (0: rank = support)", "1"),
    "at_ceiling": ("exact rank = size of S(n) (all K latents for the latent mode)", "1"),
    "noise_to_signal": ("σ·s divided by the RMS per coordinate of the analysed activations", "1"),
    "n_analysed": ("analysed tokens of the concept", "1"),
    "concept_source": ("where the concept's prompts came from (corpus contexts, templates, file)", ""),
    "prompt_set": ("fingerprint of the concept's prompts and analysed spans; models agree on it exactly when "
                   "they analysed the same data", ""),
}


def _cell_arrays(cells, results, shape, hooks, concepts, spaces) -> dict[str, np.ndarray]:
    """The per-cell arrays of every (hook, concept, space) result, NaN where a cell is missing."""
    names = {"rank": (len(MODES), len(ESTIMATORS)), "n_active": (len(MODES),), "n_tokens": (len(MODES),),
             "rank_bound": (len(MODES),), "ceiling": (len(MODES),)}
    arrays = {name: np.full(shape + extra, np.nan) for name, extra in names.items()}
    for (hook, concept, space), result in zip(cells, results):
        at = (0, hooks.index(hook), concepts.index(concept), spaces.index(space))
        for name in arrays:
            arrays[name][at] = result[name]
    return arrays


def _concept_arrays(out: str, model: str, cells, results, cfg: StratifyConfig, hooks, concepts) -> dict:
    """Per (hook, concept): analysed tokens, the prompts' source and each σ's noise-to-signal ratio."""
    n_analysed = np.full((1, len(hooks), len(concepts)), np.nan)
    ratio = np.full((1, len(hooks), len(concepts), len(cfg.noise_levels)), np.nan)
    for (hook, concept, _), result in zip(cells, results):
        at = (0, hooks.index(hook), concepts.index(concept))
        n_analysed[at] = result["n_analysed"]
        ratio[at] = np.asarray(cfg.noise_levels) * result["scale"] / result["signal_rms"]
    url = activation_store_url(out, model)
    source = np.array([[concept_source(url, hooks[0], c) for c in concepts]], dtype=object)
    prompt_set = np.array([[concept_prompt_set(url, hooks[0], c) for c in concepts]], dtype=object)
    return {"n_analysed": n_analysed, "noise_to_signal": ratio, "concept_source": source, "prompt_set": prompt_set}


def stratification_dataset(model: str, cells, results, cfg: StratifyConfig, hooks, concepts,
                           out: str = "") -> xr.Dataset:
    dims = ("model", "hook", "concept", "space", "noise", "replicate", "mode", "estimator")
    spaces = list(cfg.spaces)
    shape = (1, len(hooks), len(concepts), len(spaces), len(cfg.noise_levels), cfg.replicates)
    a = _cell_arrays(cells, results, shape, hooks, concepts, spaces)
    exact = a["rank"][..., ESTIMATORS.index("numerical")]
    known = ~np.isnan(exact)
    cell_dims = dims[:-1]
    data = {"rank": (dims, a["rank"]), "n_active": (cell_dims, a["n_active"]), "n_tokens": (cell_dims, a["n_tokens"]),
            "rank_bound": (cell_dims, a["rank_bound"]),
            "saturated": (cell_dims, known & (exact >= a["rank_bound"])),
            "deficit": (cell_dims, a["n_active"] - exact),
            "at_ceiling": (cell_dims, known & (exact == a["ceiling"]))}
    verdict_dims = dims[:4] + ("mode",)
    data.update({k: (verdict_dims, v) for k, v in _verdicts(cfg.noise_levels, exact, a["rank_bound"]).items()})
    concept_arrays = _concept_arrays(out, model, cells, results, cfg, hooks, concepts)
    data["n_analysed"] = (dims[:3], concept_arrays["n_analysed"])
    data["noise_to_signal"] = (dims[:3] + ("noise",), concept_arrays["noise_to_signal"])
    data["concept_source"] = (("model", "concept"), concept_arrays["concept_source"])
    data["prompt_set"] = (("model", "concept"), concept_arrays["prompt_set"])
    ds = xr.Dataset(data, coords={"model": [model], "hook": hooks, "concept": concepts, "space": spaces,
                                  "noise": list(cfg.noise_levels), "replicate": np.arange(cfg.replicates),
                                  "mode": list(MODES), "estimator": list(ESTIMATORS)})
    for name, (description, units) in {**_ATTRS, **{k: v[:2] for k, v in _VERDICT_VARS.items()}}.items():
        ds[name].attrs = {"long_name": name, "description": description, "units": units}
    ds.attrs = {"noise_scale": cfg.noise_scale, "base_seed": cfg.seed, "replicates": cfg.replicates,
                "verdict_noise_levels": " ".join(map(str, cfg.noise_levels)),
                "verdict_rule": inspect.cleandoc(stratification_verdict.__doc__)}
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


def sigma_chunks(n_levels: int, n_cells: int, n_workers: int) -> int:
    """Into how many tasks each (hook, concept, space) sweep is split: one while there are at least two
    sweeps per worker, else enough chunks for two tasks per worker (at most one per σ level), so that
    the longest task stays within about the mean work per worker."""
    return min(n_levels, max(1, -(-2 * n_workers // max(n_cells, 1))))


def chunk_params(params: StratifyParams, chunk: int, n_chunks: int) -> StratifyParams:
    """The σ levels of task `chunk` of `n_chunks`: every n_chunks-th level from the chunk-th, so that
    every chunk gets low and high σ (the costly ones) alike. Chunks after the first also compute the
    sweep's strata reference (its first σ, replicate 0)."""
    if n_chunks == 1:
        return params
    levels = tuple(params.noise_levels[chunk::n_chunks])
    return replace(params, noise_levels=levels, reference_noise=params.noise_levels[0])


def merge_chunks(results: list[dict]) -> dict:
    """One sweep's result from its chunks' (`chunk_params` order): per-σ lists re-interleaved, the
    per-concept scalars (equal in every chunk) taken once."""
    if len(results) == 1:
        return results[0]
    merged = {}
    for name, value in results[0].items():
        if not isinstance(value, list):
            merged[name] = value
            continue
        rows = [None] * sum(len(result[name]) for result in results)
        for chunk, result in enumerate(results):
            rows[chunk::len(results)] = result[name]
        merged[name] = rows
    return merged


def stratify_calls(out: str, model_name: str, cells, sae_refs: list[SAERef], params: StratifyParams,
                   n_chunks: int = 1) -> list[dict]:
    """`n_chunks` `stratify_cells` calls per (hook, concept, space) (`chunk_params`), cell by cell, with
    the content they read fingerprinted."""
    refs = {(ref.hook, ref.kind): ref for ref in sae_refs}
    url = activation_store_url(out, model_name)
    calls = []
    for hook, concept, space in cells:
        ref = refs.get((hook, _SPACE_SAE_KIND.get(space)))
        content = f"{content_hash(url, hook, concept)}|{ref.hash if ref else 'identity'}"
        calls += [{"out": out, "model_name": model_name, "hook": hook, "concept": concept, "space": space,
                   "sae_path": ref.path if ref else None, "params": chunk_params(params, chunk, n_chunks),
                   "content": content} for chunk in range(n_chunks)]
    return calls


@flow(name="saema-stratify", flow_run_name="stratify · {model_name}", log_prints=True)
def stratify_flow(out: str, model_name: str, hooks: tuple[str, ...], concepts: tuple[str, ...],
                  sae_refs: list[SAERef], cfg: StratifyConfig = StratifyConfig(), refresh: bool = False) -> None:
    """Rank vs noise for every (hook, concept, space); verdicts and strata to results.zarr."""
    params = StratifyParams(cfg.noise_levels, cfg.replicates, cfg.noise_scale, cfg.seed)
    kinds = {(ref.hook, ref.kind) for ref in sae_refs}
    cells = _cells(list(hooks), list(concepts), cfg.spaces)
    missing = [(h, s) for h, _, s in cells if s != "resid" and (h, _SPACE_SAE_KIND[s]) not in kinds]
    if missing:
        raise ValueError(f"no SAE for (hook, space) {sorted(set(missing))}; train or pass them first")
    n_chunks = sigma_chunks(len(cfg.noise_levels), len(cells), cluster_workers(cfg.dask_address, cfg.n_workers))
    calls = stratify_calls(out, model_name, cells, sae_refs, params, n_chunks)
    chunks = run_grid("stratify", out, calls, refresh, cfg.dask_address, cfg.n_workers)
    results = [merge_chunks(chunks[i:i + n_chunks]) for i in range(0, len(chunks), n_chunks)]
    ds = stratification_dataset(model_name, cells, results, cfg, list(hooks), list(concepts), out)
    changed = write_group(out, "stratification", ds)
    write_group(out, "strata", strata_dataset(model_name, cells, results, cfg, list(hooks), list(concepts)))
    for hook in hooks:
        png = plot_path(out, model_name, "stratification", hook)
        if changed or not exists(png):
            plot_rank_vs_noise(ds.sel(model=model_name, hook=hook), png)
        publish_plot(f"stratification-{model_name}-{hook}", png, f"{model_name}: SAEMA latent-mode rank vs noise at {hook}")
    verdicts = ds[["verdict", "n_strata", "rank_range", "tau", "n_unsaturated"]].sel(mode="latent")
    publish_table(f"stratification-verdicts-{model_name}", verdicts.to_dataframe(),
                  "SAEMA verdicts per (model, hook, concept, space), latent mode, exact rank")
    counts = verdicts["verdict"].to_series().groupby(level="space").value_counts()
    print(f"stratification verdicts (latent mode, exact rank): {counts.to_dict()}")
