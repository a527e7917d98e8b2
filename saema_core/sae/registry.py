"""The architecture registry: architecture name → SAE class (SAELens style, no `if` chains).

Each architecture module registers its class when imported; `saema_core.sae` imports them all, so the
registry is complete as soon as the package is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saema_core.sae.base import SAE, SAEConfig

#: architecture name (`SAEConfig.architecture`, SAELens `cfg.json` "architecture") → SAE class.
SAE_REGISTRY: dict[str, type[SAE]] = {}


def register_architecture(name: str, cls: type[SAE]) -> None:
    """Make `cls` the SAE class built for `SAEConfig(architecture=name)`.

    Registering a second, different class under a taken name is refused, so a typo cannot silently
    replace a built-in architecture.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"architecture name must be a non-empty string, got {name!r}")
    existing = SAE_REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"architecture {name!r} is already registered to {existing.__qualname__}; "
            f"refusing to replace it with {cls.__qualname__}"
        )
    SAE_REGISTRY[name] = cls


def sae_class(architecture: str) -> type[SAE]:
    """The SAE class registered for `architecture`; a ValueError listing the known ones otherwise."""
    try:
        return SAE_REGISTRY[architecture]
    except KeyError:
        known = ", ".join(sorted(SAE_REGISTRY))
        raise ValueError(
            f"unknown SAE architecture {architecture!r}; known architectures: {known}"
        ) from None


def build_sae(cfg: SAEConfig) -> SAE:
    """A zero-initialised SAE of the class registered for `cfg.architecture`.

    Weights are zeros: fill them from a checkpoint (`storage.sae_checkpoints.load_sae`) or by training
    (`saema_core.sae_training.train_sae`).
    """
    return sae_class(cfg.architecture)(cfg)
