"""Progress on long work: a tqdm bar in the terminal and a progress artifact in the Prefect UI."""

from __future__ import annotations

import logging

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import MissingContextError
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class StageProgress:
    """`with StageProgress("train blocks.3", total=n) as p: p.advance()`.

    The Prefect artifact is updated in steps of about 5% so the API is not flooded.
    """

    def __init__(self, label: str, total: int, unit: str = "batch") -> None:
        self.label, self.total, self.done, self.unit = label, max(total, 1), 0, unit
        self._artifact = None
        self._last = 0.0

    def __enter__(self) -> "StageProgress":
        self._bar = tqdm(total=self.total, desc=self.label, unit=self.unit, leave=False)
        if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
            try:
                self._artifact = create_progress_artifact(progress=0.0, description=self.label)
            except MissingContextError:
                self._artifact = None
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        fraction = 100.0 * self.done / self.total
        if self._artifact is not None and (fraction - self._last >= 5 or self.done >= self.total):
            update_progress_artifact(self._artifact, progress=fraction)
            self._last = fraction

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
