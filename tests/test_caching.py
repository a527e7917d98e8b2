"""Content keys of the analysis tasks: what changes them, what does not, and the cache read-back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.caching import cached, cached_results, cell_key, pending_cells, remember_results


@dataclass(frozen=True)
class Params:
    levels: tuple[float, ...]
    replicates: int


@task(name="square-cell", cache_policy=NO_CACHE)
def square_cell(out: str, x: int, params: Params, content: str = "") -> dict:
    return {"x2": x * x, "n": params.replicates}


def test_keys_follow_content_not_identity():
    base = {"out": "o", "x": 1, "params": Params((0.0, 0.1), 3), "content": "acts-1|sae-1"}
    assert cell_key("t", base) == cell_key("t", dict(base, params=Params((0.0, 0.1), 3)))  # equal values
    assert cell_key("t", base) == cell_key("t", dict(reversed(list(base.items()))))  # order-free
    changed = [dict(base, x=2), dict(base, params=Params((0.0, 0.2), 3)), dict(base, content="acts-1|sae-2")]
    keys = {cell_key("t", call) for call in changed} | {cell_key("t", base), cell_key("other-task", base)}
    assert len(keys) == 5


def test_arrays_are_refused_as_task_inputs():
    with pytest.raises(TypeError, match="ndarray.*reference"):
        cell_key("t", {"x": np.zeros(3)})


def test_cached_cells_are_read_back_and_refresh_recomputes(tmp_path):
    out = str(tmp_path)
    calls = [{"out": out, "x": x, "params": Params((0.0,), 2)} for x in range(4)]

    @flow
    def grid(refresh: bool = False) -> list[dict]:
        run = cached(square_cell, out, refresh)
        return [run(**call) for call in calls]

    assert pending_cells(square_cell, out, calls) == 4 and cached_results(square_cell, out, calls) is None
    results = grid()
    assert pending_cells(square_cell, out, calls) == 0
    assert cached_results(square_cell, out, calls) == results == [{"x2": x * x, "n": 2} for x in range(4)]
    assert pending_cells(square_cell, out, calls, refresh=True) == 4
    assert sorted(p.name.split("-")[0] for p in (tmp_path / ".cache").iterdir()) == ["square"] * 4


def test_results_missing_from_the_cache_are_remembered(tmp_path):
    out = str(tmp_path)
    calls = [{"out": out, "x": x, "params": Params((0.0,), 1)} for x in range(3)]
    results = [square_cell.fn(**call) for call in calls]
    assert remember_results(square_cell, out, calls, results) == 3
    assert remember_results(square_cell, out, calls, results) == 0
    assert cached_results(square_cell, out, calls) == results
