"""Flow: the training-time causal test of claim 3 (saema_core.causal) — SAEs on Dask, statistics here."""

from __future__ import annotations

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import CausalStageConfig
from flows.grid import run_grid
from saema_core import causal
from storage.activation_store import activation_store_url, content_hash, streamed_tokens
from storage.locations import basename, exists
from storage.models import ModelSpec
from storage.plots import plot_causal, plot_path
from storage.results import read_group, write_group
from tasks.artifacts import publish_plot, publish_table
from tasks.causal import residual_centroids
from tasks.sae import SAERef

OUTCOMES = {
    "mse": ("held-out MSE per token (sum over d_model), as in sae_eval", "activation²"),
    "explained_variance": ("held-out explained variance", "1"),
    "l0": ("held-out mean active latents per token", "latents"),
    "separability": ("held-out AEDP: mean distance between the latent centroids of the residual clusters",
                     "activation"),
    "separability_ratio": ("held-out AEDP / RMS distance of a token to its cluster's latent centroid "
                           "(scale-free)", "1"),
    "ce_loss_score": ("SAELens ce_loss_score with this SAE spliced in (NaN: the model has no LM head)", "1"),
    "n_tokens": ("held-out corpus tokens measured", "tokens"),
}
INTERVALS = {
    "effect": ("separate_mse", "relative held-out MSE change of the separating SAE (largest β) vs β = 0"),
    "separability_change": ("separate_sep", "relative held-out separability change at the largest β vs β = 0"),
    "merge_effect": ("merge_mse", "relative held-out MSE change of the merging SAE (smallest β) vs β = 0"),
    "merge_separability_change": ("merge_sep", "relative held-out separability change at the smallest β"),
    "slope": ("slope", "per-seed least-squares slope of held-out MSE on achieved separability"),
}


def _ce_models(out: str, model_name: str, hooks, model: ModelSpec | None) -> dict[str, tuple | None]:
    """Per hook, the model to splice the SAEs into and `sae_eval`'s (clean, zero-ablation) losses of the
    same held-out sequences, or None when `sae_eval` found no LM head there."""
    evaluation = read_group(out, "sae_eval", dask=False)
    if evaluation is None or model_name not in evaluation.model.values:
        return dict.fromkeys(hooks)
    cell = evaluation.sel(model=model_name, sae="sae")
    found = {}
    for hook in hooks:
        if hook not in cell.hook.values or not np.isfinite(float(cell.ce_loss_score.sel(hook=hook))):
            found[hook] = None
            continue
        reference = (float(cell.ce_loss_without_sae.sel(hook=hook)), float(cell.ce_loss_with_ablation.sel(hook=hook)))
        found[hook] = (model or ModelSpec(name=model_name), reference)
    return found


def causal_calls(out: str, model_name: str, hooks, sae_refs: list[SAERef], cfg: CausalStageConfig,
                 holdout_fraction: float, model: ModelSpec | None, dead_tokens: int) -> list[dict]:
    """One `causal_cell` call per (hook, β, seed), inputs fingerprinted."""
    saes = {ref.hook: ref for ref in sae_refs if ref.kind == "sae"}
    url = activation_store_url(out, model_name)
    ce_models = _ce_models(out, model_name, hooks, model)
    spec = model or ModelSpec(name=model_name)
    calls = []
    for hook in hooks:
        corpus = content_hash(url, hook)
        streamed = spec if streamed_tokens(url, hook) else None  # the cells recompute the training tokens
        centroids = residual_centroids(out, model_name, hook, cfg.n_clusters, cfg.cluster_seed, holdout_fraction,
                                       spec)
        for beta in cfg.betas:
            for seed in cfg.seeds:
                calls.append({"out": out, "model_name": model_name, "hook": hook, "base_path": saes[hook].path,
                              "base_id": saes[hook].sae_id, "centroids_path": centroids, "beta": beta, "seed": seed,
                              "steps": cfg.steps, "batch_size": cfg.batch_size,
                              "holdout_fraction": holdout_fraction,
                              "ce_model": ce_models[hook] and ce_models[hook][0],
                              "ce_reference": ce_models[hook] and ce_models[hook][1],
                              "content": f"{corpus}|{saes[hook].hash}|{basename(centroids)}",
                              "init": cfg.init, "dead_tokens": dead_tokens,
                              "model": streamed})
    return calls


