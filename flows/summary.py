"""The summary of a run on the run the user started: findings, key plots and a link to the report.

Each stage publishes its own tables and plots on its subflow, two or three levels down. The run a
user opens in the Prefect UI — `saema run`'s pipeline, a several-model run, or a deployment's run —
gets the summary on its own Artifacts tab: the findings of its models and hooks, the rank-vs-noise
and causal plots of each hook, and a link to `report.html`.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect.context import FlowRunContext

from flows.findings import verdict_rows
from flows.run_labels import short_hook
from storage.locations import exists, is_local, local_path
from storage.plots import plot_path
from storage.results import read_group
from tasks.artifacts import publish_link, publish_plots, publish_table

# (plot kind, caption): the plots that carry the run's conclusions, per (model, hook).
KEY_PLOTS = (("stratification", "SAEMA latent-mode rank vs noise (claim 1)"),
             ("causal", "held-out MSE vs achieved separability, the training-time test (claim 3)"))


def is_top_level_run() -> bool:
    """True inside a flow run that no other flow started (the one a user opens in the UI)."""
    context = FlowRunContext.get()
    return context is not None and context.flow_run.parent_task_run_id is None


def report_link(path: str) -> str:
    """A URL a browser opens: file:// for a local path, the fsspec URL otherwise."""
    return local_path(path).resolve().as_uri() if is_local(path) else path


def findings_frame(out: str, models: Sequence[str], hooks: Sequence[str]):
    """The stored findings of these models and hooks, one row per (model, hook, claim, space)."""
    findings = read_group(out, "findings", dask=False)
    if findings is None:
        return None
    return verdict_rows(findings.sel(model=[m for m in models if m in findings.model.values],
                                     hook=[h for h in hooks if h in findings.hook.values]))


def key_plots(out: str, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    plots = []
    for model, hook in pairs:
        for kind, caption in KEY_PLOTS:
            png = plot_path(out, model, kind, hook)
            if exists(png):
                plots.append((png, f"{model} {short_hook(hook)}: {caption}"))
    return plots


def run_cells(configs) -> list[tuple[str, str]]:
    """The (model, hook) pairs a run of these `PipelineConfig`s analyses, in order."""
    return [(cfg.extract.model.label, hook) for cfg in configs for hook in cfg.extract.hooks]


def publish_run_summary(out: str, pairs: Sequence[tuple[str, str]], report: str | None) -> None:
    """Findings, key plots and the report link of (model, hook) `pairs`, on the top-level run only
    (a subflow's summary would sit where nobody looks; its parent publishes the whole run's)."""
    if not is_top_level_run():
        return
    models, hooks = list(dict.fromkeys(m for m, _ in pairs)), list(dict.fromkeys(h for _, h in pairs))
    key = "-".join(["summary", *models])
    frame = findings_frame(out, models, hooks)
    if frame is not None and len(frame):
        publish_table(f"{key}-findings", frame, f"Findings of {', '.join(models)}: the paper's claims, read off "
                                                f"the stored results, with their caveats")
    publish_plots(f"{key}-plots", key_plots(out, pairs), f"Key plots of {', '.join(models)}",
                  heading=f"## {', '.join(models)}: key plots\n\nEvery plot and table is in the report.")
    if report and exists(report):
        publish_link(f"{key}-report", report_link(report), "report.html",
                     f"The HTML report of every result stored in {out}")
