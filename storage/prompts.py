"""Concept prompt sets: the nine built-in concepts, user sets from JSON/YAML, and what is analysed.

A concept is a list of `Prompt`s. Each prompt carries the character spans that are analysed, the
concept item it is about and where it came from, so that every analysed token can be traced back to
its word, item and sentence (the token coordinates `item` and `source` of the activation store).

Built-in concepts come from two sources (DESIGN.md §7b):
- **templates** (the paper's design): compositional sentences, subject × predicate with the item in
  its slot; every word that is not a filler (function words and punctuation) is analysed, and the
  item itself always is. Enough (subject, predicate) combinations are used, the same for every item,
  that the analysed words reach `TEMPLATE_TARGET_WORDS` (every word is at least one token).
- **corpus** contexts (`storage.concept_corpus`): whole-word, case-sensitive occurrences of the items
  in real text with a window of context; only the item is analysed. Items that are ambiguous in
  prose ("May" the verb, "A" the article, "Cancer" the disease) are left to templates.

Masking works on whole words: a token is analysed when its character span overlaps an analysed word,
so all sub-word pieces of a word ("under", "##line") are analysed or masked together, whatever the
tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from saema_core.errors import SaemaError

Span = tuple[int, int]

# Subjects shared by every concept; each template prompt is "<subject> <predicate>."
_SUBJECTS = (
    "My grandmother", "The new teacher", "Our neighbour", "The young farmer", "Every student",
    "The old sailor", "Her brother", "The museum guide", "My best friend", "The radio host",
    "The tired doctor", "Their coach",
)

_PREDICATES = {
    "months": [
        "was born in {}", "always travels north in {}", "planted tomatoes in early {}",
        "remembers the storm of {}", "will retire next {}", "paints the fence every {}",
        "moved to the coast in late {}", "prefers the weather of {}", "celebrated a birthday in {}",
        "visits the mountains during {}",
    ],
    "days": [
        "moved the meeting to {}", "goes swimming every {}", "closes the shop on {}",
        "will call back on {}", "flies home early on {}", "bakes fresh bread each {}",
        "cleaned the garage last {}", "hates waking up on {}", "plays chess every {}",
        "booked the dentist for {}",
    ],
    "elements": [
        "found traces of {}", "measured the density of {}", "wrote a report about {}",
        "heated a small sample of {}", "stored the {} in a sealed jar", "studied the spectrum of {}",
        "explained why {} reacts", "weighed a block of {}", "bought a flask of {}",
        "described the atoms of {}",
    ],
    "colours": [
        "painted the kitchen door {}", "wore a {} scarf", "chose a {} umbrella",
        "dyed the wool {}", "likes {} flowers best", "drove a {} truck", "bought {} curtains",
        "drew a {} circle", "knitted a {} sweater", "picked the {} paint",
    ],
    "planets": [
        "watched {} through the telescope", "read a book about {}", "dreams of landing on {}",
        "pointed at {} low in the sky", "photographed {} last night", "explained the orbit of {}",
        "drew a map of {}", "measured the light of {}", "gave a lecture about {}",
        "waited for {} to rise",
    ],
    "numbers": [
        "counted {} boats in the harbour", "needs {} eggs for the cake", "bought {} apples",
        "waited {} minutes for the bus", "painted {} chairs", "caught {} fish today",
        "invited {} guests", "carried {} boxes upstairs", "planted {} trees",
        "wrote {} letters",
    ],
    "alphabet": [
        "wrote the letter {} on the board", "circled the letter {}", "traced a large {}",
        "underlined the capital {}", "carved the letter {} into wood", "painted a big {}",
        "printed the letter {} twice", "stitched the letter {} onto a flag",
        "pointed at the letter {}", "spelled the word starting with {}",
    ],
    "phonetic": [
        "spelled out {} over the radio", "said {} clearly on the call", "repeated {} twice",
        "shouted {} across the field", "whispered the code word {}", "radioed {} to the tower",
        "wrote {} in the logbook", "answered with {} at once", "heard {} on the channel",
        "announced {} loudly",
    ],
    "zodiac": [
        "found {} in the night sky", "pointed at the constellation {}", "drew the stars of {}",
        "watched {} rise above the hills", "photographed the constellation {}",
        "marked {} on the star chart", "searched for {} after midnight", "described the shape of {}",
        "showed the class where {} lies", "admired {} through binoculars",
    ],
}

_ITEMS = {
    "months": "January February March April May June July August September October November December",
    "days": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "elements": "hydrogen helium lithium carbon nitrogen oxygen sodium magnesium aluminium silicon "
    "sulfur chlorine argon potassium calcium iron copper zinc silver gold",
    "colours": "red orange yellow green blue purple pink brown black white grey violet",
    "planets": "Mercury Venus Earth Mars Jupiter Saturn Uranus Neptune",
    "numbers": "two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty",
    "alphabet": "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "phonetic": "Alfa Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliett Kilo Lima Mike",
    "zodiac": "Aries Taurus Gemini Cancer Leo Virgo Libra Scorpius Sagittarius Capricornus "
    "Aquarius Pisces",
}

# Items whose whole-word, case-sensitive form is often not the concept in ordinary prose: they are
# never matched in a corpus, only used in templates.
AMBIGUOUS_ITEMS = {
    "months": {"May", "March"},
    "elements": {"iron"},
    "colours": {"orange", "black", "white", "brown", "green"},
    "planets": {"Mercury", "Venus", "Earth"},
    "alphabet": set(_ITEMS["alphabet"].split()),
    "phonetic": set(_ITEMS["phonetic"].split()),
    "zodiac": set(_ITEMS["zodiac"].split()),
}

BUILTIN_CONCEPTS: tuple[str, ...] = tuple(_ITEMS)
MIN_PROMPTS = 35
# Analysed words per template concept (each word is ≥ 1 token). 1 100 words (~1 150–1 380 MiniLM
# tokens) left the SAE's latent-mode rank on the token bound for days, phonetic and zodiac: at
# 1 500 (~1 550–1 950 tokens) every template concept has ≥ 3 unsaturated σ levels.
TEMPLATE_TARGET_WORDS = 1500
AMBIGUOUS_TEMPLATE_PROMPTS = 12  # template prompts per ambiguous item of a corpus-sourced concept

# Function words and punctuation masked in every concept, on top of its own filler list.
COMMON_FILLERS = frozenset(
    "the a an of in on at to and or is was were be been it its this that my our your his her "
    "their we you he she they i for with by from as . , ! ? ; : ' \" - ( )".split()
)
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


class PromptError(SaemaError):
    """An empty, malformed or unusable prompt set; the message names the file and concept."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text, the character spans analysed, its item and where it came from."""

    text: str
    spans: tuple[Span, ...]
    item: str = ""
    source: str = ""  # "template", "<corpus>:<document>:<char>", or the prompt file


