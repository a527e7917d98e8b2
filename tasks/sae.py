"""SAE tasks: train (or load) per hook, encode concepts into the latent store, evaluate."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.config import SAEStageConfig
from saema_core.sae import SAE
from saema_core.sae.sparse import chunk_rows, encode_csr
from saema_core.sae_metrics import ReconstructionMetricsAccumulator
from saema_core.sae_training import TrainingConfig, train_sae, training_sae_config
from saema_core.splice import CELossConfig, spliced_ce_losses
from storage import activation_store as store
from storage import latent_store
from storage.activation_store import model_slug
from storage.locations import basename, canonical, exists, join, read_text, write_text
from storage.models import ModelSpec, load_lm_head_model
from storage.provenance import config_hash, provenance
from storage.sae_checkpoints import load_sae, sae_hash, save_sae
from storage.sae_releases import resolve_checkpoint
from tasks.allocator import encode_elements
from tasks.progress import StageProgress
from tasks.training_tokens import training_batches

SAE_KINDS = ("sae", "dense_ae")
CE_SEQUENCES = 32  # held-out corpus sequences for the spliced-in CE loss: 3 forwards each
#: SAELens names: the score, then the loss without the SAE, with it spliced in, with the hook zeroed.
CE_LOSS_NAMES = ("ce_loss_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation")


@dataclass(frozen=True)
class SAERef:
    """Where an SAE lives and what it is: a small reference passed between tasks."""

    path: str
    sae_id: str
    kind: str  # "sae" | "dense_ae"
    hash: str
    hook: str
    d_sae: int = 0
    """Number of latents (0: not recorded)."""


def sae_id(cfg: SAEStageConfig, kind: str, width: int) -> str:
    if kind == "dense_ae":
        return f"dense-w{width}-s{cfg.seed}"
    k = f"-k{cfg.k}" if cfg.architecture == "topk" else ""
    return f"{cfg.architecture}-w{width}{k}-s{cfg.seed}"


def _training_key(cfg: SAEStageConfig, kind: str, width: int, corpus_hash: str, model_revision: str) -> str:
    fields = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoints", "train_dense", "dense_width")}
    dense = {"width": width} if kind == "dense_ae" else {}  # the SAE's own width is expansion × d_model
    return config_hash({**fields, **dense, "kind": kind, "corpus": corpus_hash, "model": model_revision})


def cached_sae(folder: str, key: str) -> SAE | None:
    """The SAE in `folder` (a path or fsspec URL) if it was trained with this training key."""
    cfg_file = join(folder, "cfg.json")
    if not exists(cfg_file):
        return None
    metadata = json.loads(read_text(cfg_file)).get("metadata", {})
    return load_sae(folder) if metadata.get("saema_training_key") == key else None


def _train(cfg: SAEStageConfig, kind: str, url: str, hook: str, d_model: int, width: int, metadata: dict,
           model: ModelSpec | None) -> tuple:
    architecture = "dense" if kind == "dense_ae" else cfg.architecture
    sae_cfg = training_sae_config(d_model, width, architecture, cfg.k, metadata)
    train_cfg = TrainingConfig(n_steps=cfg.n_steps, batch_size=cfg.batch_size, seed=cfg.seed,
                               dead_tokens_threshold=cfg.dead_tokens)
    batches = (torch.from_numpy(b) for b in
               training_batches(url, hook, cfg.holdout_fraction, cfg.batch_size, cfg.seed, model))
    with StageProgress(f"train {kind} {hook}", total=cfg.n_steps) as progress:
        result = train_sae(sae_cfg, train_cfg, batches, progress=lambda step, stats: progress.advance(1))
    return result.sae, result.history


@task(name="train-or-load-sae", task_run_name="sae {kind} {hook}", cache_policy=NO_CACHE)
def train_or_load_sae(out: str, model_name: str, hook: str, kind: str, cfg: SAEStageConfig,
                      width: int | None = None, model: ModelSpec | None = None) -> SAERef:
    """The user's checkpoint for this hook, a cached SAE with the same training key, or a new one.

    `width`: latents of the SAE to train (default expansion × d_model); the flow passes the dense
    control the width of the hook's SAE (`SAEStageConfig.dense_width` overrides it). `model`
    (default: `model_name` with default loading options) recomputes a streamed corpus's activations."""
    url = store.activation_store_url(out, model_name)
    corpus = store.open_activations(url, hook)
    d_model = corpus.sizes["d_model"]
    user_path = cfg.checkpoint_for(hook) if kind == "sae" else None
    if user_path:
        user_path = resolve_checkpoint(user_path)  # a SAELens release name → its cached folder
        sae = load_sae(user_path, expected_d_in=d_model)
        return SAERef(str(user_path), basename(str(user_path)), kind, sae_hash(sae), hook, sae.cfg.d_sae)
    width = width or cfg.expansion * d_model
    key = _training_key(cfg, kind, width, corpus.attrs["content_hash"], corpus.attrs["model_revision"])
    folder = canonical(join(out, "saes", model_slug(model_name), hook, sae_id(cfg, kind, width)))
    sae = cached_sae(folder, key)
    if sae is None:
        metadata = provenance(model_name=model_name, hook_name=hook, saema_training_key=key,
                              corpus_hash=corpus.attrs["content_hash"])
        sae, history = _train(cfg, kind, url, hook, d_model, width, metadata, model or ModelSpec(name=model_name))
        save_sae(sae, folder)
        write_text(join(folder, "training_history.json"), json.dumps(history.as_dict()))
    return SAERef(folder, basename(folder), kind, sae_hash(sae), hook, sae.cfg.d_sae)


