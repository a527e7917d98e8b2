"""Concept sources: corpus contexts (whole words, case-sensitive, capped, balanced), templates, files."""

from __future__ import annotations

import json

import pytest

from storage.batches import concept_batches
from storage.concept_sources import (
    ContextSpec,
    corpus_contexts,
    find_occurrences,
    quotas,
    resolve_concepts,
)
from storage.models import ModelSpec, load_model
from storage.prompts import BUILTIN_CONCEPTS, PromptError, builtin_concept

DOCS = [
    "In May the Mayor said we may go. May was warm, and June was warmer; in June we swam.",
    "March on! The march began in March. MAY day. June-bug. Junes. June's end came in June.",
]


def test_whole_word_case_sensitive_counts():
    found = find_occurrences(DOCS, ["May", "March", "June"])
    # "May" ×2 (not Mayor, may, MAY); "March" ×2 (not march); "June" ×4 (not June-bug or Junes).
    assert {item: len(v) for item, v in found.items()} == {"May": 2, "March": 2, "June": 4}
    starts = [o.start for o in found["June"]]
    assert starts == sorted(starts[:2]) + sorted(starts[2:])  # corpus order within each document
    for occ in found["May"]:
        assert DOCS[occ.document][occ.start:occ.start + 3] == "May"
        assert not DOCS[occ.document][occ.start + 3].isalpha()


def test_quotas_share_the_cap_equally_and_pass_on_what_is_left():
    assert quotas({"a": 1, "b": 10, "c": 10}, 9) == {"a": 1, "b": 4, "c": 4}
    assert quotas({"a": 1, "b": 2}, 100) == {"a": 1, "b": 2}
    assert sum(quotas({"a": 7, "b": 3, "c": 50}, 20).values()) == 20


def test_contexts_respect_the_cap_window_and_order():
    spec = ContextSpec(corpus="docs", max_contexts=3, window_words=2)
    prompts = corpus_contexts(DOCS, "months", ["June", "March"], spec)
    assert len(prompts) == 3
    assert [p.item for p in prompts] == ["June", "June", "March"]  # items in the concept's order
    for p in prompts:
        (start, end), = p.spans
        assert p.text[start:end] == p.item
        assert len(p.text.split()) <= 5
        assert p.source.startswith("docs:")
    assert corpus_contexts(DOCS, "months", ["June", "March"], spec) == prompts  # deterministic


def _write_docs(folder, documents) -> object:
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(documents))
    return path


def test_contexts_errors_name_the_concept(tmp_path):
    spec = ContextSpec(corpus="docs")
    with pytest.raises(PromptError, match="concept 'zodiac': none of its items"):
        corpus_contexts(DOCS, "zodiac", ["Aries", "Leo"], spec)
    with pytest.raises(PromptError, match="concept .months.: none of its items.*templates"):
        resolve_concepts(["months"], "corpus", ContextSpec(corpus=str(_write_docs(tmp_path, ["no dates here"]))))
    with pytest.raises(PromptError, match="every item is ambiguous"):
        resolve_concepts(["zodiac"], "corpus", ContextSpec(corpus="sotu"))
    with pytest.raises(PromptError, match="need a corpus"):
        resolve_concepts(["months"], "corpus", ContextSpec(corpus=None))
    with pytest.raises(PromptError, match="must be auto, corpus, templates or a prompt file"):
        resolve_concepts(["months"], "nonsense", ContextSpec(corpus=None))


def test_file_items_get_corpus_contexts(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(DOCS[0])
    path = tmp_path / "p.yaml"
    path.write_text("summer:\n  items: [June]\nbad:\n  items: [June, '']\n")
    with pytest.raises(PromptError, match="concept 'bad' has no items or an empty item"):
        resolve_concepts([], str(path), ContextSpec(corpus=str(corpus)))
    path.write_text(json.dumps({"summer": {"items": ["June"], "prompts": ["The long days of summer."]}}))
    concept, = resolve_concepts([], str(path), ContextSpec(corpus=str(corpus)))
    assert [p.item for p in concept.prompts] == ["", "June", "June"]
    assert "corpus" in concept.source


def test_default_builtins_reach_the_floor_with_the_embedded_tokenizer():
    lm = load_model(ModelSpec())
    concepts = resolve_concepts((), "auto", ContextSpec(corpus="sotu"))
    assert [c.name for c in concepts] == list(BUILTIN_CONCEPTS)
    sources = {c.name: c.source.split()[0] for c in concepts}
    assert sources["months"] == sources["numbers"] == "corpus" and sources["zodiac"] == "templates"
    for concept in concepts:
        _, batches = concept_batches(lm.tokenizer, concept, batch_size=64)
        assert sum(int(b.mask.sum()) for b in batches) >= 1000, concept.name


def test_corpus_months_analyse_only_the_items_and_leave_may_and_march_to_templates():
    lm = load_model(ModelSpec())
    concept, = resolve_concepts(["months"], "corpus", ContextSpec(corpus="sotu", max_contexts=200))
    corpus_items = {p.item for p in concept.prompts if p.source != "template"}
    assert "May" not in corpus_items and "March" not in corpus_items
    assert {p.item for p in concept.prompts if p.source == "template"} == {"May", "March"}
    _, batches = concept_batches(lm.tokenizer, concept, batch_size=64)
    rows = [(s, i) for b in batches for r in range(len(b.mask)) if b.source[r] != "template"
            for s, i in [(b.token_str[r][b.mask[r]], b.item[r])]]
    assert all(" ".join(tokens) == item.lower() for tokens, item in rows)


def test_templates_mask_whole_words_and_keep_the_items():
    lm = load_model(ModelSpec())
    _, batches = concept_batches(lm.tokenizer, builtin_concept("alphabet"), batch_size=64)
    analysed = [(s, b.item[r]) for b in batches for r in range(len(b.mask))
                for s in b.token_str[r][b.mask[r]]]
    tokens = {s for s, _ in analysed}
    assert {"a", "i"} <= tokens  # the letters A and I are items, never stopwords
    assert "the" not in tokens and "." not in tokens
    # every word is analysed whole: "underlined" → under ##lined, both or neither
    for b in batches:
        for r in range(len(b.mask)):
            row = list(b.token_str[r])
            for j, tok in enumerate(row):
                if tok.startswith("##"):
                    assert b.mask[r][j] == b.mask[r][j - 1]
