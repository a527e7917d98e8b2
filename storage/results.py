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
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import xarray as xr
import zarr

from saema_core.errors import SaemaError
from storage.conventions import CONVENTIONS, TITLE, annotate, write_provenance
from storage.locations import canonical, exists, is_local, is_process_local, local_path
from storage.merge import CELL_DIMS, differing_parameters, merge_cells
from storage.metadata import check_metadata, consolidate
from storage.result_groups import GROUPS

_IN_PROCESS_LOCK = threading.Lock()


class ResultsError(SaemaError):
    """A results store that is missing, busy, or asked for something it does not hold."""


def results_url(out: str) -> str:
    """`<out>/results.zarr`, a plain path when `out` is local (see storage.locations)."""
    return canonical(f"{out.rstrip('/')}/results.zarr")


LOCK_TIMEOUT_ENV = "SAEMA_LOCK_TIMEOUT"
"""Seconds a writer waits for another run's lock on a results store (default 600)."""
_FRESH_LOCK_SECONDS = 10.0  # a lock file this young may still be getting its holder's details


def lock_path(url: str) -> Path:
    """`<out>/.results.zarr.lock`: beside the store, outside its Zarr hierarchy."""
    root = local_path(url)
    return root.parent / f".{root.name}.lock"


def _lock_timeout(timeout: float | None) -> float:
    if timeout is not None:
        return timeout
    value = os.environ.get(LOCK_TIMEOUT_ENV, "600")
    try:
        return float(value)
    except ValueError:
        raise ResultsError(f"{LOCK_TIMEOUT_ENV}={value!r} is not a number of seconds") from None


@contextlib.contextmanager
def write_lock(url: str, timeout: float | None = None) -> Iterator[None]:
    """Exclusive writer lock (a file beside the store, created with O_EXCL, naming its holder); waits
    up to `timeout` seconds (default: $SAEMA_LOCK_TIMEOUT or 600), then fails naming the holder.

    Local stores only; at an fsspec URL only the writers of this process are serialised (module doc).
    A lock whose holder is a dead process of this machine, or that names no process at all, is stale
    and taken over.
    """
    timeout = _lock_timeout(timeout)
    if not is_local(url):
        if not _IN_PROCESS_LOCK.acquire(timeout=timeout):
            raise ResultsError(f"results store {url} is being written by another thread; waited {timeout:.0f} s")
        try:
            yield
        finally:
            _IN_PROCESS_LOCK.release()
        return
    root = local_path(url)
    root.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(url)
    deadline, told = time.monotonic() + timeout, False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _holder(lock)
            if holder is None:
                continue  # released meanwhile
            if _stale(holder, lock):
                lock.unlink(missing_ok=True)
                continue
            advice = (f"results store {url} is being written by {_describe(holder)}; if that run is gone, "
                      f"remove {lock}")
            if time.monotonic() > deadline:
                raise ResultsError(f"{advice} (waited {timeout:.0f} s)") from None
            if not told:
                logging.getLogger("saema").warning("%s — waiting up to %.0f s", advice, timeout)
                told = True
            time.sleep(0.2)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                             "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                             "command": " ".join(sys.argv)[:300]}).encode())
    os.close(fd)
    try:
        _repair_swaps(root)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _holder(lock: Path) -> dict | None:
    """Who holds `lock`: {pid, host, since, command}; {} when the file names no one; None when gone."""
    try:
        text = lock.read_text(errors="replace")
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        parts = text.split()  # written by saema before 0.4: "pid N on HOST"
        return {"pid": parts[1], "host": parts[3]} if len(parts) == 4 and parts[0] == "pid" else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that left an empty lock file"
    text = f"pid {holder.get('pid')} on {holder.get('host')}"
    if holder.get("since"):
        text += f" since {holder['since']}"
    return text + (f" (`{holder['command']}`)" if holder.get("command") else "")


