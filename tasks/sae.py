"""SAE tasks: train (or load) per hook, encode concepts into the latent store, evaluate."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import SAEStageConfig
from saema_core.sae import SAE
from saema_core.sae_metrics import ReconstructionMetricsAccumulator
from saema_core.sae_training import TrainingConfig, train_sae, training_sae_config
from storage import activation_store as store
from storage import latent_store
from storage.activation_store import model_slug
from storage.provenance import config_hash, provenance
from storage.sae_checkpoints import load_sae, sae_hash, save_sae
from tasks.progress import StageProgress

SAE_KINDS = ("sae", "dense_ae")
ENCODE_BATCH = 4096


@dataclass(frozen=True)
class SAERef:
    """Where an SAE lives and what it is: a small reference passed between tasks."""

    path: str
    sae_id: str
    kind: str  # "sae" | "dense_ae"
    hash: str
    hook: str


def sae_id(cfg: SAEStageConfig, kind: str, d_model: int) -> str:
    width = cfg.expansion * d_model
    if kind == "dense_ae":
        return f"dense-w{width}-s{cfg.seed}"
    k = f"-k{cfg.k}" if cfg.architecture == "topk" else ""
    return f"{cfg.architecture}-w{width}{k}-s{cfg.seed}"


def _training_key(cfg: SAEStageConfig, kind: str, corpus_hash: str, model_revision: str) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoints", "train_dense")}
    return config_hash({**fields, "kind": kind, "corpus": corpus_hash, "model": model_revision})


def _cached_sae(folder: Path, key: str) -> SAE | None:
    cfg_file = folder / "cfg.json"
    if not cfg_file.is_file():
        return None
    metadata = json.loads(cfg_file.read_text()).get("metadata", {})
    return load_sae(folder) if metadata.get("saema_training_key") == key else None


def _train(cfg: SAEStageConfig, kind: str, url: str, hook: str, d_model: int, metadata: dict) -> tuple:
    architecture = "dense" if kind == "dense_ae" else cfg.architecture
    sae_cfg = training_sae_config(d_model, cfg.expansion * d_model, architecture, cfg.k, metadata)
    train_cfg = TrainingConfig(n_steps=cfg.n_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                               dead_tokens_threshold=cfg.dead_tokens)
    regions, _ = store.corpus_chunks(url, hook, cfg.holdout_fraction)
    batches = (torch.from_numpy(b) for b in
               store.training_batches(url, hook, regions, cfg.batch_size, cfg.seed))
    with StageProgress(f"train {kind} {hook}", total=cfg.n_steps) as progress:
        result = train_sae(sae_cfg, train_cfg, batches, progress=lambda step, stats: progress.advance(1))
    return result.sae, result.history


@task(name="train-or-load-sae", task_run_name="sae {kind} {hook}", cache_policy=NO_CACHE)
def train_or_load_sae(out: str, model_name: str, hook: str, kind: str, cfg: SAEStageConfig) -> SAERef:
    """The user's checkpoint for this hook, a cached SAE with the same training key, or a new one."""
    url = store.activation_store_url(out, model_name)
    corpus = store.open_activations(url, hook)
    d_model = corpus.sizes["d_model"]
    user_path = cfg.checkpoint_for(hook) if kind == "sae" else None
    if user_path:
        sae = load_sae(user_path, expected_d_in=d_model)
        return SAERef(str(user_path), Path(user_path).name, kind, sae_hash(sae), hook)
    key = _training_key(cfg, kind, corpus.attrs["content_hash"], corpus.attrs["model_revision"])
    folder = Path(out) / "saes" / model_slug(model_name) / hook / sae_id(cfg, kind, d_model)
    sae = _cached_sae(folder, key)
    if sae is None:
        metadata = provenance(model_name=model_name, hook_name=hook, saema_training_key=key,
                              corpus_hash=corpus.attrs["content_hash"])
        sae, history = _train(cfg, kind, url, hook, d_model, metadata)
        save_sae(sae, folder)
        (folder / "training_history.json").write_text(json.dumps(history.as_dict()))
    return SAERef(str(folder), folder.name, kind, sae_hash(sae), hook)


def _encode(sae: SAE, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([sae.encode(torch.from_numpy(x[i : i + ENCODE_BATCH])).numpy()
                               for i in range(0, max(len(x), 1), ENCODE_BATCH)])


@task(name="encode-concept", task_run_name="encode {concept} {ref.hook} {ref.kind}", cache_policy=NO_CACHE)
def encode_concept(out: str, model_name: str, concept: str, ref: SAERef) -> str:
    """Latents of a concept's analysed tokens → the latent store; skipped when already there."""
    acts = store.open_activations(store.activation_store_url(out, model_name), ref.hook, concept)
    key = config_hash({"sae": ref.hash, "activations": acts.attrs["content_hash"]})
    url, group = latent_store.latent_store_url(out, model_name), latent_store.latent_group(concept, ref.hook, ref.sae_id)
    if latent_store.latents_key(url, group) != key:
        mask, sae = acts["mask"].values, load_sae(ref.path)
        index, values = latent_store.to_pairs(_encode(sae, acts.resid.values[mask]))
        coords = {name: acts[name].values[mask] for name in ("prompt_id", "position", "token_id", "token_str")}
        attrs = provenance(model=model_name, hook=ref.hook, concept=concept, sae_id=ref.sae_id,
                           sae_hash=ref.hash, sae_kind=ref.kind, d_sae=sae.cfg.d_sae,
                           cache_key=key)
        latent_store.write_latents(url, group, index, values, coords, attrs)
    return group


@task(name="evaluate-sae", task_run_name="evaluate {ref.kind} {ref.hook}", cache_policy=NO_CACHE)
def evaluate_sae(out: str, model_name: str, ref: SAERef, holdout_fraction: float) -> dict[str, float]:
    """SAELens-named reconstruction metrics on the held-out corpus chunks."""
    url = store.activation_store_url(out, model_name)
    sae = load_sae(ref.path)
    _, held_out = store.corpus_chunks(url, ref.hook, holdout_fraction)
    metrics = ReconstructionMetricsAccumulator(sae.cfg.d_sae)
    with torch.inference_mode():
        for region in held_out:
            x = torch.from_numpy(store.read_region(url, ref.hook, region))
            latents, reconstruction = sae(x)
            metrics.update(x, reconstruction, latents)
    result = metrics.compute()
    return {name: float(getattr(result, name)) for name in
            ("mse", "explained_variance", "cossim", "l0", "l1", "dead_fraction", "dense_fraction", "n_tokens")}
