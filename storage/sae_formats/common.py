"""What every SAE checkpoint reader shares: the error type, the converted result, file reading, checks.

Every problem with a folder is a `CheckpointError` whose message names the file.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from saema_core.errors import SaemaError
from saema_core.sae import SAEConfig, sae_class


class CheckpointError(SaemaError):
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
