"""Expected errors in flow and task logs: one line, not a traceback; per-cell completions at debug.

When a task or flow raises, Prefect logs the exception with its traceback at every level it passes
through (task, stage subflow, pipeline flow). For saema's own errors (`SaemaError`: a bad hook, prompt
file, store or checkpoint) and for a full disk or a read-only folder, the message already says what
was wrong and where; the traceback buries it. `install` adds a filter to Prefect's run loggers that
drops the traceback of exactly those errors; every other exception keeps its traceback.

A grid stage runs dozens to hundreds of task runs, and Prefect logs "Finished in state Completed()"
for each at INFO: a wall of lines that hides the run's own messages (the grids show a progress bar
instead). `CellCompletionsAtDebug` moves exactly those records — completed or cached task runs — to
DEBUG, so they appear with `PREFECT_LOGGING_LEVEL=DEBUG`; failures and every other record stay as they are.
"""

from __future__ import annotations

import logging
import re

from saema_core.errors import is_expected

TASK_RUNS = "prefect.task_runs"
RUN_LOGGERS = ("prefect.flow_runs", TASK_RUNS)


class ExpectedErrorsOnOneLine(logging.Filter):
    """Drops the traceback of an expected error; the record's own message stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_expected(error):
            record.msg = record.getMessage()  # Prefect's message names the error (its repr)
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


class CellCompletionsAtDebug(logging.Filter):
    """A task run's "Finished in state Completed()" (or Cached) becomes a DEBUG record."""

    _DONE = re.compile(r"Finished in state (Completed|Cached)\(")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._DONE.match(str(record.msg)):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(TASK_RUNS).isEnabledFor(logging.DEBUG)


def _add_once(logger: logging.Logger, kind: type[logging.Filter]) -> None:
    if not any(isinstance(f, kind) for f in logger.filters):
        logger.addFilter(kind())


def install() -> None:
    """Add the filters to Prefect's flow-run and task-run loggers (once per process)."""
    for name in RUN_LOGGERS:
        _add_once(logging.getLogger(name), ExpectedErrorsOnOneLine)
    _add_once(logging.getLogger(TASK_RUNS), CellCompletionsAtDebug)
