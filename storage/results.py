"""The results store `<out>/results.zarr`: one xarray Dataset per analysis group.

Groups: `stratification`, `strata`, `structure`, `intervention`, `sae_eval` (DESIGN.md §3). A run for
further models, hooks or concepts extends a group along those dimensions: the new cells are merged
with the stored ones (new values win; `storage.merge` says how every dtype is padded) and the group is
rewritten.

Locking is local-only. On local disk writers hold a lock file (created with O_EXCL), so two runs on
one store — on this machine, or on a shared POSIX filesystem — serialise (or, after `timeout`, refuse
with a clear message) instead of corrupting it, and the rewrite is atomic: the new group is written
beside the old one and swapped in by two renames; an interrupted swap is repaired by the next writer
or reader. At an fsspec URL (`s3://…`, `memory://…`) there is no atomic create-if-absent to build a
lock on and no rename, so writers in one process serialise on an in-process lock (which covers
`memory://` entirely: no other process can see it), a group is rewritten in place, and one writing
run per store is the user's contract.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import xarray as xr
import zarr

from storage.locations import canonical, exists, is_local, is_process_local, local_path
from storage.merge import merge_cells

GROUPS = ("stratification", "strata", "structure", "intervention", "causal", "sae_eval", "findings")
_LOCK = ".saema-write.lock"
_IN_PROCESS_LOCK = threading.Lock()


class ResultsError(ValueError):
    """A results store that is missing, busy, or asked for something it does not hold."""


def results_url(out: str) -> str:
    """`<out>/results.zarr`, a plain path when `out` is local (see storage.locations)."""
    return canonical(f"{out.rstrip('/')}/results.zarr")


@contextlib.contextmanager
def write_lock(url: str, timeout: float = 600.0) -> Iterator[None]:
    """Exclusive writer lock (a file created with O_EXCL); waits up to `timeout` seconds.

    Local stores only; at an fsspec URL only the writers of this process are serialised (module doc).
    """
    if not is_local(url):
        if not _IN_PROCESS_LOCK.acquire(timeout=timeout):
            raise ResultsError(f"results store {url} is being written by another thread; waited {timeout:.0f} s")
        try:
            yield
        finally:
            _IN_PROCESS_LOCK.release()
        return
    root = local_path(url)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / _LOCK
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = lock.read_text(errors="replace") if lock.exists() else "?"
            if _stale(holder):
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                raise ResultsError(f"results store {url} is being written by another run ({holder}); "
                                   f"waited {timeout:.0f} s — try again when it finishes") from None
            time.sleep(0.2)
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
    os.close(fd)
    try:
        _repair_swaps(root)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _stale(holder: str) -> bool:
    """A lock left by a killed process on this machine (its pid no longer exists)."""
    parts = holder.split()
    if len(parts) != 4 or parts[0] != "pid" or parts[3] != os.uname().nodename:
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _repair_swaps(root: Path) -> None:
    """Finish or undo a swap that a killed writer left half-done."""
    for old in root.glob(".old-*"):
        group = root / old.name.removeprefix(".old-")
        if group.exists():
            shutil.rmtree(old)
        else:
            old.rename(group)
    for staging in root.glob(".new-*"):
        shutil.rmtree(staging)


def read_group(out: str, group: str, dask: bool = True) -> xr.Dataset | None:
    """A group as a lazy Dataset, or None when it does not exist yet.

    `dask=False` inside Dask tasks: lazily indexed Zarr arrays instead of Dask arrays, which a task
    would compute by leaving its worker's thread slot (see `storage.activation_store.open_activations`).
    """
    url = results_url(out)
    try:
        return xr.open_zarr(url, group=group, consolidated=False, **({} if dask else {"chunks": None}))
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return None


def _variable_length_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width numpy strings ('<U7') have no Zarr v3 spec; store them as variable-length strings."""
    fixed = [name for name, var in ds.variables.items() if var.dtype.kind == "U"]
    return ds.assign({name: ds[name].astype(object) for name in fixed if name in ds.data_vars}).assign_coords(
        {name: ds[name].astype(object) for name in fixed if name in ds.coords})


def write_group(out: str, group: str, ds: xr.Dataset) -> bool:
    """Merge `ds` into the stored group (new cells win) and write it back atomically.

    Returns False, writing nothing, when the stored group already holds exactly these values (an
    unchanged re-run)."""
    if group not in GROUPS:
        raise ResultsError(f"unknown results group {group!r}; groups are {GROUPS}")
    url = results_url(out)
    with write_lock(url):
        old = read_group(out, group)
        old = None if old is None else _variable_length_strings(old.load())
        merged = _variable_length_strings(merge_cells(ds, old))
        if old is not None and merged.identical(old):
            return False
        if is_local(url):
            _swap_in(local_path(url), group, merged)
        else:
            merged.to_zarr(url, group=group, mode="w", consolidated=False)
        zarr.consolidate_metadata(url)
    return True


