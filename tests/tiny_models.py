"""Tiny random models of each supported architecture, built with `from_config` and saved to disk,
so tests go through the real loading path without a model hub."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import transformers
from tokenizers import ByteLevelBPETokenizer
from tokenizers.processors import TemplateProcessing

from storage.corpus import iter_documents
from storage.models import embedded_model_path

ARCHITECTURES = ("bert", "gpt2", "gpt_neox", "llama", "gemma3")
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
    if arch == "gemma3":  # Gemma 3 270M's layout: GQA, head_dim ≠ d/heads, sliding + global layers
        return transformers.Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                                             sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                                                            "full_attention"],
                                             bos_token_id=1, pad_token_id=0, eos_token_id=2)
    raise ValueError(arch)


@lru_cache(maxsize=1)
def _gemma_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Gemma's conventions: <pad> 0, <bos> 1 prepended to every sequence, <eos> 2."""
    texts = [doc[:20_000] for _, doc in zip(range(20), iter_documents("sotu"))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=600, special_tokens=["<pad>", "<bos>", "<eos>"])
    bpe.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                            special_tokens=[("<bos>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<bos>",
                                                eos_token="<eos>", pad_token="<pad>", unk_token="<eos>")


def save_tiny_model(arch: str, folder: Path) -> Path:
    """Build a seeded random model from its config and save it with a tokenizer to `folder`.

    Gemma 3 is saved with its LM head (`Gemma3ForCausalLM`, as the built-in gemma-3-270m is)."""
    if arch == "bert":
        tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_path())
    elif arch == "gemma3":
        tokenizer = _gemma_tokenizer()
    else:
        tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if arch == "gemma3" else transformers.AutoModel
    model = auto.from_config(_config(arch, len(tokenizer)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_run_args(out, model: str, corpus, command: str = "run", hook: str = "blocks.1.hook_resid_post") -> list[str]:
    """CLI options of a whole `saema` run on a tiny model in seconds per stage (`extract` takes only
    the extraction options)."""
    extract = ["--out", str(out), "--model", model, "--hooks", hook, "--concepts", "days", "planets",
               "--corpus", str(corpus), "--corpus-max-tokens", "8192", "--corpus-seq-len", "64",
               "--corpus-batch-size", "8", "--batch-size", "16"]
    stages = {"sae": ["--expansion", "4", "--k", "8", "--steps", "30", "--sae-batch-size", "256"],
              "stratify": ["--noise-levels", "0", "0.1", "1", "--replicates", "2"],
              "structure": ["--umap-seeds", "42", "--min-cluster-size", "5"],
              "intervention": ["--alphas", "0.5", "1", "1.5", "--intervention-steps", "3", "--paper-seeds", "2"],
              "causal": ["--causal-betas", "-1", "0", "1", "--causal-seeds", "1", "2", "--causal-steps", "5",
                         "--causal-clusters", "4"]}
    listed = COMMAND_STAGES.get(command, tuple(stages))  # each subcommand takes its stages' options only
    return extract + [option for stage in listed if stage in stages for option in stages[stage]]


COMMAND_STAGES = {"extract": (), "train-sae": ("sae",), "stratify": ("sae", "stratify"),
                  "structure": ("sae", "structure"), "intervene": ("sae", "structure", "intervention"),
                  "causal": ("sae", "causal")}


def without_write_time(ds):
    """A results group without the moment it was written: two runs of the same cells write the same
    values at different times (storage.conventions.write_provenance)."""
    return ds.assign_attrs({key: "" for key in ("date_modified",) if key in ds.attrs})
