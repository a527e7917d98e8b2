"""Standard (ReLU) SAE: latents = ReLU(sae_in @ W_enc + b_enc), as SAELens `StandardSAE`."""

from __future__ import annotations

import torch
from torch import Tensor

from saema_core.sae.base import SAE
from saema_core.sae.registry import register_architecture


class StandardSAE(SAE):
    """ReLU SAE (SAELens architecture "standard"); trained with an L1 penalty on the latents."""

    architecture = "standard"

    def activation(self, hidden_pre: Tensor) -> Tensor:
        """ReLU of the pre-activations [..., d_sae]."""
        return torch.relu(hidden_pre)


register_architecture(StandardSAE.architecture, StandardSAE)
