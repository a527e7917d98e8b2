"""Flow: local and global representations (DESIGN.md §6) per (hook, concept, space, seed) on Dask."""

from __future__ import annotations

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import StructureStageConfig
from flows.grid import run_grid
from saema_core.structure import METRIC_NAMES
from storage.locations import exists
from storage.plots import plot_path, plot_structure_scatter
from storage.results import write_group
from tasks.artifacts import publish_plot, publish_table
from tasks.sae import SAERef
from saema_core.structure_metrics import identity_agreement
from tasks.structure import points_fingerprint, procrustes_between, token_metadata

_KIND = {"latent": "sae", "dense_ae": "dense_ae"}
_DESCRIPTIONS = {
    "n_clusters": "HDBSCAN clusters (local representations; Betti-0 of the clustering)",
    "noise_fraction": "fraction of tokens HDBSCAN leaves unclustered",
    "avg_intrinsic_dim": "mean TwoNN dimension of the clusters, in UMAP space",
    "avg_intrinsic_dim_original": "mean TwoNN dimension of the clusters, in the preprocessed space",
    "mst_weight": "weight of the minimum spanning tree over cluster centroids (UMAP space)",
    "agd": "average geodesic distance on the k=15 nearest-neighbour graph (UMAP space)",
}
_IDENTITIES = {
    "ari_item": ("item", "adjusted Rand index of the clusters against the concept item of each token "
                         "(1: the clusters are the items; noise tokens left out)"),
    "ari_token": ("token", "adjusted Rand index of the clusters against the token string (1: the clusters "
                           "are just the words)"),
    "ari_sentence": ("sentence", "adjusted Rand index of the clusters against the source sentence (prompt)"),
}


def structure_calls(out: str, model_name: str, cells, sae_ids, cfg: StructureStageConfig) -> list[dict]:
    """One `structure_cell` call per (hook, concept, space, seed); scatter coordinates for the first seed."""
    fingerprints: dict[tuple, str] = {}
    calls = []
    for (hook, concept, space, seed), sae_id in zip(cells, sae_ids):
        where = (hook, concept, space, sae_id)
        if where not in fingerprints:
            fingerprints[where] = points_fingerprint(out, model_name, *where)
        calls.append({"out": out, "model_name": model_name, "hook": hook, "concept": concept, "space": space,
                      "sae_id": sae_id, "seed": seed, "cfg": cfg.core(), "with_scatter": seed == cfg.seeds[0],
                      "content": fingerprints[where]})
    return calls


def _identity_arrays(cells, results, shape, hooks, concepts, spaces, seeds, meta) -> dict[str, np.ndarray]:
    """Per cell, the adjusted Rand index of its clusters against each token identity."""
    arrays = {name: np.full(shape, np.nan) for name in _IDENTITIES}
    for (hook, concept, space, seed), result in zip(cells, results):
        at = (0, hooks.index(hook), concepts.index(concept), spaces.index(space), seeds.index(seed))
        for name, (key, _) in _IDENTITIES.items():
            arrays[name][at] = identity_agreement(np.asarray(result["labels"]), meta[concept][key])
    return arrays


