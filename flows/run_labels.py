"""Names and tags of flow runs, so the Prefect UI tells runs apart and its filters work.

A run is named after what it analyses ("all-MiniLM-L6-v2 · blocks.3 · 9 concepts") instead of
Prefect's random "free-inchworm", and tagged `model:<name>`, `hook:<hook>` and, for each stage's
subflow and its task runs, `stage:<stage>`: in the UI's run list, `model:gemma-3-270m` filters one
model's runs of every stage.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import PurePath
from typing import Any

from prefect import tags
from prefect.runtime import flow_run

SHOWN_CONCEPTS = 3
"""A run of at most this many concepts names them; a larger one says how many."""


def short_hook(hook: str) -> str:
    """blocks.3.hook_resid_post → blocks.3 (post is the default); blocks.3.hook_resid_pre → blocks.3.pre."""
    match = re.fullmatch(r"(blocks\.\d+)\.hook_resid_(pre|post)", hook)
    if not match:
        return hook
    return match.group(1) + ("" if match.group(2) == "post" else ".pre")


def _concepts_label(concepts: Iterable[str], prompt_file: str | None) -> str:
    concepts = list(concepts)
    if not concepts:
        return f"concepts of {PurePath(prompt_file).name}" if prompt_file else "built-in concepts"
    if len(concepts) <= SHOWN_CONCEPTS:
        return " ".join(concepts)
    return f"{len(concepts)} concepts"


def run_label(model: str, hooks: Iterable[str], concepts: Iterable[str] = (), prompt_file: str | None = None) -> str:
    """"model · hooks · concepts", the name of a pipeline run."""
    return " · ".join([model, " ".join(short_hook(h) for h in hooks), _concepts_label(concepts, prompt_file)])


def run_tags(model: str, hooks: Iterable[str]) -> list[str]:
    return ["saema", f"model:{model}", *(f"hook:{hook}" for hook in hooks)]


def config_label(cfg: Any) -> str:
    """The run label of a `PipelineConfig`."""
    ex = cfg.extract
    return run_label(ex.model.label, ex.hooks, ex.concepts, ex.prompt_file)


def config_tags(cfg: Any) -> list[str]:
    return run_tags(cfg.extract.model.label, cfg.extract.hooks)


def pipeline_run_name() -> str:
    """The `flow_run_name` of `saema_pipeline`, from its `cfg` parameter."""
    return config_label(flow_run.parameters["cfg"])


def models_run_name() -> str:
    """The `flow_run_name` of a run over several models: their names."""
    return "models · " + " ".join(cfg.extract.model.label for cfg in flow_run.parameters["configs"])


@contextlib.contextmanager
def stage_tags(stage: str) -> Iterator[None]:
    """Runs started inside carry `stage:<stage>` (plus the tags already in effect)."""
    with tags(f"stage:{stage}"):
        yield
