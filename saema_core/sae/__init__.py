"""SAE modules: one module per architecture plus a registry (SAELens style).

    cfg = SAEConfig(architecture="topk", d_in=384, d_sae=3072, k=32)
    sae = build_sae(cfg)          # zero weights: load (storage.sae_checkpoints) or train (sae_training)
    latents = sae.encode(x)       # [..., d_sae]
    latents, recon = sae(x)       # SAEOutput

Importing this package registers the built-in architectures: standard, topk, jumprelu, gated, dense.
"""

from saema_core.sae.base import NORMALIZATIONS, SAE, TORCH_DTYPES, SAEConfig, SAEOutput
from saema_core.sae.dense import DenseAutoencoder
from saema_core.sae.gated import GatedSAE
from saema_core.sae.jumprelu import JumpReLUSAE
from saema_core.sae.registry import SAE_REGISTRY, build_sae, register_architecture, sae_class
from saema_core.sae.standard import StandardSAE
from saema_core.sae.topk import TopKLatents, TopKSAE, topk_activation

__all__ = [
    "NORMALIZATIONS",
    "SAE",
    "SAE_REGISTRY",
    "TORCH_DTYPES",
    "DenseAutoencoder",
    "GatedSAE",
    "JumpReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "StandardSAE",
    "TopKLatents",
    "TopKSAE",
    "build_sae",
    "register_architecture",
    "sae_class",
    "topk_activation",
]