@dataclass(frozen=True)
class Concept:
    """One concept: its prompts and a description of where they came from."""

    name: str
    prompts: tuple[Prompt, ...]
    source: str = "templates"

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def prompt_set(self) -> str:
        """A model-independent fingerprint of the prompts and their analysed spans: two models analysed
        the same data for this concept exactly when their fingerprints agree."""
        digest = hashlib.sha256(json.dumps([(p.text, p.spans) for p in self.prompts]).encode())
        return f"{digest.hexdigest()[:12]} ({len(self.prompts)} prompts)"


def normalise_token(token: str) -> str:
    """Token string without tokenizer markers (`Ġ`, `▁`, `##`, leading space), lower case."""
    return re.sub(r"^(##|Ġ|▁|\s)+", "", token).lower()


def analysed_spans(text: str, fillers: frozenset[str] = frozenset(), keep: tuple[Span, ...] = ()) -> tuple[Span, ...]:
    """Character spans of the words of `text` that are analysed: not a filler (common fillers and
    `fillers`, case-insensitive), plus the spans in `keep` (a concept's item is never a filler)."""
    masked = COMMON_FILLERS | fillers
    spans = {(m.start(), m.end()) for m in _WORD.finditer(text) if m.group().lower() not in masked}
    return tuple(sorted(spans | set(keep)))


def template_prompt(subject: str, predicate: str, item: str) -> Prompt:
    """"<subject> <predicate with item>." with every non-filler word and the item analysed."""
    head, tail = predicate.split("{}")
    text = f"{subject} {head}{item}{tail}."
    start = len(subject) + 1 + len(head)
    return Prompt(text, analysed_spans(text, keep=((start, start + len(item)),)), item, "template")


def _combinations(name: str) -> list[tuple[str, str]]:
    """Every (subject, predicate) pair of a concept, in a fixed pseudo-random order."""
    pairs = [(s, p) for p in _PREDICATES[name] for s in _SUBJECTS]
    random.Random(name).shuffle(pairs)
    return pairs


def template_prompts(name: str, items: list[str], target_words: int = TEMPLATE_TARGET_WORDS) -> list[Prompt]:
    """Balanced template prompts: each (subject, predicate) pair is used for every item, and pairs
    are added until the analysed words reach `target_words` (at least `MIN_PROMPTS` prompts)."""
    prompts: list[Prompt] = []
    words = 0
    for subject, predicate in _combinations(name):
        batch = [template_prompt(subject, predicate, item) for item in items]
        prompts += batch
        words += sum(len(p.spans) for p in batch)
        if words >= target_words and len(prompts) >= MIN_PROMPTS:
            break
    return prompts


