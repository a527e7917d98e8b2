"""Output locations: local folders and fsspec URLs (`file://…`, `memory://…`, `s3://…`) behind one API.

Zarr and xarray are given a location as it is, except that a `file://` URL becomes a plain path
(`canonical`): zarr then uses its local store, which creates folders (fsspec's local filesystem does
not), and the local-only guarantees (atomic renames, lock files) apply to it. Every other file saema
keeps under `--out` (SAE checkpoints, training histories, plots, the report) goes through
`read_bytes` / `write_bytes`, which are atomic on local disk (temporary file + rename) and a single
whole-object put elsewhere.

`memory://` lives only inside the process that wrote it (`is_process_local`): work in other processes
(Dask worker processes, a later `saema query`) cannot see it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import fsspec
from fsspec.core import split_protocol

_PROCESS_LOCAL_PROTOCOLS = frozenset({"memory"})


def is_local(url: str) -> bool:
    """True for a plain path or a `file://` URL."""
    return "://" not in url or url.startswith("file://")


def is_process_local(url: str) -> bool:
    """True for locations only this process can see (`memory://`)."""
    return split_protocol(url)[0] in _PROCESS_LOCAL_PROTOCOLS


def local_path(url: str) -> Path:
    """The path of a local location (`file://` stripped, `~` expanded)."""
    if not is_local(url):
        raise ValueError(f"{url} is not a local path or file:// URL")
    return Path(url.removeprefix("file://")).expanduser()


def canonical(url: str) -> str:
    """A local location as a plain path, any other URL unchanged (what zarr and xarray are given)."""
    return str(local_path(url)) if is_local(url) else url


def join(base: str, *parts: str) -> str:
    """`base/part/…` for paths and URLs alike (never collapses the `//` of a URL, as Path would)."""
    return "/".join([base.rstrip("/") if not base.endswith("://") else base[:-1], *parts])


def basename(url: str) -> str:
    """The last component of a path or URL (`…/saes/topk-w256` → `topk-w256`)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a location and the path within it."""
    return fsspec.core.url_to_fs(url)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file; readers never see a half-written one (rename locally, one put elsewhere)."""
    if is_local(url):
        _write_local_atomically(local_path(url), data)
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _write_local_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(staging, 0o666 & ~_UMASK)  # mkstemp makes it 0600; colleagues get the user's umask
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)  # only the staging copy; the error propagates
        raise
