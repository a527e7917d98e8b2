"""The end-to-end flow `saema_pipeline` (also `saema run`): every stage that exists, in order.

Each stage skips the work whose results are already stored (content-keyed), so running a later stage
alone (`saema stratify`) runs the earlier ones only where their results are missing.
"""

from __future__ import annotations

from prefect import flow, tags

from flows.causal import causal_flow
from flows.config import PipelineConfig
from flows.dask_runner import cluster_per_run
from flows.extract import extract_flow
from flows.findings import findings_flow
from flows.intervention import intervention_flow
from flows.preflight import preflight
from flows.run_labels import config_tags, models_run_name, pipeline_run_name, stage_tags
from flows.sae import sae_flow
from flows.stratify import stratify_flow
from flows.structure import structure_flow
from flows.summary import publish_run_summary, run_cells
from storage.activation_store import activation_store_url, concept_prompt_set
from storage.report import report_is_current, write_report
from storage.results import read_group, recorded_run

STAGES = ("extract", "sae", "stratify", "structure", "intervention", "causal", "report")


@flow(name="saema-pipeline", flow_run_name=pipeline_run_name, log_prints=True)
def saema_pipeline(cfg: PipelineConfig = PipelineConfig(), stages: tuple[str, ...] = STAGES) -> None:
    """prompts → activations → SAEs → stratification → structure → intervention → causal test →
    findings → report."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; stages are {STAGES}")
    preflight(cfg, stages)  # again for deployment runs, which do not pass the CLI
    ex = cfg.extract
    record = {"model": ex.model.label, "hooks": list(ex.hooks), "stages": list(stages),
              "concepts": list(ex.concepts) or [ex.prompt_file or "default concepts"]}
    with recorded_run(ex.out, record):  # a failed run stays recorded until a re-run completes it
        _run_stages(cfg, stages)
    report = _report(ex.out) if "report" in stages else None
    publish_run_summary(ex.out, run_cells([cfg]), report)


def _report(out: str) -> str:
    path = f"{out.rstrip('/')}/report.html"
    current = report_is_current(out)
    print(f"report: {path}" + (" (unchanged)" if current else ""))
    return path if current else write_report(out)


@flow(name="saema-models", flow_run_name=models_run_name, log_prints=True)
def saema_models(configs: list[PipelineConfig], stages: tuple[str, ...] = STAGES) -> None:
    """`saema_pipeline` for several models, one after the other, each a subflow; their results go
    into one store when they share `out`, side by side along the `model` dimension."""
    labels = [cfg.extract.model.label for cfg in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models would be stored under one name: {labels}")
    each = tuple(stage for stage in stages if stage != "report")  # the report once, after every model
    for cfg in configs:
        with tags(*config_tags(cfg)):
            saema_pipeline(cfg, stages=each)
    for out in dict.fromkeys(cfg.extract.out for cfg in configs):
        report = _report(out) if "report" in stages else None
        publish_run_summary(out, run_cells([cfg for cfg in configs if cfg.extract.out == out]), report)


def differing_concepts(out: str, model: str, hook: str, concepts: tuple[str, ...]) -> list[str]:
    """The concepts this model analyses on other prompts than a model already in the store (other
    `--prompts`, corpus or `--concept-contexts`): comparisons of them across models compare different data."""
    stored = read_group(out, "stratification")
    if stored is None or "prompt_set" not in stored:
        return []
    url = activation_store_url(out, model)
    lines = []
    for concept in set(concepts) & {str(c) for c in stored.concept.values}:
        mine = concept_prompt_set(url, hook, concept)
        others = {str(m): str(p) for m, p in zip(stored.model.values, stored.prompt_set.sel(concept=concept).values)
                  if str(m) != model and str(p) not in ("", mine)}
        if mine and others:
            lines.append(f"concept {concept!r}: {model} analyses prompt set {mine}, but "
                         + ", ".join(f"{m} analysed {p}" for m, p in others.items())
                         + "; comparisons of this concept across models compare different prompts")
    return sorted(lines)


def _run_stages(cfg: PipelineConfig, stages: tuple[str, ...]) -> None:
    ex = cfg.extract
    with stage_tags("extract"):
        refs = extract_flow(ex, cfg.sae.holdout_fraction)
    concepts = tuple(ref.concept for ref in refs if ref.concept is not None)
    for line in differing_concepts(ex.out, ex.model.label, ex.hooks[0], concepts):
        print(f"warning: {line}")
    if "sae" not in stages:
        return
    with stage_tags("sae"):
        sae_refs = sae_flow(ex.out, ex.model.label, ex.hooks, concepts, cfg.sae, model=ex.model, refresh=ex.refresh)
    dask = (cfg.stratify.dask_address, cfg.stratify.n_workers)
    cells = (ex.out, ex.model.label, ex.hooks)
    with cluster_per_run():  # one local Dask cluster for the parallel stages, started when first needed
        if "stratify" in stages:
            with stage_tags("stratify"):
                stratify_flow(*cells, concepts, sae_refs, cfg.stratify, ex.refresh)
        if "structure" in stages:
            with stage_tags("structure"):
                structure_flow(*cells, concepts, sae_refs, cfg.structure, *dask, ex.refresh)
        if "intervention" in stages:
            with stage_tags("intervention"):
                intervention_flow(*cells, concepts, sae_refs, cfg.intervention, cfg.structure.seeds[0], *dask,
                                  ex.refresh)
        if "causal" in stages:
            with stage_tags("causal"):
                causal_flow(*cells, sae_refs, cfg.causal, cfg.sae.holdout_fraction, ex.model, *dask, ex.refresh,
                            dead_tokens=cfg.sae.dead_tokens)
    if {"stratify", "structure", "intervention", "causal"} & set(stages):
        with stage_tags("findings"):
            findings_flow(ex.out)
