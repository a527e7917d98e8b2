"""The end-to-end flow `saema_pipeline` (also `saema run`): every stage that exists, in order."""

from __future__ import annotations

from prefect import flow

from flows.config import ExtractConfig
from flows.extract import extract_flow


@flow(name="saema-pipeline", log_prints=True)
def saema_pipeline(cfg: ExtractConfig = ExtractConfig()) -> None:
    """prompts → activations (→ SAEs → stratification → structure → intervention → report)."""
    extract_flow(cfg)