def structure_dataset(model: str, cells, results, cfg: StructureStageConfig, hooks, concepts,
                      meta: dict[str, dict[str, np.ndarray]]) -> xr.Dataset:
    spaces, seeds = list(cfg.spaces), list(cfg.seeds)
    n_tok = max(len(m["token"]) for m in meta.values())
    shape = (1, len(hooks), len(concepts), len(spaces), len(seeds))
    metrics = {name: np.full(shape, np.nan) for name in METRIC_NAMES}
    disparity, labels = np.full(shape, np.nan), np.full(shape + (n_tok,), np.nan, dtype=np.float32)
    reasons = np.full(shape, "", dtype=object)
    by_cell = dict(zip(cells, results))
    for (hook, concept, space, seed), result in by_cell.items():
        at = (0, hooks.index(hook), concepts.index(concept), spaces.index(space), seeds.index(seed))
        for name in METRIC_NAMES:
            metrics[name][at] = result["metrics"][name]
        labels[at][: len(result["labels"])] = result["labels"]
        reasons[at] = result["reason"]
        if space != "resid":
            disparity[at] = procrustes_between(by_cell[(hook, concept, "resid", seed)], result)[0]
    per_token = {name: np.full((1, len(hooks), len(concepts), n_tok), fill, dtype=dtype)
                 for name, fill, dtype in (("token", "", object), ("item", "", object), ("sentence", -1, np.int64))}
    for j, concept in enumerate(concepts):
        for name, values in per_token.items():
            values[0, :, j, : len(meta[concept][name])] = meta[concept][name]
    dims = ("model", "hook", "concept", "space", "seed")
    data = {name: (dims, value, {"long_name": name, "units": "1",
                                 "description": _DESCRIPTIONS.get(name, name.replace("_", " "))})
            for name, value in metrics.items()}
    identities = _identity_arrays(cells, results, shape, hooks, concepts, spaces, seeds, meta)
    data.update({name: (dims, identities[name], {"long_name": name, "units": "1", "description": text})
                 for name, (_, text) in _IDENTITIES.items()})
    data["procrustes_disparity"] = (dims, disparity, {"long_name": "procrustes_disparity", "units": "1",
        "description": "Procrustes disparity of cluster centroids vs resid space, clusters matched by token overlap"})
    data["cluster_label"] = (dims + ("token_index",), labels, {"units": "1",
        "description": "HDBSCAN label of each analysed token (−1 noise, NaN padding)"})
    data["reason"] = (dims, reasons, {"description": "why metrics of the cell are NaN (empty: all defined)"})
    token_dims = ("model", "hook", "concept", "token_index")
    data["token_str"] = (token_dims, per_token["token"],
                         {"description": "analysed token strings, in the order of cluster_label"})
    data["token_item"] = (token_dims, per_token["item"],
                          {"description": "the concept item of each analysed token's prompt"})
    data["token_sentence"] = (token_dims, per_token["sentence"],
                              {"description": "the prompt (source sentence) id of each analysed token (−1 padding); "
                                              "the activation store's `source` coordinate says where it came from"})
    return xr.Dataset(data, coords={"model": [model], "hook": hooks, "concept": concepts, "space": spaces,
                                    "seed": seeds, "token_index": np.arange(n_tok)})


@flow(name="saema-structure", flow_run_name="structure · {model_name}", log_prints=True)
def structure_flow(out: str, model_name: str, hooks: tuple[str, ...], concepts: tuple[str, ...],
                   sae_refs: list[SAERef], cfg: StructureStageConfig = StructureStageConfig(),
                   dask_address: str | None = None, n_workers: int = 2, refresh: bool = False) -> None:
    """Clusters and geometry per (hook, concept, space, seed) → the `structure` group and scatter plots."""
    ids = {(ref.hook, ref.kind): ref.sae_id for ref in sae_refs}
    cells = [(h, c, s, seed) for h in hooks for c in concepts for s in cfg.spaces for seed in cfg.seeds]
    sae_ids = [ids.get((h, _KIND.get(s))) for h, _, s, _ in cells]
    calls = structure_calls(out, model_name, cells, sae_ids, cfg)
    results = run_grid("structure", out, calls, refresh, dask_address, n_workers)
    meta = {c: token_metadata(out, model_name, hooks[0], c) for c in concepts}
    ds = structure_dataset(model_name, cells, results, cfg, list(hooks), list(concepts), meta)
    changed = write_group(out, "structure", ds)
    by_cell = dict(zip(cells, results))
    for hook in hooks:
        for concept in concepts:
            png = plot_path(out, model_name, "structure", hook, concept)
            if changed or not exists(png):
                panels = {s: by_cell[(hook, concept, s, cfg.seeds[0])] for s in cfg.spaces}
                plot_structure_scatter(panels, meta[concept]["token"],
                                       f"{model_name} {hook} · {concept} · UMAP seed {cfg.seeds[0]} (2-D view; "
                                       f"clusters from the {cfg.n_components}-D embedding)", png)
            publish_plot(f"structure-{model_name}-{hook}-{concept}", png,
                         f"{model_name}: UMAP of {concept} at {hook}, coloured by cluster (seed {cfg.seeds[0]})")
    metrics = ds[["n_clusters", "noise_fraction", "avg_intrinsic_dim", "mst_weight", "agd", "procrustes_disparity",
                  *_IDENTITIES]]
    publish_table(f"structure-metrics-{model_name}", metrics.mean("seed").to_dataframe(),
                  "structure metrics per (model, hook, concept, space), mean over UMAP seeds")
    clusters = ds["n_clusters"].mean(["model", "hook", "concept", "seed"]).to_pandas()
    print(f"structure: {len(cells)} cells; mean clusters per space: {clusters.round(1).to_dict()}")
