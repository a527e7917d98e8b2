"""The HTML report of a results store: one self-contained file (DESIGN.md §4.8).

Every plot is a PNG embedded as a base64 data URI and the styling is inline, so the file can be
mailed or archived alone. One section per stored group: key-metric tables, rank-vs-noise plots
(regenerated from the store, so they cover every model and hook it holds), strata plots, generic
tables for groups without a dedicated layout, then any other PNG under `<out>/plots/`.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import xarray as xr

from saema_core.compare import by_layer
from storage.locations import is_local, local_path, write_text
from storage.plots import plot_causal, plot_rank_vs_noise
from storage.provenance import provenance
from storage.results import GROUPS, incomplete_warning, open_results, results_url

PER_ITEM_DIMS = frozenset({"token", "prompt", "position", "d_model", "latent", "cluster", "step"})
"""Dimensions of per-token / per-step detail (and any `token_*` dim); not tabulated generically."""
MAX_TABLE_CELLS = 200_000
MAX_TABLE_ROWS = 400
VERDICT = ("verdict", "rank_range", "tau", "n_unsaturated", "n_strata", "transition_noise")
STRATA_PLOTTED = ("mean_jaccard", "fraction_changed")
_SPACE_COLOR = {"latent": "tab:red", "dense_ae": "tab:blue", "resid": "tab:gray"}

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table.data { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
table.data thead th { position: sticky; top: 0; background: #fff; }
table.data th, table.data td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; }
.incomplete-run { background: #fff3cd; border: 1px solid #e0b000; padding: 0.5em; }
.note { font-size: 0.85em; color: #555; } footer { margin-top: 3em; font-size: 0.8em; color: #666; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_uri(fig) -> str:
    """Render a matplotlib figure to a PNG data URI and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return data_uri(buffer.getvalue())


