"""Flow: per hook, an SAE and its dense control → latents of every concept → evaluation."""

from __future__ import annotations

import numpy as np
import xarray as xr
from prefect import flow

from flows.config import SAEStageConfig
from storage.activation_store import activation_store_url, content_hash
from storage.models import ModelSpec, load_model
from storage.results import write_group
from tasks.artifacts import publish_table
from tasks.caching import cached
from tasks.sae import SAE_KINDS, SAERef, encode_concept, evaluate_sae, train_or_load_sae

METRICS = {
    "mse": ("mean squared reconstruction error per token (sum over d_model)", "activation²"),
    "explained_variance": ("1 − residual variance / activation variance", "1"),
    "cossim": ("mean cosine similarity of reconstruction and activation", "1"),
    "l0": ("mean number of active latents per token", "latents"),
    "l1": ("mean L1 norm of the latents per token", "activation"),
    "dead_fraction": ("fraction of latents that never fire on the held-out tokens", "1"),
    "dense_fraction": ("fraction of latents firing on more than 10% of held-out tokens", "1"),
    "n_tokens": ("held-out corpus tokens evaluated", "tokens"),
    "ce_loss_without_sae": ("the model's own LM loss on held-out corpus sequences (next-token or masked)",
                            "nats/token"),
    "ce_loss_with_sae": ("the LM loss with the SAE reconstruction spliced in at the hook", "nats/token"),
    "ce_loss_with_ablation": ("the LM loss with the hook's residual stream zeroed", "nats/token"),
}
CE_LOSS_SCORE = ("(zero-ablation CE − spliced CE) / (zero-ablation CE − clean CE); reconstruction and "
                 "zero ablation replace non-special tokens only")


def sae_eval_dataset(model_name: str, refs: list[SAERef], metrics: list[dict]) -> xr.Dataset:
    """The `sae_eval` group: metrics per (model, hook, sae kind)."""
    hooks = list(dict.fromkeys(ref.hook for ref in refs))
    kinds = [k for k in SAE_KINDS if any(ref.kind == k for ref in refs)]
    shape = (1, len(hooks), len(kinds))
    data = {name: np.full(shape, np.nan) for name in METRICS}
    ids = np.full(shape, "", dtype=object)
    for ref, values in zip(refs, metrics):
        cell = (0, hooks.index(ref.hook), kinds.index(ref.kind))
        ids[cell] = ref.sae_id
        for name in METRICS:
            data[name][cell] = values[name]
    variables = {name: (("model", "hook", "sae"), data[name], {"long_name": name, "description": d, "units": u})
                 for name, (d, u) in METRICS.items()}
    variables["sae_id"] = (("model", "hook", "sae"), ids, {"description": "SAE checkpoint folder name"})
    variables["ce_loss_score"] = ce_loss_score_variable(refs, metrics, hooks, kinds)
    return xr.Dataset(variables, coords={"model": [model_name], "hook": hooks, "sae": kinds})


def model_provenance(model: ModelSpec | None) -> dict:
    """Where the model under its readable `model` name came from: the folder or hub name, and revision."""
    loaded = load_model(model) if model is not None else None
    source = loaded.source if loaded else ""
    revision = loaded.revision if loaded else ""
    return {"model_source": ("model", [source], {"description": "the folder or hub name the model was loaded from"}),
            "model_revision": ("model", [revision], {"description": "hub commit or content hash of the folder"})}


def ce_loss_score_variable(refs: list[SAERef], metrics: list[dict], hooks: list[str],
                           kinds: list[str]) -> tuple:
    """`ce_loss_score` (model, hook, sae); a `reason` attribute, naming the cells, only where it is NaN."""
    score = np.full((1, len(hooks), len(kinds)), np.nan)
    reasons: dict[str, list[str]] = {}
    for ref, values in zip(refs, metrics):
        score[0, hooks.index(ref.hook), kinds.index(ref.kind)] = values["ce_loss_score"]
        if np.isnan(values["ce_loss_score"]):
            reasons.setdefault(values["ce_loss_reason"], []).append(f"{ref.hook} {ref.kind}")
    attrs = {"long_name": "ce_loss_score", "units": "1", "description": CE_LOSS_SCORE}
    if reasons:
        attrs["reason"] = "; ".join(f"{reason} ({', '.join(cells)})" for reason, cells in reasons.items())
    return ("model", "hook", "sae"), score, attrs


@flow(name="saema-sae", flow_run_name="sae · {model_name}", log_prints=True)
def sae_flow(out: str, model_name: str, hooks: tuple[str, ...], concepts: tuple[str, ...],
             cfg: SAEStageConfig = SAEStageConfig(), model: ModelSpec | None = None,
             refresh: bool = False) -> list[SAERef]:
    """Train or load the SAEs, encode every concept, evaluate on held-out corpus tokens.

    `model` (default: `model_name` with default loading options) loads the LM-head checkpoint for the
    spliced-in CE loss; pass the extraction's spec so dtype, device and trust_remote_code match.
    """
    refs = []
    for hook in hooks:
        refs.append(train_or_load_sae(out, model_name, hook, "sae", cfg, model=model))
        if cfg.train_dense:  # the control has the SAE's width unless the user set another
            width = cfg.dense_width or refs[-1].d_sae
            refs.append(train_or_load_sae(out, model_name, hook, "dense_ae", cfg, width=width, model=model))
    for ref in refs:
        for concept in concepts:
            encode_concept(out, model_name, concept, ref)
    evaluate = cached(evaluate_sae, out, refresh)
    corpus = {hook: content_hash(activation_store_url(out, model_name), hook) for hook in hooks}
    metrics, references = [], {}
    for ref in refs:  # the SAE first: the dense control reuses its clean and zero-ablation losses
        values = evaluate(out, model_name, ref, cfg.holdout_fraction, model, content=corpus[ref.hook],
                          ce_reference=references.get(ref.hook))
        if np.isfinite(values["ce_loss_score"]):
            references.setdefault(ref.hook, (values["ce_loss_without_sae"], values["ce_loss_with_ablation"]))
        metrics.append(values)
    evaluation = sae_eval_dataset(model_name, refs, metrics).assign(model_provenance(model))
    write_group(out, "sae_eval", evaluation)
    publish_table(f"sae-eval-{model_name}", evaluation.drop_vars(["sae_id"]).to_dataframe(),
                  "SAE and dense-AE reconstruction on held-out corpus tokens")
    for ref, values in zip(refs, metrics):
        print(f"{ref.hook} {ref.kind} {ref.sae_id}: EV {values['explained_variance']:.3f}, "
              f"L0 {values['l0']:.1f}, dead {values['dead_fraction']:.3f}, "
              f"CE loss score {values['ce_loss_score']:.3f}")
    return refs