def _stale(holder: dict, lock: Path | None = None) -> bool:
    """A lock that names no process (once past its first moments), or a dead process of this machine."""
    if not holder.get("pid"):
        try:
            return lock is not None and time.time() - lock.stat().st_mtime > _FRESH_LOCK_SECONDS
        except FileNotFoundError:
            return False
    if holder.get("host") != os.uname().nodename:
        return False
    try:
        os.kill(int(holder["pid"]), 0)
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


def _interrupted_swaps(url: str) -> bool:
    return is_local(url) and local_path(url).is_dir() and any(
        path.name.startswith((".old-", ".new-")) for path in local_path(url).iterdir())


def settle_swaps(url: str) -> None:
    """For readers: repair a swap a killed writer left half-done, when no writer is at work and the
    store is writable; otherwise leave it (`read_group` then reads the group it was replacing)."""
    if not _interrupted_swaps(url):
        return
    holder = _holder(lock_path(url))
    if holder is not None and not _stale(holder, lock_path(url)):
        return  # a writer is in the middle of its swap
    with contextlib.suppress(OSError, ResultsError), write_lock(url, timeout=1.0):
        pass  # taking the lock repairs


def read_group(out: str, group: str, dask: bool = True) -> xr.Dataset | None:
    """A group as a lazy Dataset, or None when it does not exist yet.

    `dask=False` inside Dask tasks: lazily indexed Zarr arrays instead of Dask arrays, which a task
    would compute by leaving its worker's thread slot (see `storage.activation_store.open_activations`).
    """
    url = results_url(out)
    settle_swaps(url)
    for name in (group, f".old-{group}"):  # the group an unrepaired, interrupted swap was replacing
        try:
            return xr.open_zarr(url, group=name, consolidated=False, **({} if dask else {"chunks": None}))
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
            continue
    return None


def _variable_length_strings(ds: xr.Dataset) -> xr.Dataset:
    """Fixed-width numpy strings ('<U7') have no Zarr v3 spec; store them as variable-length strings."""
    fixed = [name for name, var in ds.variables.items() if var.dtype.kind == "U"]
    return ds.assign({name: ds[name].astype(object) for name in fixed if name in ds.data_vars}).assign_coords(
        {name: ds[name].astype(object) for name in fixed if name in ds.coords})


def write_group(out: str, group: str, ds: xr.Dataset) -> bool:
    """Merge `ds` into the stored group (new cells win) and write it back atomically.

    Returns False, writing nothing and taking no lock, when the stored group already holds exactly
    these values (an unchanged re-run: it works on a store it may not write). The first group a
    `recorded_run` writes records that run in the store."""
    if group not in GROUPS:
        raise ResultsError(f"unknown results group {group!r}; groups are {GROUPS}")
    url = results_url(out)
    ds = annotate(group, ds)
    if _merged(out, group, ds)[1]:
        return False
    check_metadata(url)  # nothing goes into a store whose metadata is damaged
    with write_lock(url):
        merged, unchanged, old = _merged(out, group, ds)  # again: another run may have written meanwhile
        if unchanged:
            return False
        _say_replaced_parameters(group, ds, old)
        merged.attrs.update(write_provenance())
        if is_local(url):
            _swap_in(local_path(url), group, merged)
        else:
            merged.to_zarr(url, group=group, mode="w", consolidated=False)
        _stamp_root(url, merged.attrs)
        _record_pending_run(url)  # after the swap: a write that failed changed nothing, not even this
        consolidate(url)
    return True


def _stamp_root(url: str, written: dict) -> None:
    """The root says what the store is, which saema last wrote it, and when it was created."""
    root = zarr.open_group(url, mode="a")
    stamp = {"title": TITLE, "Conventions": CONVENTIONS,
             **{key: written[key] for key in ("saema_version", "git_commit", "date_modified")}}
    if "date_created" not in root.attrs:
        stamp["date_created"] = stamp["date_modified"]
    root.attrs.update(stamp)


def _merged(out: str, group: str, ds: xr.Dataset) -> tuple[xr.Dataset, bool, xr.Dataset | None]:
    """The stored group extended by `ds`, whether that is what is stored already, and the stored group."""
    old = read_group(out, group)
    old = None if old is None else _variable_length_strings(old.load())
    merged = _variable_length_strings(merge_cells(ds, old))
    return merged, old is not None and merged.identical(old), old


