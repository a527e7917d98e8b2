"""Plots of every stage, written as PNG files (and embedded in the report and Prefect artifacts).

A plot's `path` is a local path or any fsspec URL (`memory://…/plots/x.png`); see storage.locations.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

from storage.activation_store import model_slug
from storage.locations import write_bytes

_SPACE_STYLE = {"latent": ("tab:red", "-"), "dense_ae": ("tab:blue", "--"), "resid": ("tab:gray", ":")}


def plot_path(out: str, model: str, kind: str, *parts: str) -> str:
    """`<out>/plots/<model>/<kind>_<part>_….png`: one folder per model, so models never share a file."""
    return f"{out.rstrip('/')}/plots/{model_slug(model)}/{'_'.join((kind, *parts))}.png"


def _save(fig, path: str) -> str:
    """Render `fig` as PNG into memory, close it, and write the bytes to `path` (a path or URL)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return path


def plot_rank_vs_noise(ds: xr.Dataset, path: str, mode: str = "latent", estimator: str = "numerical") -> str:
    """One panel per concept: replicate-mean rank vs σ (log axis) per space, spread as a band."""
    concepts = list(ds.concept.values)
    cols = min(3, len(concepts))
    rows = -(-len(concepts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    sigma = ds.noise.values
    x = [s if s > 0 else sigma[sigma > 0].min() / 3 for s in sigma]  # σ=0 drawn left of the first level
    for ax, concept in zip(axes.flat, concepts):
        for space in ds.space.values:
            rank = ds["rank"].sel(concept=concept, space=space, mode=mode, estimator=estimator)
            color, style = _SPACE_STYLE.get(str(space), ("black", "-"))
            ax.plot(x, rank.mean("replicate"), style, color=color, marker="o", ms=3, label=str(space))
            ax.fill_between(x, rank.min("replicate"), rank.max("replicate"), color=color, alpha=0.15)
        if {"n_active", "n_tokens"} <= set(ds.data_vars):
            # The rank can never exceed the analysed tokens: a rank on this line is saturated.
            cell = ds[["n_tokens"]].sel(concept=concept, mode=mode).max(["replicate", "space"])
            ax.plot(x, cell["n_tokens"], "k--", lw=0.8, label="tokens (saturation)")
            if "latent" in ds.space.values:
                active = ds["n_active"].sel(concept=concept, mode=mode, space="latent").mean("replicate")
                ax.plot(x, active, ":", color="tab:red", lw=0.8, label="SAE active latents")
        ax.set_xscale("log")
        ax.set_title(_verdict_title(ds, str(concept), mode), fontsize=8)
        ax.set_xlabel("noise σ (σ=0 at far left)")
        ax.set_ylabel(f"{mode}-mode rank")
    for ax in list(axes.flat)[len(concepts):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{_where(ds)}: SAEMA {mode}-mode rank vs noise ({estimator}); dashed: saturation bound", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _verdict_title(ds: xr.Dataset, concept: str, mode: str) -> str:
    """'concept' and, when stored, each space's verdict on a second line."""
    if "verdict" not in ds:
        return concept
    verdicts = ds["verdict"].sel(concept=concept, mode=mode)
    return concept + "\n" + ", ".join(f"{s}: {v}" for s, v in zip(verdicts.space.values, verdicts.values) if v)


def plot_structure_scatter(panels: dict[str, dict], tokens, title: str, path: str, max_labels: int = 40) -> str:
    """2-D UMAP per space, coloured by HDBSCAN cluster (grey = noise), distinct tokens annotated."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, (space, result) in zip(axes.flat, panels.items()):
        xy, labels = np.asarray(result["xy"]), np.asarray(result["labels"])
        colours = plt.cm.tab20(np.mod(labels, 20))
        colours[labels < 0] = (0.75, 0.75, 0.75, 0.6)
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=9, linewidths=0)
        seen: set[str] = set()
        for (x, y), token in zip(xy, tokens):
            if token not in seen and len(seen) < max_labels:
                seen.add(token)
                ax.annotate(token, (x, y), fontsize=6, alpha=0.8)
        n = int(result["metrics"]["n_clusters"]) if np.isfinite(result["metrics"]["n_clusters"]) else 0
        ax.set_title(f"{space}: {n} clusters", fontsize=10)
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


_MOVE_MARKERS = {"optimised": ("o", True), "control": ("o", False), "control_row": ("x", True)}


def _final_change(ds: xr.Dataset, name: str) -> xr.DataArray:
    return ds[name].isel(step=-1) - ds[name].isel(step=0)


def _moves_panel(ax, cell: xr.Dataset, objective: str) -> None:
    """ΔMSE vs ΔSep of every move kind, colour = concept; stars = the pure (λ = 0) moves."""
    for i, concept in enumerate(cell.concept.values):
        colour = plt.cm.tab10(i % 10)
        for kind, (marker, filled) in _MOVE_MARKERS.items():
            moves = cell.sel(concept=concept, intervention=kind)
            style = ({"color": colour} if marker == "x" else
                     {"facecolors": colour if filled else "none", "edgecolors": colour})
            ax.scatter(_final_change(moves, "separability").values.ravel(), _final_change(moves, "mse").values.ravel(),
                       s=16, marker=marker, label=str(concept) if kind == "optimised" else None, **style)
        ax.scatter(cell.pure_delta_sep.sel(concept=concept).values, cell.pure_delta_mse.sel(concept=concept).values,
                   s=60, marker="*", color=colour)
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(f"ΔSep ({objective})")
    ax.set_ylabel("ΔMSE")
    ax.set_title(f"{objective}: ● optimised, ○ control (same ‖δ‖), × control (same row-space ‖δ‖), ★ λ = 0",
                 fontsize=8)


def _dose_panel(ax, cell: xr.Dataset, objective: str) -> None:
    """ΔMSE of the optimised move against α (a dose axis), one line per (concept, direction)."""
    change = _final_change(cell.sel(intervention="optimised"), "mse")
    for i, concept in enumerate(cell.concept.values):
        for direction, style in zip(cell.direction.values, ("-", "--")):
            ax.plot(cell.alpha.values, change.sel(concept=concept, direction=direction).values, style,
                    marker=".", color=plt.cm.tab10(i % 10), lw=0.8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("α (solid: separate, dashed: merge)")
    ax.set_ylabel("ΔMSE of the optimised move")
    ax.set_title(f"{objective}: dose axis", fontsize=8)


def _paper_panel(ax, ds: xr.Dataset, direction: int) -> None:
    """The paper-literal search in one direction: raw ΔMSE per (α, seed), colour = concept."""
    change = ds.paper_delta_mse.sel(direction=direction)
    for i, concept in enumerate(ds.concept.values):
        values = change.sel(concept=concept)
        for seed in values.paper_seed.values:
            ax.scatter(values.alpha.values + 0.01 * i, values.sel(paper_seed=seed).values, s=10,
                       color=plt.cm.tab10(i % 10), label=str(concept) if seed == values.paper_seed.values[0] else None)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("α (step scale of the random search)")
    ax.set_ylabel("raw ΔMSE (one point per seed)")
    name = "separating (best of 1/AEDP + λ·MSE)" if direction == 1 else "merging (best of AEDP + λ·MSE)"
    ax.set_title(f"paper-literal search, {name}", fontsize=8)
    ax.legend(fontsize=6, ncol=2)


def plot_intervention(ds: xr.Dataset, path: str) -> str:
    """Per objective: ΔMSE vs ΔSep of the moves and controls, and ΔMSE vs α; the paper-literal search."""
    objectives = list(ds.objective.values)
    paper = "paper_delta_mse" in ds
    rows = len(objectives) + int(paper)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False, layout="constrained")
    for row, objective in zip(axes, objectives):
        cell = ds.sel(objective=objective)
        _moves_panel(row[0], cell, objective)
        _dose_panel(row[1], cell, objective)
    if objectives:
        axes[0][0].legend(fontsize=6, ncol=2)
    if paper:
        for ax, direction in zip(axes[-1], ds.direction.values):
            _paper_panel(ax, ds, int(direction))
        for ax in axes[-1][ds.sizes["direction"]:]:
            ax.axis("off")
    fig.suptitle(f"{_where(ds)}: post-hoc interventions on the latent clusters".lstrip(": "), fontsize=11)
    return _save(fig, path)


def _where(ds: xr.Dataset) -> str:
    """"model hook" of a dataset selected to one model and hook (what a plot title names)."""
    return " ".join(str(ds[dim].values) for dim in ("model", "hook") if dim in ds.coords and ds[dim].ndim == 0)


def plot_causal(ds: xr.Dataset, path: str, title: str) -> str:
    """The training-time test of one hook: held-out MSE against achieved separability (one point per
    SAE, colour = β, one line per seed), and the relative MSE change against β with the seeds' CI."""
    betas, seeds = ds.beta.values, ds.seed.values
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    norm = matplotlib.colors.TwoSlopeNorm(vmin=min(betas.min(), -1e-9), vcenter=0.0, vmax=max(betas.max(), 1e-9))
    markers = "osD^v<>p"
    for i, seed in enumerate(seeds):
        cell = ds.sel(seed=seed)
        left.plot(cell.separability, cell.mse, color="grey", lw=0.7, zorder=1)
        points = left.scatter(cell.separability, cell.mse, c=betas, cmap="coolwarm", norm=norm, s=36,
                              marker=markers[i % len(markers)], edgecolors="black", linewidths=0.4, zorder=2,
                              label=f"seed {seed}")
        zero = cell.mse.sel(beta=0.0)
        right.plot(betas, (cell.mse - zero) / zero * 100, marker=markers[i % len(markers)], lw=0.8,
                   label=f"seed {seed}")
    fig.colorbar(points, ax=left, label="β (separability weight)")
    left.set_xlabel("achieved separability on held-out tokens (AEDP of latent centroids)")
    left.set_ylabel("held-out MSE (sum over d_model, per token)")
    left.legend(fontsize=7)
    right.axhline(0, color="grey", lw=0.5)
    right.axvline(0, color="grey", lw=0.5)
    right.set_xlabel("β  (< 0 merges, > 0 separates)")
    right.set_ylabel("held-out MSE change vs β = 0 (%)")
    right.legend(fontsize=7)
    verdict = str(ds["verdict"].values) if "verdict" in ds else ""
    fig.suptitle(f"{title}: {verdict}" if verdict else title, fontsize=10)
    return _save(fig, path)
