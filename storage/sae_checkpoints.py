"""SAE checkpoints on disk: read the ecosystem's formats, write saema's own as SAELens folders.

Formats read by `load_sae(path)` (detected from the files in the folder); each reader's module
docstring gives its exact conversion:

- **SAELens** (`cfg.json` + `sae_weights.safetensors`), 6.x and older flat configs:
  `storage.sae_formats.saelens`.
- **dictionary_learning** (`ae.pt` + `config.json`, whose "trainer" block names the "dict_class"):
  `storage.sae_formats.dictionary_learning`.
- **EleutherAI sparsify** (`cfg.json` + `sae.safetensors`), TopK SAEs only:
  `storage.sae_formats.sparsify`.

`save_sae(sae, path)` writes a SAELens 6.x folder atomically (temporary folder beside the target, then
rename). Every problem with a folder is a `CheckpointError` whose message names the file.

`path` may also be an fsspec URL (`memory://…`, `s3://…`; see storage.locations). Such a filesystem has
no folder rename, so a remote save is write-then-mark-complete: an old `cfg.json` is removed first, the
weights are put, and `cfg.json` is put last, so a `cfg.json` always describes the weights beside it.
A remote folder is read by copying its checkpoint files into a temporary local folder, so every
format has one reader.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from saema_core.sae import SAE, SAEConfig, build_sae, sae_class
from storage.locations import filesystem, is_local, local_path
from storage.sae_formats.common import (
    CheckpointError,
    ConvertedCheckpoint,
    _check_finite,
    _check_shapes,
    _check_tensor_names,
)
from storage.sae_formats.dictionary_learning import (
    DICTIONARY_LEARNING_CFG,
    DICTIONARY_LEARNING_WEIGHTS,
    _read_dictionary_learning,
)
from storage.sae_formats.saelens import (
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    _convert_saelens_dicts,
    _read_saelens,
)
from storage.sae_formats.sparsify import SPARSIFY_CFG, SPARSIFY_WEIGHTS, _read_sparsify

__all__ = [
    "DICTIONARY_LEARNING_CFG", "DICTIONARY_LEARNING_WEIGHTS", "SAELENS_CFG", "SAELENS_FORMAT_VERSION",
    "SAELENS_WEIGHTS", "SPARSIFY_CFG", "SPARSIFY_WEIGHTS", "CheckpointError", "ConvertedCheckpoint",
    "detect_format", "load_sae", "load_sae_from_release", "sae_hash", "saelens_config_dict", "save_sae",
]

#: Written into metadata when absent, so that SAELens ≥ 6 reads saema's cfg.json as a 6.x config
#: (without it SAELens would run its pre-6 upgrade and drop the metadata). It marks the file format.
SAELENS_FORMAT_VERSION = "6.0.0"


def _build_checked(checkpoint: ConvertedCheckpoint, where: str, expected_d_in: int | None) -> SAE:
    cfg = checkpoint.cfg
    shapes = sae_class(cfg.architecture).parameter_shapes(cfg)
    _check_tensor_names(checkpoint.tensors, set(shapes), checkpoint.weights_file)
    dims = {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae}
    _check_shapes(checkpoint.tensors, shapes, checkpoint.weights_file, checkpoint.cfg_file, dims)
    _check_finite(checkpoint.tensors, checkpoint.weights_file)
    if expected_d_in is not None and cfg.d_in != expected_d_in:
        raise CheckpointError(
            f"{where}: the SAE reads d_in={cfg.d_in} activations, but d_in={expected_d_in} was expected "
            f"(d_model at the hook)"
        )
    sae = build_sae(cfg)
    sae.load_saelens_tensors(checkpoint.tensors)
    return sae.eval().requires_grad_(False)  # inference only; gradients w.r.t. inputs still flow


# ----------------------------------------------------------------------------------------------
# Public API

#: format name → (files that identify it, reader); detection tries them in this order.
_FORMATS: dict[str, tuple[tuple[str, ...], Callable[[Path], ConvertedCheckpoint]]] = {
    "saelens": ((SAELENS_CFG, SAELENS_WEIGHTS), _read_saelens),
    "sparsify": ((SPARSIFY_CFG, SPARSIFY_WEIGHTS), _read_sparsify),
    "dictionary_learning": ((DICTIONARY_LEARNING_WEIGHTS,), _read_dictionary_learning),
}


#: Every file a reader may open; a remote folder is copied to local disk with these only.
_CHECKPOINT_FILES = frozenset({*(file for files, _ in _FORMATS.values() for file in files), DICTIONARY_LEARNING_CFG})


def _folder_files(path: str) -> tuple[str, set[str]]:
    """(where, names of the files in it) of a local folder or fsspec URL; refuse a non-folder."""
    where = str(local_path(path)) if is_local(path) else path
    fs, root = filesystem(where)
    if not fs.isdir(root):
        raise CheckpointError(f"{where}: not a folder (an SAE checkpoint is a folder of files)")
    return where, {entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=True)
                   if entry["type"] == "file"}


def detect_format(path: str | os.PathLike[str]) -> str:
    """"saelens", "sparsify" or "dictionary_learning", from the files in the folder `path` (path or URL)."""
    return _format_of(*_folder_files(str(path)))


def _format_of(where: str, present: set[str]) -> str:
    for name, (files, _) in _FORMATS.items():
        if all(file in present for file in files):
            return name
    layouts = "; ".join(f"{name}: {' + '.join(files)}" for name, (files, _) in _FORMATS.items())
    raise CheckpointError(f"{where}: not a known SAE checkpoint (found {sorted(present)}; expected {layouts})")


def load_sae(path: str | os.PathLike[str], expected_d_in: int | None = None) -> SAE:
    """The SAE stored in the folder `path` (SAELens, dictionary_learning or sparsify format).

    `path` is a local folder or an fsspec URL. The SAE is in eval mode with frozen parameters.

    `expected_d_in`: the width of the activations it will read (d_model at the hook); a mismatch is a
    CheckpointError. The SAE's `cfg.metadata["source_format"]` says which format it came from.
    """
    if not is_local(str(path)):
        return _load_remote(str(path), expected_d_in)
    folder = local_path(str(path))
    reader = _FORMATS[detect_format(folder)][1]
    return _build_checked(reader(folder), str(folder), expected_d_in)


def _load_remote(url: str, expected_d_in: int | None) -> SAE:
    """Copy the checkpoint files at `url` into a temporary folder and load that; errors name `url`."""
    where, present = _folder_files(url)
    _format_of(where, present)  # refuse a non-checkpoint before copying anything
    fs, root = filesystem(url)
    with tempfile.TemporaryDirectory(prefix="saema-sae-") as tmp:
        for name in present & _CHECKPOINT_FILES:
            fs.get_file(f"{root}/{name}", f"{tmp}/{name}")
        try:
            return load_sae(tmp, expected_d_in)
        except CheckpointError as error:
            raise CheckpointError(str(error).replace(tmp, url.rstrip("/"))) from error


def saelens_config_dict(cfg: SAEConfig) -> dict[str, Any]:
    """The SAELens 6.x cfg.json content of `cfg` (the "dense" architecture is saema's own)."""
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, **cfg.metadata}
    out: dict[str, Any] = {
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype,
        "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations, "reshape_activations": "none",
        "metadata": metadata,
    }
    if cfg.k is not None:
        out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    return out


