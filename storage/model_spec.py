"""Which model to load, and the name its results are stored under — without importing torch.

The command line builds its configuration from these before anything heavy is imported (`saema
--help` answers at once); `storage.models` loads what they name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from saema_core.errors import SaemaError
from storage import gemma

DEFAULT_MODEL = "all-MiniLM-L6-v2"
EMBEDDED_ALIASES = {DEFAULT_MODEL.lower(), "sentence-transformers/all-minilm-l6-v2", "embedded"}
DTYPES = ("float32", "float16", "bfloat16")


class ModelLoadError(SaemaError):
    """A model or tokenizer that cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and how."""

    name: str = DEFAULT_MODEL
    """Hub name (`gpt2`), local folder, or `all-MiniLM-L6-v2` for the embedded default."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); ignored for local folders."""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda`, `cuda:1`, …"""
    dtype: str = "float32"
    """Weights dtype: float32, float16 or bfloat16. Activations are stored as float32."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless the user asks."""

    @property
    def label(self) -> str:
        """The readable name results are stored under (the `model` coordinate); see `model_label`."""
        return model_label(self.name)

    def __post_init__(self) -> None:
        if not self.name:
            raise ModelLoadError("model name is empty")
        if self.dtype not in DTYPES:
            raise ModelLoadError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")


def model_label(name: str) -> str:
    """The name results are stored under: the built-in model's name, a local folder's own name (its
    path goes to provenance), or the hub name."""
    if name.lower() in EMBEDDED_ALIASES:
        return DEFAULT_MODEL
    if name.lower() in gemma.ALIASES:
        return gemma.GEMMA_NAME
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name
