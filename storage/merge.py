"""Merging a run's cells into a stored results group, for every dtype a group holds.

A run computes the cells of its own (model, hook, concept, …) coordinates; the stored group holds
earlier runs' cells. The merged group spans the union of both along every dimension, and a cell
takes the new run's value exactly when the new run computed it — also when that value is NaN or "" —
and the stored value otherwise (along `WHOLE_DIMS` a re-computed cell is replaced whole). Presence, not null-ness, decides: `Dataset.combine_first` would keep
a stale stored number wherever the new run legitimately stored NaN.

Cells that no run computed hold the dtype's missing value: NaN for floats, "" for strings (numpy's
StringDType, which Zarr reads back, cannot hold NaN at all). Integer and boolean variables keep
their dtype unless the union leaves such a cell, in which case they become float64 with NaN there,
as xarray does when it reindexes them.
"""

from __future__ import annotations

import functools

import numpy as np
import xarray as xr

MISSING_STRING = ""
"""The value of a string cell that no run computed."""

WHOLE_DIMS = ("token_index", "step")
"""Axes that belong to one cell (a concept's tokens, an optimiser's steps): a re-computed cell replaces
all of its values along them, so a re-run with fewer tokens leaves no stale tokens behind."""


def _is_string(var: xr.Variable) -> bool:
    return var.dtype.kind in "OTUS"


def _widened(var: xr.Variable) -> xr.Variable:
    """A copy that alignment can pad: strings as objects, integers and booleans as float64."""
    if _is_string(var):
        return var.astype(object)
    if var.dtype.kind in "biu":
        return var.astype(np.float64)
    return var


def _narrowed(var: xr.Variable, like: np.dtype) -> xr.Variable:
    """Back to the original dtype where no cell is missing; strings get "" for their missing cells."""
    if like.kind in "OTUS":
        values = np.asarray(var.values, dtype=object)
        missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values.ravel()],
                           dtype=bool).reshape(values.shape)
        return var.copy(data=np.where(missing, MISSING_STRING, values).astype(object))
    if like.kind in "biu" and not np.isnan(var.values).any():
        return var.astype(like)
    return var


def _widened_all(ds: xr.Dataset) -> xr.Dataset:
    return ds.assign({name: _widened(ds.variables[name]) for name in _data_names(ds)})


def _data_names(ds: xr.Dataset) -> list[str]:
    """Data variables and non-index coordinates: everything that is merged cell by cell."""
    return [name for name in ds.variables if name not in ds.indexes]


def _in_new(new: xr.Dataset, merged: xr.Dataset, dims: tuple[str, ...]) -> xr.DataArray:
    """True at the cells of `merged` (over `dims`) that lie on the new run's coordinates."""
    masks = [xr.DataArray(np.isin(merged.indexes[d], new.indexes[d]), dims=d)
             if d in new.indexes and d not in WHOLE_DIMS else xr.DataArray(np.ones(merged.sizes[d], bool), dims=d)
             for d in dims]
    return functools.reduce(lambda a, b: a & b, masks, xr.DataArray(True))


CELL_DIMS = ("model", "hook", "concept")
"""The dimensions a run's parameters can differ along (one run: one model, its hooks and concepts)."""
DESCRIPTIVE_ATTRS = frozenset({"design", "verdict_rule", "description", "long_name", "units"})
"""Group attributes that describe the method (code text), not a run's parameters."""


def differing_parameters(new: xr.Dataset, old: xr.Dataset | None) -> dict[str, tuple[str, str]]:
    """Run parameters (group attributes of both) whose value in `new` differs from the stored group's:
    {name: (stored, new)}. A parameter only one of them records (a group written by an older saema)
    is not compared."""
    if old is None:
        return {}
    keys = (set(old.attrs) & set(new.attrs)) - DESCRIPTIVE_ATTRS
    return {key: (str(old.attrs[key]), str(new.attrs[key])) for key in sorted(keys)
            if str(old.attrs[key]) != str(new.attrs[key])}


def parameters_per_cell(new: xr.Dataset, old: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Each differing run parameter becomes a string variable `param_<name>` over the cell dims, so
    that every cell keeps the value it was computed with (a group attribute can hold only one); the
    attribute then points to the variable."""
    for key, (stored, value) in differing_parameters(new, old).items():
        name, dims = f"param_{key}", [d for d in CELL_DIMS if d in new.dims]
        pointer = f"differs between cells: see the variable {name}"
        if value == pointer:  # `new` already carries the variable (it came from such a group)
            continue
        new = new.assign({name: (dims, np.full([new.sizes[d] for d in dims], value, dtype=object))})
        if name not in old:
            old_dims = [d for d in CELL_DIMS if d in old.dims]
            old = old.assign({name: (old_dims, np.full([old.sizes[d] for d in old_dims], stored, dtype=object))})
        for ds in (new, old):
            ds[name].attrs = {"description": f"the run parameter {key} each cell was computed with"}
            ds.attrs[key] = pointer
    return new, old


def merge_cells(new: xr.Dataset, old: xr.Dataset | None) -> xr.Dataset:
    """`old` extended by `new` (module doc): the union of coordinates, new cells win, dtypes kept;
    run parameters that differ are kept per cell (`parameters_per_cell`)."""
    if old is None:
        return new
    old = old.load()
    new, old = parameters_per_cell(new, old)
    dtypes = {name: ds.variables[name].dtype for ds in (old, new) for name in _data_names(ds)}
    new_w, old_w = xr.align(_widened_all(new), _widened_all(old), join="outer", fill_value=np.nan)
    merged = xr.Dataset(coords={name: new_w[name] for name in new_w.indexes})
    for name in dict.fromkeys([*_data_names(old), *_data_names(new)]):
        if name not in new_w.variables:
            var = old_w.variables[name]
        elif name not in old_w.variables:
            var = new_w.variables[name]
        else:
            dims = new_w.variables[name].dims
            var = xr.where(_in_new(new, new_w, dims), new_w[name], old_w[name]).transpose(*dims).variable
            var.attrs = dict(new_w.variables[name].attrs)
        merged[name] = _narrowed(var, dtypes[name])
        is_coord = name in new.coords or (name not in new.variables and name in old.coords)
        if is_coord:
            merged = merged.set_coords(name)
    for name, var in {**old.variables, **new.variables}.items():
        merged[name].attrs = dict(var.attrs)
    merged.attrs = {**old.attrs, **new.attrs}
    return merged
