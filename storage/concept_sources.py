"""Where a concept's prompts come from: corpus contexts, templates, or a prompt file.

`--concept-source`:
- `auto` (default): a built-in concept draws real contexts from the corpus when its unambiguous items
  occur there at least `floor` times (each context analyses one item occurrence), else templates.
- `corpus`: corpus contexts for every concept (an error when a concept's items never occur).
- `templates`: the built-in templates (the paper's design).
- a JSON/YAML file: its concepts; a concept with `items` gets corpus contexts for them.

Corpus matching is on whole words, case-sensitive: "May" inside "Mayor" or "may" the verb never
match, and a hyphenated compound ("two-thirds") is a different word. Items that are ambiguous in
prose (`storage.prompts.AMBIGUOUS_ITEMS`) are never matched; a corpus-sourced built-in concept covers
them with template prompts. When the corpus has more occurrences than the cap, every item gets an
equal share (items with fewer give the rest to the others), spread evenly through the corpus; the
order is deterministic (items in the concept's order, occurrences in corpus order).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.corpus import iter_documents
from storage.prompts import (
    BUILTIN_CONCEPTS,
    Concept,
    Prompt,
    PromptError,
    ambiguous_items,
    ambiguous_prompts,
    builtin_concept,
    builtin_items,
    load_prompt_file,
)

SOURCES = ("auto", "corpus", "templates")


@dataclass(frozen=True)
class ContextSpec:
    """How corpus contexts are drawn."""

    corpus: str | None
    max_contexts: int = 1500
    window_words: int = 10
    floor: int = 1000


@dataclass(frozen=True)
class Occurrence:
    item: str
    document: int
    start: int


def item_pattern(items: Iterable[str]) -> re.Pattern:
    """One regex matching any item as a whole word, case-sensitive (longest item first)."""
    alternatives = "|".join(re.escape(i) for i in sorted(set(items), key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])")


def find_occurrences(documents: Iterable[str], items: list[str]) -> dict[str, list[Occurrence]]:
    """Every whole-word occurrence of each item, in corpus order."""
    found: dict[str, list[Occurrence]] = {item: [] for item in items}
    pattern = item_pattern(items)
    for index, document in enumerate(documents):
        for match in pattern.finditer(document):
            found[match.group()].append(Occurrence(match.group(), index, match.start()))
    return found


def quotas(counts: dict[str, int], cap: int) -> dict[str, int]:
    """An equal share of `cap` per item; items with fewer occurrences give the rest to the others."""
    take, remaining = {}, cap
    order = sorted(counts, key=lambda item: counts[item])
    for position, item in enumerate(order):
        take[item] = min(counts[item], remaining // (len(order) - position))
        remaining -= take[item]
    return take


def spread(occurrences: list[Occurrence], n: int) -> list[Occurrence]:
    """`n` occurrences evenly spaced through the list (all of them when n ≥ len)."""
    if n >= len(occurrences):
        return occurrences
    return [occurrences[i] for i in np.linspace(0, len(occurrences) - 1, n).round().astype(int)]


def context_prompt(document: str, occurrence: Occurrence, window_words: int, source: str) -> Prompt:
    """`window_words` words either side of the occurrence (within its document); only the item is
    analysed. Whitespace becomes single spaces' width (offsets are kept)."""
    start, end = occurrence.start, occurrence.start + len(occurrence.item)
    reach = 40 * window_words
    low = max(0, start - reach)
    before = [low + m.start() for m in re.finditer(r"\S+", document[low:start])]
    after = [end + m.end() for m in re.finditer(r"\S+", document[end:end + reach])]
    left = before[max(0, len(before) - window_words)] if before else start
    right = after[min(len(after), window_words) - 1] if after else end
    text = re.sub(r"\s", " ", document[left:right])
    return Prompt(text, ((start - left, end - left),), occurrence.item,
                  f"{source}:{occurrence.document}:{occurrence.start}")


def contexts_of(documents: list[str], found: dict[str, list[Occurrence]], spec: ContextSpec) -> list[Prompt]:
    """Up to `spec.max_contexts` contexts of the found occurrences (a balanced, evenly spread
    selection, items in their given order)."""
    share = quotas({item: len(occ) for item, occ in found.items()}, spec.max_contexts)
    return [context_prompt(documents[o.document], o, spec.window_words, spec.corpus or "corpus")
            for item, occurrences in found.items() for o in spread(occurrences, share[item])]


def corpus_contexts(documents: list[str], name: str, items: list[str], spec: ContextSpec,
                    hint: str = "give the concept prompts, or items that occur in the corpus") -> list[Prompt]:
    """Up to `spec.max_contexts` contexts of the items; an error naming the concept if none occurs."""
    if not items:
        raise PromptError(f"concept {name!r}: no items to look up in the corpus")
    found = find_occurrences(documents, items)
    if not any(found.values()):
        raise PromptError(f"concept {name!r}: none of its items ({', '.join(items)}) occurs as a whole word "
                          f"in corpus {spec.corpus!r}; {hint}")
    return contexts_of(documents, found, spec)