@task(name="encode-concept", task_run_name="encode {concept} {ref.hook} {ref.kind}", cache_policy=NO_CACHE)
def encode_concept(out: str, model_name: str, concept: str, ref: SAERef) -> str:
    """Latents of a concept's analysed tokens → the latent store; skipped when already there."""
    acts = store.open_activations(store.activation_store_url(out, model_name), ref.hook, concept)
    key = config_hash({"sae": ref.hash, "activations": acts.attrs["content_hash"]})
    url, group = latent_store.latent_store_url(out, model_name), latent_store.latent_group(concept, ref.hook, ref.sae_id)
    if latent_store.latents_key(url, group) != key:
        mask, sae = acts["mask"].values, load_sae(ref.path)
        index, values = latent_store.pairs_of_csr(encode_csr(sae, acts.resid.values[mask], encode_elements()))
        coords = {name: acts[name].values[mask] for name in ("prompt_id", "position", "token_id", "token_str")}
        attrs = provenance(model=model_name, hook=ref.hook, concept=concept, sae_id=ref.sae_id,
                           sae_hash=ref.hash, sae_kind=ref.kind, d_sae=sae.cfg.d_sae,
                           cache_key=key)
        latent_store.write_latents(url, group, index, values, coords, attrs)
    return group


@task(name="evaluate-sae", task_run_name="evaluate {model_name} {ref.kind} {ref.hook}", cache_policy=NO_CACHE)
def evaluate_sae(out: str, model_name: str, ref: SAERef, holdout_fraction: float,
                 model: ModelSpec | None = None, ce_sequences: int = CE_SEQUENCES,
                 content: str = "", ce_reference: tuple[float, float] | None = None) -> dict[str, float | str]:
    """SAELens-named reconstruction metrics on the held-out corpus chunks, and the spliced-in CE loss
    on up to `ce_sequences` held-out sequences (NaN with `ce_loss_reason` when it cannot be computed).

    `content` fingerprints the corpus activations read (part of the cache key, see tasks/caching.py);
    `ce_reference` is the (clean, zero-ablation) loss pair of the same sequences when already known."""
    url = store.activation_store_url(out, model_name)
    sae = load_sae(ref.path)
    _, held_out = store.corpus_chunks(url, ref.hook, holdout_fraction)
    metrics = ReconstructionMetricsAccumulator(sae.cfg.d_sae)
    rows = chunk_rows(sae.cfg.d_sae, encode_elements())  # tokens × d_sae held at once: a set budget
    with torch.inference_mode():
        for region in held_out:
            tokens = torch.from_numpy(store.read_region(url, ref.hook, region))
            for x in tokens.split(rows):
                latents, reconstruction = sae(x)
                metrics.update(x, reconstruction, latents)
    result = metrics.compute()
    values = {name: float(getattr(result, name)) for name in
              ("mse", "explained_variance", "cossim", "l0", "l1", "dead_fraction", "dense_fraction", "n_tokens")}
    spec = model or ModelSpec(name=model_name)
    return {**values, **ce_loss_values(url, ref.hook, held_out, sae, spec, ce_sequences, ce_reference)}


def _held_out_sequences(corpus, held_out: list[slice], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and analysed-token mask (sequences, seq_len) of the first `n` held-out sequences of
    the corpus group (a lazy xarray Dataset).

    Corpus chunks are whole sequences (row-major sequence × position, no padding), so a chunk reshapes
    to (rows, seq_len); the mask is False exactly at the special tokens.
    """
    seq_len = int(corpus.attrs["seq_len"])
    ids, analysed = [], []
    for region in held_out:
        ids.append(corpus["token_id"][region].values.reshape(-1, seq_len))
        analysed.append(corpus["mask"][region].values.reshape(-1, seq_len))
        if sum(len(rows) for rows in ids) >= n:
            break
    return torch.from_numpy(np.concatenate(ids)[:n]), torch.from_numpy(np.concatenate(analysed)[:n])


def _ce_loss_nan(reason: str) -> dict[str, float | str]:
    return {**dict.fromkeys(CE_LOSS_NAMES, float("nan")), "ce_loss_reason": reason}


def ce_loss_values(url: str, hook: str, held_out: list[slice], sae: SAE, spec: ModelSpec,
                    n_sequences: int, reference: tuple[float, float] | None = None) -> dict[str, float | str]:
    """`ce_loss_score` and its three losses under SAELens names, or NaN and the reason.

    `reference`: the clean and zero-ablation losses of the same sequences (`sae_eval`'s), reused."""
    if not held_out:
        return _ce_loss_nan("no held-out corpus chunks to evaluate on")
    loaded = load_lm_head_model(spec)
    if loaded.lm is None:
        return _ce_loss_nan(loaded.reason)
    lm, corpus = loaded.lm, store.open_activations(url, hook)
    if lm.revision != corpus.attrs["model_revision"]:
        raise ValueError(f"{spec.name} {hook}: the LM-head checkpoint has revision {lm.revision}, but the "
                         f"activations were extracted from revision {corpus.attrs['model_revision']}; "
                         f"re-extract")
    ids, analysed = _held_out_sequences(corpus, held_out, n_sequences)
    losses = spliced_ce_losses(lm.model, hook, sae, ids, torch.ones_like(ids), ~analysed,
                               CELossConfig(kind=lm.kind), lm.tokenizer.mask_token_id, reference)
    values = (losses.score, losses.clean, losses.sae, losses.zero_ablation)
    return {**dict(zip(CE_LOSS_NAMES, values)), "ce_loss_reason": losses.reason}
