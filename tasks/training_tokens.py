"""Training tokens of the corpus: read from the activation store, or recomputed by the model.

A corpus extracted with `--stream-corpus` stores activations for its held-out chunks only; its
training chunks keep their token ids and masks. Reading a training chunk then runs the model on that
chunk's sequences — the same (rows, seq_len) batch extraction would have run — and captures the hook,
so the SAE trains on the activations a stored corpus would have held, in the same shuffled order,
without ever writing them (SAELens trains from the forward in the same way). Each read costs one
forward, repeated every epoch and for every SAE trained on the hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from storage import activation_store as store
from storage.models import ModelSpec, load_model
from tasks.extract import forward_residuals


def corpus_reader(url: str, hook: str, model: ModelSpec | None) -> Callable[[slice], np.ndarray]:
    """A function giving a corpus region's analysed activations (tokens, d_model) float32: from the
    store, or, for a streamed chunk, from a forward of `model` (which must be the model that was
    extracted: its revision is checked)."""
    first_stored = store.streamed_tokens(url, hook)
    if not first_stored:
        return lambda region: store.read_region(url, hook, region)
    if model is None:
        raise ValueError(f"{url} {hook}: the corpus was extracted with --stream-corpus, so training needs the "
                         f"model to recompute its activations; pass the model's spec")
    _check_revision(url, hook, model)

    def read(region: slice) -> np.ndarray:
        if region.start >= first_stored:
            return store.read_region(url, hook, region)
        ids, mask = store.read_token_ids(url, hook, region)
        resid = forward_residuals(load_model(model), ids, np.ones_like(ids), (hook,))[hook]
        return np.ascontiguousarray(resid[mask.reshape(-1)])

    return read


def _check_revision(url: str, hook: str, model: ModelSpec) -> None:
    extracted = store.open_activations(url, hook).attrs["model_revision"]
    loaded = load_model(model).revision
    if loaded != extracted:
        raise ValueError(f"{url} {hook}: the corpus was extracted (--stream-corpus) from model revision {extracted}, "
                         f"but {model.name} is now revision {loaded}; its training activations cannot be "
                         f"recomputed — re-extract with --refresh")


def training_batches(url: str, hook: str, holdout_fraction: float, batch_size: int, seed: int,
                     model: ModelSpec | None = None) -> Iterator[np.ndarray]:
    """Endless shuffled minibatches of the corpus's training tokens (store.training_batches), stored
    or streamed."""
    regions, _ = store.corpus_chunks(url, hook, holdout_fraction)
    return store.training_batches(url, hook, regions, batch_size, seed, read=corpus_reader(url, hook, model))


def first_training_tokens(url: str, hook: str, holdout_fraction: float, n_tokens: int,
                          model: ModelSpec | None = None) -> np.ndarray:
    """The first `n_tokens` analysed training tokens of the corpus (fewer if it has fewer)."""
    regions, _ = store.corpus_chunks(url, hook, holdout_fraction)
    read, rows, n = corpus_reader(url, hook, model), [], 0
    for region in regions:
        rows.append(read(region))
        n += len(rows[-1])
        if n >= n_tokens:
            break
    return np.concatenate(rows)[:n_tokens]
