"""Real server, worker and scheduler processes for the integration tests.

Each service runs in its own process group (so its children — a Dask nanny's worker, a Prefect
worker's flow-run process — are stopped with it), bound to 127.0.0.1 on a port the kernel picked,
with its output in a log file that a failing test shows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

LOG_TAIL_CHARS = 6000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def venv_executable(name: str) -> str:
    """The console script `name` of the running interpreter's environment (never one on $PATH)."""
    path = Path(sys.executable).parent / name  # not resolved: a venv's python is often a symlink
    if not path.exists():
        raise FileNotFoundError(f"{name} is not installed next to {sys.executable}")
    return str(path)


def child_env(**updates: str) -> dict[str, str]:
    """This process's environment without its PREFECT_* settings, plus `updates`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(updates)
    return env


@dataclass
class Service:
    """A started process group and the file its stdout and stderr go to."""

    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        """The end of the service's log, headed by its name and exit code (None: still running)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} (exit code {self.process.poll()}) ---\n{text[-LOG_TAIL_CHARS:]}"


def start_service(name: str, argv: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path) -> Service:
    """Start `argv` in a new session (its own process group), logging to `<log_dir>/<name>.log`."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Service(name, process, log)


def stop_service(service: Service, grace: float = 20.0) -> None:
    """SIGTERM the service's process group and those of its descendants, SIGKILL what is left after
    `grace` seconds. Descendants count because some start sessions of their own: a Prefect worker
    runs each flow run (and its local Dask cluster) in a new process group."""
    groups = _process_groups(service.process.pid)
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        service.process.poll()  # reap the leader: a zombie still counts as a member of its group
        if not any(_group_alive(group) for group in groups):
            return
        time.sleep(0.2)
    _signal_groups(groups, signal.SIGKILL)
    service.process.wait()


def _process_groups(pid: int) -> list[int]:
    """The process group of `pid` (a session leader of ours) and those of all its descendants."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    groups = [pid]  # start_new_session: the leader's pid is its group id
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            groups.append(os.getpgid(child.pid))
    return list(dict.fromkeys(groups))


def _signal_groups(groups: Iterable[int], sig: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError):  # every member has exited already
            os.killpg(group, sig)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process and every descendant (its temporary Prefect server, its Dask workers) at
    once, with no chance to clean up — what a crash or `kill -9` of a run does."""
    family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def completed_task_runs(client, name_like: str) -> list:
    """Task runs in state Completed whose name matches the SQL pattern `name_like`, from `client`'s API."""
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    wanted = TaskRunFilter(name=TaskRunFilterName(like_=name_like),
                           state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.COMPLETED])))
    return client.read_task_runs(task_run_filter=wanted)


def logs(services: Iterable[Service]) -> str:
    return "\n".join(service.output() for service in services)


def wait_until(ready: Callable[[], bool], what: str, timeout: float, services: Iterable[Service],
               interval: float = 0.5) -> None:
    """Poll `ready()` until true; fail early (with the logs) if a service exits, or after `timeout`."""
    services = list(services)
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [service for service in services if service.process.poll() is not None]
        if dead:
            names = ", ".join(service.name for service in dead)
            raise RuntimeError(f"waiting for {what}: {names} exited\n{logs(services)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s\n{logs(services)}")
        time.sleep(interval)
