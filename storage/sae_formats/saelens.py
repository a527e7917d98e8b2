"""SAELens checkpoints: read a folder or a downloaded SAE's dicts into SAELens-named tensors.

**SAELens** (`cfg.json` + `sae_weights.safetensors`). Both the 6.x config (top-level "architecture",
nested "metadata") and the older flat config ("activation_fn_str", "activation_fn_kwargs": {"k": ..},
"hook_point"/"hook_name", "model_name" at top level; a missing "architecture" means "standard",
activation "topk" means a TopK SAE, a boolean "normalize_activations" means
"expected_average_only_in"/"none"), as SAELens 6's own `handle_pre_6_0_config` upgrades them.
Tensors keep their names; a legacy all-ones `scaling_factor` tensor is dropped as SAELens does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saema_core.sae import SAEConfig
from storage.sae_formats.common import (
    CheckpointError,
    ConvertedCheckpoint,
    _k_if_used,
    _make_config,
    _read_json,
    _read_safetensors,
    _required,
)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

#: Top-level keys of a pre-6 SAELens config that SAELens 6 moves into "metadata".
_FLAT_SAELENS_METADATA_KEYS = (
    "model_name", "hook_name", "hook_layer", "hook_head_index", "model_class_name",
    "model_from_pretrained_kwargs", "prepend_bos", "exclude_special_tokens", "neuronpedia_id",
    "context_size", "seqpos_slice", "dataset_path", "sae_lens_version", "sae_lens_training_version",
)
_FLAT_SAELENS_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}


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
