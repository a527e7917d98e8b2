"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), as SAELens `TopKSAE`.

Per token, the k largest pre-activations keep their value after a ReLU; every other latent is 0. This
is SAELens's `TopK` module (topk of the pre-activations, then `.relu()` of the selected values), which
gives the same latents as dictionary_learning's and sparsify's ReLU-then-topk. Among exactly tied
pre-activations the choice is torch.topk's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saema_core.sae.base import SAE
from saema_core.sae.registry import register_architecture


def topk_activation(hidden_pre: Tensor, k: int) -> Tensor:
    """[..., d_sae] with the k largest entries per row kept (ReLU'd) and every other entry 0."""
    top = hidden_pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(hidden_pre).scatter_(-1, top.indices, top.values.relu())


class TopKLatents(NamedTuple):
    """The non-zero part of top-k latents: k (value, index) pairs per token."""

    values: Tensor
    """[..., k] latent values (ReLU'd, so possibly 0), in no particular order."""
    indices: Tensor
    """[..., k] int64 latent indices in [0, d_sae)."""


class TopKSAE(SAE):
    """TopK SAE (SAELens architecture "topk"); `cfg.k` latents per token at most."""

    architecture = "topk"
    uses_k = True

    def activation(self, hidden_pre: Tensor) -> Tensor:
        """Top-k of the pre-activations [..., d_sae], ReLU'd, scattered into zeros."""
        return topk_activation(hidden_pre, self.cfg.k)

    def encode_topk(self, x: Tensor) -> TopKLatents:
        """The same latents as `encode`, as k (value, index) pairs per token, without materialising
        the dense [..., d_sae] tensor (1 GB per 4096 tokens at d_sae = 65 536)."""
        top = self.hidden_pre(self.sae_input(x)).topk(self.cfg.k, dim=-1, sorted=False)
        return TopKLatents(top.values.relu(), top.indices)


register_architecture(TopKSAE.architecture, TopKSAE)
