"""Prefect artifacts: tables and plots of each stage, so the UI tells the story of a run."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
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


def _plot_markdown(png: str, caption: str) -> str:
    data = base64.b64encode(read_bytes(png)).decode()
    return f"### {caption}\n\n![{Path(png).name}](data:image/png;base64,{data})\n\n`{png}`"


def publish_plot(key: str, png: str, description: str) -> None:
    """A markdown artifact embedding a PNG (as a data URI) with its description."""
    publish_plots(key, [(png, description)], description)


def publish_plots(key: str, plots: list[tuple[str, str]], description: str, heading: str = "") -> None:
    """One markdown artifact embedding several (PNG, caption) pairs under an optional heading."""
    if FlowRunContext.get() is None or not plots:
        return
    markdown = "\n\n".join([heading] * bool(heading) + [_plot_markdown(png, caption) for png, caption in plots])
    create_markdown_artifact(key=_key(key), markdown=markdown, description=description)


def publish_link(key: str, link: str, text: str, description: str) -> None:
    """A link artifact (e.g. to the HTML report) when running inside a flow."""
    if FlowRunContext.get() is None:
        return
    create_link_artifact(key=_key(key), link=link, link_text=text, description=description)
