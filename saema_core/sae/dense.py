"""The dense autoencoder: the non-sparse control of DESIGN.md §5.6 (space `dense_ae`).

Same parameters and width as a standard SAE but no activation function at all: latents =
sae_in @ W_enc + b_enc, a linear (affine) encoder. Chosen over a smooth non-sparse activation
(GELU, softplus) because

- its latents are dense: a latent is exactly 0 only on a measure-zero set of inputs;
- it is the cleanest control for the rank analysis: Z = X W_enc + b_enc has the rank of [X, 1] at most,
  for every noise level, so the SAEMA sweep must show a flat, unstratified rank (DESIGN.md §5,
  "a dense encoder gives constant rank"); a nonlinear dense activation would instead raise the rank of
  the latent tensor above d_in by its curvature, a rank effect that has nothing to do with sparsity.

Trained like the SAEs (MSE, unit-norm decoder rows), it learns an affine map onto the principal subspace
of the data. Latents are signed: downstream code must not clamp them to ≥ 0.
"""

from __future__ import annotations

from torch import Tensor

from saema_core.sae.base import SAE
from saema_core.sae.registry import register_architecture


class DenseAutoencoder(SAE):
    """Linear autoencoder of SAE width (architecture "dense", saema's own; SAELens cannot load it)."""

    architecture = "dense"

    def activation(self, hidden_pre: Tensor) -> Tensor:
        """The identity: the pre-activations [..., d_sae] are the latents."""
        return hidden_pre


register_architecture(DenseAutoencoder.architecture, DenseAutoencoder)