def _write_folder(folder: Path, cfg_text: str, tensors: dict[str, Tensor]) -> None:
    save_file(tensors, folder / SAELENS_WEIGHTS)
    with open(folder / SAELENS_CFG, "w") as f:
        f.write(cfg_text)
        f.flush()
        os.fsync(f.fileno())


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename the finished folder `new` to `target`, replacing an old checkpoint only once `new` is whole."""
    if not target.exists():
        os.rename(new, target)
        return
    if not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a folder; refusing to replace it")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)  # put the good checkpoint back before reporting the failure
        raise
    shutil.rmtree(old)


def save_sae(sae: SAE, path: str | os.PathLike[str]) -> Path | str:
    """Write `sae` as a SAELens 6.x folder (cfg.json + sae_weights.safetensors) at `path`, atomically.

    Locally, files are written into a temporary folder beside `path` and renamed into place, so a
    failed save never leaves a half-written checkpoint where a good one was. At an fsspec URL the save
    is write-then-mark-complete (module docstring). NaN/Inf weights are refused. Returns the folder: a
    Path when local, the URL otherwise.
    """
    tensors = sae.state_dict_saelens()
    _check_finite(tensors, path)
    try:
        cfg_text = json.dumps(saelens_config_dict(sae.cfg), indent=2)
    except TypeError as e:
        raise CheckpointError(f"{path}/{SAELENS_CFG}: metadata is not JSON-serialisable ({e})") from e
    if not is_local(str(path)):
        _save_remote(str(path), cfg_text, tensors)
        return str(path)
    target = local_path(str(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_folder(staging, cfg_text, tensors)
        _swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only the staging copy; the error propagates
        raise
    return target


def _save_remote(url: str, cfg_text: str, tensors: dict[str, Tensor]) -> None:
    """Unmark (remove an old cfg.json), put the weights, mark complete (put cfg.json last)."""
    fs, root = filesystem(url)
    if fs.isfile(root):
        raise CheckpointError(f"{url}: exists and is not a folder; refusing to replace it")
    cfg_file = f"{root}/{SAELENS_CFG}"
    if fs.exists(cfg_file):
        fs.rm_file(cfg_file)  # the old cfg.json must never stand beside the new weights
    fs.pipe_file(f"{root}/{SAELENS_WEIGHTS}", safetensors_bytes(tensors))
    fs.pipe_file(cfg_file, cfg_text.encode())


def _computation_fields(cfg: SAEConfig) -> dict[str, Any]:
    """The config fields that change what the SAE computes (metadata does not)."""
    return {"architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "k": cfg.k,
            "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
            "normalize_activations": cfg.normalize_activations}


def sae_hash(sae: SAE) -> str:
    """SHA-256 (hex) over the SAE's tensors (name, dtype, shape, bytes) and its computing config.

    Two SAEs with the same hash encode identically; provenance metadata does not enter the hash.
    """
    digest = hashlib.sha256(json.dumps(_computation_fields(sae.cfg), sort_keys=True).encode())
    for name, param in sorted(sae.named_parameters()):
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_sae_from_release(release: str, sae_id: str, expected_d_in: int | None = None) -> SAE:
    """An SAE from a SAELens pretrained release (needs the optional `sae-lens` package and network).

    Raises CheckpointError saying why when sae-lens is not installed or the Hub cannot be reached;
    a downloaded folder can always be read with `load_sae` instead.
    """
    where = f"SAELens release {release!r}, sae_id {sae_id!r}"
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise CheckpointError(
            f"{where}: the optional package sae-lens is not installed (pip install 'saema[saelens]'); "
            "alternatively download the folder and use load_sae(path)"
        ) from e
    try:
        remote = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except OSError as e:
        raise CheckpointError(f"{where}: cannot download it, no network access to the Hub? ({e})") from e
    tensors = {name: t.detach().to("cpu") for name, t in remote.state_dict().items()}
    checkpoint = _convert_saelens_dicts(remote.cfg.to_dict(), tensors, Path(where), Path(where))
    return _build_checked(checkpoint, where, expected_d_in)
