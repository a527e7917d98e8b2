"""Comparing a result across models and layers: a metric against block depth, one column per model."""

from __future__ import annotations

import pandas as pd
import xarray as xr

from saema_core.hooks import HOOK_PATTERN


def layer_of(hook: str) -> tuple[int, str]:
    """(block index, 'pre' | 'post') of a hook name, for ordering hooks by depth."""
    match = HOOK_PATTERN.match(hook)
    if match is None:
        raise ValueError(f"hook {hook!r} is not a residual hook name (blocks.L.hook_resid_pre|post)")
    return int(match.group(1)), match.group(2)


def by_layer(ds: xr.Dataset, variable: str, **labels: str) -> pd.DataFrame:
    """`variable` against depth, one column per model: rows (layer, position), cells the value.

    Every dimension other than model and hook must be fixed by `labels` (e.g. `sae="sae"`) or be
    averaged over (a concept axis: the mean over concepts); the cross-model comparison of the paper's
    "a metric against layer, per model".

        >>> from saema.api import query
        >>> by_layer(query("saema-out", "sae_eval"), "explained_variance", sae="sae")
    """
    if variable not in ds.data_vars:
        raise ValueError(f"variable {variable!r} not in the dataset; it has: {', '.join(map(str, ds.data_vars))}")
    da = ds[variable].sel(labels) if labels else ds[variable]
    extra = [d for d in da.dims if d not in ("model", "hook")]
    if extra:
        da = da.mean(extra)
    frame = da.to_dataframe().reset_index()
    frame[["layer", "position"]] = [layer_of(str(h)) for h in frame["hook"]]
    table = frame.pivot_table(index=["layer", "position"], columns="model", values=variable, dropna=False)
    table = table.dropna(how="all")  # (layer, position) pairs of the full product that no hook has
    table.attrs["averaged_over"] = extra
    return table.sort_index()