def image_html(uri: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def note_html(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def format_number(value: float) -> str:
    """Counts as integers with thousands separators (12,100, not 1.21e+04); other values with four
    significant digits, in plain notation between 0.001 and a million, scientific outside."""
    if not np.isfinite(value):
        return "—" if np.isnan(value) else str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e6:
        decimals = max(0, 3 - int(np.floor(np.log10(magnitude))))
        return f"{value:,.{decimals}f}"
    return f"{value:.3e}"


def table_html(frame: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS) -> str:
    """A pandas table (see `format_number`; '—' for NaN) that scrolls sideways when wider than the
    page, truncated with a note past `max_rows`."""
    shown = frame.head(max_rows).to_html(classes="data", border=0, na_rep="—", float_format=format_number)
    shown = f'<div class="table-wrap">{shown}</div>'
    if len(frame) > max_rows:
        shown += note_html(f"first {max_rows} of {len(frame)} rows; `saema query` prints them all")
    return shown


def glossary_html(ds: xr.Dataset) -> str:
    """What each variable means: dims, units, description (from the variables' attributes)."""
    rows = [{"variable": str(name), "dims": " × ".join(map(str, var.dims)), "units": var.attrs.get("units", ""),
             "description": var.attrs.get("description", "")} for name, var in ds.data_vars.items()]
    frame = pd.DataFrame(rows).set_index("variable")
    return f"<details><summary>variables</summary>{table_html(frame)}</details>"


def reasons_html(ds: xr.Dataset) -> str:
    """Why values are missing: the `reason` attribute a variable carries when some cells are NaN
    (e.g. `ce_loss_score` of a model without an LM head)."""
    notes = [f"{name} is '—' where it could not be computed: {var.attrs['reason']}" for name, var in ds.data_vars.items()
             if var.attrs.get("reason") and var.dtype.kind == "f" and bool(var.isnull().any())]
    return "".join(note_html(text) for text in notes)


def attrs_html(ds: xr.Dataset) -> str:
    if not ds.attrs:
        return ""
    return note_html("attributes: " + ", ".join(f"{key}={value}" for key, value in ds.attrs.items()))


def has_labels(ds: xr.Dataset, **labels: str) -> bool:
    return all(dim in ds.coords and value in [str(v) for v in ds[dim].values] for dim, value in labels.items())


def cell_frame(ds: xr.Dataset, variables: list[str]) -> pd.DataFrame:
    """Variables as columns indexed by their dims; rows never computed (all NaN) dropped."""
    frame = ds[variables].to_dataframe()[variables]
    return frame.dropna(how="all")


# --- sae_eval ---------------------------------------------------------------------------------------

def sae_eval_section(ds: xr.Dataset) -> list[str]:
    """Reconstruction metrics per (model, hook, SAE kind)."""
    numeric = [str(v) for v in ds.data_vars if ds[v].dtype.kind in "fiub"]
    labels = [str(v) for v in ds.data_vars if v not in numeric]
    shown = [v for v in ("sae_id",) if v in labels]
    sources = [v for v in labels if v not in shown]
    parts = [table_html(cell_frame(ds, shown + numeric))]
    if sources:
        parts.append(f"<details><summary>model sources and revisions</summary>"
                     f"{table_html(cell_frame(ds, sources))}</details>")
    return parts


# --- stratification ---------------------------------------------------------------------------------

def verdict_frame(ds: xr.Dataset) -> pd.DataFrame:
    """The latent-mode verdict (exact rank) per (model, hook, concept), the three spaces side by side."""
    present = [v for v in VERDICT if v in ds]
    frame = ds[present].sel(mode="latent").to_dataframe()[present]
    frame = frame[frame["verdict"].fillna("") != ""] if "verdict" in present else frame.dropna(how="all")
    return frame.unstack("space") if "space" in frame.index.names else frame


def verdict_summary(ds: xr.Dataset) -> str:
    """Per space, how many computed (model, hook, concept) cells got each verdict."""
    verdicts = ds["verdict"].sel(mode="latent")
    parts = []
    for space in verdicts.space.values:
        values = [str(v) for v in verdicts.sel(space=space).values.ravel() if v]
        counts = ", ".join(f"{name} {values.count(name)}" for name in ("stratified", "not stratified", "saturated"))
        parts.append(f"{space}: {counts} (of {len(values)})")
    return ("Latent mode, exact (float64) rank — " + "; ".join(parts) + ". 'saturated' means the rank reached "
            "the number of analysed tokens at all but at most one σ: not informative.")


def concept_frame(ds: xr.Dataset) -> pd.DataFrame:
    """Per (model, hook, concept): analysed tokens and where the prompts came from."""
    frame = ds["n_analysed"].to_dataframe()[["n_analysed"]].dropna()
    if "concept_source" in ds:
        sources = ds["concept_source"].to_series()
        frame["source"] = [sources.get((m, c), "") for m, _, c in frame.index]
    return frame


def computed_cells(ds: xr.Dataset, variable: str) -> xr.Dataset:
    """Leave out concepts and spaces never computed for this (model, hook): merged runs leave NaN holes."""
    for dim in ("concept", "space"):
        ds = ds.dropna(dim, how="all", subset=[variable])
    return ds


def rank_plots(ds: xr.Dataset) -> list[str]:
    """One rank-vs-noise figure per (model, hook), drawn by storage.plots.plot_rank_vs_noise."""
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in ds.model.values:
            for hook in ds.hook.values:
                cell = computed_cells(ds.sel(model=model, hook=hook).load(), "rank")
                if cell.concept.size == 0:
                    continue  # this (model, hook) was never run
                path = plot_rank_vs_noise(cell, f"{tmp}/rank.png")
                parts.append(image_html(data_uri(Path(path).read_bytes()), f"rank vs noise σ — {model}, {hook}"))
    return parts


def stratification_section(ds: xr.Dataset) -> list[str]:
    if not has_labels(ds, mode="latent", estimator="numerical"):
        return [note_html("no latent-mode numerical ranks stored; generic table instead")] + generic_section(ds)
    parts = [note_html(verdict_summary(ds))] if "verdict" in ds else []
    parts.append(table_html(verdict_frame(ds)))
    if "n_analysed" in ds:
        parts += ["<h3>concept data</h3>", table_html(concept_frame(ds))]
    if "rank" in ds and bool((ds.noise > 0).any()):
        parts += rank_plots(ds)
    return parts


def plotted_names(tree: xr.DataTree) -> set[str]:
    """Files under <out>/plots/ that the report regenerates (the stratify and causal flows' per-hook plots)."""
    return {f"{group}_{hook}.png" for group in ("stratification", "causal") if group in tree.children
            for hook in tree[group].ds.hook.values}


# --- causal test ------------------------------------------------------------------------------------

_CAUSAL_TABLE = ("mse", "explained_variance", "separability", "separability_ratio", "l0", "ce_loss_score")


def dose_response_frame(cell: xr.Dataset) -> pd.DataFrame:
    """Rows β; per outcome the mean over seeds and the seeds' standard deviation."""
    names = [n for n in _CAUSAL_TABLE if n in cell]
    mean = cell[names].mean("seed").to_dataframe()[names]
    spread = cell[names].std("seed").to_dataframe()[names].add_suffix(" (sd over seeds)")
    return pd.concat([mean, spread], axis=1)[[c for n in names for c in (n, f"{n} (sd over seeds)")]]


def causal_section(ds: xr.Dataset) -> list[str]:
    """Per (model, hook): the verdict in words, the dose–response table and its plot."""
    parts = []
    for model in ds.model.values:
        for hook in ds.hook.values:
            cell = ds.sel(model=model, hook=hook).load()
            if not str(cell["verdict"].values):
                continue  # this (model, hook) was never tested
            parts += [f"<h3>{html.escape(f'{model}, {hook}')}: {html.escape(str(cell['verdict'].values))}</h3>",
                      note_html(str(cell["verdict_reason"].values)), table_html(dose_response_frame(cell))]
            with tempfile.TemporaryDirectory() as tmp:
                path = plot_causal(cell, f"{tmp}/causal.png", f"{model} {hook}")
                parts.append(image_html(data_uri(Path(path).read_bytes()),
                                        f"held-out MSE vs achieved separability — {model}, {hook}"))
    return parts or generic_section(ds)


# --- strata -----------------------------------------------------------------------------------------

def _sigma_axis(noise: np.ndarray) -> np.ndarray:
    """σ for a log axis: σ = 0 is drawn a third of the first positive level to its left."""
    positive = noise[noise > 0]
    floor = positive.min() / 3 if positive.size else 1.0
    return np.where(noise > 0, noise, floor)


def plot_strata_vs_noise(cell: xr.Dataset, title: str):
    """Per variable a panel: concept-mean of the replicate mean vs σ per space, band = concept range."""
    names = [v for v in STRATA_PLOTTED if v in cell]
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.3), squeeze=False)
    x = _sigma_axis(cell.noise.values)
    for ax, name in zip(axes.flat, names):
        per_concept = cell[name].mean("replicate") if "replicate" in cell[name].dims else cell[name]
        for space in cell.space.values:
            curve = per_concept.sel(space=space)
            color = _SPACE_COLOR.get(str(space), "black")
            ax.plot(x, curve.mean("concept"), marker="o", ms=3, color=color, label=str(space))
            ax.fill_between(x, curve.min("concept"), curve.max("concept"), color=color, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("noise σ (σ=0 at far left)")
        ax.set_ylabel(name)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def noise_table(ds: xr.Dataset, name: str) -> pd.DataFrame:
    """Mean over concepts and replicates of one variable: rows (model, hook, space), columns σ."""
    reduce = [d for d in ("concept", "replicate") if d in ds[name].dims]
    frame = ds[name].mean(reduce).to_dataframe()[name].unstack("noise")
    return frame.dropna(how="all")


def strata_section(ds: xr.Dataset) -> list[str]:
    needed = {"noise", "space", "concept"}
    names = [v for v in STRATA_PLOTTED if v in ds]
    if not names or not needed <= set(ds.dims):
        return generic_section(ds)
    parts = []
    for name in [v for v in ("n_supports", *STRATA_PLOTTED) if v in ds]:
        parts += [f"<h3>{html.escape(name)} (mean over concepts and replicates)</h3>", table_html(noise_table(ds, name))]
    for model in ds.model.values:
        for hook in ds.hook.values:
            cell = computed_cells(ds.sel(model=model, hook=hook).load(), names[0])
            if cell.concept.size:
                parts.append(image_html(figure_uri(plot_strata_vs_noise(cell, f"{model}, {hook}")),
                                        f"support strata vs noise σ — {model}, {hook}"))
    return parts


# --- structure --------------------------------------------------------------------------------------

STRUCTURE_KEY = ("n_clusters", "noise_fraction", "ari_item", "ari_sentence", "agd", "procrustes_disparity")


def seed_summary(var: xr.DataArray) -> pd.DataFrame:
    """Rows (model, hook, concept), columns space: "mean ± sd" over seeds (the value, for one seed)."""
    mean, sd = var.mean("seed"), var.std("seed")
    cells = xr.apply_ufunc(np.vectorize(lambda m, s: "" if np.isnan(m) else format_number(m) + (
        f" ± {format_number(s)}" if var.sizes["seed"] > 1 else ""), otypes=[object]), mean, sd)
    frame = cells.to_dataframe(name=str(var.name))[str(var.name)].unstack("space")
    return frame[[c for c in var.space.values if c in frame.columns]].replace("", np.nan).dropna(how="all")


def structure_section(ds: xr.Dataset) -> list[str]:
    """Key cluster metrics, one narrow table each (spaces as columns, mean ± sd over UMAP seeds); every
    metric per seed folded away; the reason of each cell whose metrics are NaN."""
    if not {"seed", "space", "concept"} <= set(ds.dims):
        return generic_section(ds)
    seeds = ", ".join(map(str, ds.seed.values))
    parts = [note_html(f"Per concept, one column per space; mean ± sd over the UMAP seeds ({seeds}).")]
    for name in [n for n in STRUCTURE_KEY if n in ds]:
        description = ds[name].attrs.get("description") or ds[name].attrs.get("long_name", "")
        parts += [f"<h3>{html.escape(name)}</h3>", note_html(description) if description else "",
                  table_html(seed_summary(ds[name]))]
    if "reason" in ds:
        reasons = ds["reason"].to_dataframe()[["reason"]]
        reasons = reasons[reasons["reason"].astype(str) != ""]
        if len(reasons):
            parts += ["<h3>cells without metrics</h3>", table_html(reasons)]
    parts.append(f"<details><summary>every metric, per seed</summary>{''.join(generic_section(ds))}</details>")
    return parts


# --- any other group --------------------------------------------------------------------------------

def scalar_variables(ds: xr.Dataset) -> dict[tuple[str, ...], list[str]]:
    """Variables without per-token/per-step dims, grouped by their dims (one table per dims)."""
    tables: dict[tuple[str, ...], list[str]] = {}
    for name, var in ds.data_vars.items():
        dims = set(map(str, var.dims))
        if not PER_ITEM_DIMS & dims and not any(d.startswith("token") for d in dims) and var.size <= MAX_TABLE_CELLS:
            tables.setdefault(tuple(map(str, var.dims)), []).append(str(name))
    return tables


def generic_section(ds: xr.Dataset) -> list[str]:
    tables = {dims: names for dims, names in scalar_variables(ds).items() if dims}
    parts = [table_html(cell_frame(ds, names)) for names in tables.values()]
    tabulated = {name for names in tables.values() for name in names}
    left = [f"{name} ({' × '.join(map(str, ds[name].dims)) or 'scalar'})" for name in map(str, ds.data_vars)
            if name not in tabulated]
    if left:
        parts.append(note_html("not tabulated (per-token or per-step detail, or scalar): " + ", ".join(left)))
    return parts


# --- findings ---------------------------------------------------------------------------------------

def findings_section(ds: xr.Dataset) -> list[str]:
    """The claims, one row per (model, hook, claim, space) with a verdict."""
    frame = ds[["verdict", "why", "numbers"]].to_dataframe()
    frame = frame[frame["verdict"].fillna("") != ""]
    claims = "".join(f"<li><b>{html.escape(str(c))}</b>: {html.escape(str(t))}</li>"
                     for c, t in zip(ds.claim.values, ds["claim_text"].values)) if "claim_text" in ds else ""
    return [f"<ul>{claims}</ul>", note_html("Each verdict is computed from the groups below; 'not informative' "
                                           "says why the data cannot decide."), table_html(frame)]


# --- across models and layers ------------------------------------------------------------------------

KEY_CURVES = (("sae_eval", "explained_variance", {"sae": "sae"}, "SAE explained variance"),
              ("sae_eval", "ce_loss_score", {"sae": "sae"}, "SAE CE loss score"),
              ("causal", "effect", {}, "causal test: MSE change of the separating SAE"),
              ("causal", "separability_change", {}, "causal test: separability change it achieved"))


def verdict_grid(ds: xr.Dataset) -> pd.DataFrame:
    """Findings side by side: one row per (claim, space), one column per (model, hook)."""
    frame = ds["verdict"].to_dataframe().reset_index()
    frame = frame[frame["verdict"].astype(str) != ""]
    frame["column"] = frame["model"].astype(str) + " · " + frame["hook"].astype(str)
    return frame.pivot(index=["claim", "space"], columns="column", values="verdict").fillna("")


def prompt_set_frame(prompt_set: xr.DataArray) -> pd.DataFrame:
    """Concepts whose prompt-set fingerprint differs between the models that analysed them."""
    frame = prompt_set.to_pandas().T  # concept × model
    differs = frame.apply(lambda row: len({v for v in row if v}) > 1, axis=1)
    return frame[differs]


def plot_key_curves(tree: xr.DataTree) -> str:
    """One panel per key metric against layer, a line per model."""
    curves = [(by_layer(tree[g].to_dataset(), v, **sel), title) for g, v, sel, title in KEY_CURVES
              if g in tree.children and v in tree[g].ds]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), squeeze=False, layout="constrained")
    for ax, (table, title) in zip(axes[0], curves):
        for model in table.columns:
            series = table[model].dropna()
            x = [layer + (0.0 if position == "post" else -0.5) for layer, position in series.index]
            ax.plot(x, series.values, marker="o", label=str(model))
        ax.set(title=title, xlabel="block (resid_post at L, resid_pre at L − ½)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    return figure_uri(fig)


def comparison_section(tree: xr.DataTree) -> str:
    """Findings and key curves per model and hook side by side, when the store holds more than one."""
    cells = {(str(m), str(h)) for g in tree.children.values() for m in g.ds.coords.get("model", xr.DataArray([])).values
             for h in g.ds.coords.get("hook", xr.DataArray([])).values}
    if len(cells) < 2:
        return ""
    parts = ['<section id="across"><h2>Across models and layers</h2>',
             note_html(f"{len(cells)} (model, hook) cells; each model's hooks are drawn against block depth.")]
    if "stratification" in tree.children and "prompt_set" in tree["stratification"].ds:
        differing = prompt_set_frame(tree["stratification"].ds["prompt_set"].load())
        if len(differing):
            parts += [note_html("These concepts were analysed on different prompts for different models (another "
                                "prompt file, corpus or --concept-contexts): their comparison across models "
                                "compares different data."), table_html(differing)]
    if "findings" in tree.children:
        parts += ["<h3>findings side by side</h3>", table_html(verdict_grid(tree["findings"].to_dataset()))]
    parts += ["<h3>key curves</h3>", image_html(plot_key_curves(tree), "key metrics against layer, per model")]
    return "\n".join([*parts, "</section>"])


SECTIONS: dict[str, Callable[[xr.Dataset], list[str]]] = {
    "findings": findings_section, "sae_eval": sae_eval_section, "stratification": stratification_section,
    "strata": strata_section, "causal": causal_section, "structure": structure_section}


def group_section(name: str, ds: xr.Dataset) -> str:
    sizes = ", ".join(f"{dim}: {size}" for dim, size in ds.sizes.items())
    body = SECTIONS.get(name, generic_section)(ds)
    return "\n".join([f'<section id="{name}"><h2>{html.escape(name)}</h2>', note_html(f"dims — {sizes}"),
                      attrs_html(ds), *body, reasons_html(ds), glossary_html(ds), "</section>"])


# --- other plots, footer, page ----------------------------------------------------------------------

def other_plots_section(out: str, skip: set[str]) -> str:
    """Every PNG under <out>/plots/ whose name is not in `skip` (plots the report already drew)."""
    fs, root = fsspec.core.url_to_fs(f"{out.rstrip('/')}/plots")
    if not fs.exists(root):
        return ""
    files = sorted(p for p in fs.glob(f"{root}/**/*.png") if Path(p).name not in skip)
    images = [image_html(data_uri(fs.cat_file(p)), p[len(root):].lstrip("/")) for p in files]
    return f'<section id="other-plots"><h2>Other plots</h2>{"".join(images)}</section>' if images else ""


def footer_html(out: str) -> str:
    meta = provenance()
    return (f"<footer>saema {html.escape(meta['saema_version'])} (git {html.escape(meta['git_commit'])}) · "
            f"report created {html.escape(meta['created'])} · results store {html.escape(results_url(out))}</footer>")


INCOMPLETE_CLASS = "incomplete-run"


def incomplete_html(out: str) -> str:
    """A warning box naming the runs that started extending the store and have not finished."""
    warning = incomplete_warning(out)
    return "".join(f'<p class="{INCOMPLETE_CLASS}"><b>Partly updated:</b> {html.escape(line)}</p>'
                   for line in warning.splitlines())


def render_report(out: str) -> str:
    """The report of `<out>/results.zarr` as one HTML string."""
    tree = open_results(out)
    names = sorted((g for g in GROUPS if g in tree.children), key=lambda g: g != "findings")  # findings first
    sections = [comparison_section(tree), *(group_section(name, tree[name].to_dataset()) for name in names)]
    links = (["across"] if sections[0] else []) + names
    contents = " · ".join(f'<a href="#{name}">{name}</a>' for name in links) or "no result groups stored yet"
    return "\n".join([
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>saema report — {html.escape(out)}</title><style>{CSS}</style></head><body>",
        f"<h1>saema report</h1><p>{html.escape(results_url(out))}</p>{incomplete_html(out)}<nav>{contents}</nav>",
        *sections, other_plots_section(out, plotted_names(tree)), footer_html(out), "</body></html>"])


def report_is_current(out: str, path: str | None = None) -> bool:
    """True when a local report is newer than every results group and plot it shows (an unchanged
    re-run leaves those untouched); always False for remote outputs, which have no cheap mtimes."""
    path = path or f"{out.rstrip('/')}/report.html"
    if not (is_local(out) and is_local(path)) or not local_path(path).exists():
        return False
    root = local_path(out)
    # The root zarr.json changes with every run's in-progress record; the banner shows that record.
    shown = [*(root / "results.zarr").glob("[!z]*"), *(root / "plots").glob("*.png")]
    written = local_path(path).stat().st_mtime
    banner = INCOMPLETE_CLASS in local_path(path).read_text(errors="replace")
    return banner == bool(incomplete_warning(out)) and all(item.stat().st_mtime <= written for item in shown)


def write_report(out: str, path: str | None = None) -> str:
    """Write the self-contained HTML report (default `<out>/report.html`, any fsspec URL); returns its path."""
    path = path or f"{out.rstrip('/')}/report.html"
    write_text(path, render_report(out))
    return path
