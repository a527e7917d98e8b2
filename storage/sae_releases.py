"""SAELens release names (`RELEASE/SAE_ID`) as `--sae` checkpoints, resolved in the local Hugging Face cache.

SAELens names its pretrained SAEs by release and id (`gpt2-small-res-jb/blocks.8.hook_resid_pre`);
its table `pretrained_saes.yaml` maps each to a Hugging Face repository and a folder in it. saema
reads that table from an installed sae-lens (`pip install 'saema[saelens]'`; the file is read, the
package is not imported) and finds the folder in the local Hugging Face cache (`$HF_HUB_CACHE`, as
SAELens and `huggingface-cli download` fill it) without any network access. A release that is not
cached, a release SAELens converts from another layout (`conversion_func`), or an unknown name is an
error saying what to do instead.

`--sae HOOK=saelens:RELEASE/SAE_ID` always means a release; a bare `RELEASE/SAE_ID` does when no such
local folder exists and sae-lens knows the release.
"""

from __future__ import annotations

import difflib
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import yaml

from storage.locations import is_local, local_path
from storage.sae_formats.common import CheckpointError

PREFIX = "saelens:"


class Release(NamedTuple):
    repo_id: str
    conversion_func: str | None
    saes: dict[str, str]
    """sae_id → folder in the repository."""


def directory_file() -> Path | None:
    """sae-lens's `pretrained_saes.yaml`, or None when sae-lens is not installed."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    return path if path.is_file() else None


@lru_cache(maxsize=2)
def _read_directory(path: Path) -> dict[str, Release]:
    data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {name: Release(entry["repo_id"], entry.get("conversion_func"),
                          {str(sae["id"]): str(sae["path"]) for sae in entry.get("saes", [])})
            for name, entry in data.items()}


def releases() -> dict[str, Release]:
    """The SAELens release table; empty when sae-lens is not installed."""
    path = directory_file()
    return {} if path is None else _read_directory(path)


def _close(name: str, names) -> str:
    matches = difflib.get_close_matches(name, list(names), n=3)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def release_folder(name: str) -> Path:
    """The cached folder of the SAELens release `RELEASE/SAE_ID`, or a CheckpointError saying why not."""
    release, _, sae_id = name.partition("/")
    where = f"SAELens release {release!r}, sae_id {sae_id!r}"
    table = releases()
    if not table:
        raise CheckpointError(f"{name}: reading SAELens release names needs its table, from the optional package "
                              f"sae-lens (pip install 'saema[saelens]'); or give the SAE's folder as --sae HOOK=FOLDER")
    if release not in table:
        raise CheckpointError(f"{name}: no SAELens release {release!r}{_close(release, table)}")
    entry = table[release]
    if sae_id not in entry.saes:
        raise CheckpointError(f"{where}: no such sae_id in the release{_close(sae_id, entry.saes)} "
                              f"({len(entry.saes)} ids, e.g. {next(iter(entry.saes), '—')})")
    if entry.conversion_func:
        raise CheckpointError(f"{where}: SAELens converts this release from another layout "
                              f"({entry.conversion_func!r}), which saema does not read; load it with sae-lens, "
                              f"save it with sae.save_model(FOLDER) and give --sae HOOK=FOLDER")
    return _cached_folder(entry.repo_id, entry.saes[sae_id], where)


def _cached_folder(repo_id: str, folder: str, where: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    missing = (f"{where}: {repo_id}/{folder} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
               f"and no hub is reachable from here; on a machine with network run "
               f"`hf download {repo_id} --include '{folder}/*'` and copy its cache here (or set HF_HUB_CACHE), "
               f"or give the downloaded folder as --sae HOOK=FOLDER")
    try:
        snapshot = snapshot_download(repo_id, allow_patterns=[f"{folder}/*"], local_files_only=True)
    except LocalEntryNotFoundError as error:
        raise CheckpointError(missing) from error
    path = Path(snapshot) / folder
    if not path.is_dir():
        raise CheckpointError(missing)
    return path


def resolve_checkpoint(spec: str) -> str:
    """The folder (or URL) of an `--sae` checkpoint: a SAELens release name resolved, anything else as is."""
    if spec.startswith(PREFIX):
        return str(release_folder(spec[len(PREFIX):]))
    release, _, sae_id = spec.partition("/")
    if sae_id and is_local(spec) and not local_path(spec).exists() and release in releases():
        return str(release_folder(spec))
    return spec
