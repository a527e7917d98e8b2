"""What every stored group says about itself, so it reads as data in plain xarray (or any CF reader).

Applied by `storage.results.write_group` to every group it writes:
- coordinates carry `long_name` (and `units` / `description` where they have them); `seed` means a
  UMAP seed in `structure` and a batch-order seed in `causal`;
- every variable has a `long_name` in words (`n_clusters` → "number of clusters"), never its name again;
- counts are integers when every cell is present (a padded cell is NaN, which needs a float);
- the group carries `Conventions`, and at write time `saema_version`, `git_commit` and `date_modified`
  (the root also `date_created` and `title`). A group's run parameters are its other attributes, or
  `param_<name>` variables where cells were computed with different ones (storage.merge).
"""

from __future__ import annotations

import re

import numpy as np
import xarray as xr

CONVENTIONS = "CF-1.10"
TITLE = "saema results: how a sparse autoencoder reorganises a language model's representations"

COORDINATES: dict[str, dict[str, str]] = {
    "model": {"long_name": "language model", "description": "saema's name of the model (sae_eval.model_source "
                                                            "holds its path, sae_eval.model_revision its revision)"},
    "hook": {"long_name": "hook point", "description": "residual-stream position, TransformerLens name "
                                                       "blocks.<layer>.hook_resid_pre|post"},
    "concept": {"long_name": "concept"},
    "space": {"long_name": "representation space", "description": "resid: the model's activations (control); "
                                                                   "latent: the SAE's latents; dense_ae: the dense "
                                                                   "autoencoder's code (control)"},
    "sae": {"long_name": "autoencoder", "description": "sae: the sparse autoencoder; dense_ae: the dense control"},
    "noise": {"long_name": "noise level σ", "units": "1",
              "description": "x̃ = x + σ·s·ε, ε ~ N(0, I); s = 1 or the concept's RMS per coordinate (noise_scale)"},
    "replicate": {"long_name": "noise replicate", "description": "independent noise draw at one σ"},
    "estimator": {"long_name": "rank estimator"},
    "mode": {"long_name": "unfolding mode", "description": "prompt, position or latent unfolding of the tensor"},
    "claim": {"long_name": "claim of the paper"},
    "beta": {"long_name": "separability weight β", "units": "1",
             "description": "weight of the separability term in the SAE's training loss (> 0 separates)"},
    "alpha": {"long_name": "separability weight α", "units": "1",
              "description": "weight of the separability term of the post-hoc intervention"},
    "direction": {"long_name": "intervention direction", "units": "1", "description": "+1 separate, −1 merge"},
    "objective": {"long_name": "intervention objective",
                  "description": "aedp / gw: Adam moves of that separability; paper: the released code's search"},
    "intervention": {"long_name": "intervention", "description": "optimised move or its random controls"},
    "stage_objective": {"long_name": "intervention objective of the slope"},
    "step": {"long_name": "optimisation step", "units": "1", "description": "0: before any change"},
    "token_index": {"long_name": "analysed token", "units": "1"},
}
GROUP_COORDINATES: dict[tuple[str, str], dict[str, str]] = {
    ("structure", "seed"): {"long_name": "UMAP seed"},
    ("causal", "seed"): {"long_name": "batch-order seed", "description": "one fine-tuned SAE per (β, seed)"},
}

COUNTS = frozenset({"n_tokens", "n_analysed", "n_active", "n_points", "n_clusters", "n_components_used",
                    "n_strata", "n_unsaturated", "n_supports", "n_replicates", "agd_n_components", "agd_n_sources",
                    "n_active_columns", "paper_accepted"})
"""Variables that count things: stored as integers when no cell is missing."""

_WORDS = {"n": "number of", "ari": "adjusted Rand index", "agd": "average geodesic distance",
          "mse": "mean squared error", "ce": "cross-entropy", "ci": "95% CI", "low": "lower bound",
          "high": "upper bound", "l0": "L0", "l1": "L1", "mst": "minimum spanning tree", "avg": "average",
          "dim": "dimension", "sae": "SAE", "zscored": "(z-scored)", "delta": "change in", "sep": "separability",
          "ev": "explained variance", "aedp": "AEDP", "gw": "GW", "ae": "autoencoder", "pure": "pure move:",
          "cossim": "cosine similarity", "tau": "Kendall τ", "id": "id", "str": "string"}


def words(name: str) -> str:
    """A variable's name in words: n_clusters → "number of clusters", ari_item → "adjusted Rand index item"."""
    return " ".join(_WORDS.get(part, part) for part in re.split(r"_+", name) if part)


def _as_counts(var: xr.DataArray) -> xr.DataArray:
    values = var.values
    if values.dtype.kind != "f" or not np.isfinite(values).all() or not (values == np.round(values)).all():
        return var
    return var.astype(np.int64)


def annotate(group: str, ds: xr.Dataset) -> xr.Dataset:
    """`ds` with coordinate attributes, long names in words, integer counts and `Conventions`."""
    ds = ds.copy()
    for name in ds.coords:
        attrs = {**COORDINATES.get(str(name), {}), **GROUP_COORDINATES.get((group, str(name)), {})}
        ds[name].attrs = {**attrs, **{k: v for k, v in ds[name].attrs.items() if k != "long_name" or v != name}}
    for name in list(ds.data_vars):
        if str(name) in COUNTS:
            ds[name] = _as_counts(ds[name]).assign_attrs(ds[name].attrs)
        if ds[name].attrs.get("long_name") in (None, "", str(name)):
            ds[name].attrs["long_name"] = words(str(name))
    ds.attrs["Conventions"] = CONVENTIONS
    return ds


def write_provenance() -> dict[str, str]:
    """What wrote a group and when (set at write time, so an unchanged re-run keeps the stored ones)."""
    from storage.provenance import provenance

    stamp = provenance()
    return {"saema_version": stamp["saema_version"], "git_commit": stamp["git_commit"],
            "date_modified": stamp["created"]}
