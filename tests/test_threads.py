"""Thread pinning shared by the tasks of one worker process (tasks/threads.py)."""

from __future__ import annotations

import threading

import torch
from threadpoolctl import threadpool_info

from tasks.threads import pinned_threads


def _blas_threads() -> set[int]:
    return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_threads_stay_pinned_until_the_last_task_of_the_process_leaves():
    torch.set_num_threads(2)
    before = _blas_threads()
    first_inside, second_inside, first_left = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first_task():
        with pinned_threads(1):
            first_inside.set()
            second_inside.wait()
        first_left.set()

    def second_task():
        first_inside.wait()
        with pinned_threads(1):
            second_inside.set()
            first_left.wait()
            seen["blas"], seen["torch"] = _blas_threads(), torch.get_num_threads()

    threads = [threading.Thread(target=second_task), threading.Thread(target=first_task)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {"blas": {1}, "torch": 1}  # the first task's exit did not unpin the second's threads
    assert _blas_threads() == before and torch.get_num_threads() == 2
