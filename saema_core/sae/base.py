"""The SAE configuration and the base class every SAE architecture derives from.

Parameters carry SAELens names and shapes (`W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`,
`b_dec [d_in]`; rows of `W_dec` are the decoder directions), so a SAELens `sae_weights.safetensors` loads
into them unchanged and `state_dict_saelens()` writes one back.

Encoding follows SAELens `SAE.process_sae_in` then the architecture's activation:

    sae_in = normalise(x) - b_dec · apply_b_dec_to_input
    latents = activation(sae_in @ W_enc + b_enc)
    reconstruction = denormalise(latents @ W_dec + b_dec)

Activation normalisation (`normalize_activations`), as SAELens 6 applies it at inference:

- ``"none"``: x is used as is.
- ``"expected_average_only_in"``: also x as is. In SAELens this mode rescales activations by one
  dataset-wide constant *during training* (so that E‖x‖ = √d_in) and that constant is folded into the
  weights when the SAE is saved; the inference-time SAE applies no per-token transform. A checkpoint
  still marked with this mode whose constant was never folded (SAELens then ships it separately as
  `norm_scaling_factor`) cannot be reproduced from its folder alone.
- ``"constant_norm_rescale"``: every token is rescaled to norm √d_in before encoding,
  x ← x · √d_in/‖x‖, and the reconstruction is divided by the same per-token factor. All-zero tokens
  keep norm 0 (the norm is clamped at machine epsilon instead of dividing by zero).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from saema_core.sae.registry import sae_class

#: Accepted values of `SAEConfig.normalize_activations` (see the module docstring for their meaning).
NORMALIZATIONS: tuple[str, ...] = ("none", "expected_average_only_in", "constant_norm_rescale")

#: `SAEConfig.dtype` strings (SAELens spelling) → torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _metadata_copy(metadata: object) -> dict[str, Any]:
    """A private dict copy of `metadata`, which must be a mapping."""
    try:
        return dict(metadata)  # type: ignore[call-overload]
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be a mapping, got {metadata!r}") from e


@dataclass(frozen=True)
class SAEConfig:
    """What defines an SAE's computation, plus free-form provenance.

    `architecture` must be registered (`saema_core.sae.SAE_REGISTRY`): built in are "standard" (ReLU),
    "topk", "jumprelu", "gated" and "dense" (the non-sparse control). `k` is required by, and only
    allowed for, top-k architectures.
    """

    architecture: str
    """Registered architecture name; SAELens `cfg.json` "architecture"."""
    d_in: int
    """Width of the activations the SAE reads (the model's d_model at the hook)."""
    d_sae: int
    """Number of latents."""
    k: int | None = None
    """Active latents per token of a top-k SAE; None for every other architecture."""
    apply_b_dec_to_input: bool = True
    """Subtract `b_dec` from the input before encoding (SAELens default True)."""
    normalize_activations: str = "none"
    """One of `NORMALIZATIONS`; see the module docstring."""
    dtype: str = "float32"
    """Parameter dtype, a key of `TORCH_DTYPES`."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Provenance (model_name, hook_name, source format, training settings...); never used to compute."""

    def __post_init__(self) -> None:
        cls = sae_class(self.architecture)
        _check_positive_int("d_in", self.d_in)
        _check_positive_int("d_sae", self.d_sae)
        self._check_k(cls.uses_k)
        if type(self.apply_b_dec_to_input) is not bool:
            raise ValueError(f"apply_b_dec_to_input must be a bool, got {self.apply_b_dec_to_input!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations must be one of {NORMALIZATIONS}, "
                f"got {self.normalize_activations!r}"
            )
        if self.dtype not in TORCH_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "metadata", _metadata_copy(self.metadata))

    def _check_k(self, uses_k: bool) -> None:
        if not uses_k:
            if self.k is not None:
                raise ValueError(
                    f"k={self.k!r} is only used by top-k architectures, not {self.architecture!r}"
                )
            return
        _check_positive_int("k", self.k)
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} cannot exceed d_sae={self.d_sae}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The parameters' torch dtype."""
        return TORCH_DTYPES[self.dtype]


class SAEOutput(NamedTuple):
    """What `SAE.forward` returns."""

    latents: Tensor
    """Latent activations, shape [..., d_sae]."""
    reconstruction: Tensor
    """Reconstruction of the input, shape [..., d_in], in the input's own units."""


