"""Content-keyed Prefect caching of the analysis tasks (stratify, structure, intervention, evaluation).

A task's cache key is the hash of its name, its inputs and saema's code version. The inputs are
references (output location, model name, hook, concept, SAE path) plus a `content` fingerprint of what
the task reads — the activation group's content hash, the SAE's weight hash, the cluster labels it
starts from — so an equal key means equal work, whatever the paths. Results are persisted as JSON
(never pickles) next to the results, in `<out>/.cache`, so deleting the output deletes its cache.

A stage whose every cell is cached reads the results straight from this store (`cached_results`):
no Dask cluster, no task runs to record. Otherwise the grid runs on Dask and the cached cells finish
there as `Cached` task runs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer

import saema
from storage.activation_store import is_local

_CODE_PACKAGES = ("saema_core", "tasks", "storage")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of saema's version and the source of the packages whose code decides a task's result."""
    root = Path(saema.__file__).resolve().parent.parent
    digest = hashlib.sha256(saema.__version__.encode())
    for package in _CODE_PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            digest.update(source.relative_to(root).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def _canonical(value: Any) -> Any:
    """JSON-able form of task inputs: dataclasses by field, tuples as lists, mappings sorted."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__type__": type(value).__name__,
                **{f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"task input of type {type(value).__name__} has no content key; pass a reference instead")


def cell_key(task_name: str, inputs: Mapping[str, Any]) -> str:
    """The cache key of one task call: task name + canonical inputs + code version."""
    text = json.dumps({"task": task_name, "inputs": _canonical(inputs), "code": code_version()},
                      sort_keys=True, allow_nan=True)
    return f"{task_name}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


@dataclasses.dataclass
class ContentKey(CachePolicy):
    """Prefect cache policy: `cell_key` of the task's name and inputs."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        return cell_key(task_ctx.task.name, inputs)


CONTENT_KEY = ContentKey()


def cache_storage(out: str) -> Path | None:
    """`<out>/.cache` for a local output; None (Prefect's default result storage) for a remote one."""
    if not is_local(out):
        return None
    return Path(out.removeprefix("file://")).expanduser().resolve() / ".cache"


def cached(task: Task, out: str, refresh: bool = False) -> Task:
    """The task with its results persisted (JSON) beside `out`; `refresh` recomputes and overwrites."""
    options: dict[str, Any] = {"cache_policy": CONTENT_KEY, "persist_result": True,
                               "result_serializer": "json", "refresh_cache": refresh}
    storage = cache_storage(out)
    if storage is not None:
        options["result_storage"] = storage
    return task.with_options(**options)


def pending_cells(task: Task, out: str, calls: Iterable[Mapping[str, Any]], refresh: bool = False) -> int:
    """How many of these task calls have no cached result (all of them when refreshing)."""
    calls = list(calls)
    if refresh:
        return len(calls)
    store = _result_store(out)
    return sum(not store.exists(cell_key(task.name, _with_defaults(task, call))) for call in calls)


def cached_results(task: Task, out: str, calls: Iterable[Mapping[str, Any]]) -> list[Any] | None:
    """The cached result of every call, in order — or None as soon as one is missing."""
    store = _result_store(out)
    results = []
    for call in calls:
        key = cell_key(task.name, _with_defaults(task, call))
        if not store.exists(key):
            return None
        results.append(store.read(key).result)
    return results


def remember_results(task: Task, out: str, calls: Iterable[Mapping[str, Any]], results: Iterable[Any],
                     overwrite: bool = False) -> int:
    """Store the records of computed cells that are missing from the cache (every one when
    `overwrite`, as after `--refresh`); returns how many were written.

    On a local cluster of worker processes, Prefect 3.8.8 now and then finishes a task run as
    Completed without its result record on disk (one cell in five to ten here); the flow holds every
    result, so it writes what the workers did not.
    """
    store = _result_store(out)
    written = 0
    for call, result in zip(calls, results):
        key = cell_key(task.name, _with_defaults(task, call))
        if overwrite or not store.exists(key):
            store.write(result, key=key)
            written += 1
    return written


def _result_store(out: str) -> ResultStore:
    storage = cache_storage(out)
    block = LocalFileSystem(basepath=str(storage)) if storage else None
    return ResultStore(result_storage=block, serializer=JSONSerializer())


def _with_defaults(task: Task, call: Mapping[str, Any]) -> dict[str, Any]:
    """The call's arguments as Prefect hands them to the cache policy: defaults filled in."""
    bound = inspect.signature(task.fn).bind(**call)
    bound.apply_defaults()
    return dict(bound.arguments)
