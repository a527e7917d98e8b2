"""Token batches for extraction: concept prompts and corpus sequences, with their token coordinates.

A batch is `batch_size` rows of `seq_len` positions; flattened it is `batch_size * seq_len` rows of
the `token` dimension, which is exactly one Zarr chunk, so every write is chunk-aligned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

import numpy as np

from storage.corpus import iter_documents
from storage.prompts import Concept, Prompt, PromptError, analysed_mask


@dataclass(frozen=True)
class TokenBatch:
    """One forward's worth of tokens (rows × positions) and their coordinates."""

    index: int
    input_ids: np.ndarray  # (rows, seq_len) int64
    attention_mask: np.ndarray  # (rows, seq_len) int64
    prompt_id: np.ndarray  # (rows,) int64, global within the split
    mask: np.ndarray  # (rows, seq_len) bool, True = analysed token
    token_str: np.ndarray  # (rows, seq_len) object
    item: np.ndarray | None = None  # (rows,) object: the concept item each prompt is about
    source: np.ndarray | None = None  # (rows,) object: where each prompt came from

    def coords(self) -> dict[str, np.ndarray]:
        """Flattened token coordinates (`token` = row-major prompt × position)."""
        rows, seq_len = self.input_ids.shape
        coords = {
            "prompt_id": np.repeat(self.prompt_id, seq_len),
            "position": np.tile(np.arange(seq_len, dtype=np.int64), rows),
            "token_id": self.input_ids.reshape(-1).astype(np.int64),
            "token_str": self.token_str.reshape(-1),
            "mask": self.mask.reshape(-1),
        }
        for name in ("item", "source"):
            if getattr(self, name) is not None:
                coords[name] = np.repeat(getattr(self, name), seq_len)
        return coords


@dataclass(frozen=True)
class BatchPlan:
    """The full layout of one split: sizes known before any forward (template-first writes)."""

    n_rows: int
    seq_len: int
    batch_rows: int
    n_batches: int
    content_hash: str

    @property
    def n_tokens(self) -> int:
        return self.n_rows * self.seq_len

    @property
    def chunk_tokens(self) -> int:
        return self.batch_rows * self.seq_len


def _special_flags(tokenizer, ids: np.ndarray) -> np.ndarray:
    special = set(tokenizer.all_special_ids)
    return np.isin(ids, list(special))


def _make_batch(tokenizer, index: int, ids: np.ndarray, attention: np.ndarray, first_prompt: int,
                prompts: Sequence[Prompt] | None = None, offsets: np.ndarray | None = None) -> TokenBatch:
    """A batch with its coordinates; without `prompts` every non-special token is analysed (corpus),
    with them the tokens that overlap each prompt's analysed words (`offsets (rows, seq_len, 2)`)."""
    strs = np.array([tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids], dtype=object)
    special = _special_flags(tokenizer, ids) | (attention == 0)
    prompt_id = np.arange(first_prompt, first_prompt + ids.shape[0], dtype=np.int64)
    if prompts is None:
        return TokenBatch(index, ids.astype(np.int64), attention.astype(np.int64), prompt_id, ~special, strs)
    mask = np.array([analysed_mask(off.tolist(), sp.tolist(), p.spans)
                     for off, sp, p in zip(offsets, special, prompts, strict=True)], dtype=bool)
    item = np.array([p.item for p in prompts], dtype=object)
    source = np.array([p.source for p in prompts], dtype=object)
    return TokenBatch(index, ids.astype(np.int64), attention.astype(np.int64), prompt_id, mask, strs,
                      item, source)


def _encode_with_offsets(tokenizer, concept: Concept) -> dict[str, np.ndarray]:
    if not getattr(tokenizer, "is_fast", False):
        raise PromptError(f"concept {concept.name!r}: masking needs the character offsets of a fast "
                          f"tokenizer; {type(tokenizer).__name__} has none")
    return tokenizer(concept.texts, padding="longest", return_tensors="np", return_offsets_mapping=True)


def concept_batches(tokenizer, concept: Concept, batch_size: int) -> tuple[BatchPlan, list[TokenBatch]]:
    """All prompts of a concept, padded to the concept's longest prompt, in batches."""
    encoded = _encode_with_offsets(tokenizer, concept)
    ids, attention, offsets = encoded["input_ids"], encoded["attention_mask"], encoded["offset_mapping"]
    batches = [
        _make_batch(tokenizer, b, ids[s : s + batch_size], attention[s : s + batch_size], s,
                    concept.prompts[s : s + batch_size], offsets[s : s + batch_size])
        for b, s in enumerate(range(0, len(ids), batch_size))
    ]
    if not any(batch.mask.any() for batch in batches):
        raise PromptError(
            f"concept {concept.name!r}: no analysed tokens remain after masking padding, special and "
            f"filler tokens; check its prompts and filler list"
        )
    digest = hashlib.sha256(f"batch_rows={batch_size}|".encode() + ids.tobytes() + attention.tobytes())
    digest.update(np.concatenate([b.mask for b in batches]).tobytes())
    digest.update("\x00".join(f"{p.item}\x01{p.source}" for p in concept.prompts).encode())
    plan = BatchPlan(len(ids), ids.shape[1], batch_size, len(batches), digest.hexdigest()[:16])
    return plan, batches


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids a tokenizer puts before and after a text ([CLS] … [SEP], <s> …, or none)."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise PromptError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens")


def _corpus_sequences(tokenizer, corpus: str, seq_len: int) -> Iterator[list[int]]:
    """Fixed-length sequences from the concatenated token stream of the corpus's documents."""
    prefix, suffix = special_affixes(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    buffer: list[int] = []
    for document in iter_documents(corpus):
        # verbose=False: a document longer than the model's positions is expected here — it is cut into
        # sequences of seq_len below — so transformers' "longer than the maximum" warning does not apply.
        buffer.extend(tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"])
        while len(buffer) >= body:
            yield prefix + buffer[:body] + suffix
            del buffer[:body]


def corpus_plan(tokenizer, corpus: str, seq_len: int, batch_size: int, max_tokens: int) -> BatchPlan:
    """Count the corpus's sequences (streaming, capped at `max_tokens`) and hash their ids."""
    max_rows = max_tokens // seq_len
    digest = hashlib.sha256(f"{corpus}|seq_len={seq_len}|batch_rows={batch_size}|".encode())
    n_rows = 0
    for sequence in islice(_corpus_sequences(tokenizer, corpus, seq_len), max_rows):
        digest.update(np.asarray(sequence, dtype=np.int64).tobytes())
        n_rows += 1
    if n_rows == 0:
        raise PromptError(f"corpus {corpus!r} has fewer than {seq_len} tokens")
    n_batches = -(-n_rows // batch_size)
    return BatchPlan(n_rows, seq_len, batch_size, n_batches, digest.hexdigest()[:16])


def corpus_batches(tokenizer, corpus: str, plan: BatchPlan, skip: set[int] = frozenset()) -> Iterator[TokenBatch]:
    """The corpus's batches in order, streamed; batches in `skip` are not materialised."""
    sequences = islice(_corpus_sequences(tokenizer, corpus, plan.seq_len), plan.n_rows)
    for index in range(plan.n_batches):
        rows = list(islice(sequences, plan.batch_rows))
        if index in skip:
            continue
        ids = np.asarray(rows, dtype=np.int64)
        batch = _make_batch(tokenizer, index, ids, np.ones_like(ids), index * plan.batch_rows)
        yield batch
