"""Damaged stores are named before anything is written into them.

A truncated or garbled `zarr.json` (a full disk, a crashed copy, an editor) makes every later read of
its group fail with a bare JSON error deep inside Zarr. `check_metadata` reads each metadata file of
a local store (chunk folders are skipped, so it costs milliseconds) and names the broken one.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import zarr
from zarr.errors import ZarrUserWarning

from saema_core.errors import SaemaError
from storage.locations import is_local, local_path


class CorruptStoreError(SaemaError):
    """A store whose metadata does not parse; the message names the file and what to do."""


def check_metadata(url: str) -> None:
    """Raise `CorruptStoreError` naming the first `zarr.json` of the local store at `url` that is not
    Zarr v3 metadata. A store that does not exist yet, or one at an fsspec URL, passes."""
    if not is_local(url) or not local_path(url).is_dir():
        return
    root = local_path(url)
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if name != "c" and not name.startswith(".new-")]
        if "zarr.json" in files:
            _check_file(Path(folder) / "zarr.json", root)


def _check_file(path: Path, root: Path) -> None:
    try:
        metadata = json.loads(path.read_bytes())
        if not isinstance(metadata, dict) or "node_type" not in metadata:
            raise ValueError("not Zarr v3 metadata: no node_type")
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptStoreError(f"{path} is corrupt ({error}); nothing was written — restore it from a backup, "
                                f"or remove {root} and re-run to recompute it") from None


def consolidate(url: str) -> None:
    """Consolidate the store's metadata into its root `zarr.json`, so plain xarray opens it in one read.

    Zarr warns on every call that consolidated metadata is not (yet) part of the Zarr v3 spec. saema
    writes it on purpose, as an index beside the per-group metadata that stays authoritative (saema
    itself reads with `use_consolidated=False`; readers that do not know the index ignore it), so
    exactly that warning is not shown here; any other warning is.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part",
                                category=ZarrUserWarning)
        zarr.consolidate_metadata(url)
