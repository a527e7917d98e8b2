"""The query layer (saema.api, `saema query`) and the HTML report, on small fabricated results stores.

The stores are built by the flows' own dataset builders (stratification_dataset, strata_dataset,
sae_eval_dataset) from fake per-cell results, so their layout is the pipeline's.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
from pathlib import Path

import dask.array
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flows.config import StratifyConfig
from flows.sae import METRICS, sae_eval_dataset
from flows.stratify import _cells, strata_dataset, stratification_dataset
from saema.api import by_layer, open_results, query, stored_groups, to_frame
from saema.query_cli import add_query_arguments, add_report_arguments, run_query, run_report
from saema_core.ranks import ESTIMATORS, MODES
from storage.report import render_report, write_report
from storage.results import ResultsError, write_group
from tasks.sae import SAERef

H3, H5 = "blocks.3.hook_resid_post", "blocks.5.hook_resid_post"
CFG = StratifyConfig(noise_levels=(0.0, 0.1, 1.0), replicates=2)
N_TOKENS = 300_000  # a per-token variable above the 200k-cell default of to_frame


def _cell_result(space: str, concept: str) -> dict:
    """Ranks (noise, replicate, mode, estimator): the SAE's latent-mode rank climbs with σ."""
    noise, reps = len(CFG.noise_levels), CFG.replicates
    base = 4.0 if space == "latent" else 8.0
    levels = np.array([base, base + 2, base + 4]) if space == "latent" else np.full(noise, base)
    rank = np.broadcast_to(levels[:, None, None, None], (noise, reps, len(MODES), len(ESTIMATORS))).copy()
    jaccard = np.linspace(1.0, 0.4, noise)[:, None].repeat(reps, 1)
    counts = np.full((noise, reps, len(MODES)), 1.0)
    return {"rank": rank, "n_active": 16.0 * counts, "n_tokens": 50.0 * counts, "rank_bound": 50.0 * counts,
            "ceiling": 64.0 * counts, "n_supports": 10 * (2 - jaccard), "mean_jaccard": jaccard,
            "fraction_changed": 1 - jaccard, "scale": 1.0, "signal_rms": 0.5, "n_analysed": 50}


def _write_stratify(out: str, model: str, hooks: list[str], concepts: list[str]) -> None:
    cells = _cells(hooks, concepts, CFG.spaces)
    results = [_cell_result(space, concept) for _, concept, space in cells]
    write_group(out, "stratification", stratification_dataset(model, cells, results, CFG, hooks, concepts))
    write_group(out, "strata", strata_dataset(model, cells, results, CFG, hooks, concepts))


def _write_sae_eval(out: str, model: str, hooks: list[str]) -> None:
    refs = [SAERef(f"/saes/{h}/{k}", f"{k}-x4", k, "abc", h) for h in hooks for k in ("sae", "dense_ae")]
    metrics = [{**{name: 0.1 * (i + 1) for name in METRICS}, "ce_loss_score": float("nan"),
                "ce_loss_reason": "no LM head in the checkpoint"} for i, _ in enumerate(refs)]
    write_group(out, "sae_eval", sae_eval_dataset(model, refs, metrics))


def _structure(model: str) -> xr.Dataset:
    """A `structure`-like group: per-cell metrics plus a per-token variable over the size limit."""
    shape = (1, 1, 2, 2)
    coords = {"model": [model], "hook": [H3], "concept": ["months", "days"], "space": ["resid", "latent"]}
    cells = {"n_clusters": (("model", "hook", "concept", "space"), np.arange(4.0).reshape(shape),
                            {"long_name": "n_clusters", "units": "1", "description": "Betti-0"}),
             "embedding": (("model", "token"), np.zeros((1, N_TOKENS), np.float32), {"units": "1"}),
             "cluster_label": (("model", "hook", "concept", "space", "token_index"), np.zeros(shape + (5,)), {})}
    return xr.Dataset(cells, coords=coords)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    """m1: hooks 3 and 5, months and days; m2 (a second run merged in): hook 3, months only."""
    root = str(tmp_path_factory.mktemp("results"))
    _write_stratify(root, "m1", [H3, H5], ["months", "days"])
    _write_stratify(root, "m2", [H3], ["months"])
    _write_sae_eval(root, "m1", [H3, H5])
    write_group(root, "structure", _structure("m1"))
    return root


