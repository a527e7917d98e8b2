"""The results store: merging runs along dimensions, atomic rewrites, locking, lazy reads."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import xarray as xr

from storage.results import ResultsError, open_results, read_group, results_url, write_group, write_lock


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
        with pytest.raises(ResultsError, match="being written by another run"):
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
