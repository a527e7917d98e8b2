"""Structure tasks: one (hook, concept, space, seed) point set → clusters and geometry metrics."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from prefect import task
from prefect.cache_policies import NO_CACHE

from saema_core.structure import StructureConfig, analyse_structure, compare_spaces, umap_2d
from storage import activation_store as store
from storage import latent_store
from tasks.allocator import keep_freed_memory
from tasks.threads import pinned_threads

_DENSE_ABOVE = 0.3  # densify latents above this fill (the dense AE); keep sparse latents as CSR


def concept_points(out: str, model_name: str, hook: str, concept: str, space: str,
                   sae_id: str | None) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray]:
    """The analysed tokens of a concept in one space, and their token strings (same order)."""
    acts = store.open_activations(store.activation_store_url(out, model_name), hook, concept)
    mask = acts["mask"].values
    tokens = np.array([str(t) for t in acts.token_str.values[mask]], dtype=object)
    if space == "resid":
        return acts.resid.values[mask], tokens
    csr, _ = latent_store.read_latents(latent_store.latent_store_url(out, model_name),
                                       latent_store.latent_group(concept, hook, sae_id))
    density = csr.nnz / max(1, csr.shape[0] * csr.shape[1])
    return (csr.toarray() if density > _DENSE_ABOVE else csr), tokens


def token_metadata(out: str, model_name: str, hook: str, concept: str) -> dict[str, np.ndarray]:
    """The analysed tokens' string, item and prompt (sentence) id, in `concept_points` order.

    Stores written before items were recorded give the token string as the item."""
    acts = store.open_activations(store.activation_store_url(out, model_name), hook, concept)
    mask = acts["mask"].values
    token = np.array([str(t) for t in acts.token_str.values[mask]], dtype=object)
    item = np.array([str(t) for t in acts["item"].values[mask]], dtype=object) if "item" in acts else token
    return {"token": token, "item": item, "sentence": acts.prompt_id.values[mask]}


def points_fingerprint(out: str, model_name: str, hook: str, concept: str, space: str,
                       sae_id: str | None) -> str:
    """What `concept_points` reads, as a cache-key input: the activations or the latents' own key."""
    if space == "resid":
        return store.content_hash(store.activation_store_url(out, model_name), hook, concept)
    key = latent_store.latents_key(latent_store.latent_store_url(out, model_name),
                                   latent_store.latent_group(concept, hook, sae_id))
    if key is None:
        raise ValueError(f"no complete latents for {concept} at {hook} ({sae_id}); encode them first")
    return key


def _result_dict(result, xy: np.ndarray | None) -> dict:
    return {"labels": result.labels.tolist(), "metrics": result.metrics, "reason": result.reason,
            "cluster_ids": result.cluster_ids.tolist(), "centroids": result.centroids.tolist(),
            "xy": None if xy is None else xy.tolist()}


@task(name="structure", task_run_name="structure {model_name} {hook} {concept} {space} seed {seed}",
      cache_policy=NO_CACHE, retries=1)
def structure_cell(out: str, model_name: str, hook: str, concept: str, space: str, sae_id: str | None,
                   seed: int, cfg: StructureConfig, with_scatter: bool = False, content: str = "") -> dict:
    """UMAP → HDBSCAN → metrics of one point set; labels per analysed token (+ a 2-D UMAP).

    `content` fingerprints the points read (part of the cache key, see tasks/caching.py)."""
    cell = f"{hook}/{concept}/{space}/seed={seed}"
    keep_freed_memory()
    with pinned_threads(1):
        points, _ = concept_points(out, model_name, hook, concept, space, sae_id)
        result = analyse_structure(points, cfg, cell=cell, seed=seed)
        xy = umap_2d(points, cfg, cell=cell, seed=seed) if with_scatter else None
    return _result_dict(result, xy)


def procrustes_between(resid: dict, other: dict) -> tuple[float, str]:
    """Procrustes disparity of two spaces' centroid arrangements, clusters matched by token overlap."""
    from saema_core.structure import StructureResult

    def as_result(d: dict, name: str) -> StructureResult:
        empty, ids = np.zeros(0), np.asarray(d["cluster_ids"], dtype=np.int64)
        centroids = np.asarray(d["centroids"], dtype=float).reshape(len(ids), -1) if len(ids) else np.zeros((0, 1))
        return StructureResult(name, 0, np.asarray(d["labels"]), empty, ids, centroids, empty, empty, {}, "")

    comparison = compare_spaces(as_result(resid, "resid"), as_result(other, "other"))
    return comparison.procrustes_disparity, comparison.reason