def _parse(argv: list[str], add=add_query_arguments) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


# --- saema.api ----------------------------------------------------------------------------------------

def test_stored_groups_and_datatree(out):
    assert stored_groups(out) == ["stratification", "strata", "structure", "sae_eval"]
    assert isinstance(open_results(out), xr.DataTree)


def test_query_is_lazy_and_filters_by_label_or_list(out):
    ds = query(out, "stratification", model="m1", hook=[H5], concept=["days", "months"])
    assert isinstance(ds["rank"].data, dask.array.Array)  # nothing read yet
    assert "model" not in ds.dims and ds.model.item() == "m1"  # a single label drops the dim
    assert list(ds.hook.values) == [H5] and list(ds.concept.values) == ["days", "months"]
    rank = ds["rank"].sel(hook=H5, concept="days", space="latent", mode="latent", estimator="numerical").load()
    np.testing.assert_array_equal(rank.mean("replicate").values, [4.0, 6.0, 8.0])


def test_groups_without_a_dim_ignore_its_filter(out):
    ds = query(out, "sae_eval", hook=H3, concept="months")
    assert set(ds.dims) == {"model", "sae"} and ds.hook.item() == H3


def test_query_without_group_leaves_out_groups_lacking_a_label(out):
    groups = query(out, hook=H5)
    assert set(groups) == {"stratification", "strata", "sae_eval"}  # structure holds only hook 3
    assert all(isinstance(ds, xr.Dataset) for ds in groups.values())
    with pytest.raises(ResultsError, match="no group holds"):
        query(out, hook="blocks.9.hook_resid_post")


@pytest.mark.parametrize("field, value, listed", [
    ("hook", "blocks.9.hook_resid_post", f"hook 'blocks.9.hook_resid_post' not in stratification; it has: {H3}, {H5}"),
    ("model", ["m1", "m7"], "model 'm7' not in stratification; it has: m1, m2"),
    ("concept", "planets", "concept 'planets' not in stratification; it has: days, months"),
])
def test_unknown_labels_say_what_exists(out, field, value, listed):
    with pytest.raises(ResultsError) as error:
        query(out, "stratification", **{field: value})
    assert listed in str(error.value)


def test_unknown_or_missing_group_says_which_exist(out, tmp_path):
    with pytest.raises(ResultsError, match=r"'bogus' not in .*groups are .*it has: stratification, strata"):
        query(out, "bogus")
    only_eval = str(tmp_path / "only_eval")
    _write_sae_eval(only_eval, "m1", [H3])
    with pytest.raises(ResultsError, match="'intervention' not in .*it has: sae_eval$"):
        query(only_eval, "intervention")
    with pytest.raises(ResultsError, match="no results at"):
        query(str(tmp_path / "empty"), "stratification")


def test_to_frame_is_tidy_and_leaves_out_per_token_variables(out):
    ds = query(out, "stratification", model=["m1"], hook=[H3])
    frame = to_frame(ds[["verdict", "n_strata", "transition_noise"]])
    cells = ds[["verdict"]].sizes
    assert len(frame) == int(np.prod(list(cells.values())))
    assert list(frame.columns[:len(cells)]) == list(cells) and frame.columns[-1] == "transition_noise"
    row = frame.query("concept == 'days' and space == 'latent' and mode == 'latent'")
    assert row["verdict"].item() == "stratified" and row["n_strata"].item() == 3
    assert row["transition_noise"].item() == 0.1
    assert set(frame.query("space != 'latent'")["verdict"]) == {"not stratified"}
    one = to_frame(ds.sel(hook=H3, concept="days", space="latent", mode="latent", estimator="numerical"))
    assert len(one) == 3 * 2 and one["model"].tolist() == ["m1"] * 6  # scalar coords stay as columns
    cell = to_frame(query(out, "sae_eval", model="m1", hook=H3).sel(sae="sae"), ["l0"])
    assert cell.to_dict("records") == [{"model": "m1", "hook": H3, "sae": "sae", "l0": pytest.approx(0.1)}]
    structure = query(out, "structure")
    assert to_frame(structure).attrs["skipped"] == ["embedding"]  # cluster_label is small: kept
    assert len(to_frame(structure, ["embedding"])) == N_TOKENS  # named, it is included
    with pytest.raises(ResultsError, match="it has: .*embedding"):
        to_frame(structure, ["n_cluster"])


