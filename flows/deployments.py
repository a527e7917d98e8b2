"""Entry points for `prefect.yaml` deployments: the pipeline with plain, schedulable parameters."""

from __future__ import annotations

from prefect import flow

from flows.config import (
    DEFAULT_OUT,
    CausalStageConfig,
    ExtractConfig,
    PipelineConfig,
    SAEStageConfig,
    StratifyConfig,
    shared_concept_contexts,
)
from flows.pipeline import STAGES, saema_models, saema_pipeline
from storage.corpus import DEFAULT_CORPUS
from storage.models import DEFAULT_MODEL, ModelSpec


@flow(name="saema-scheduled")
def scheduled_pipeline(
    models: tuple[str, ...] = (DEFAULT_MODEL,),
    hooks: tuple[str, ...] = (),
    concepts: tuple[str, ...] = (),
    out: str = DEFAULT_OUT,
    corpus: str | None = DEFAULT_CORPUS,
    corpus_max_tokens: int | None = None,
    concept_source: str = ExtractConfig.concept_source,
    concept_contexts: int | None = None,
    sae_steps: int = SAEStageConfig.n_steps,
    sae_batch_size: int = SAEStageConfig.batch_size,
    noise_levels: tuple[float, ...] = StratifyConfig.noise_levels,
    replicates: int = StratifyConfig.replicates,
    causal_betas: tuple[float, ...] = CausalStageConfig.betas,
    causal_seeds: tuple[int, ...] = CausalStageConfig.seeds,
    causal_steps: int = CausalStageConfig.steps,
    dask_address: str | None = None,
    n_workers: int = StratifyConfig.n_workers,
    stages: tuple[str, ...] = STAGES,
) -> None:
    """`saema run` for a deployment: every parameter is JSON (tuples are JSON arrays), so a schedule
    (or a one-off run with overrides, e.g. a small `corpus_max_tokens`, `sae_steps` and `stages` up
    to stratify) can carry it. Several `models` run one after the other into the one store `out`
    (`saema_models`), each on `hooks` (empty: each model's own default hooks). Empty `concepts`: all
    built-in concepts.

    Paths (`out`, `corpus`, a local `model` folder) are relative to the working directory of the
    deployment: the repository root that `prefect deploy --all` ran in.
    """
    if not models:
        raise ValueError("models is empty: name at least one model")
    configs = [PipelineConfig(
        extract=ExtractConfig(out=out, model=ModelSpec(name=model), hooks=tuple(hooks),
                              concepts=tuple(concepts), corpus=corpus,
                              corpus_max_tokens=corpus_max_tokens, concept_source=concept_source,
                              concept_contexts=concept_contexts or (
                                  shared_concept_contexts(models) if len(models) > 1 else None)),
        sae=SAEStageConfig(n_steps=sae_steps, batch_size=sae_batch_size),
        stratify=StratifyConfig(noise_levels=tuple(noise_levels), replicates=replicates,
                                dask_address=dask_address, n_workers=n_workers),
        causal=CausalStageConfig(betas=tuple(causal_betas), seeds=tuple(causal_seeds), steps=causal_steps))
        for model in dict.fromkeys(models)]
    if len(configs) == 1:
        saema_pipeline(configs[0], stages=tuple(stages))
    else:
        saema_models(configs, stages=tuple(stages))
