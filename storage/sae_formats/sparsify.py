"""EleutherAI sparsify checkpoints converted to SAELens names.

**EleutherAI sparsify** (`cfg.json` + `sae.safetensors`): encoder.weight [num_latents, d_in]ᵀ → W_enc,
encoder.bias → b_enc, W_dec [num_latents, d_in] → W_dec, b_dec → b_dec; TopK with cfg "k",
num_latents = cfg "num_latents" or d_in · "expansion_factor"; b_dec subtracted from the input.
Transcoders, skip connections and non-"topk" activations are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from storage.sae_formats.common import (
    CheckpointError,
    ConvertedCheckpoint,
    _check_shapes,
    _check_tensor_names,
    _make_config,
    _read_json,
    _read_safetensors,
    _required,
    _resolve_shapes,
)

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"


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
