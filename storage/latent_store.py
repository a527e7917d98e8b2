"""The latent store: SAE latents of the concept tokens, as (index, value) pairs per token.

    <out>/latents/<model>.zarr/<concept>/<hook>/<sae_id>/
        latent_index (token, slot) int32   active latent ids, -1 = empty slot
        latent_value (token, slot) float32 their values
        + the token coordinates of the activation group

`slot` is as wide as the most active token (k for TopK), so memory and disk scale with the active
latents, never with d_sae (65 536 latents cost the same as 3 072).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import xarray as xr
import zarr

from saema_core.ranks import canonical_csr
from storage.activation_store import model_slug
from storage.locations import canonical


def latent_store_url(out: str, model_name: str) -> str:
    """`<out>/latents/<model>.zarr`, a plain path when `out` is local (see storage.locations)."""
    return canonical(f"{out.rstrip('/')}/latents/{model_slug(model_name)}.zarr")


def latent_group(concept: str, hook: str, sae_id: str) -> str:
    return f"{concept}/{hook}/{sae_id}"


def pairs_of_csr(csr: sp.sparray | sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """Sparse (tokens, d_sae) latents → (index, value) arrays (tokens, max active), without densifying:
    each token's nonzeros in ascending latent order, -1 / 0 padded to the most active token."""
    csr = canonical_csr(csr)
    counts = np.diff(csr.indptr)
    width = max(int(counts.max(initial=0)), 1)
    rows = np.repeat(np.arange(csr.shape[0]), counts)
    slots = np.arange(csr.nnz) - np.repeat(csr.indptr[:-1], counts)
    index = np.full((csr.shape[0], width), -1, dtype=np.int32)
    values = np.zeros((csr.shape[0], width), dtype=np.float32)
    index[rows, slots], values[rows, slots] = csr.indices, csr.data
    return index, values


def to_csr(index: np.ndarray, values: np.ndarray, d_sae: int) -> sp.csr_matrix:
    """(index, value) pairs → a sparse (tokens, d_sae) matrix."""
    rows = np.repeat(np.arange(index.shape[0]), index.shape[1])
    keep = index.reshape(-1) >= 0
    return sp.csr_matrix((values.reshape(-1)[keep], (rows[keep], index.reshape(-1)[keep])),
                         shape=(index.shape[0], d_sae))


def write_latents(url: str, group: str, index: np.ndarray, values: np.ndarray, coords: dict,
                  attrs: dict) -> None:
    ds = xr.Dataset(
        {"latent_index": (("token", "slot"), index, {"long_name": "active latent id", "units": "1"}),
         "latent_value": (("token", "slot"), values, {"long_name": "latent activation", "units": "1"})},
        coords={name: ("token", np.asarray(v)) for name, v in coords.items()}, attrs=attrs)
    ds.to_zarr(url, group=group, mode="w", consolidated=False)
    zarr.open_group(url, path=group, mode="r+", use_consolidated=False).attrs["complete"] = True


def latents_key(url: str, group: str) -> str | None:
    """The cache key of a complete latent group, or None when missing or half-written."""
    try:
        attrs = zarr.open_group(url, path=group, mode="r", use_consolidated=False).attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    return attrs.get("cache_key") if attrs.get("complete") else None


def read_latents(url: str, group: str) -> tuple[sp.csr_matrix, xr.Dataset]:
    ds = xr.open_zarr(url, group=group, consolidated=False, chunks=None).load()  # no Dask inside tasks
    return to_csr(ds.latent_index.values, ds.latent_value.values, int(ds.attrs["d_sae"])), ds
