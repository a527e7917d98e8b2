"""SAE checkpoints on disk: read the ecosystem's formats, write saema's own as SAELens folders.

Formats read by `load_sae(path)` (detected from the files in the folder):

- **SAELens** (`cfg.json` + `sae_weights.safetensors`). Both the 6.x config (top-level "architecture",
  nested "metadata") and the older flat config ("activation_fn_str", "activation_fn_kwargs": {"k": ..},
  "hook_point"/"hook_name", "model_name" at top level; a missing "architecture" means "standard",
  activation "topk" means a TopK SAE, a boolean "normalize_activations" means
  "expected_average_only_in"/"none"), as SAELens 6's own `handle_pre_6_0_config` upgrades them.
  Tensors keep their names; a legacy all-ones `scaling_factor` tensor is dropped as SAELens does.
- **dictionary_learning** (`ae.pt` + `config.json`, whose "trainer" block names the "dict_class").
  Mapping to SAELens names (nn.Linear stores weight as [out, in]):

  | dict_class          | architecture | tensors read → SAELens names                                  |
  |---------------------|--------------|---------------------------------------------------------------|
  | AutoEncoder         | standard     | encoder.weight [d_sae,d_in]ᵀ → W_enc, encoder.bias → b_enc,    |
  |                     |              | decoder.weight [d_in,d_sae]ᵀ → W_dec, bias → b_dec            |
  | AutoEncoderTopK     | topk         | as AutoEncoder but b_dec → b_dec; buffer k → cfg k            |
  |                     |              | (its inference-only `threshold` buffer is not used: encode()   |
  |                     |              | defaults to the top-k path)                                   |
  | BatchTopKSAE        | jumprelu     | as AutoEncoderTopK; its encode() defaults to the learned       |
  |                     |              | scalar threshold, so threshold → threshold [d_sae] (filled)   |
  | JumpReluAutoEncoder | jumprelu     | W_enc, b_enc, W_dec, b_dec, threshold (already SAELens names) |
  | GatedAutoEncoder    | gated        | encoder.weightᵀ → W_enc, gate_bias → b_gate, r_mag → r_mag,   |
  |                     |              | mag_bias → b_mag, decoder.weightᵀ → W_dec,                    |
  |                     |              | decoder_bias → b_dec                                          |

  b_dec is subtracted from the input before encoding in all but JumpReluAutoEncoder, as in
  dictionary_learning's `encode`. Weights are taken as stored (no `normalize_decoder` reparametrisation),
  so latents equal dictionary_learning's `encode` of a raw state dict.
- **EleutherAI sparsify** (`cfg.json` + `sae.safetensors`): encoder.weight [num_latents, d_in]ᵀ → W_enc,
  encoder.bias → b_enc, W_dec [num_latents, d_in] → W_dec, b_dec → b_dec; TopK with cfg "k",
  num_latents = cfg "num_latents" or d_in · "expansion_factor"; b_dec subtracted from the input.
  Transcoders, skip connections and non-"topk" activations are refused.

`save_sae(sae, path)` writes a SAELens 6.x folder atomically (temporary folder beside the target, then
rename). Every problem with a folder is a `CheckpointError` whose message names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saema_core.sae import SAE, SAEConfig, build_sae, sae_class

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
DICTIONARY_LEARNING_CFG = "config.json"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"

#: Written into metadata when absent, so that SAELens ≥ 6 reads saema's cfg.json as a 6.x config
#: (without it SAELens would run its pre-6 upgrade and drop the metadata). It marks the file format.
SAELENS_FORMAT_VERSION = "6.0.0"

#: Top-level keys of a pre-6 SAELens config that SAELens 6 moves into "metadata".
_FLAT_SAELENS_METADATA_KEYS = (
    "model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
    "context_size", "seqpos_slice", "dataset_path", "sae_lens_version", "sae_lens_training_version",
)
_FLAT_SAELENS_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as an SAE; the message names the file."""


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """An SAE configuration and its tensors under SAELens names, before validation."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    weights_file: str
    """Where the tensors came from (named in error messages)."""
    cfg_file: str
    """Where the configuration came from (named in error messages)."""


# ----------------------------------------------------------------------------------------------
# Reading files


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read as JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file, device="cpu")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: cannot read as safetensors ({e})") from e


def _read_torch_state_dict(file: Path) -> dict[str, Tensor]:
    """A state dict saved with torch.save, loaded without executing pickled code."""
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{file}: cannot read as a torch state dict ({e})") from e
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{file}: expected a state dict of tensors, got {type(data).__name__}")
    return dict(data)


def _required(cfg: Mapping[str, Any], key: str, cfg_file: Path) -> Any:
    if cfg.get(key) is None:
        raise CheckpointError(f"{cfg_file}: missing required key {key!r}")
    return cfg[key]


def _make_config(cfg_file: Path, **fields: Any) -> SAEConfig:
    """SAEConfig(**fields), with its validation errors re-raised naming the config file."""
    try:
        return SAEConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


def _k_if_used(architecture: str, k: Any, cfg_file: Path) -> Any:
    """`k` for an architecture that uses it, else None (configs carry k for other architectures too)."""
    try:
        return k if sae_class(architecture).uses_k else None
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from e


# ----------------------------------------------------------------------------------------------
# SAELens


def _upgrade_flat_saelens_config(raw: Mapping[str, Any], cfg_file: Path) -> dict[str, Any]:
    """A pre-6 flat SAELens config in 6.x layout (after SAELens's own `handle_pre_6_0_config`)."""
    raw = {_FLAT_SAELENS_RENAMES.get(key, key): value for key, value in raw.items()}
    activation = raw.get("activation_fn_str", raw.get("activation_fn")) or "relu"
    architecture = raw.get("architecture") or "standard"
    k = raw.get("k")
    if activation == "topk":
        architecture = "topk"
        k = (raw.get("activation_fn_kwargs") or {}).get("k", k)
    elif activation != "relu":
        raise CheckpointError(
            f"{cfg_file}: activation_fn {activation!r} is not supported (relu or topk)"
        )
    normalize = raw.get("normalize_activations")
    if isinstance(normalize, bool):  # SAELens < 3 stored a flag for the April-update scaling
        normalize = "expected_average_only_in" if normalize else "none"
    metadata = {key: raw[key] for key in _FLAT_SAELENS_METADATA_KEYS if key in raw}
    return {**raw, "architecture": architecture, "k": k, "normalize_activations": normalize or "none",
            "metadata": metadata}


def _reject_unsupported_saelens_options(raw: Mapping[str, Any], cfg_file: Path) -> None:
    if raw.get("rescale_acts_by_decoder_norm"):
        raise CheckpointError(
            f"{cfg_file}: rescale_acts_by_decoder_norm=true is not supported; "
            "fold the decoder norms into the encoder first"
        )
    if raw.get("finetuning_scaling_factor"):
        raise CheckpointError(f"{cfg_file}: finetuning_scaling_factor=true is not supported")


def _saelens_config(raw: Mapping[str, Any], cfg_file: Path) -> SAEConfig:
    """SAEConfig of a SAELens cfg.json, 6.x or flat."""
    if "metadata" not in raw:
        raw = _upgrade_flat_saelens_config(raw, cfg_file)
    _reject_unsupported_saelens_options(raw, cfg_file)
    architecture = raw.get("architecture") or "standard"
    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{cfg_file}: 'metadata' must be an object, got {metadata!r}")
    return _make_config(
        cfg_file,
        architecture=architecture,
        d_in=_required(raw, "d_in", cfg_file),
        d_sae=_required(raw, "d_sae", cfg_file),
        k=_k_if_used(architecture, raw.get("k"), cfg_file),
        apply_b_dec_to_input=raw.get("apply_b_dec_to_input", True),
        normalize_activations=raw.get("normalize_activations") or "none",
        dtype=str(raw.get("dtype") or "float32").removeprefix("torch."),
        metadata={**metadata, "source_format": "saelens"},
    )


def _drop_unit_scaling_factor(tensors: dict[str, Tensor], weights_file: Path) -> dict[str, Tensor]:
    """SAELens wrote an all-ones `scaling_factor` for a while and drops it on load; so do we."""
    factor = tensors.get("scaling_factor")
    if factor is None:
        return tensors
    if not torch.all(factor == 1):
        raise CheckpointError(
            f"{weights_file}: tensor 'scaling_factor' is not all ones (a fine-tuning scaling "
            "factor), which is not supported"
        )
    return {name: t for name, t in tensors.items() if name != "scaling_factor"}


def _convert_saelens_dicts(
    raw_cfg: Mapping[str, Any], tensors: dict[str, Tensor], cfg_file: Path, weights_file: Path
) -> ConvertedCheckpoint:
    cfg = _saelens_config(raw_cfg, cfg_file)
    tensors = _drop_unit_scaling_factor(tensors, weights_file)
    return ConvertedCheckpoint(cfg, tensors, str(weights_file), str(cfg_file))


def _read_saelens(folder: Path) -> ConvertedCheckpoint:
    cfg_file, weights_file = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    return _convert_saelens_dicts(
        _read_json(cfg_file), _read_safetensors(weights_file), cfg_file, weights_file
    )


# ----------------------------------------------------------------------------------------------
# dictionary_learning


@dataclass(frozen=True)
class _DictionaryLearningLayout:
    """How one dictionary_learning `dict_class` maps onto a saema architecture."""

    architecture: str
    apply_b_dec_to_input: bool
    shapes: dict[str, tuple[str, ...]]
    """Source tensor name → shape in symbols "d_in" / "d_sae" (() for a scalar buffer)."""
    convert: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]
    check: Callable[[Mapping[str, Tensor], Path], None] | None = None
    """Extra validation of the source tensors (given the weights file for the message)."""