def _say_replaced_parameters(group: str, new: xr.Dataset, old: xr.Dataset | None) -> None:
    """A write with other run parameters than the stored group's says so; each cell keeps its own."""
    changes = {key: pair for key, pair in differing_parameters(new, old).items() if not pair[0].startswith("differs")}
    if changes:
        cells = ", ".join(f"{dim} {' '.join(map(str, new[dim].values))}" for dim in CELL_DIMS if dim in new.dims)
        logging.getLogger("saema").warning(
            "%s: the cells of %s are now computed with %s (the group held %s); each cell's parameters are in "
            "the variables param_<name>", group, cells, ", ".join(f"{k}={v}" for k, (_, v) in changes.items()),
            ", ".join(f"{k}={s}" for k, (s, _) in changes.items()))


def _swap_in(root: Path, group: str, ds: xr.Dataset) -> None:
    staging = root / f".new-{group}-{uuid.uuid4().hex[:8]}"
    try:
        ds.to_zarr(str(staging), mode="w", consolidated=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk or an interrupt leaves nothing behind
        raise
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

_PENDING: dict[str, tuple[str, dict]] = {}  # url → the run of this process not yet recorded there
_RECORDED: set[str] = set()  # run ids recorded by this process


def _covers(done: dict, other: dict) -> bool:
    """A finished run `done` re-did everything `other` set out to do, and `other` is no longer running."""
    same_cells = done["model"] == other.get("model") and done["concepts"] == other.get("concepts")
    covered = (set(other.get("hooks", [])) <= set(done["hooks"])
               and set(other.get("stages", [])) <= set(done["stages"]))
    return same_cells and covered and _stale({"pid": other.get("pid"), "host": other.get("host")})


def _update_runs(url: str, update) -> None:
    """Rewrite the root's run records as `update(runs)`; the caller holds the write lock."""
    root = zarr.open_group(url, mode="a")
    root.attrs[RUNS_ATTR] = update(dict(root.attrs.get(RUNS_ATTR, {})))
    consolidate(url)


def _record_pending_run(url: str) -> None:
    if url in _PENDING:
        run_id, record = _PENDING.pop(url)
        _update_runs(url, lambda runs: {**runs, run_id: record})
        _RECORDED.add(run_id)


@contextlib.contextmanager
def recorded_run(out: str, record: dict) -> Iterator[None]:
    """Mark the store as holding a run in progress, from its first written group until the block
    finishes without an error.

    Groups are written one by one as stages finish (each atomically), so a run that fails part-way
    leaves earlier groups extended and later ones as they were. It stays recorded under `RUNS_ATTR`
    (what it was extending, when it started) so that `saema query` and the report say the store is
    partly updated; re-running the same command completes it from the cache and clears the record
    (a finished run clears the records of dead runs whose model, concepts, hooks and stages it covered).
    A run that writes nothing (all cached) records nothing and takes no lock unless it clears one.
    """
    url = results_url(out)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    record = {**record, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
              "host": os.uname().nodename}
    _PENDING[url] = (run_id, record)
    try:
        yield
    finally:
        _PENDING.pop(url, None)
    covered = [key for key, run in runs_in_progress(out).items() if key != run_id and _covers(record, run)]
    if run_id in _RECORDED or covered:
        with write_lock(url):
            _update_runs(url, lambda runs: {key: run for key, run in runs.items()
                                            if key != run_id and not _covers(record, run)})
    _RECORDED.discard(run_id)


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
    check_metadata(url)
    settle_swaps(url)
    tree = xr.open_datatree(url, engine="zarr", consolidated=False)
    for name in list(tree.children):  # what an unrepaired, interrupted swap left: the group it replaced
        if name.startswith(".old-") and name.removeprefix(".old-") not in tree.children:
            tree[name.removeprefix(".old-")] = tree[name]
        if name.startswith((".old-", ".new-")):
            del tree[name]
    return tree
