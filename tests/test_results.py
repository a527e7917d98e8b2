"""The results store: merging runs along dimensions, atomic rewrites, locking, lazy reads."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.merge import MISSING_STRING
from storage.results import (
    GROUPS,
    ResultsError,
    open_results,
    read_group,
    results_url,
    write_group,
    write_lock,
)


def _cells(hooks, concepts, value):
    data = np.full((1, len(hooks), len(concepts)), value, dtype=float)
    return xr.Dataset({"rank": (("model", "hook", "concept"), data, {"long_name": "rank"})},
                      coords={"model": ["m"], "hook": list(hooks), "concept": list(concepts)})


def test_runs_extend_the_group_along_dimensions(tmp_path):
    out = str(tmp_path)
    write_group(out, "stratification", _cells(["h1"], ["months"], 1.0))
    write_group(out, "stratification", _cells(["h2"], ["days"], 2.0))
    ds = read_group(out, "stratification")
    assert ds.sizes == {"model": 1, "hook": 2, "concept": 2}
    assert float(ds["rank"].sel(model="m", hook="h1", concept="months")) == 1.0
    assert float(ds["rank"].sel(model="m", hook="h2", concept="days")) == 2.0
    assert np.isnan(float(ds["rank"].sel(model="m", hook="h1", concept="days")))
    assert ds["rank"].attrs["long_name"] == "rank"
    # A re-run of one cell replaces it.
    write_group(out, "stratification", _cells(["h1"], ["months"], 5.0))
    assert float(read_group(out, "stratification")["rank"].sel(model="m", hook="h1", concept="months")) == 5.0


def test_an_unchanged_write_leaves_the_group_untouched(tmp_path):
    out = str(tmp_path)
    assert write_group(out, "stratification", _cells(["h1", "h2"], ["months"], 1.0))
    group = tmp_path / "results.zarr" / "stratification"
    written = group.stat().st_mtime_ns
    assert not write_group(out, "stratification", _cells(["h1"], ["months"], 1.0))  # already stored
    assert group.stat().st_mtime_ns == written
    assert write_group(out, "stratification", _cells(["h1"], ["months"], 2.0))  # a changed value is written
    assert float(read_group(out, "stratification")["rank"].sel(model="m", hook="h1", concept="months")) == 2.0


def test_open_results_is_a_lazy_datatree(tmp_path):
    write_group(str(tmp_path), "sae_eval", _cells(["h1"], ["c"], 0.5))
    tree = open_results(str(tmp_path))
    assert "sae_eval" in tree.children
    assert xr.open_datatree(results_url(str(tmp_path)), engine="zarr")["sae_eval"].ds["rank"].size == 1


def test_missing_store_and_unknown_group(tmp_path):
    with pytest.raises(ResultsError, match="no results"):
        open_results(str(tmp_path / "nowhere"))
    with pytest.raises(ResultsError, match="unknown results group"):
        write_group(str(tmp_path), "bogus", _cells(["h"], ["c"], 1.0))


def _hold_lock(url, ready, release):
    with write_lock(url):
        ready.set()
        release.wait(30)


def test_second_writer_waits_then_refuses(tmp_path):
    url = results_url(str(tmp_path))
    ready, release = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(url, ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ResultsError, match=rf"being written by pid {holder.pid} on .* remove .*\.results\.zarr\.lock"):
            with write_lock(url, timeout=0.5):
                pass
    finally:
        release.set()
        holder.join()
    with write_lock(url, timeout=5):  # free again
        pass


def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    url = results_url(str(tmp_path))
    holder = multiprocessing.Process(target=_hold_lock, args=(url, multiprocessing.Event(), multiprocessing.Event()))
    holder.start()
    holder.kill()
    holder.join()
    with write_lock(url, timeout=5):
        pass


def test_interrupted_swap_is_repaired(tmp_path):
    out = str(tmp_path)
    write_group(out, "structure", _cells(["h"], ["c"], 1.0))
    root = tmp_path / "results.zarr"
    (root / "structure").rename(root / ".old-structure")  # killed between the two renames
    write_group(out, "strata", _cells(["h"], ["c"], 2.0))  # the next writer repairs
    assert float(read_group(out, "structure")["rank"].squeeze()) == 1.0


# ---- Extending a group along any dimension, for every dtype a group holds (storage.merge) ----

_DIMS = ("model", "hook", "concept")
_VALUES = {"model": ["all-MiniLM-L6-v2", "gemma-3-270m", "gpt2"], "hook": ["blocks.1.hook_resid_post",
           "blocks.3.hook_resid_post", "blocks.5.hook_resid_pre"], "concept": ["months", "days", "colours"]}


def _run(coords: dict[str, list[str]], seed: int, n_tokens: int) -> xr.Dataset:
    """A run's cells with a variable of every dtype the groups hold (float, int, bool, string) and a
    per-concept dimension whose length differs between runs (structure's token_index)."""
    rng = np.random.default_rng(seed)
    shape = tuple(len(coords[d]) for d in _DIMS)
    floats = rng.normal(size=shape)
    floats[rng.random(shape) < 0.2] = np.nan  # a computed NaN must replace a stored number
    strings = np.array([f"s{v}" for v in rng.integers(0, 99, size=shape).ravel()], dtype=object).reshape(shape)
    strings[rng.random(shape) < 0.2] = ""
    tokens = (("model", "hook", "concept", "token_index"), rng.integers(0, 9, size=(*shape, n_tokens)))
    return xr.Dataset(
        {"value": (_DIMS, floats, {"units": "1"}), "count": (_DIMS, rng.integers(0, 50, size=shape)),
         "flag": (_DIMS, rng.random(shape) < 0.5), "reason": (_DIMS, strings), "token_count": tokens,
         "token_str": (("concept", "token_index"), np.full((shape[2], n_tokens), "tok", dtype="<U3"))},
        coords={**{d: coords[d] for d in _DIMS}, "token_index": np.arange(n_tokens)})


def _cell(ds: xr.Dataset, name: str, where: dict):
    return _plain(ds[name].sel({d: v for d, v in where.items() if d in ds[name].dims}).values[()])


def _same(a, b) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)) or a == b