def _linear_ae_tensors(sd: Mapping[str, Tensor], b_dec: str) -> dict[str, Tensor]:
    return {
        "W_enc": sd["encoder.weight"].T.contiguous(),
        "b_enc": sd["encoder.bias"],
        "W_dec": sd["decoder.weight"].T.contiguous(),
        "b_dec": sd[b_dec],
    }


def _batch_topk_tensors(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    d_sae = sd["encoder.bias"].shape[0]
    return {**_linear_ae_tensors(sd, "b_dec"), "threshold": sd["threshold"].reshape(()).repeat(d_sae)}


def _gated_tensors(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {
        "W_enc": sd["encoder.weight"].T.contiguous(),
        "b_gate": sd["gate_bias"],
        "r_mag": sd["r_mag"],
        "b_mag": sd["mag_bias"],
        "W_dec": sd["decoder.weight"].T.contiguous(),
        "b_dec": sd["decoder_bias"],
    }


def _check_batch_topk_threshold(sd: Mapping[str, Tensor], weights_file: Path) -> None:
    if float(sd["threshold"]) < 0:
        raise CheckpointError(
            f"{weights_file}: BatchTopKSAE threshold is {float(sd['threshold'])} (< 0): no inference "
            "threshold was learned, so its per-token latents are undefined"
        )


_LINEAR_SHAPES = {
    "encoder.weight": ("d_sae", "d_in"), "encoder.bias": ("d_sae",), "decoder.weight": ("d_in", "d_sae"),
}
_TOPK_SHAPES = {**_LINEAR_SHAPES, "b_dec": ("d_in",), "k": (), "threshold": ()}

_DICTIONARY_LEARNING_LAYOUTS: dict[str, _DictionaryLearningLayout] = {
    "AutoEncoder": _DictionaryLearningLayout(
        "standard", True, {**_LINEAR_SHAPES, "bias": ("d_in",)},
        lambda sd: _linear_ae_tensors(sd, "bias"),
    ),
    "AutoEncoderTopK": _DictionaryLearningLayout(
        "topk", True, _TOPK_SHAPES, lambda sd: _linear_ae_tensors(sd, "b_dec")
    ),
    "BatchTopKSAE": _DictionaryLearningLayout(
        "jumprelu", True, _TOPK_SHAPES, _batch_topk_tensors, _check_batch_topk_threshold
    ),
    "JumpReluAutoEncoder": _DictionaryLearningLayout(
        "jumprelu", False,
        {"W_enc": ("d_in", "d_sae"), "b_enc": ("d_sae",), "W_dec": ("d_sae", "d_in"),
         "b_dec": ("d_in",), "threshold": ("d_sae",)},
        dict,
    ),
    "GatedAutoEncoder": _DictionaryLearningLayout(
        "gated", True,
        {"encoder.weight": ("d_sae", "d_in"), "gate_bias": ("d_sae",), "r_mag": ("d_sae",),
         "mag_bias": ("d_sae",), "decoder.weight": ("d_in", "d_sae"), "decoder_bias": ("d_in",)},
        _gated_tensors,
    ),
}


def _dictionary_learning_trainer(cfg_file: Path) -> dict[str, Any]:
    trainer = _read_json(cfg_file).get("trainer")
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{cfg_file}: missing the 'trainer' object of a dictionary_learning config")
    return trainer


def _dictionary_learning_layout(trainer: Mapping[str, Any], cfg_file: Path) -> _DictionaryLearningLayout:
    dict_class = _required(trainer, "dict_class", cfg_file)
    layout = _DICTIONARY_LEARNING_LAYOUTS.get(dict_class)
    if layout is None:
        known = ", ".join(sorted(_DICTIONARY_LEARNING_LAYOUTS))
        raise CheckpointError(
            f"{cfg_file}: unknown dictionary_learning dict_class {dict_class!r}; known: {known}"
        )
    return layout


def _dictionary_learning_k(
    trainer: Mapping[str, Any], sd: Mapping[str, Tensor], cfg_file: Path, weights_file: Path
) -> int:
    buffer_k = int(sd["k"].item())
    cfg_k = trainer.get("k")
    if cfg_k is not None and int(cfg_k) != buffer_k:
        raise CheckpointError(
            f"{weights_file}: buffer k={buffer_k} contradicts k={cfg_k} in {cfg_file}"
        )
    return buffer_k




def _read_dictionary_learning(folder: Path) -> ConvertedCheckpoint:
    cfg_file, weights_file = folder / DICTIONARY_LEARNING_CFG, folder / DICTIONARY_LEARNING_WEIGHTS
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; dictionary_learning's ae.pt needs its config.json")
    trainer = _dictionary_learning_trainer(cfg_file)
    layout = _dictionary_learning_layout(trainer, cfg_file)
    dims = {"d_in": _required(trainer, "activation_dim", cfg_file),
            "d_sae": _required(trainer, "dict_size", cfg_file)}
    sd = _read_torch_state_dict(weights_file)
    _check_tensor_names(sd, set(layout.shapes), weights_file)
    _check_shapes(sd, _resolve_shapes(layout.shapes, dims), weights_file, cfg_file, dims)
    uses_k = sae_class(layout.architecture).uses_k
    k = _dictionary_learning_k(trainer, sd, cfg_file, weights_file) if uses_k else None
    if layout.check is not None:
        layout.check(sd, weights_file)
    metadata = {key: trainer[key] for key in ("dict_class", "layer", "submodule_name") if key in trainer}
    if "lm_name" in trainer:
        metadata["model_name"] = trainer["lm_name"]
    cfg = _make_config(
        cfg_file, architecture=layout.architecture, k=k, apply_b_dec_to_input=layout.apply_b_dec_to_input,
        metadata={**metadata, "source_format": "dictionary_learning"}, **dims,
    )
    return ConvertedCheckpoint(cfg, layout.convert(sd), str(weights_file), str(cfg_file))


# ----------------------------------------------------------------------------------------------
# EleutherAI sparsify


def _sparsify_num_latents(raw: Mapping[str, Any], d_in: int, cfg_file: Path) -> int:
    num_latents = raw.get("num_latents") or 0
    if num_latents:
        return num_latents
    expansion = raw.get("expansion_factor")
    if not expansion:
        raise CheckpointError(f"{cfg_file}: neither 'num_latents' nor 'expansion_factor' is set")
    return d_in * expansion


def _reject_unsupported_sparsify_options(raw: Mapping[str, Any], cfg_file: Path) -> None:
    if raw.get("transcode"):
        raise CheckpointError(f"{cfg_file}: a sparsify transcoder (transcode=true) is not an autoencoder")
    if raw.get("skip_connection"):
        raise CheckpointError(f"{cfg_file}: sparsify skip connections (W_skip) are not supported")
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise CheckpointError(f"{cfg_file}: sparsify activation {activation!r} is not supported (topk)")


def _read_sparsify(folder: Path) -> ConvertedCheckpoint:
    cfg_file, weights_file = folder / SPARSIFY_CFG, folder / SPARSIFY_WEIGHTS
    raw = _read_json(cfg_file)
    _reject_unsupported_sparsify_options(raw, cfg_file)
    d_in = _required(raw, "d_in", cfg_file)
    dims = {"d_in": d_in, "d_sae": _sparsify_num_latents(raw, d_in, cfg_file)}
    shapes = {"encoder.weight": ("d_sae", "d_in"), "encoder.bias": ("d_sae",),
              "W_dec": ("d_sae", "d_in"), "b_dec": ("d_in",)}
    sd = _read_safetensors(weights_file)
    _check_tensor_names(sd, set(shapes), weights_file)
    _check_shapes(sd, _resolve_shapes(shapes, dims), weights_file, cfg_file, dims)
    cfg = _make_config(
        cfg_file, architecture="topk", k=_required(raw, "k", cfg_file), apply_b_dec_to_input=True,
        metadata={"source_format": "sparsify", "hookpoint": folder.name}, **dims,
    )
    tensors = {"W_enc": sd["encoder.weight"].T.contiguous(), "b_enc": sd["encoder.bias"],
               "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    return ConvertedCheckpoint(cfg, tensors, str(weights_file), str(cfg_file))


# ----------------------------------------------------------------------------------------------
# Validation shared by every format


def _resolve_shapes(shapes: Mapping[str, tuple[str, ...]], dims: Mapping[str, int]) -> dict[str, tuple]:
    return {name: tuple(dims[s] for s in symbols) for name, symbols in shapes.items()}


def _check_tensor_names(tensors: Mapping[str, Tensor], expected: set[str], weights_file: Any) -> None:
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise CheckpointError(
            f"{weights_file}: tensor keys do not match: missing {missing}, unexpected {extra}"
        )


def _check_shapes(
    tensors: Mapping[str, Tensor], expected: Mapping[str, tuple], weights_file: Any, cfg_file: Any,
    dims: Mapping[str, Any],
) -> None:
    """Every tensor has the shape its config implies; else the config contradicts the weights."""
    for name, shape in expected.items():
        actual = tuple(tensors[name].shape)
        if actual != tuple(shape):
            said = ", ".join(f"{key}={value}" for key, value in dims.items())
            raise CheckpointError(
                f"{weights_file}: tensor {name!r} has shape {actual}, but {cfg_file} says {said}, "
                f"which implies {tuple(shape)}"
            )


def _check_finite(tensors: Mapping[str, Tensor], weights_file: Any) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{weights_file}: tensor {name!r} has {n_bad} NaN/Inf values")


def _build_checked(checkpoint: ConvertedCheckpoint, where: str, expected_d_in: int | None) -> SAE:
    cfg = checkpoint.cfg
    shapes = sae_class(cfg.architecture).parameter_shapes(cfg)
    _check_tensor_names(checkpoint.tensors, set(shapes), checkpoint.weights_file)
    dims = {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae}
    _check_shapes(checkpoint.tensors, shapes, checkpoint.weights_file, checkpoint.cfg_file, dims)
    _check_finite(checkpoint.tensors, checkpoint.weights_file)
    if expected_d_in is not None and cfg.d_in != expected_d_in:
        raise CheckpointError(
            f"{where}: the SAE reads d_in={cfg.d_in} activations, but d_in={expected_d_in} was expected "
            f"(d_model at the hook)"
        )
    sae = build_sae(cfg)
    sae.load_saelens_tensors(checkpoint.tensors)
    return sae.eval().requires_grad_(False)  # inference only; gradients w.r.t. inputs still flow


# ----------------------------------------------------------------------------------------------
# Public API

#: format name → (files that identify it, reader); detection tries them in this order.
_FORMATS: dict[str, tuple[tuple[str, ...], Callable[[Path], ConvertedCheckpoint]]] = {
    "saelens": ((SAELENS_CFG, SAELENS_WEIGHTS), _read_saelens),
    "sparsify": ((SPARSIFY_CFG, SPARSIFY_WEIGHTS), _read_sparsify),
    "dictionary_learning": ((DICTIONARY_LEARNING_WEIGHTS,), _read_dictionary_learning),
}


def detect_format(path: str | os.PathLike[str]) -> str:
    """"saelens", "sparsify" or "dictionary_learning", from the files in the folder `path`."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (an SAE checkpoint is a folder of files)")
    for name, (files, _) in _FORMATS.items():
        if all((folder / file).is_file() for file in files):
            return name
    present = sorted(p.name for p in folder.iterdir())
    layouts = "; ".join(f"{name}: {' + '.join(files)}" for name, (files, _) in _FORMATS.items())
    raise CheckpointError(f"{folder}: not a known SAE checkpoint (found {present}; expected {layouts})")


def load_sae(path: str | os.PathLike[str], expected_d_in: int | None = None) -> SAE:
    """The SAE stored in the folder `path` (SAELens, dictionary_learning or sparsify format).

    The SAE is in eval mode with frozen parameters.

    `expected_d_in`: the width of the activations it will read (d_model at the hook); a mismatch is a
    CheckpointError. The SAE's `cfg.metadata["source_format"]` says which format it came from.
    """
    folder = Path(path)
    reader = _FORMATS[detect_format(folder)][1]
    return _build_checked(reader(folder), str(folder), expected_d_in)


def saelens_config_dict(cfg: SAEConfig) -> dict[str, Any]:
    """The SAELens 6.x cfg.json content of `cfg` (the "dense" architecture is saema's own)."""
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, **cfg.metadata}
    out: dict[str, Any] = {
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype,
        "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations, "reshape_activations": "none",
        "metadata": metadata,
    }
    if cfg.k is not None:
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    return out


def _write_folder(folder: Path, cfg_text: str, tensors: dict[str, Tensor]) -> None:
    save_file(tensors, folder / SAELENS_WEIGHTS)
    with open(folder / SAELENS_CFG, "w") as f:
        f.write(cfg_text)
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename the finished folder `new` to `target`, replacing an old checkpoint only once `new` is whole."""
    if not target.exists():
        os.rename(new, target)
        return
    if not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a folder; refusing to replace it")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)  # put the good checkpoint back before reporting the failure
        raise
    shutil.rmtree(old)


def save_sae(sae: SAE, path: str | os.PathLike[str]) -> Path:
    """Write `sae` as a SAELens 6.x folder (cfg.json + sae_weights.safetensors) at `path`, atomically.

    Files are written into a temporary folder beside `path` and renamed into place, so a failed save
    never leaves a half-written checkpoint where a good one was. NaN/Inf weights are refused.
    """
    target = Path(path)
    tensors = sae.state_dict_saelens()
    _check_finite(tensors, target)
    try:
        cfg_text = json.dumps(saelens_config_dict(sae.cfg), indent=2)
    except TypeError as e:
        raise CheckpointError(f"{target / SAELENS_CFG}: metadata is not JSON-serialisable ({e})") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_folder(staging, cfg_text, tensors)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only the staging copy; the error propagates
        raise
    return target


def _computation_fields(cfg: SAEConfig) -> dict[str, Any]:
    """The config fields that change what the SAE computes (metadata does not)."""
    return {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
            "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
            "normalize_activations": cfg.normalize_activations}


def sae_hash(sae: SAE) -> str:
    """SHA-256 (hex) over the SAE's tensors (name, dtype, shape, bytes) and its computing config.

    Two SAEs with the same hash encode identically; provenance metadata does not enter the hash.
    """
    digest = hashlib.sha256(json.dumps(_computation_fields(sae.cfg), sort_keys=True).encode())
    for name, param in sorted(sae.named_parameters()):
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_sae_from_release(release: str, sae_id: str, expected_d_in: int | None = None) -> SAE:
    """An SAE from a SAELens pretrained release (needs the optional `sae-lens` package and network).

    Raises CheckpointError saying why when sae-lens is not installed or the Hub cannot be reached;
    a downloaded folder can always be read with `load_sae` instead.
    """
    where = f"SAELens release {release!r}, sae_id {sae_id!r}"
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise CheckpointError(
            f"{where}: the optional package sae-lens is not installed (pip install 'saema[saelens]'); "
            "alternatively download the folder and use load_sae(path)"
        ) from e
    try:
        remote = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except OSError as e:
        raise CheckpointError(f"{where}: cannot download it, no network access to the Hub? ({e})") from e
    tensors = {name: t.detach().to("cpu") for name, t in remote.state_dict().items()}
    checkpoint = _convert_saelens_dicts(remote.cfg.to_dict(), tensors, Path(where), Path(where))
    return _build_checked(checkpoint, where, expected_d_in)
