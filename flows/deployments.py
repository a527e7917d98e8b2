"""Entry points for `prefect.yaml` deployments: `saema run` with every option as a flow parameter.

The parameters of `scheduled_pipeline` are the options of `saema run`, by their argparse names
(`--prompts` is `prompt_file`, `--sae HOOK=PATH` is `sae: ["HOOK=PATH", …]`, `--no-dense` is
`no_dense`), except `models` for `--model` (it takes several), plus `stages`. The run's configuration
is built from them by the same code as the command line's (`saema.cli.pipeline_config`), so a
schedule is validated exactly as the command would be, and `tests/test_pipeline_stages.py` checks that
every option of `saema run` is a parameter here with the same default.
"""

from __future__ import annotations

import argparse

from prefect import flow, tags
from prefect.runtime import flow_run

from flows.config import (
    DEFAULT_OUT,
    CausalStageConfig,
    ExtractConfig,
    InterventionStageConfig,
    SAEStageConfig,
    StratifyConfig,
    StructureStageConfig,
)
from flows.pipeline import STAGES, saema_models, saema_pipeline
from flows.preflight import preflight
from flows.run_labels import config_tags, run_label
from flows.summary import publish_run_summary, run_cells
from storage.corpus import DEFAULT_CORPUS
from storage.model_spec import DEFAULT_MODEL, model_label
from tasks.allocator import set_encode_elements

# Argparse names whose deployment parameter is called otherwise.
RENAMED = {"model": "models"}
_DESTS = {parameter: dest for dest, parameter in RENAMED.items()}


def scheduled_run_name() -> str:
    """"scheduled · <model> · <hooks> · <concepts>" from the deployment run's parameters."""
    p = flow_run.parameters
    models = " ".join(model_label(name) for name in p["models"])
    return "scheduled · " + run_label(models, p["hooks"] or ["default hooks"], p["concepts"], p["prompt_file"])


def run_arguments(parameters: dict) -> argparse.Namespace:
    """The `saema run` arguments these deployment parameters stand for: the parser's defaults, then
    each parameter under its argparse name (sequences as lists, as argparse gives them)."""
    from saema.cli import build_parser

    args = build_parser().parse_args(["run"])
    for name, value in parameters.items():
        dest = _DESTS.get(name, name)
        if not hasattr(args, dest):
            raise ValueError(f"unknown deployment parameter {name!r}")
        if dest == "corpus" and value is None:
            value = "none"  # as on the command line: no corpus
        setattr(args, dest, list(value) if isinstance(value, (list, tuple)) else value)
    return args


@flow(name="saema-scheduled", flow_run_name=scheduled_run_name, log_prints=True)
def scheduled_pipeline(
    models: tuple[str, ...] = (DEFAULT_MODEL,),
    out: str = DEFAULT_OUT,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    hooks: tuple[str, ...] = (),
    concepts: tuple[str, ...] = (),
    concept_source: str = ExtractConfig.concept_source,
    prompt_file: str | None = None,
    concept_contexts: int | None = None,
    concept_window: int = ExtractConfig.concept_window,
    min_concept_tokens: int = ExtractConfig.min_concept_tokens,
    corpus: str | None = DEFAULT_CORPUS,
    corpus_max_tokens: int | None = None,
    batch_size: int = ExtractConfig.batch_size,
    corpus_batch_size: int = ExtractConfig.corpus_batch_size,
    corpus_seq_len: int = ExtractConfig.corpus_seq_len,
    corpus_dtype: str = ExtractConfig.corpus_dtype,
    stream_corpus: bool = ExtractConfig.stream_corpus,
    refresh: bool = False,
    arch: str = SAEStageConfig.architecture,
    expansion: int = SAEStageConfig.expansion,
    k: int = SAEStageConfig.k,
    steps: int = SAEStageConfig.n_steps,
    sae_batch_size: int = SAEStageConfig.batch_size,
    seed: int = SAEStageConfig.seed,
    no_dense: bool = False,
    dense_width: int | None = SAEStageConfig.dense_width,
    sae: tuple[str, ...] = (),
    noise_levels: tuple[float, ...] = StratifyConfig.noise_levels,
    replicates: int = StratifyConfig.replicates,
    noise_scale: str = StratifyConfig.noise_scale,
    noise_seed: int = StratifyConfig.seed,
    dask_address: str | None = None,
    workers: int = StratifyConfig.n_workers,
    encode_elements: int | None = None,
    umap_seeds: tuple[int, ...] = StructureStageConfig.seeds,
    min_cluster_size: int = StructureStageConfig.min_cluster_size,
    n_neighbors: int = StructureStageConfig.n_neighbors,
    umap_epochs: int = StructureStageConfig.n_epochs,
    objectives: tuple[str, ...] = InterventionStageConfig.objectives,
    alphas: tuple[float, ...] = InterventionStageConfig.alphas,
    intervention_steps: int = InterventionStageConfig.steps,
    intervention_lr: float = InterventionStageConfig.lr,
    max_clusters: int = InterventionStageConfig.max_clusters,
    max_cluster_tokens: int = InterventionStageConfig.max_cluster_tokens,
    paper_seeds: int = InterventionStageConfig.paper_seeds,
    paper_step_scale: float = InterventionStageConfig.paper_step_scale,
    causal_betas: tuple[float, ...] = CausalStageConfig.betas,
    causal_seeds: tuple[int, ...] = CausalStageConfig.seeds,
    causal_steps: int = CausalStageConfig.steps,
    causal_clusters: int = CausalStageConfig.n_clusters,
    causal_init: str = CausalStageConfig.init,
    stages: tuple[str, ...] = STAGES,
) -> None:
    """`saema run` as a deployment: each parameter is the `saema run` option of the same name (see
    `saema run --help`), `models` is `--model`, `prompt_file` is `--prompts`, `sae` holds `HOOK=PATH`
    strings as `--sae` does, and `stages` limits the run (e.g. up to stratify). Every parameter is
    JSON, so a schedule or a one-off run from the UI can carry it; the run is checked as the command
    line checks it before any work starts.

    Several `models` run one after the other into the one store `out`. Paths (`out`, `corpus`,
    `prompt_file`, `sae` folders, a local model folder) are relative to the deployment's working
    directory: the repository root that `prefect deploy --all` ran in.
    """
    parameters = dict(locals())
    from saema.cli import pipeline_config

    stages = tuple(parameters.pop("stages"))
    if not models:
        raise ValueError("models is empty: name at least one model")
    args = run_arguments(parameters)
    set_encode_elements(args.encode_elements)  # before the Dask workers start: they inherit it
    configs = [pipeline_config(args, name) for name in dict.fromkeys(args.model)]
    for cfg in configs:
        preflight(cfg, stages)
    if len(configs) == 1:
        with tags(*config_tags(configs[0])):
            saema_pipeline(configs[0], stages=stages)
    else:
        saema_models(configs, stages=stages)
    report = f"{out.rstrip('/')}/report.html" if "report" in stages else None
    publish_run_summary(out, run_cells(configs), report)