# --- saema query / saema report -------------------------------------------------------------------------

def test_cli_table_has_a_header_and_respects_limit(out, capsys):
    assert run_query(_parse(["--out", out, "--group", "strata", "--hook", H3, "--limit", "5"])) == 0
    text = capsys.readouterr().out
    assert text.startswith("== strata (model: 2, hook: 1, concept: 2, space: 3, noise: 3, replicate: 2) ==")
    assert "mean_jaccard" in text and "5 of 72 rows shown" in text


def test_cli_csv_parses_back_to_the_stored_values(out, capsys):
    run_query(_parse(["--out", out, "--group", "strata", "--model", "m1", "--concept", "days", "--format", "csv"]))
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(frame) == 2 * 3 * 3 * 2 and set(frame.model) == {"m1"} and set(frame.concept) == {"days"}
    stored = query(out, "strata")["mean_jaccard"].sel(model="m1", concept="days", hook=H5, space="latent",
                                                        noise=1.0, replicate=1).values.item()
    picked = frame.query(f"hook == '{H5}' and space == 'latent' and noise == 1.0 and replicate == 1")
    assert picked["mean_jaccard"].item() == pytest.approx(stored)


def test_cli_json_records_with_chosen_variables(out, capsys):
    run_query(_parse(["--out", out, "--group", "sae_eval", "--var", "l0", "sae_id", "--format", "json"]))
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 4 and set(records[0]) == {"model", "hook", "sae", "l0", "sae_id"}
    assert {r["sae_id"] for r in records} == {"sae-x4", "dense_ae-x4"}


def test_cli_summary_of_every_group_in_each_format(out, capsys):
    run_query(_parse(["--out", out]))
    text = capsys.readouterr().out
    assert [line.split(" (")[0] for line in text.splitlines() if line.startswith("== ")] == [
        "== stratification", "== strata", "== structure", "== sae_eval"]
    run_query(_parse(["--out", out, "--format", "csv"]))
    summary = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert summary.set_index(["group", "variable"]).loc[("stratification", "rank"), "shape"] == "2×2×2×3×3×2×3×6"  # 6 estimators
    run_query(_parse(["--out", out, "--format", "json", "--concept", "days"]))
    groups = {r["group"] for r in json.loads(capsys.readouterr().out)}
    assert groups == {"stratification", "strata", "structure", "sae_eval"}