def builtin_items(name: str) -> list[str]:
    if name not in _ITEMS:
        raise PromptError(f"unknown built-in concept {name!r}; known: {', '.join(BUILTIN_CONCEPTS)}")
    return _ITEMS[name].split()


def builtin_concept(name: str) -> Concept:
    """A built-in concept from templates alone (the paper's design)."""
    return Concept(name, tuple(template_prompts(name, builtin_items(name))), "templates")


def ambiguous_items(name: str) -> set[str]:
    return AMBIGUOUS_ITEMS.get(name, set())


def ambiguous_prompts(name: str, items: list[str]) -> list[Prompt]:
    """Template prompts for the ambiguous items of a corpus-sourced built-in concept."""
    pairs = _combinations(name)[:AMBIGUOUS_TEMPLATE_PROMPTS]
    return [template_prompt(s, p, item) for s, p in pairs for item in items]


def _concept_from_entry(name: str, entry: object, source: str) -> tuple[Concept, list[str]]:
    """A file's concept (its prompts) and its item list (for corpus contexts; may be empty)."""
    if isinstance(entry, list):
        entry = {"prompts": entry}
    if not isinstance(entry, dict) or not ({"prompts", "items"} & entry.keys()):
        raise PromptError(
            f"{source}: concept {name!r} must be a list of prompts or a mapping with 'prompts' and/or "
            f"'items' (and optional 'fillers'), got {type(entry).__name__}"
        )
    prompts, items, fillers = entry.get("prompts", []), entry.get("items", []), entry.get("fillers", [])
    for key, values in (("prompts", prompts), ("items", items), ("fillers", fillers)):
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise PromptError(f"{source}: concept {name!r}: '{key}' must be a list of text")
    if "prompts" in entry and (not prompts or not all(p.strip() for p in prompts)):
        raise PromptError(f"{source}: concept {name!r} has no prompts or an empty prompt")
    if "items" in entry and (not items or not all(i.strip() for i in items)):
        raise PromptError(f"{source}: concept {name!r} has no items or an empty item (\"\")")
    concept = concept_from_texts(str(name), prompts, fillers, source=source)
    return concept, [i.strip() for i in items]


def concept_from_texts(name: str, texts: list[str] | tuple[str, ...], fillers=(), source: str = "file") -> Concept:
    """A concept from plain prompts: every word that is not a filler is analysed."""
    fill = frozenset(normalise_token(f) for f in fillers)
    return Concept(name, tuple(Prompt(t, analysed_spans(t, fill), "", source) for t in texts), source)


def load_prompt_file(path: str | Path) -> list[tuple[Concept, list[str]]]:
    """(concept, items) pairs from a JSON or YAML file:
    {concept: [prompts]} or {concept: {prompts: [...], items: [...], fillers: [...]}}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PromptError(f"cannot read prompt file {path}: {error}") from error
    except UnicodeDecodeError as error:
        raise PromptError(f"prompt file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                          f"offset {error.start}); save it as UTF-8") from None
    if not text.strip():
        raise PromptError(f"prompt file {path} is empty")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise PromptError(f"prompt file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {error}") from error
    if not isinstance(data, dict) or not data:
        raise PromptError(f"prompt file {path} is empty or not a mapping of concept -> prompts")
    for name in data:
        check_concept_name(name, str(path))
    return [_concept_from_entry(name, entry, str(path)) for name, entry in data.items()]


_NAME_PATTERN = re.compile(r"[^\W_][\w .+-]*", re.UNICODE)


def check_concept_name(name: object, source: str) -> None:
    """A concept name becomes a store group, a coordinate value and part of plot file names: letters,
    digits, spaces and `_ . + -`, starting with a letter or digit (no `/`, no leading dot)."""
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or len(name) > 100:
        raise PromptError(f"{source}: concept name {name!r} is not allowed: use letters, digits, spaces and "
                          f"_ . + - (starting with a letter or digit, at most 100 characters); it names a "
                          f"store group and plot files")


def token_is_analysed(offset: Span, spans: tuple[Span, ...]) -> bool:
    """True when a token's character span overlaps an analysed word (empty spans never do)."""
    start, end = offset
    return end > start and any(start < b and a < end for a, b in spans)


def analysed_mask(offsets: list[Span], special: list[bool], spans: tuple[Span, ...]) -> list[bool]:
    """Per token: not special or padding, and part of an analysed word."""
    return [not is_special and token_is_analysed(tuple(offset), spans)
            for offset, is_special in zip(offsets, special, strict=True)]