def causal_dataset(model_name: str, hooks: list[str], cfg: CausalStageConfig, results: list[dict]) -> xr.Dataset:
    """The `causal` group: outcomes per (model, hook, β, seed); statistics and verdict per (model, hook)."""
    betas, seeds = list(cfg.betas), list(cfg.seeds)
    grid = {name: np.full((1, len(hooks), len(betas), len(seeds)), np.nan) for name in OUTCOMES}
    skipped = np.full((1, len(hooks)), "", dtype=object)
    cells = [(h, b, s) for h in hooks for b in betas for s in seeds]
    for (hook, beta, seed), result in zip(cells, results):
        if result["skipped"]:
            skipped[0, hooks.index(hook)] = result["skipped"]
            continue
        for name in OUTCOMES:
            grid[name][0, hooks.index(hook), betas.index(beta), seeds.index(seed)] = result[name]
    dims = ("model", "hook", "beta", "seed")
    data = {name: (dims, grid[name], {"long_name": name, "description": d, "units": u})
            for name, (d, u) in OUTCOMES.items()}
    data.update(_statistics(grid, betas, skipped, cfg.init))
    data["skipped"] = (("model", "hook"), skipped, {"description": "why the hook was not tested ('' = it was)"})
    return xr.Dataset(data, coords={"model": [model_name], "hook": hooks, "beta": betas, "seed": seeds},
                      attrs={"design": causal.__doc__, "init": cfg.init, "steps": cfg.steps,
                             "batch_size": cfg.batch_size,
                             "n_clusters": cfg.n_clusters, "cluster_seed": cfg.cluster_seed,
                             "verdict_rule": causal.causal_verdict.__doc__ or ""})


def _statistics(grid: dict, betas: list[float], skipped: np.ndarray, init: str) -> dict:
    """Per (model, hook): every interval of `dose_response` (mean, CI), the verdict and its reason."""
    n_hooks = skipped.shape[1]
    values = {f"{name}{part}": np.full((1, n_hooks), np.nan) for name in INTERVALS for part in ("", "_ci_low", "_ci_high")}
    values["best_beta"] = np.full((1, n_hooks), np.nan)
    verdicts, reasons = np.full((1, n_hooks), "", dtype=object), np.full((1, n_hooks), "", dtype=object)
    for h in range(n_hooks):
        if skipped[0, h]:
            verdicts[0, h], reasons[0, h] = "inconclusive", f"not tested: {skipped[0, h]}"
            continue
        stats = causal.dose_response(betas, grid["mse"][0, h], grid["separability"][0, h])
        for name, (field, _) in INTERVALS.items():
            interval = getattr(stats, field)
            values[name][0, h], values[f"{name}_ci_low"][0, h], values[f"{name}_ci_high"][0, h] = interval[:3]
        values["best_beta"][0, h] = stats.best_beta
        verdict = causal.causal_verdict(stats, max(betas), init)
        verdicts[0, h], reasons[0, h] = verdict.verdict, verdict.reason
    out = {}
    for name, (_, description) in INTERVALS.items():
        out[name] = (("model", "hook"), values[name], {"description": f"{description}; mean over seeds"})
        for part in ("_ci_low", "_ci_high"):
            out[name + part] = (("model", "hook"), values[name + part],
                                {"description": f"{part[1:].replace('_', ' ')} of the 95% Student-t CI over seeds"})
    out["best_beta"] = (("model", "hook"), values["best_beta"], {"description": "β with the lowest mean held-out MSE"})
    out["verdict"] = (("model", "hook"), verdicts, {"description": " | ".join(causal.VERDICTS)})
    out["verdict_reason"] = (("model", "hook"), reasons, {"description": "the verdict's reason, effect sizes, caveat"})
    return out


@flow(name="saema-causal", flow_run_name="causal · {model_name}", log_prints=True)
def causal_flow(out: str, model_name: str, hooks: tuple[str, ...], sae_refs: list[SAERef],
                cfg: CausalStageConfig = CausalStageConfig(), holdout_fraction: float = 0.05,
                model: ModelSpec | None = None, dask_address: str | None = None, n_workers: int = 2,
                refresh: bool = False, dead_tokens: int = 100_000) -> xr.Dataset:
    """Fine-tune the hook's SAE with the separability term over the β × seed grid (one SAE per Dask
    task), measure each on held-out tokens, and read the dose–response off the seeds. `dead_tokens`:
    the SAE stage's dead-latent threshold, used when the SAEs train from scratch."""
    calls = causal_calls(out, model_name, hooks, sae_refs, cfg, holdout_fraction, model, dead_tokens)
    results = run_grid("causal", out, calls, refresh, dask_address, n_workers)
    ds = causal_dataset(model_name, list(hooks), cfg, results)
    changed = write_group(out, "causal", ds)
    for hook in hooks:
        cell = ds.sel(model=model_name, hook=hook)
        png = plot_path(out, model_name, "causal", hook)
        if changed or not exists(png):
            plot_causal(cell, png, f"{model_name} {hook}")
        publish_plot(f"causal-{model_name}-{hook}", png, f"{model_name}: held-out MSE vs achieved separability at {hook} (training-time test)")
        print(f"causal {hook}: {cell.verdict.item()} — {cell.verdict_reason.item()}")
    publish_table(f"causal-outcomes-{model_name}", ds[["mse", "explained_variance", "separability", "separability_ratio"]]
                  .to_dataframe(), "held-out outcomes of every fine-tuned SAE of the causal test")
    return ds
