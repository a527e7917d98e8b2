"""The cell grids of the parallel stages: read from the cache, or run as one subflow each on Dask.

A stage hands over its cells as task calls (one dict of arguments per cell). When every cell has a
stored result under its content key, the results are read back here — no cluster is started and no
task runs are recorded. Otherwise a subflow maps every cell on Dask (local, or `--dask-address`);
cells already cached finish there as `Cached` task runs, the others are computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import flow
from prefect.futures import as_completed

from flows.dask_runner import dask_runner
from tasks.caching import cached, cached_results, pending_cells, remember_results
from tasks.causal import causal_cell
from tasks.intervention import intervention_cell
from tasks.progress import StageProgress
from tasks.stratify import stratify_cells
from tasks.structure import structure_cell

GRID_TASKS = {"stratify": stratify_cells, "structure": structure_cell, "intervention": intervention_cell,
              "causal": causal_cell}

# Relative cost of a stratify call by space (measured on the default run with ~1 500–2 100 tokens per
# concept: dense AE 12–16 s, SAE latents ~14 s, the residual control ~2 s). Longest cells go first, so
# the last cells to finish are short ones and the workers finish together.
_STRATIFY_SPACE_COST = {"dense_ae": 1.2, "latent": 1.0, "resid": 0.15}


def _cost(stage: str, call: Mapping[str, Any]) -> float:
    return _STRATIFY_SPACE_COST.get(call.get("space"), 1.0) if stage == "stratify" else 1.0


def longest_first(stage: str, calls: list[dict[str, Any]]) -> list[int]:
    """The submission order of `calls`: the most expensive first (stable among equals)."""
    return sorted(range(len(calls)), key=lambda i: -_cost(stage, calls[i]))


@flow(name="saema-grid", flow_run_name="{stage} cells")
def grid_flow(stage: str, out: str, calls: list[dict[str, Any]], refresh: bool = False) -> list[dict]:
    """Every call of the stage's task, mapped over the task runner the caller chose (Dask)."""
    task = cached(GRID_TASKS[stage], out, refresh)
    futures = task.map(**{name: [call[name] for call in calls] for name in calls[0]})
    with StageProgress(f"{stage} cells", total=len(calls), unit="cell") as progress:
        for _ in as_completed(list(futures)):
            progress.advance()
    return [future.result() for future in futures]


def run_grid(stage: str, out: str, calls: list[Mapping[str, Any]], refresh: bool,
             dask_address: str | None, n_workers: int) -> list[dict]:
    """The results of `calls`, in order: cached ones read back, the others computed on Dask.

    A fully cached grid is read from the cache in this process (no cluster, no task runs); otherwise
    a subflow maps every cell on Dask, where the cached ones finish as `Cached` task runs."""
    if not calls:
        return []
    calls = [dict(call) for call in calls]
    if not refresh and (results := cached_results(GRID_TASKS[stage], out, calls)) is not None:
        print(f"{stage}: all {len(calls)} cells served from the cache")
        return results
    pending = pending_cells(GRID_TASKS[stage], out, calls, refresh)
    print(f"{stage}: {len(calls) - pending} of {len(calls)} cells cached, {pending} to compute")
    order = longest_first(stage, calls)
    submitted = grid_flow.with_options(task_runner=dask_runner(dask_address, n_workers, out))(
        stage, out, [calls[i] for i in order], refresh)
    results = [None] * len(calls)
    for i, result in zip(order, submitted):
        results[i] = result
    missing = remember_results(GRID_TASKS[stage], out, calls, results, overwrite=refresh)
    if missing and not refresh:
        print(f"{stage}: cached {missing} results the workers left unstored")
    return results
