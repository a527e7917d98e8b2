"""Provenance attributes carried by every store: what made it, from what, and when."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from dataclasses import asdict, is_dataclass
from pathlib import Path

import saema


def git_commit() -> str:
    """The commit of the saema checkout, or 'unknown' outside a git checkout."""
    root = Path(saema.__file__).resolve().parent.parent
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def config_hash(config: object) -> str:
    """A stable hash of a config (dataclass, mapping or value), for provenance and cache keys."""
    data = asdict(config) if is_dataclass(config) else config
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(**fields: object) -> dict:
    """Standard provenance attributes plus the caller's fields (model, hook, SAE id, …)."""
    return {
        "saema_version": saema.__version__,
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in fields.items() if v is not None},
    }
