"""Extraction throughput and memory: `saema extract`'s streaming loop against a bare forward.

    python benchmarks/extract.py [--tokens 65536] [--repeats 3] [--memory-tokens 32768 327680]
                                 [--hooks blocks.3.hook_resid_post] [--model gemma-3-270m]

Throughput: the same corpus batches, in the same process, through (a) a bare full forward of the
model, (b) the same forward followed by writing as many hidden states per batch as there are hooks as
plain files (the floor with I/O: what putting those bytes on this disk costs at all), (c) saema's
extraction loop (hooked forward that stops after the deepest hook + Zarr writes of activations and
token coordinates). All three run under saema's allocator setting (tasks/allocator.py). Repeats are
interleaved and medians reported, since the machine is shared. Memory: peak RSS of a child process
running the extraction loop on N and 10·N corpus tokens (flat = memory bounded by one batch, not by
the corpus).

The default hooks (blocks 1, 3 and 5 of the 6-block MiniLM) are the worst case: the deepest is the
last block, so the hooked forward is not shortened and every batch writes three hooks. `--hooks
blocks.3.hook_resid_post` measures what `saema extract` does by default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flows.config import ExtractConfig  # noqa: E402
from storage import activation_store as store  # noqa: E402
from storage.batches import corpus_batches, corpus_plan  # noqa: E402
from storage.models import ModelSpec, load_model  # noqa: E402
from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.extract import _identity, _stream, _todo, _writers  # noqa: E402

HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post", "blocks.5.hook_resid_post")


def bare_forward(lm, batches) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            lm.model(input_ids=torch.from_numpy(batch.input_ids),
                     attention_mask=torch.from_numpy(batch.attention_mask))
    return time.perf_counter() - start


def bare_forward_and_raw_writes(lm, batches, n_hooks: int) -> float:
    """The floor with I/O: the bare forward, then the same activation bytes (n_hooks hidden states per
    batch) written as plain files to the same disk: what writing them costs at all."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                states = lm.model(input_ids=torch.from_numpy(batch.input_ids),
                                  attention_mask=torch.from_numpy(batch.attention_mask),
                                  output_hidden_states=True).hidden_states
                for i, state in enumerate(states[-n_hooks:]):
                    with open(f"{out}/{batch.index}-{i}", "wb") as f:
                        f.write(state.numpy().tobytes())
        return time.perf_counter() - start


def saema_extraction(cfg: ExtractConfig, lm, batches) -> float:
    """Seconds of saema's streaming loop over `batches` into a fresh store (cfg.hooks)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = ExtractConfig(**{**cfg.__dict__, "out": out})
        url = store.activation_store_url(out, cfg.model.label)
        store.open_store(url, _identity(cfg, lm))
        plan = corpus_plan(lm.tokenizer, cfg.corpus, cfg.corpus_seq_len, cfg.corpus_batch_size,
                           cfg.corpus_max_tokens)
        writers = _writers(cfg, lm, url, plan, None)
        start = time.perf_counter()
        _stream(lm, writers, batches, _todo(writers, plan.n_batches), "bench")
        return time.perf_counter() - start


def child_peak_rss(max_tokens: int, hooks: tuple[str, ...], model: str) -> float:
    """Run the full streaming extraction (batches generated lazily) in a child; peak RSS in MiB."""
    result = subprocess.run([sys.executable, __file__, "--child", str(max_tokens), "--hooks", *hooks,
                             "--model", model],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def run_child(max_tokens: int, hooks: tuple[str, ...], model: str) -> None:
    cfg = ExtractConfig(model=ModelSpec(name=model), hooks=hooks, corpus_max_tokens=max_tokens)
    lm = load_model(cfg.model)
    plan = corpus_plan(lm.tokenizer, cfg.corpus, cfg.corpus_seq_len, cfg.corpus_batch_size, max_tokens)
    saema_extraction(cfg, lm, corpus_batches(lm.tokenizer, cfg.corpus, plan))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": plan.n_tokens, "peak_rss_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-tokens", type=int, nargs="*", default=[32_768, 327_680])
    parser.add_argument("--hooks", nargs="+", default=list(HOOKS), help="hooks to extract")
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="model to measure (e.g. gemma-3-270m)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hooks = tuple(args.hooks)
    if args.child:
        return run_child(args.child, hooks, args.model)
    keep_freed_memory()  # what `saema extract` does; the bare forward runs under the same allocator
    cfg = ExtractConfig(model=ModelSpec(name=args.model), hooks=hooks, corpus_max_tokens=args.tokens)
    lm = load_model(cfg.model)
    plan = corpus_plan(lm.tokenizer, cfg.corpus, cfg.corpus_seq_len, cfg.corpus_batch_size, args.tokens)
    batches = list(corpus_batches(lm.tokenizer, cfg.corpus, plan))
    bare_forward(lm, batches[:2])  # warm-up
    bare, floor, ours = [], [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(lm, batches))
        floor.append(bare_forward_and_raw_writes(lm, batches, len(hooks)))
        ours.append(saema_extraction(cfg, lm, batches))
    tok = plan.n_tokens
    b, f, o = statistics.median(bare), statistics.median(floor), statistics.median(ours)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model {cfg.model.label}, hooks {', '.join(hooks)}, {tok} tokens, seq_len {plan.seq_len}, "
          f"batch {plan.batch_rows} sequences, median of {args.repeats}")
    print(f"bare full forward      : {tok / b:10.0f} tokens/s")
    print(f"bare + raw file writes : {tok / f:10.0f} tokens/s  (the same bytes as plain files)")
    print(f"saema extract (+ Zarr) : {tok / o:10.0f} tokens/s")
    print(f"ratio saema / bare     : {b / o:10.2f}  (target >= 0.9)")
    print(f"ratio saema / (bare + raw writes): {f / o:4.2f}  (saema's own cost beyond writing the bytes)")
    for n in args.memory_tokens:
        print(f"peak RSS, {n:>8} corpus tokens: {child_peak_rss(n, hooks, args.model):8.0f} MiB")


if __name__ == "__main__":
    main()
