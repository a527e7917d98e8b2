"""Prefect artifacts: tables and plots of each stage, so the UI tells the story of a run."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext

from storage.locations import read_bytes


def _key(text: str) -> str:
    """Prefect artifact keys: lower case letters, digits and dashes."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


def publish_table(key: str, frame: pd.DataFrame, description: str) -> None:
    """A table artifact (rounded floats, NaN as empty) when running inside a flow."""
    if FlowRunContext.get() is None:
        return
    rows = frame.reset_index().round(4).astype(object).where(frame.reset_index().notna(), None)
    create_table_artifact(key=_key(key), table=rows.to_dict(orient="records"), description=description)


def publish_plot(key: str, png: str, description: str) -> None:
    """A markdown artifact embedding a PNG (as a data URI) with its description."""
    if FlowRunContext.get() is None:
        return
    data = base64.b64encode(read_bytes(png)).decode()
    markdown = f"### {description}\n\n![{Path(png).name}](data:image/png;base64,{data})\n\n`{png}`"
    create_markdown_artifact(key=_key(key), markdown=markdown, description=description)