def test_cli_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match="no results at .*results.zarr; run `saema run"):
        run_query(_parse(["--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="--var needs --group"):
        run_query(_parse(["--out", str(tmp_path), "--var", "rank"]))
    with pytest.raises(SystemExit):  # argparse: exit 2 with the message on stderr
        _parse(["--out", str(tmp_path), "--limit", "0"])
    assert "must be ≥ 1" in capsys.readouterr().err


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_self_contained_with_sections_tables_and_plots(out):
    path = write_report(out)
    assert path == f"{out}/report.html"
    page = Path(path).read_text(encoding="utf-8")
    assert all(f'<section id="{g}">' in page for g in ("stratification", "strata", "structure", "sae_eval"))
    # m1 × {h3, h5} and m2 × h3 were computed (m2 × h5 never was): 3 rank plots + 3 strata plots,
    # and the key curves of the cross-model section.
    assert 'id="across"' in page
    assert len(_images(page)) == 7 and all(image.startswith(b"\x89PNG") for image in _images(page))
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert not re.search(r"<(script|link|iframe)\b", page)
    assert "latent: stratified 5, not stratified 0, saturated 0 (of 5)" in page
    assert "resid: stratified 0, not stratified 5, saturated 0 (of 5)" in page
    assert "transition_noise" in page and "explained_variance" in page
    assert "n_clusters" in page and "not tabulated" in page and "embedding (model × token)" in page
    assert "cluster_label (model × hook × concept × space × token_index)" in page
    assert f"results store {out}/results.zarr" in page and "saema 0.1.0" in page


def _tiny_png() -> bytes:
    fig = plt.figure(figsize=(1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def test_report_embeds_other_plots_once(tmp_path):
    out = str(tmp_path)
    _write_stratify(out, "m1", [H3], ["months"])
    png = _tiny_png()
    (tmp_path / "plots" / "extra").mkdir(parents=True)
    (tmp_path / "plots" / "extra" / "umap.png").write_bytes(png)
    (tmp_path / "plots" / f"stratification_{H3}.png").write_bytes(png)  # the report redraws this one
    page = render_report(out)
    assert '<section id="other-plots">' in page and "extra/umap.png" in page
    assert len(_images(page)) == 3 and f"stratification_{H3}.png" not in page


def test_cli_report_writes_where_asked(tmp_path, capsys):
    out, target = str(tmp_path / "out"), tmp_path / "deep" / "r.html"
    _write_sae_eval(out, "m1", [H3])
    assert run_report(_parse(["--out", out, "--output", str(target)], add_report_arguments)) == 0
    assert capsys.readouterr().out.strip() == f"report written to {target}"
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# --- across models and layers -------------------------------------------------------------------------

def test_a_metric_against_layer_per_model_in_the_api_the_cli_and_the_report(tmp_path, capsys):
    out = str(tmp_path)
    _write_sae_eval(out, "m1", [H3, H5])
    _write_sae_eval(out, "m2", [H3])  # another model, extended along `model` with one hook
    _write_stratify(out, "m2", [H3], ["months"])
    table = by_layer(query(out, "sae_eval"), "explained_variance", sae="sae")
    assert list(table.columns) == ["m1", "m2"] and list(table.index) == [(3, "post"), (5, "post")]
    np.testing.assert_allclose(table["m1"].values, [0.1, 0.3])  # SAE rows of hooks 3 and 5
    assert table.loc[(3, "post"), "m2"] == pytest.approx(0.1) and np.isnan(table.loc[(5, "post"), "m2"])
    assert by_layer(query(out, "sae_eval"), "explained_variance").attrs["averaged_over"] == ["sae"]
    run_query(_parse(["--out", out, "--group", "sae_eval", "--var", "explained_variance", "--by-layer",
                      "--sel", "sae=sae", "--format", "csv"]))
    assert capsys.readouterr().out.splitlines()[:2] == ["layer,position,m1,m2", "3,post,0.1,0.1"]
    with pytest.raises(ValueError, match="exactly one --var"):
        run_query(_parse(["--out", out, "--group", "sae_eval", "--by-layer"]))
    page = render_report(out)
    assert 'id="across"' in page and "key metrics against layer, per model" in page


def test_help_imports_nothing_heavy():
    """`saema --help` and argument errors answer at once: no torch, transformers, xarray or Zarr."""
    import subprocess
    import sys

    code = ("import sys; from saema.cli import build_parser; build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'xarray', 'zarr', 'pandas', 'prefect') if m in sys.modules]; "
            "print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_report_numbers_read_as_a_person_writes_them():
    from storage.report import format_number

    assert [format_number(v) for v in (12100.0, 32.0, 0.5590123, 48.8812, 3.255e-4, 2.5e7, -0.005209, np.nan)] == [
        "12,100", "32", "0.5590", "48.88", "3.255e-04", "25,000,000", "-0.005209", "—"]


def test_report_structure_tables_are_narrow_and_nan_reasons_are_shown():
    from storage.report import reasons_html, seed_summary

    rng = np.random.default_rng(0)
    values = rng.random((1, 2, 3, 2))
    values[0, 1, 2, :] = np.nan  # one (concept, space) never computed
    var = xr.DataArray(values, dims=("hook", "concept", "space", "seed"), name="n_clusters",
                       coords={"hook": ["h"], "concept": ["a", "b"], "space": ["resid", "latent", "dense_ae"],
                               "seed": [42, 43]})
    frame = seed_summary(var)
    assert list(frame.columns) == ["resid", "latent", "dense_ae"] and len(frame) == 2
    mean, sd = values[0, 0, 0].mean(), values[0, 0, 0].std(ddof=0)
    assert frame.loc[("h", "a"), "resid"].startswith(f"{mean:.4f}"[:5]) and " ± " in frame.loc[("h", "a"), "resid"]
    assert pd.isna(frame.loc[("h", "b"), "dense_ae"])
    ds = xr.Dataset({"ce_loss_score": (("sae",), [np.nan, 0.9], {"reason": "no LM head in the checkpoint"}),
                     "mse": (("sae",), [1.0, 2.0], {"reason": "never shown: nothing is missing"})})
    notes = reasons_html(ds)
    assert "ce_loss_score" in notes and "no LM head in the checkpoint" in notes and "mse" not in notes


def test_cli_exports_parquet_and_netcdf_that_read_back_to_the_stored_values(out, tmp_path, capsys):
    parquet, netcdf = tmp_path / "strata.parquet", tmp_path / "all.nc"
    run_query(_parse(["--out", out, "--group", "strata", "--model", "m1", "--format", "parquet",
                      "--output", str(parquet)]))
    frame = pd.read_parquet(parquet)
    stored = query(out, "strata", model="m1")
    assert len(frame) == stored["mean_jaccard"].size and set(frame.model) == {"m1"}
    picked = frame.query(f"hook == '{H5}' and concept == 'days' and space == 'latent' and noise == 1.0 and replicate == 1")
    assert picked["mean_jaccard"].item() == pytest.approx(
        stored["mean_jaccard"].sel(hook=H5, concept="days", space="latent", noise=1.0, replicate=1).values.item())
    run_query(_parse(["--out", out, "--format", "netcdf", "--output", str(netcdf), "--sel", "space=latent"]))
    tree = xr.open_datatree(netcdf)
    assert set(tree.children) == {"stratification", "strata", "structure", "sae_eval"}
    strata = tree["strata"].to_dataset()
    xr.testing.assert_allclose(strata["mean_jaccard"], query(out, "strata").sel(space="latent")["mean_jaccard"].load())
    assert strata.noise.attrs["long_name"] == "noise level σ" and strata.attrs["Conventions"] == "CF-1.10"
    assert list(tree["stratification"].to_dataset().verdict.values.ravel()[:1]) != []  # strings survive
    assert not list(tmp_path.glob(".*.partial"))


def test_cli_file_formats_need_an_output_and_a_failed_export_leaves_no_file(out, tmp_path):
    with pytest.raises(ValueError, match="--format parquet writes a file: give --output PATH"):
        run_query(_parse(["--out", out, "--group", "strata", "--format", "parquet"]))
    with pytest.raises(ValueError, match="--output writes csv, json, parquet or netcdf"):
        run_query(_parse(["--out", out, "--output", str(tmp_path / "x.csv")]))
    target = tmp_path / "missing-folder" / "x.nc"
    with pytest.raises(OSError):
        run_query(_parse(["--out", out, "--group", "strata", "--format", "netcdf", "--output", str(target)]))
    assert not target.parent.exists()


def test_every_stored_group_describes_itself(out):
    tree = open_results(out)
    assert {"title", "Conventions", "saema_version", "git_commit", "date_created", "date_modified"} <= set(tree.attrs)
    for name, group in tree.children.items():
        ds = group.to_dataset()
        assert ds.attrs["Conventions"] == "CF-1.10" and "date_modified" in ds.attrs, name
        for coord in ("model", "hook"):
            assert ds[coord].attrs.get("long_name"), (name, coord)
        for var_name, var in ds.data_vars.items():
            long_name = var.attrs.get("long_name")
            assert long_name and (long_name != var_name or "_" not in var_name), (name, var_name)  # words
    assert tree["strata"].to_dataset()["noise"].attrs["long_name"] == "noise level σ"
