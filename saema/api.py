"""Query the results store without re-running anything (DESIGN.md §1, §3).

    >>> from saema.api import query, to_frame
    >>> ds = query("saema-out", "stratification", hook="blocks.3.hook_resid_post", concept=["months", "days"])
    >>> to_frame(ds[["stratified", "n_strata"]].sel(mode="latent", estimator="numerical"))

Everything is opened lazily (dask-backed); values are read on `.load()`, `.values` or `to_frame`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from saema_core.compare import by_layer, layer_of
from storage.results import GROUPS, ResultsError, open_results, read_group, results_url

__all__ = ["FILTER_DIMS", "MAX_CELLS", "ResultsError", "by_layer", "layer_of", "open_results", "query", "select",
           "stored_groups", "to_frame"]

FILTER_DIMS: tuple[str, ...] = ("model", "hook", "concept")
"""The dimensions `query` filters on (whichever of them a group has)."""

MAX_CELLS = 200_000
"""Variables larger than this (per-token tables) are left out of `to_frame` unless named."""

Selector = str | Sequence[str] | None


def stored_groups(out: str) -> list[str]:
    """The result groups present in `<out>/results.zarr`, in the order of `GROUPS`."""
    children = open_results(out).children
    present = [name for name in GROUPS if name in children]
    if not present:
        raise ResultsError(f"the results store {results_url(out)} holds no groups yet; "
                           f"run `saema run --out {out}` first")
    return present


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _stored_labels(ds: xr.Dataset, group: str, dim: str, wanted: list) -> list:
    """The stored labels asked for (`"0.1"` finds the noise level 0.1); raise naming what the group
    holds when one is not there."""
    values = list(ds[dim].values)
    found, missing = [], []
    for label in wanted:
        match = [v for v in values if str(v) == str(label) or _same_number(v, label)]
        (found.append(match[0]) if match else missing.append(label))
    if missing:
        names = ", ".join(repr(v) for v in missing)
        raise ResultsError(f"{dim} {names} not in {group}; it has: {', '.join(map(str, values))}")
    return found


def _same_number(stored, label) -> bool:
    try:
        return isinstance(stored, (int, float, np.number)) and float(stored) == float(label)
    except (TypeError, ValueError):
        return False


def select(ds: xr.Dataset, group: str, filters: dict[str, Selector]) -> xr.Dataset:
    """`ds.sel` on each filter whose dimension the group has; a str drops the dim, a list keeps it."""
    for dim, value in filters.items():
        if value is None or dim not in ds.dims:
            continue
        labels = _stored_labels(ds, group, dim, _as_list(value))
        ds = ds.sel({dim: labels[0] if isinstance(value, str) else labels})
    return ds


def _open_group(out: str, group: str, present: list[str]) -> xr.Dataset:
    if group not in present:
        known = "" if group in GROUPS else f" (groups are {', '.join(GROUPS)})"
        raise ResultsError(f"group {group!r} not in {results_url(out)}{known}; it has: {', '.join(present)}")
    ds = read_group(out, group)
    if ds is None:  # listed a moment ago, so another run is swapping it in
        raise ResultsError(f"group {group!r} of {results_url(out)} vanished while opening; try again")
    return ds


def _query_all(out: str, filters: dict[str, Selector]) -> dict[str, xr.Dataset]:
    """Every group filtered; groups without a requested label are left out, and if none has it, raise."""
    selected, errors = {}, []
    present = stored_groups(out)
    for group in present:
        ds = _open_group(out, group, present)
        try:
            selected[group] = select(ds, group, filters)
        except ResultsError as error:  # this group lacks the label; the others may have it
            errors.append(str(error))
    if not selected:
        raise ResultsError("no group holds the requested labels: " + "; ".join(errors))
    return selected


def query(out: str, group: str | None = None, model: Selector = None, hook: Selector = None,
          concept: Selector = None) -> xr.Dataset | dict[str, xr.Dataset]:
    """One group (lazy Dataset), or with `group=None` every stored group as {name: Dataset}.

    Each of model/hook/concept is a label or a list of labels; a label that is not stored raises
    `ResultsError` listing the labels that are. Groups without one of the dimensions ignore that
    filter (sae_eval has no concept). With `group=None`, groups lacking a requested label are left
    out of the dict; if every group lacks it, the error names what each group has.
    """
    filters = {"model": model, "hook": hook, "concept": concept}
    if group is None:
        return _query_all(out, filters)
    return select(_open_group(out, group, stored_groups(out)), group, filters)


def _table_variables(ds: xr.Dataset, variables: Sequence[str] | None, max_cells: int) -> tuple[list, list]:
    """(variables to tabulate, large variables left out)."""
    if variables is not None:
        unknown = [v for v in variables if v not in ds.data_vars]
        if unknown:
            raise ResultsError(f"variables {unknown} not in the dataset; it has: {', '.join(map(str, ds.data_vars))}")
        return list(variables), []
    names = [str(v) for v in ds.data_vars]
    return [v for v in names if ds[v].size <= max_cells], [v for v in names if ds[v].size > max_cells]


def _dim_order(ds: xr.Dataset) -> list[str]:
    """The widest variable's dims in its order (model, hook, concept, …), then any others."""
    widest = max(ds.data_vars.values(), key=lambda var: var.ndim)
    order = [str(d) for d in widest.dims]
    return order + [str(d) for d in ds.dims if d not in order]


def to_frame(ds: xr.Dataset, variables: Sequence[str] | None = None, max_cells: int = MAX_CELLS) -> pd.DataFrame:
    """A tidy long table: one row per cell, coordinates then variables as columns.

    Variables with fewer dimensions than the widest chosen one are repeated along the others (as in
    a join). Without `variables`, variables of more than `max_cells` cells (per-token tables) are
    left out; their names are in `frame.attrs["skipped"]`. Reads the chosen values.
    """
    chosen, skipped = _table_variables(ds, variables, max_cells)
    if not chosen:
        frame = pd.DataFrame()
    else:
        subset = ds[chosen] if ds[chosen].dims else ds[chosen].expand_dims("_cell")  # one fully selected cell
        dims = _dim_order(subset)
        frame = subset.to_dataframe(dim_order=dims).reset_index()
        coords = [c for c in dims if c != "_cell"] + [str(c) for c in subset.coords if c not in dims]
        frame = frame[coords + chosen]
    frame.attrs["skipped"] = skipped
    return frame


def write_netcdf(groups: dict[str, xr.Dataset], path: str) -> None:
    """Datasets as one netCDF-4 file (h5netcdf), one netCDF group per name, attributes kept.

    numpy's variable-length strings (how Zarr gives them back) are written as netCDF strings; open
    the file with `xr.open_datatree(path)` (every group) or `xr.open_dataset(path, group=NAME)`.
    """
    tree = xr.DataTree.from_dict({f"/{name}": _netcdf_ready(ds.load()) for name, ds in groups.items()})
    tree.to_netcdf(path, engine="h5netcdf")


def _netcdf_ready(ds: xr.Dataset) -> xr.Dataset:
    """StringDType variables and coordinates as object strings, which netCDF writers encode."""
    def plain(var):
        return var.astype(object) if var.dtype.kind == "T" else var

    ds = ds.assign_coords({name: plain(ds[name].variable) for name in ds.coords})
    return ds.assign({name: plain(ds[name].variable) for name in ds.data_vars})