@st.composite
def _two_runs(draw):
    dim = draw(st.sampled_from(_DIMS))
    first = {d: [_VALUES[d][0]] for d in _DIMS}
    second = dict(first)
    # The second run extends along `dim`, with or without re-computing the first run's value there.
    extra = draw(st.lists(st.sampled_from(_VALUES[dim][1:]), min_size=1, max_size=2, unique=True))
    second[dim] = ([_VALUES[dim][0]] if draw(st.booleans()) else []) + extra
    sizes = draw(st.tuples(st.integers(1, 4), st.integers(1, 4)))
    seeds = draw(st.tuples(st.integers(0, 2**16), st.integers(0, 2**16)))
    return dim, _run(first, seeds[0], sizes[0]), _run(second, seeds[1], sizes[1])


@pytest.mark.parametrize("group", GROUPS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs=_two_runs())
def test_extending_a_group_along_any_dimension_keeps_every_cell(tmp_path_factory, group, runs):
    dim, first, second = runs
    out = str(tmp_path_factory.mktemp("store"))
    write_group(out, group, first)
    write_group(out, group, second)
    stored = xr.open_datatree(results_url(out), engine="zarr")[group].ds.load()  # plain xarray
    assert set(stored[dim].values) == {*first[dim].values, *second[dim].values}
    for name in ("value", "count", "flag", "reason", "token_count"):
        for where in _cells_of(stored[name]):
            newest = next((run for run in (second, first) if _holds(run, where)), None)
            got = _cell(stored, name, where)
            if newest is None or where.get("token_index", 0) >= newest.sizes["token_index"]:
                assert _same(got, MISSING_STRING if name == "reason" else np.nan), (name, where, got)
            else:
                assert _same(got, _cell(newest, name, where)), (name, where, got)
    padded = stored["count"].isnull().any()
    assert stored["count"].dtype.kind == ("f" if padded else "i")
    assert stored["reason"].dtype.kind in "OT" and stored["value"].attrs == {"units": "1", "long_name": "value"}


