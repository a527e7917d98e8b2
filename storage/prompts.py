"""Concept prompt sets: the nine built-in concepts, user sets from JSON/YAML, and token masking.

A built-in concept is a list of items (the months, the planets, …) crossed with sentence templates.
Its filler tokens are the words of its templates, so the analysed tokens are the items' tokens.
Masking matches normalised token strings (leading space, `Ġ`, `▁` and `##` stripped, lower case),
never raw ids, so the same filler list works for every tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_TEMPLATES = {
    "months": [
        "The festival always takes place in {}.",
        "My sister was born in {} last year.",
        "We usually travel north during {}.",
    ],
    "days": [
        "The meeting was moved to {}.",
        "She goes swimming every {}.",
        "The shop is closed on {}.",
        "I will call you back on {}.",
        "Our flight leaves early on {}.",
    ],
    "elements": [
        "The sample contained traces of {}.",
        "Students measured the density of {}.",
    ],
    "colours": [
        "She painted the kitchen door {}.",
        "The flag has a stripe of {}.",
        "He wore a scarf that was {}.",
    ],
    "planets": [
        "The probe finally reached {}.",
        "Astronomers watched {} through the telescope.",
        "A year on {} lasts a long time.",
        "The documentary was about {}.",
        "Tonight you can see {} low in the sky.",
    ],
    "numbers": [
        "The recipe needs {} eggs.",
        "There were {} boats in the harbour.",
    ],
    "alphabet": [
        "The word starts with the letter {}.",
        "Please underline the letter {}.",
    ],
    "phonetic": [
        "The pilot spelled out {} over the radio.",
        "Say {} clearly when you spell the code.",
        "The call sign began with {}.",
    ],
    "zodiac": [
        "The constellation {} rose above the hills.",
        "On clear nights we could find {} easily.",
        "The star chart showed {} near the horizon.",
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

BUILTIN_CONCEPTS: tuple[str, ...] = tuple(_ITEMS)
MIN_PROMPTS = 35

# Function words and punctuation masked in every concept, on top of its own filler list.
COMMON_FILLERS = frozenset(
    "the a an of in on at to and or is was were be been it its this that my our your his her "
    "their we you he she they i for with by from as . , ! ? ; : ' \" - ( )".split()
)


class PromptError(ValueError):
    """An empty, malformed or unusable prompt set; the message names the file and concept."""


@dataclass(frozen=True)
class Concept:
    """One concept: its prompts and the filler tokens masked out of its analysis."""

    name: str
    prompts: tuple[str, ...]
    fillers: frozenset[str] = field(default_factory=frozenset)


def normalise_token(token: str) -> str:
    """Token string without tokenizer markers (`Ġ`, `▁`, `##`, leading space), lower case."""
    return re.sub(r"^(##|Ġ|▁|\s)+", "", token).lower()


def _template_words(templates: list[str], items: list[str]) -> frozenset[str]:
    words = {w for t in templates for w in re.findall(r"\w+|[^\w\s]", t.replace("{}", " "))}
    item_words = {w.lower() for item in items for w in item.split()}
    return frozenset(w.lower() for w in words) - item_words


def builtin_concept(name: str) -> Concept:
    """A built-in concept: every item in every template (≥ 35 prompts)."""
    if name not in _ITEMS:
        raise PromptError(f"unknown built-in concept {name!r}; known: {', '.join(BUILTIN_CONCEPTS)}")
    items, templates = _ITEMS[name].split(), _TEMPLATES[name]
    prompts = tuple(t.format(item) for t in templates for item in items)
    assert len(prompts) >= MIN_PROMPTS, (name, len(prompts))
    return Concept(name, prompts, _template_words(templates, items))


def _concept_from_entry(name: str, entry: object, source: str) -> Concept:
    if isinstance(entry, list):
        prompts, fillers = entry, []
    elif isinstance(entry, dict) and "prompts" in entry:
        prompts, fillers = entry["prompts"], entry.get("fillers", [])
    else:
        raise PromptError(
            f"{source}: concept {name!r} must be a list of prompts or a mapping with 'prompts' "
            f"(and optional 'fillers'), got {type(entry).__name__}"
        )
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise PromptError(f"{source}: concept {name!r} has no prompts or a prompt that is not text")
    if not all(isinstance(f, str) for f in fillers):
        raise PromptError(f"{source}: concept {name!r} has a filler token that is not text")
    return Concept(str(name), tuple(prompts), frozenset(normalise_token(f) for f in fillers))


def load_prompt_file(path: str | Path) -> list[Concept]:
    """Concepts from a JSON or YAML file: {concept: [prompts]} or {concept: {prompts, fillers}}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PromptError(f"cannot read prompt file {path}: {error}") from error
    if not text.strip():
        raise PromptError(f"prompt file {path} is empty")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise PromptError(f"prompt file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {error}") from error
    if not isinstance(data, dict) or not data:
        raise PromptError(f"prompt file {path} is empty or not a mapping of concept -> prompts")
    return [_concept_from_entry(name, entry, str(path)) for name, entry in data.items()]


def resolve_concepts(names: list[str] | tuple[str, ...] = (), prompt_file: str | None = None) -> list[Concept]:
    """The requested concepts: built-ins by name, or those of a prompt file (all, or the named)."""
    if prompt_file:
        concepts = load_prompt_file(prompt_file)
        known = {c.name: c for c in concepts}
        missing = [n for n in names if n not in known]
        if missing:
            raise PromptError(f"concepts {missing} are not in {prompt_file}; it has {sorted(known)}")
        return [known[n] for n in names] if names else concepts
    return [builtin_concept(n) for n in (names or BUILTIN_CONCEPTS)]


def analysed_mask(token_strs: list[str], special: list[bool], fillers: frozenset[str]) -> list[bool]:
    """True for tokens that are analysed: not padding/special, not filler, not empty."""
    masked = COMMON_FILLERS | fillers
    return [
        not is_special and (norm := normalise_token(tok)) != "" and norm not in masked
        for tok, is_special in zip(token_strs, special, strict=True)
    ]
