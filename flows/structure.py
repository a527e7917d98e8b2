"""Flow: local and global representations (DESIGN.md §6) per (hook, concept, space, seed) on Dask."""

from __future__ import annotations

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import StructureStageConfig
from flows.grid import run_grid
from saema_core.structure import METRIC_NAMES
from storage.locations import exists
from storage.plots import plot_structure_scatter
from storage.results import write_group
from tasks.artifacts import publish_plot, publish_table
from tasks.sae import SAERef
from tasks.structure import concept_points, points_fingerprint, procrustes_between

_KIND = {"latent": "sae", "dense_ae": "dense_ae"}
_DESCRIPTIONS = {
    "n_clusters": "HDBSCAN clusters (local representations; Betti-0 of the clustering)",
    "noise_fraction": "fraction of tokens HDBSCAN leaves unclustered",
    "avg_intrinsic_dim": "mean TwoNN dimension of the clusters, in UMAP space",
    "avg_intrinsic_dim_original": "mean TwoNN dimension of the clusters, in the preprocessed space",
    "mst_weight": "weight of the minimum spanning tree over cluster centroids (UMAP space)",
    "agd": "average geodesic distance on the k=15 nearest-neighbour graph (UMAP space)",
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


def structure_dataset(model: str, cells, results, cfg: StructureStageConfig, hooks, concepts,
                      tokens: dict[str, np.ndarray]) -> xr.Dataset:
    spaces, seeds = list(cfg.spaces), list(cfg.seeds)
    n_tok = max(len(t) for t in tokens.values())
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
    token_str = np.full((1, len(hooks), len(concepts), n_tok), "", dtype=object)
    for j, concept in enumerate(concepts):
        token_str[0, :, j, : len(tokens[concept])] = tokens[concept]
    dims = ("model", "hook", "concept", "space", "seed")
    data = {name: (dims, value, {"long_name": name, "units": "1",
                                 "description": _DESCRIPTIONS.get(name, name.replace("_", " "))})
            for name, value in metrics.items()}
    data["procrustes_disparity"] = (dims, disparity, {"long_name": "procrustes_disparity", "units": "1",
        "description": "Procrustes disparity of cluster centroids vs resid space, clusters matched by token overlap"})
    data["cluster_label"] = (dims + ("token_index",), labels, {"units": "1",
        "description": "HDBSCAN label of each analysed token (−1 noise, NaN padding)"})
    data["reason"] = (dims, reasons, {"description": "why metrics of the cell are NaN (empty: all defined)"})
    data["token_str"] = (("model", "hook", "concept", "token_index"), token_str,
                         {"description": "analysed token strings, in the order of cluster_label"})
    return xr.Dataset(data, coords={"model": [model], "hook": hooks, "concept": concepts, "space": spaces,
                                    "seed": seeds, "token_index": np.arange(n_tok)})


@flow(name="saema-structure", log_prints=True)
def structure_flow(out: str, model_name: str, hooks: tuple[str, ...], concepts: tuple[str, ...],
                   sae_refs: list[SAERef], cfg: StructureStageConfig = StructureStageConfig(),
                   dask_address: str | None = None, n_workers: int = 2, refresh: bool = False) -> None:
    """Clusters and geometry per (hook, concept, space, seed) → the `structure` group and scatter plots."""
    ids = {(ref.hook, ref.kind): ref.sae_id for ref in sae_refs}
    cells = [(h, c, s, seed) for h in hooks for c in concepts for s in cfg.spaces for seed in cfg.seeds]
    sae_ids = [ids.get((h, _KIND.get(s))) for h, _, s, _ in cells]
    calls = structure_calls(out, model_name, cells, sae_ids, cfg)
    results = run_grid("structure", out, calls, refresh, dask_address, n_workers)
    tokens = {c: concept_points(out, model_name, hooks[0], c, "resid", None)[1] for c in concepts}
    ds = structure_dataset(model_name, cells, results, cfg, list(hooks), list(concepts), tokens)
    changed = write_group(out, "structure", ds)
    by_cell = dict(zip(cells, results))
    for hook in hooks:
        for concept in concepts:
            png = f"{out}/plots/structure_{hook}_{concept}.png"
            if changed or not exists(png):
                panels = {s: by_cell[(hook, concept, s, cfg.seeds[0])] for s in cfg.spaces}
                plot_structure_scatter(panels, tokens[concept], f"{hook} · {concept}", png)
            publish_plot(f"structure-{hook}-{concept}", png, f"UMAP of {concept} at {hook}, coloured by cluster")
    metrics = ds[["n_clusters", "noise_fraction", "avg_intrinsic_dim", "mst_weight", "agd", "procrustes_disparity"]]
    publish_table("structure-metrics", metrics.mean("seed").to_dataframe(),
                  "structure metrics per (model, hook, concept, space), mean over UMAP seeds")
    clusters = ds["n_clusters"].mean(["model", "hook", "concept", "seed"]).to_pandas()
    print(f"structure: {len(cells)} cells; mean clusters per space: {clusters.round(1).to_dict()}")