def _cells_of(da: xr.DataArray):
    for index in np.ndindex(da.shape):
        yield {d: _plain(da[d].values[i]) for d, i in zip(da.dims, index)}


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _holds(run: xr.Dataset, where: dict) -> bool:
    return all(where[d] in run[d].values for d in _DIMS)


def test_a_failed_run_stays_recorded_until_a_rerun_completes(tmp_path):
    from storage.report import render_report, report_is_current, write_report
    from storage.results import RUNS_ATTR, incomplete_warning, recorded_run, runs_in_progress

    out = str(tmp_path)
    record = {"model": "gemma-3-270m", "hooks": ["blocks.6.hook_resid_post"], "stages": ["extract", "stratify"],
              "concepts": ["months"]}
    with pytest.raises(RuntimeError), recorded_run(out, record):
        write_group(out, "stratification", _cells(["blocks.6.hook_resid_post"], ["months"], 1.0))
        raise RuntimeError("structure stage failed")
    [(run_id, failed)] = runs_in_progress(out).items()
    assert failed["model"] == "gemma-3-270m"
    warning = incomplete_warning(out)
    assert "has not finished" in warning and "blocks.6.hook_resid_post" in warning and "months" in warning
    assert "Partly updated" in render_report(out)
    write_report(out)
    assert report_is_current(out)
    with recorded_run(out, {**record, "stages": ["extract"]}):  # a smaller run does not complete it
        write_group(out, "strata", _cells(["blocks.6.hook_resid_post"], ["months"], 1.0))
        assert len(runs_in_progress(out)) == 2
    assert list(runs_in_progress(out)) == [run_id]
    with recorded_run(out, record):  # the failed run's process (this one) is alive: not taken over
        pass
    assert list(runs_in_progress(out)) == [run_id]
    root = zarr.open_group(results_url(out), mode="a")  # now its process is gone
    root.attrs[RUNS_ATTR] = {run_id: {**failed, "pid": _dead_pid()}}
    with recorded_run(out, record):  # the same command re-run to completion
        pass
    assert runs_in_progress(out) == {} and incomplete_warning(out) == "" and not report_is_current(out)
    assert xr.open_datatree(results_url(out), engine="zarr")["stratification"].ds["rank"].size == 1


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# ---- Locks, damaged metadata and interrupted swaps (issue: nothing lost, nothing silent) ----