def _split_items(name: str) -> tuple[list[str], list[str]]:
    """A built-in concept's (unambiguous, ambiguous) items."""
    items = builtin_items(name)
    return [i for i in items if i not in ambiguous_items(name)], [i for i in items if i in ambiguous_items(name)]


def _corpus_builtin(documents: list[str], name: str, spec: ContextSpec, contexts: list[Prompt] | None = None,
                    ) -> Concept:
    """Corpus contexts of the unambiguous items (`contexts` when already drawn) + templates for the rest."""
    plain, ambiguous = _split_items(name)
    if not plain:
        raise PromptError(f"concept {name!r}: every item is ambiguous in prose ({', '.join(builtin_items(name))}),"
                          f" so it is never matched in a corpus; use --concept-source templates (or auto)")
    if contexts is None:
        contexts = corpus_contexts(documents, name, plain, spec, "use --concept-source templates (or auto)")
    note = f"; templates for {', '.join(ambiguous)}" if ambiguous else ""
    prompts = tuple(contexts) + tuple(ambiguous_prompts(name, ambiguous))
    return Concept(name, prompts, f"corpus {spec.corpus} ({len(contexts)} contexts{note})")


def _auto_builtin(documents: list[str], name: str, spec: ContextSpec) -> Concept:
    """Corpus contexts when the unambiguous items occur at least `spec.floor` times, else templates."""
    plain, _ = _split_items(name)
    found = find_occurrences(documents, plain) if plain else {}
    if sum(len(o) for o in found.values()) < spec.floor:
        return builtin_concept(name)
    return _corpus_builtin(documents, name, spec, contexts_of(documents, found, spec))


# Corpus text scanned for concept contexts: the whole default corpus (~12 MB) and more, but bounded
# for streamed hub datasets, which may be far larger than memory.
MAX_SCANNED_CHARACTERS = 64_000_000


def _documents(spec: ContextSpec) -> list[str]:
    """The corpus's documents in order, up to `MAX_SCANNED_CHARACTERS` of text."""
    if not spec.corpus:
        raise PromptError("corpus contexts need a corpus (--corpus), but it is 'none'; use "
                          "--concept-source templates")
    documents, total = [], 0
    for document in iter_documents(spec.corpus):
        if total >= MAX_SCANNED_CHARACTERS:
            break
        documents.append(document)
        total += len(document)
    return documents


def _builtins(names: tuple[str, ...], source: str, spec: ContextSpec) -> list[Concept]:
    names = names or BUILTIN_CONCEPTS
    for name in names:
        builtin_items(name)  # unknown names fail before the corpus is read
    if source == "templates":
        return [builtin_concept(n) for n in names]
    if source == "auto" and not spec.corpus:
        return [builtin_concept(n) for n in names]
    documents = _documents(spec)
    if source == "corpus":
        return [_corpus_builtin(documents, n, spec) for n in names]
    return [_auto_builtin(documents, n, spec) for n in names]


def _from_file(path: str, names: tuple[str, ...], spec: ContextSpec) -> list[Concept]:
    entries = {concept.name: (concept, items) for concept, items in load_prompt_file(path)}
    missing = [n for n in names if n not in entries]
    if missing:
        raise PromptError(f"concepts {missing} are not in {path}; it has {sorted(entries)}")
    chosen = [entries[n] for n in names] if names else list(entries.values())
    documents = _documents(spec) if any(items for _, items in chosen) else []
    concepts = []
    for concept, items in chosen:
        contexts = corpus_contexts(documents, concept.name, items, spec) if items else []
        source = f"file {path}" + (f" + corpus {spec.corpus} ({len(contexts)} contexts)" if items else "")
        concepts.append(Concept(concept.name, concept.prompts + tuple(contexts), source))
    return concepts


def check_concepts(names: tuple[str, ...] | list[str] = (), source: str = "auto") -> list[Concept]:
    """What can be checked without reading the corpus: the source, the names asked for, a prompt file
    (it parses, its names are usable). Returns the prompt file's own concepts (their explicit prompts)
    for further checks; [] for built-ins."""
    if source in SOURCES:
        for name in names:
            builtin_items(name)
        return []
    if not Path(source).expanduser().is_file():
        raise PromptError(f"--concept-source must be auto, corpus, templates or a prompt file; "
                          f"{source!r} is none of these")
    path = str(Path(source).expanduser())
    entries = {concept.name: concept for concept, _ in load_prompt_file(path)}
    missing = [n for n in names if n not in entries]
    if missing:
        raise PromptError(f"concepts {missing} are not in {path}; it has {sorted(entries)}")
    return [entries[n] for n in names] if names else list(entries.values())


def resolve_concepts(names: tuple[str, ...] | list[str] = (), source: str = "auto",
                     spec: ContextSpec = ContextSpec(corpus=None)) -> list[Concept]:
    """The requested concepts from `source`: auto | corpus | templates | a prompt file."""
    names = tuple(names)
    if source in SOURCES:
        return _builtins(names, source, spec)
    if not Path(source).expanduser().is_file():
        raise PromptError(f"--concept-source must be auto, corpus, templates or a prompt file; "
                          f"{source!r} is none of these")
    return _from_file(str(Path(source).expanduser()), names, spec)
