"""Thread pinning for the tasks of the parallel stages.

A Dask worker runs one task per thread and the tasks pin BLAS and torch to one thread each, so the
workers together use the cores they were given. Pinning is process-wide state: when a worker has
several threads (the in-process workers of a `memory://` run), a per-task `threadpool_limits` would
restore the original limits when its task ends while another task is still running, and that task
would carry on with several BLAS threads (and round differently). `pinned_threads` pins on the first
entry and restores on the last exit of the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

_lock = threading.Lock()
_state: dict = {"depth": 0, "limits": None, "torch": None}


@contextmanager
def pinned_threads(n: int = 1) -> Iterator[None]:
    """BLAS and torch intra-op threads pinned to `n` while any task of this process is inside."""
    with _lock:
        if _state["depth"] == 0:
            _state["torch"] = torch.get_num_threads()
            _state["limits"] = threadpool_limits(n)
            torch.set_num_threads(n)
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                _state["limits"].restore_original_limits()
                torch.set_num_threads(_state["torch"])