def _lock(out: str, holder: str, age: float = 60.0) -> Path:
    from storage.results import lock_path

    path = lock_path(results_url(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(holder)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_an_empty_lock_is_stale_but_a_fresh_one_is_not(tmp_path):
    out = str(tmp_path)
    _lock(out, "", age=60)
    write_group(out, "structure", _cells(["h"], ["c"], 1.0))  # taken over at once
    _lock(out, "", age=0)  # its creator may be writing its details this very moment
    with pytest.raises(ResultsError, match="a run that left an empty lock file; if that run is gone, remove"):
        with write_lock(results_url(out), timeout=0.3):
            pass


def test_an_unchanged_write_takes_no_lock(tmp_path):
    out = str(tmp_path)
    write_group(out, "structure", _cells(["h"], ["c"], 1.0))
    held = _lock(out, json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))  # a live holder
    assert write_group(out, "structure", _cells(["h"], ["c"], 1.0)) is False  # returns at once
    assert held.exists()


def test_a_damaged_metadata_file_is_named_and_nothing_is_written(tmp_path):
    out = str(tmp_path)
    write_group(out, "structure", _cells(["h"], ["c"], 1.0))
    root = tmp_path / "results.zarr"
    (root / "zarr.json").write_text('{"zarr_format": 3, "node_')
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    from storage.metadata import CorruptStoreError

    with pytest.raises(CorruptStoreError, match=r"results.zarr/zarr.json is corrupt .* restore it"):
        write_group(out, "strata", _cells(["h"], ["c"], 2.0))
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_reader_repairs_an_interrupted_swap(tmp_path):
    out = str(tmp_path)
    write_group(out, "structure", _cells(["h"], ["c"], 1.0))
    root = tmp_path / "results.zarr"
    (root / "structure").rename(root / ".old-structure")  # killed between the two renames
    assert float(read_group(out, "structure")["rank"].squeeze()) == 1.0
    assert (root / "structure").is_dir() and not (root / ".old-structure").exists()


def test_a_reader_reads_the_old_group_while_a_live_writer_holds_the_lock(tmp_path):
    out = str(tmp_path)
    write_group(out, "structure", _cells(["h"], ["c"], 1.0))
    root = tmp_path / "results.zarr"
    (root / "structure").rename(root / ".old-structure")  # a writer between its two renames
    _lock(out, json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    assert float(read_group(out, "structure")["rank"].squeeze()) == 1.0
    assert set(open_results(out).children) == {"structure"}
    assert (root / ".old-structure").exists()  # left for the writer


def test_a_full_disk_during_the_swap_leaves_the_group_and_no_staging(tmp_path, monkeypatch):
    import errno

    out = str(tmp_path)
    write_group(out, "structure", _cells(["h"], ["c"], 1.0))
    original = xr.Dataset.to_zarr

    def full(self, store=None, *args, **kwargs):
        original(self, store, *args, **kwargs)  # a part is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(store))

    monkeypatch.setattr(xr.Dataset, "to_zarr", full)
    with pytest.raises(OSError, match="No space left"):
        write_group(out, "structure", _cells(["h"], ["c"], 2.0))
    monkeypatch.undo()
    root = tmp_path / "results.zarr"
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert float(read_group(out, "structure")["rank"].squeeze()) == 1.0


def test_expected_errors_are_logged_on_one_line(caplog):
    import logging

    from storage.prompts import PromptError
    from tasks.quiet_errors import install

    install()
    logger = logging.getLogger("prefect.flow_runs")
    for error in (PromptError("prompt file p.json is not UTF-8"), RuntimeError("a bug")):
        try:
            raise error
        except Exception as caught:
            logger.error("Encountered exception during execution: %r", caught, exc_info=True)
    quiet, loud = caplog.records[-2:]
    assert quiet.exc_info is None and "p.json is not UTF-8" in quiet.getMessage()
    assert loud.exc_info is not None  # a bug keeps its traceback


def test_cell_completions_are_debug_records_and_failures_stay(caplog):
    import logging

    from tasks.quiet_errors import install

    from prefect.settings import PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW, temporary_settings

    install()
    logger = logging.getLogger("prefect.task_runs")
    with caplog.at_level(logging.INFO, logger="prefect"), \
            temporary_settings(updates={PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        logger.info("Finished in state Completed()")
        logger.info("Finished in state Cached(type=COMPLETED)")
        logger.error("Finished in state Failed('Task run encountered an exception')")
        logger.info("a message of the task itself")
    assert [r.getMessage() for r in caplog.records][-2:] == [
        "Finished in state Failed('Task run encountered an exception')", "a message of the task itself"]
    with caplog.at_level(logging.DEBUG, logger="prefect"):
        logger.info("Finished in state Completed()")
    assert caplog.records[-1].levelname == "DEBUG"


def test_a_run_with_other_parameters_keeps_each_cells_own(tmp_path):
    out = str(tmp_path)
    both = _cells(["h"], ["months", "days"], 1.0).assign_attrs(base_seed="0", noise_scale="absolute")
    write_group(out, "stratification", both)
    write_group(out, "stratification", _cells(["h"], ["months"], 2.0).assign_attrs(base_seed="3",
                                                                                    noise_scale="absolute"))
    ds = read_group(out, "stratification").load()
    assert ds.attrs["base_seed"].startswith("differs between cells") and ds.attrs["noise_scale"] == "absolute"
    assert ds["param_base_seed"].sel(concept="months").item() == "3"
    assert ds["param_base_seed"].sel(concept="days").item() == "0"
    write_group(out, "stratification", _cells(["h"], ["planets"], 3.0).assign_attrs(base_seed="5",
                                                                                     noise_scale="absolute"))
    seeds = read_group(out, "stratification")["param_base_seed"].squeeze().to_series().to_dict()
    assert {k: v for k, v in seeds.items()} == {"months": "3", "days": "0", "planets": "5"}