def _swap_in(root: Path, group: str, ds: xr.Dataset) -> None:
    staging = root / f".new-{group}-{uuid.uuid4().hex[:8]}"
    ds.to_zarr(str(staging), mode="w", consolidated=False)
    target, old = root / group, root / f".old-{group}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    if not (root / "zarr.json").exists():
        zarr.open_group(str(root), mode="a")


RUNS_ATTR = "saema_runs_in_progress"
"""Root attribute of results.zarr: the runs that started writing and have not finished."""


def _covers(done: dict, other: dict) -> bool:
    """A finished run `done` re-did everything `other` set out to do, and `other` is no longer running."""
    same_cells = done["model"] == other.get("model") and done["concepts"] == other.get("concepts")
    covered = (set(other.get("hooks", [])) <= set(done["hooks"])
               and set(other.get("stages", [])) <= set(done["stages"]))
    return same_cells and covered and _stale(f"pid {other.get('pid')} on {other.get('host')}")


def _set_run(url: str, run_id: str, record: dict, state: str = "started") -> None:
    """Record a run as `started`; remove it when `withdrawn`; when `completed`, remove it and the dead
    runs it covered."""
    with write_lock(url):
        root = zarr.open_group(url, mode="a")
        runs = dict(root.attrs.get(RUNS_ATTR, {}))
        runs[run_id] = record
        if state != "started":
            runs = {key: run for key, run in runs.items()
                    if key != run_id and not (state == "completed" and _covers(record, run))}
        root.attrs[RUNS_ATTR] = runs
        zarr.consolidate_metadata(url)


@contextlib.contextmanager
def recorded_run(out: str, record: dict) -> Iterator[None]:
    """Mark the store as holding a run in progress until the block finishes without an error.

    Groups are written one by one as stages finish (each atomically), so a run that fails part-way
    leaves earlier groups extended and later ones as they were. It stays recorded under `RUNS_ATTR`
    (what it was extending, when it started) so that `saema query` and the report say the store is
    partly updated; re-running the same command completes it from the cache and clears the record
    (a finished run clears the records of dead runs whose model, concepts, hooks and stages it covered).
    """
    url = results_url(out)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    record = {**record, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
              "host": os.uname().nodename}
    before = _group_stamps(url)
    _set_run(url, run_id, record)
    try:
        yield
    except BaseException:
        if is_local(url) and _group_stamps(url) == before:  # it failed before writing any group
            _set_run(url, run_id, record, "withdrawn")
        raise
    _set_run(url, run_id, record, "completed")


def _group_stamps(url: str) -> dict[str, int]:
    """When each local group was last swapped in (its metadata file's mtime); {} elsewhere."""
    if not is_local(url):
        return {}
    root = local_path(url)
    return {group: (root / group / "zarr.json").stat().st_mtime_ns for group in GROUPS
            if (root / group / "zarr.json").exists()}


def runs_in_progress(out: str) -> dict[str, dict]:
    """The recorded runs that did not finish (a failed run, or one still running)."""
    url = results_url(out)
    if not exists(url):
        return {}
    try:
        return dict(zarr.open_group(url, mode="r").attrs.get(RUNS_ATTR, {}))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return {}


def incomplete_warning(out: str) -> str:
    """One line per unfinished run, for `saema query` and the report; "" when there is none."""
    return "\n".join(
        f"run started {run['started']} (pid {run['pid']} on {run['host']}) has not finished (it failed, or "
        f"is still running): it extends {run.get('model', '?')} × {', '.join(run.get('hooks', []))} × "
        f"{', '.join(run.get('concepts', []))} through stages {', '.join(run.get('stages', []))}; groups may "
        f"cover different cells until the same command is re-run to completion"
        for run in runs_in_progress(out).values())


def open_results(out: str) -> xr.DataTree:
    """All result groups as a lazy DataTree (`tree["stratification"].ds`)."""
    url = results_url(out)
    if not exists(url):
        where = " (memory:// lives only in the process that wrote it)" if is_process_local(url) else ""
        raise ResultsError(f"no results at {url}{where}; run `saema run --out {out}` first")
    return xr.open_datatree(url, engine="zarr", consolidated=False)
