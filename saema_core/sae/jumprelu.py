"""JumpReLU SAE (Rajamanoharan et al. 2024), as SAELens `JumpReLUSAE` at inference.

latents = ReLU(pre) · 1[pre > threshold], with a learned per-latent `threshold [d_sae]`. For the
non-negative thresholds that trained SAEs have this is `pre · 1[pre > threshold]`; the ReLU only
matters for a negative threshold, where SAELens (and dictionary_learning) also apply it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saema_core.sae.base import SAE, SAEConfig
from saema_core.sae.registry import register_architecture


class JumpReLUSAE(SAE):
    """JumpReLU SAE (SAELens architecture "jumprelu") with parameter `threshold [d_sae]`."""

    architecture = "jumprelu"

    @classmethod
    def parameter_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """The standard four tensors plus `threshold [d_sae]`."""
        return {**super().parameter_shapes(cfg), "threshold": (cfg.d_sae,)}

    def activation(self, hidden_pre: Tensor) -> Tensor:
        """ReLU(pre) where pre > threshold, else 0; shape [..., d_sae]."""
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)


register_architecture(JumpReLUSAE.architecture, JumpReLUSAE)
