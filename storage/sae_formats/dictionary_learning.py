"""dictionary_learning checkpoints (`ae.pt` + `config.json`) converted to SAELens names.

**dictionary_learning** (`ae.pt` + `config.json`, whose "trainer" block names the "dict_class").
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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from saema_core.sae import sae_class
from storage.sae_formats.common import (
    CheckpointError,
    ConvertedCheckpoint,
    _check_shapes,
    _check_tensor_names,
    _make_config,
    _read_json,
    _read_torch_state_dict,
    _required,
    _resolve_shapes,
)

DICTIONARY_LEARNING_CFG = "config.json"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"


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
