"""Gated SAE (Rajamanoharan et al. 2024), as SAELens `GatedSAE`.

One encoder matrix serves two paths: the gate decides which latents are active, the magnitude path
(the same matrix rescaled per latent by exp(r_mag)) decides how much:

    gate = 1[sae_in @ W_enc + b_gate > 0]
    latents = gate · ReLU(sae_in @ (W_enc · exp(r_mag)) + b_mag)

Parameters (SAELens names): `W_enc [d_in, d_sae]`, `b_gate`, `r_mag`, `b_mag [d_sae]`, `W_dec`, `b_dec`;
there is no `b_enc`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saema_core.sae.base import SAE, SAEConfig
from saema_core.sae.registry import register_architecture


class GatedSAE(SAE):
    """Gated SAE (SAELens architecture "gated")."""

    architecture = "gated"

    @classmethod
    def parameter_shapes(cls, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """W_enc, b_gate, r_mag, b_mag, W_dec, b_dec (no b_enc), as in SAELens."""
        return {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_gate": (cfg.d_sae,),
            "r_mag": (cfg.d_sae,),
            "b_mag": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_in),
            "b_dec": (cfg.d_in,),
        }

    def encode_sae_input(self, sae_in: Tensor) -> Tensor:
        """Gate · magnitude latents [..., d_sae] from the pre-processed input."""
        projected = sae_in @ self.W_enc
        gate = (projected + self.b_gate > 0).to(projected.dtype)
        return gate * torch.relu(projected * self.r_mag.exp() + self.b_mag)

    def hidden_pre(self, sae_in: Tensor) -> Tensor:
        """The magnitude path's pre-activations (SAELens `hook_sae_acts_pre` of a gated SAE)."""
        return (sae_in @ self.W_enc) * self.r_mag.exp() + self.b_mag


register_architecture(GatedSAE.architecture, GatedSAE)
