"""Expected errors in flow and task logs: one line, not a traceback.

When a task or flow raises, Prefect logs the exception with its traceback at every level it passes
through (task, stage subflow, pipeline flow). For saema's own errors (`SaemaError`: a bad hook, prompt
file, store or checkpoint) and for a full disk or a read-only folder, the message already says what
was wrong and where; the traceback buries it. `install` adds a filter to Prefect's run loggers that
drops the traceback of exactly those errors; every other exception keeps its traceback.
"""

from __future__ import annotations

import logging

from saema_core.errors import is_expected

RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ExpectedErrorsOnOneLine(logging.Filter):
    """Drops the traceback of an expected error; the record's own message stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_expected(error):
            record.msg = record.getMessage()  # Prefect's message names the error (its repr)
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


def install() -> None:
    """Add the filter to Prefect's flow-run and task-run loggers (once per process)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedErrorsOnOneLine) for f in logger.filters):
            logger.addFilter(ExpectedErrorsOnOneLine())
