"""Tiny random models of each supported architecture, built with `from_config` and saved to disk,
so tests go through the real loading path without a model hub."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import transformers
from tokenizers import ByteLevelBPETokenizer

from storage.corpus import iter_documents
from storage.models import embedded_model_path

ARCHITECTURES = ("bert", "gpt2", "gpt_neox", "llama")
N_LAYERS, D_MODEL = 3, 32


@lru_cache(maxsize=1)
def _bpe_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer (GPT-2 style, `Ġ` markers) trained on real text."""
    texts = [doc[:20_000] for _, doc in zip(range(20), iter_documents("sotu"))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, special_tokens=["<|endoftext|>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>")


def _config(arch: str, vocab: int) -> transformers.PretrainedConfig:
    common = dict(vocab_size=vocab, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, intermediate_size=64)
    if arch == "bert":
        return transformers.BertConfig(**common, max_position_embeddings=256)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4,
                                       n_positions=256)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(**common, max_position_embeddings=256)
    if arch == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=2, max_position_embeddings=256)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path) -> Path:
    """Build a seeded random model from its config and save it with a tokenizer to `folder`."""
    if arch == "bert":
        tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_path())
    else:
        tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(_config(arch, len(tokenizer)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
