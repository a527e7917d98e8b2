"""Flow: the `findings` group — the paper's claims read off the stored results (saema_core.findings)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr
from prefect import flow

from saema_core.findings import (
    CLAIMS,
    Finding,
    not_tested,
    separability_findings,
    stratification_findings,
    structure_findings,
)
from storage.results import read_group, write_group
from tasks.artifacts import publish_table

_READERS = {"stratification": stratification_findings, "local_global": structure_findings}
_GROUPS = {"stratification": "stratification", "local_global": "structure", "separability": "causal"}
_MISSING = {"stratification": "the stratification stage has not run",
            "local_global": "the structure stage has not run"}


def _cell(ds: xr.Dataset | None, model: str, hook: str) -> xr.Dataset | None:
    """The group's cells of (model, hook) that a run computed, or None when it computed none.

    A store holding several models or hooks spans their union, so a (model, hook) pair or a concept
    can be on the grid without data (storage.merge): such cells are left out, not read as results."""
    if ds is None or model not in ds.model.values or hook not in ds.hook.values:
        return None
    cell = ds.sel(model=model, hook=hook)
    numeric = [var for var in cell.data_vars.values() if var.dtype.kind == "f"]
    if numeric and not any(bool(var.notnull().any()) for var in numeric):
        return None
    per_concept = [var.notnull().any([d for d in var.dims if d != "concept"]) for var in numeric
                   if "concept" in var.dims]
    if not per_concept:
        return cell
    computed = np.logical_or.reduce([mask.values for mask in per_concept])
    return cell.isel(concept=np.flatnonzero(computed))


def claim_findings(groups: dict[str, xr.Dataset | None], model: str, hook: str) -> list[Finding]:
    """Every claim's findings for one (model, hook); a claim without its group is `not tested`."""
    rows = []
    for claim, reader in _READERS.items():
        ds = _cell(groups.get(_GROUPS[claim]), model, hook)
        rows += [not_tested(claim, _MISSING[claim])] if ds is None else reader(ds)
    return rows + separability_findings(_cell(groups.get("causal"), model, hook),
                                        _cell(groups.get("intervention"), model, hook))


def findings_dataset(rows: dict[tuple[str, str], list[Finding]]) -> xr.Dataset:
    """Dims (model, hook, claim, space); variables verdict, why, numbers (strings, "" = no row)."""
    models = sorted({m for m, _ in rows})
    hooks = sorted({h for _, h in rows})
    spaces = ["latent", "resid", "dense_ae"]
    claims = list(CLAIMS)
    shape = (len(models), len(hooks), len(claims), len(spaces))
    data = {name: np.full(shape, "", dtype=object) for name in ("verdict", "why", "numbers")}
    for (model, hook), findings in rows.items():
        for f in findings:
            at = (models.index(model), hooks.index(hook), claims.index(f.claim), spaces.index(f.space))
            for name in data:
                data[name][at] = getattr(f, name)
    dims = ("model", "hook", "claim", "space")
    descriptions = {"verdict": "supported | not supported | not informative | not tested ('' = no such row)",
                    "why": "the reason for the verdict, in words", "numbers": "the numbers the verdict rests on"}
    ds = xr.Dataset({name: (dims, value, {"long_name": name, "description": descriptions[name]})
                     for name, value in data.items()},
                    coords={"model": models, "hook": hooks, "claim": claims, "space": spaces})
    ds["claim_text"] = (("claim",), np.array([CLAIMS[c] for c in claims], dtype=object),
                        {"description": "the paper's claim, as tested here"})
    return ds


def verdict_rows(ds: xr.Dataset) -> pd.DataFrame:
    """The findings with a verdict, one row per (model, hook, claim, space): verdict, why, numbers."""
    frame = ds[["verdict", "why", "numbers"]].to_dataframe()
    return frame[frame["verdict"] != ""]


@flow(name="saema-findings", flow_run_name="findings", log_prints=True)
def findings_flow(out: str) -> xr.Dataset | None:
    """Read the stored groups and write `findings` for every (model, hook) they hold."""
    groups = {name: read_group(out, name, dask=False) for name in {*_GROUPS.values(), "intervention"}}
    present = [ds for ds in groups.values() if ds is not None]
    if not present:
        print("findings: no results stored yet")
        return None
    pairs = sorted({(str(m), str(h)) for ds in present for m in ds.model.values for h in ds.hook.values})
    ds = findings_dataset({pair: claim_findings(groups, *pair) for pair in pairs})
    write_group(out, "findings", ds)
    frame = verdict_rows(ds)
    publish_table("findings", frame, "The paper's claims, read off the stored results, with their caveats")
    for (model, hook, claim, space), row in frame.iterrows():
        print(f"finding {model} {hook} {claim} [{space}]: {row['verdict']} — {row['why']}")
    return ds
