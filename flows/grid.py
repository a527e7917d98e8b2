"""The cell grids of the parallel stages, run as one subflow each on Dask — or in threads when cached.

A stage hands over its cells as task calls (one dict of arguments per cell). The grid asks the cache
first: cells whose content key has a stored result come back as `Cached` task runs, and only when
some cell must be computed does the subflow start the Dask cluster (local, or `--dask-address`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.dask import dask_runner
from tasks.caching import cached, pending_cells, remember_results
from tasks.intervention import intervention_cell
from tasks.stratify import stratify_cells
from tasks.structure import structure_cell

GRID_TASKS = {"stratify": stratify_cells, "structure": structure_cell, "intervention": intervention_cell}


@flow(name="saema-grid", flow_run_name="{stage} grid")
def grid_flow(stage: str, out: str, calls: list[dict[str, Any]], refresh: bool = False) -> list[dict]:
    """Every call of the stage's task, mapped over the task runner the caller chose."""
    task = cached(GRID_TASKS[stage], out, refresh)
    futures = task.map(**{name: [call[name] for call in calls] for name in calls[0]})
    return [future.result() for future in futures]


def run_grid(stage: str, out: str, calls: list[Mapping[str, Any]], refresh: bool,
             dask_address: str | None, n_workers: int) -> list[dict]:
    """The results of `calls`, in order: cached ones read back, the others computed on Dask."""
    if not calls:
        return []
    pending = pending_cells(GRID_TASKS[stage], out, calls, refresh)
    print(f"{stage}: {len(calls) - pending} of {len(calls)} cells cached, {pending} to compute")
    if not pending:
        return grid_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=4))(stage, out, calls, refresh)
    runner = dask_runner(dask_address, n_workers, out)
    results = grid_flow.with_options(task_runner=runner)(stage, out, [dict(call) for call in calls], refresh)
    if missing := remember_results(GRID_TASKS[stage], out, calls, results):
        print(f"{stage}: cached {missing} results the workers left unstored")
    return results
