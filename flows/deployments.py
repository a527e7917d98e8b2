"""Entry points for `prefect.yaml` deployments: the pipeline with plain, schedulable parameters."""

from __future__ import annotations

from prefect import flow

from flows.config import (DEFAULT_HOOKS, DEFAULT_OUT, ExtractConfig, PipelineConfig, SAEStageConfig,
                          StratifyConfig)
from flows.pipeline import saema_pipeline
from storage.models import DEFAULT_MODEL, ModelSpec


@flow(name="saema-scheduled")
def scheduled_pipeline(
    model: str = DEFAULT_MODEL,
    hooks: list[str] = list(DEFAULT_HOOKS),
    concepts: list[str] | None = None,
    out: str = DEFAULT_OUT,
    sae_steps: int = SAEStageConfig.n_steps,
    replicates: int = StratifyConfig.replicates,
    dask_address: str | None = None,
) -> None:
    """`saema run` for a deployment: every parameter is JSON, so a schedule can carry it."""
    cfg = PipelineConfig(
        extract=ExtractConfig(out=out, model=ModelSpec(name=model), hooks=tuple(hooks),
                              concepts=tuple(concepts or ())),
        sae=SAEStageConfig(n_steps=sae_steps),
        stratify=StratifyConfig(replicates=replicates, dask_address=dask_address))
    saema_pipeline(cfg)