class SAE(nn.Module):
    """Base of every architecture: SAELens-named parameters, encode / decode / forward.

    Subclasses set `architecture`, implement `activation` (or override `encode_sae_input`) and, when
    their parameters differ, `parameter_shapes`. Parameters start at zero; load or train them.
    """

    architecture: ClassVar[str] = ""
    uses_k: ClassVar[bool] = False
    """True for architectures that take `SAEConfig.k`."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if sae_class(cfg.architecture) is not type(self):
            raise ValueError(
                f"config architecture {cfg.architecture!r} is built by "
                f"{sae_class(cfg.architecture).__qualname__}, not {type(self).__qualname__}"
            )
        self.cfg = cfg
        for name, shape in self.parameter_shapes(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=cfg.torch_dtype)))

    @classmethod
    def parameter_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """SAELens tensor name → shape, exactly the keys of this architecture's safetensors file."""
        return {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }

    def input_scale(self, x: Tensor) -> Tensor | None:
        """Per-token factor [..., 1] that `constant_norm_rescale` multiplies x [..., d_in] by; else None."""
        if self.cfg.normalize_activations != "constant_norm_rescale":
            return None
        norm = x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).eps)
        return math.sqrt(self.cfg.d_in) / norm

    def sae_input(self, x: Tensor) -> Tensor:
        """x [..., d_in] as the encoder sees it: cast, rescaled if configured, minus b_dec if configured."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"{self.cfg.architecture} SAE expects inputs [..., d_in={self.cfg.d_in}], "
                f"got shape {tuple(x.shape)}"
            )
        x = x.to(self.W_dec.dtype)
        scale = self.input_scale(x)
        if scale is not None:
            x = x * scale
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def hidden_pre(self, sae_in: Tensor) -> Tensor:
        """Pre-activations [..., d_sae] = sae_in @ W_enc + b_enc."""
        return sae_in @ self.W_enc + self.b_enc

    def activation(self, hidden_pre: Tensor) -> Tensor:
        """The architecture's activation function, elementwise or per token, on [..., d_sae]."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement activation()")

    def encode_sae_input(self, sae_in: Tensor) -> Tensor:
        """Latents [..., d_sae] from an already pre-processed input (see `sae_input`)."""
        return self.activation(self.hidden_pre(sae_in))

    def encode(self, x: Tensor) -> Tensor:
        """Latents [..., d_sae] of activations x [..., d_in]."""
        return self.encode_sae_input(self.sae_input(x))

    def decode(self, latents: Tensor, input_scale: Tensor | None = None) -> Tensor:
        """Reconstruction [..., d_in] = latents @ W_dec + b_dec, divided by `input_scale` if given.

        Under `constant_norm_rescale` pass `input_scale(x)` to get the reconstruction in x's units (as
        `forward` does); without it the result is in the rescaled space, like SAELens before its
        out-normalisation.
        """
        out = latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        return out if input_scale is None else out / input_scale

    def forward(self, x: Tensor) -> SAEOutput:
        """Latents and reconstruction of x [..., d_in]."""
        latents = self.encode(x)
        scale = self.input_scale(x.to(self.W_dec.dtype))
        return SAEOutput(latents, self.decode(latents, scale))

    def state_dict_saelens(self) -> dict[str, Tensor]:
        """SAELens-named CPU tensors (detached copies), ready for `safetensors.torch.save_file`."""
        return {n: p.detach().to("cpu").contiguous().clone() for n, p in self.named_parameters()}

    @torch.no_grad()
    def load_saelens_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Copy SAELens-named tensors into the parameters (cast to the SAE dtype).

        Keys and shapes must match `parameter_shapes` exactly; a ValueError names every difference.
        """
        expected = self.parameter_shapes(self.cfg)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(
                f"{self.cfg.architecture} SAE tensors: missing {missing}, unexpected {extra}"
            )
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(
                    f"{self.cfg.architecture} SAE tensor {name!r} has shape "
                    f"{tuple(tensors[name].shape)}, expected {shape}"
                )
            getattr(self, name).copy_(tensors[name].to(self.cfg.torch_dtype))

    def extra_repr(self) -> str:
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        return f"d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}{k}"
