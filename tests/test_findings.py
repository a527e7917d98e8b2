"""Findings: each claim's verdict is computed from the results and can come out every way."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from flows.causal import causal_dataset
from flows.config import CausalStageConfig, InterventionStageConfig, StratifyConfig
from flows.findings import claim_findings, findings_dataset
from flows.intervention import intervention_dataset
from flows.stratify import _cells, stratification_dataset
from saema_core.findings import separability_findings, stratification_findings, structure_findings
from saema_core.ranks import ESTIMATORS, MODES
from saema_core.structure_metrics import identity_agreement

HOOK = "blocks.3.hook_resid_post"
CFG = StratifyConfig(noise_levels=(0.0, 0.1, 1.0), replicates=2)
CONCEPTS = ["months", "days", "planets"]


def _result(levels, bound=50.0, active=40.0):
    noise, reps = len(CFG.noise_levels), CFG.replicates
    rank = np.broadcast_to(np.asarray(levels, float)[:, None, None, None],
                           (noise, reps, len(MODES), len(ESTIMATORS))).copy()
    counts = np.ones((noise, reps, len(MODES)))
    return {"rank": rank, "n_active": active * counts, "n_tokens": bound * counts, "rank_bound": bound * counts,
            "ceiling": 64.0 * counts, "scale": 1.0, "signal_rms": 0.5, "n_analysed": int(bound)}


def _stratification(ranks_by_space: dict[str, list], bound=50.0) -> xr.Dataset:
    cells = _cells([HOOK], CONCEPTS, CFG.spaces)
    results = [_result(ranks_by_space[space], bound) for _, _, space in cells]
    return stratification_dataset("m", cells, results, CFG, [HOOK], CONCEPTS).sel(model="m", hook=HOOK)


def _by_space(findings):
    return {f.space: f for f in findings}


def test_sae_stratified_and_controls_flat_is_supported():
    ds = _stratification({"latent": [10, 20, 30], "resid": [8, 8, 8], "dense_ae": [8, 9, 9]})
    rows = _by_space(stratification_findings(ds))
    assert rows["latent"].verdict == "supported" and "3 of 3" in rows["latent"].why
    assert rows["resid"].verdict == rows["dense_ae"].verdict == "supported"
    assert "deficit" in rows["latent"].numbers and "genuine rank deficit" in rows["latent"].why


def test_without_the_dense_control_its_row_is_not_tested_and_the_sae_row_says_so():
    ds = _stratification({"latent": [10, 20, 30], "resid": [8, 8, 8], "dense_ae": [8, 9, 9]})
    rows = _by_space(stratification_findings(ds.sel(space=["resid", "latent"])))
    assert rows["latent"].verdict == "supported" and "--no-dense" in rows["latent"].why
    assert rows["dense_ae"].verdict == "not tested" and "--no-dense" in rows["dense_ae"].why
    assert "--no-dense" not in _by_space(stratification_findings(ds))["latent"].why


def test_a_stratified_control_makes_the_sae_verdict_not_informative():
    ds = _stratification({"latent": [10, 20, 30], "resid": [8, 12, 16], "dense_ae": [8, 8, 8]})
    rows = _by_space(stratification_findings(ds))
    assert rows["latent"].verdict == "not informative" and "control is stratified too" in rows["latent"].why
    assert rows["resid"].verdict == "not supported"


def test_flat_sae_is_not_supported_and_saturation_is_not_informative():
    rows = _by_space(stratification_findings(_stratification({s: [8, 8, 8] for s in CFG.spaces})))
    assert rows["latent"].verdict == "not supported"
    rows = _by_space(stratification_findings(_stratification({s: [50, 50, 50] for s in CFG.spaces})))
    assert {f.verdict for f in rows.values()} == {"not informative"} and "saturated in all 3" in rows["latent"].why


def _structure(dim_latent, agd_latent, dim_dense=1.0, agd_dense=5.0) -> xr.Dataset:
    seeds = [42, 43, 44]
    spaces = ["resid", "latent", "dense_ae"]
    dims = ("concept", "space", "seed")
    jitter = np.array([0.0, 0.01, -0.01])
    dim = np.stack([np.stack([np.full(3, v) + jitter for v in (1.0, dim_latent, dim_dense)])] * len(CONCEPTS))
    agd = np.stack([np.stack([np.full(3, v) + jitter for v in (5.0, agd_latent, agd_dense)])] * len(CONCEPTS))
    return xr.Dataset({"avg_intrinsic_dim_original": (dims, dim), "agd": (dims, agd),
                       "ari_token": (dims, np.full(dim.shape, 0.8))},
                      coords={"concept": CONCEPTS, "space": spaces, "seed": seeds})


def test_local_dimension_up_and_global_compressed():
    rows = _by_space(structure_findings(_structure(3.0, 2.0)))
    assert rows["latent"].verdict == "supported" and rows["dense_ae"].verdict == "not supported"
    assert "ARI 0.80" in rows["latent"].numbers
    assert _by_space(structure_findings(_structure(1.0, 2.0)))["latent"].verdict == "not supported"
    same = _by_space(structure_findings(_structure(3.0, 2.0, dim_dense=3.0, agd_dense=2.0)))
    assert same["latent"].verdict == "not informative" and "dense-AE control" in same["latent"].why
    nan = _structure(3.0, 2.0)
    nan["avg_intrinsic_dim_original"][:] = np.nan
    assert _by_space(structure_findings(nan))["latent"].verdict == "not informative"


def _intervention(lowers_mse: bool = True) -> xr.Dataset:
    """An intervention group built by the stage's own `intervention_dataset` from synthetic cell results:
    ΔMSE = 0.1·ΔSep + noise for the optimised moves, pure moves that separate, a paper search that moves."""
    cfg = InterventionStageConfig(alphas=(0.5, 1.0, 1.5), steps=2, n_boot=100, paper_seeds=2)
    rng = np.random.default_rng(0)

    def move(sep: float) -> dict:
        mse = 0.1 * sep + rng.normal(scale=0.01)
        return {"objective": [0, 0, 0], "separability": [1.0, 1.0, 1.0 + sep], "mse": [2.0, 2.0, 2.0 + mse],
                "mse_zscored": [0.1] * 3, "explained_variance": [0.9] * 3, "displacement_norm": [0.0, 0.5, abs(sep)],
                "row_norm": abs(sep) / 2, "null_norm": abs(sep) / 2, "delta_mse_row": mse, "delta_mse_null": 0.0}

    cells, results = [], []
    for concept in CONCEPTS:
        for objective in cfg.objectives:
            for direction in cfg.directions:
                cells.append((HOOK, concept, objective, direction))
                if objective == "paper":
                    run = {"delta_sep": 0.2 * direction, "delta_mse": -0.01 if lowers_mse else 0.01,
                           "delta_mse_zscored": -0.001, "accepted": 3}
                    results.append({"skipped": "", "paper": [[run, run] for _ in cfg.alphas]})
                    continue
                alphas = [{kind: move(direction * a * rng.uniform(0.5, 1.5)) for kind in ("optimised", "control", "control_row")}
                          for a in cfg.alphas]
                results.append({"skipped": "", "alphas": alphas, "pure": move(direction * 0.8),
                                "decomposition_reason": ""})
    return intervention_dataset("m", cells, results, cfg, [HOOK], list(CONCEPTS)).sel(model="m", hook=HOOK)


def test_intervention_dataset_slopes_use_concepts_as_replicates():
    ds = _intervention()
    slope = ds["slope"].sel(objective="aedp", intervention="optimised")
    assert float(slope) == pytest.approx(0.1, abs=0.02)
    assert int(ds["n_replicates"].sel(objective="aedp", intervention="optimised")) == len(CONCEPTS)
    assert (ds["paper_lower_mse_fraction"] == 1.0).all()


def _causal(mse_by_beta) -> xr.Dataset:
    """A `causal` cell whose separability rises with β and whose MSE is `mse_by_beta` (+ seed jitter)."""
    cfg = CausalStageConfig()
    jitter = np.random.default_rng(0).normal(scale=0.01, size=(len(cfg.betas), len(cfg.seeds)))
    results = [{"skipped": "", "mse": mse_by_beta[i] + jitter[i, j], "separability": 2.0 + beta + 0.01 * j,
                "explained_variance": 0.8, "l0": 32.0, "separability_ratio": 1.0, "ce_loss_score": np.nan,
                "n_tokens": 1000.0}
               for i, beta in enumerate(cfg.betas) for j, _ in enumerate(cfg.seeds)]
    return causal_dataset("m", [HOOK], cfg, results).sel(model="m", hook=HOOK)


@pytest.mark.parametrize("mse,verdict", [
    ([30, 28, 26, 24, 22], "supported"),            # more separable SAEs reconstruct better
    ([30, 27, 25, 27, 30], "not supported"),        # a U: separating costs reconstruction (contradicted)
    ([25, 25, 25, 25, 25], "not informative"),      # no effect: the CI covers 0
])
def test_separability_verdict_comes_from_the_training_time_test(mse, verdict):
    row, = separability_findings(_causal(mse), _intervention())
    assert row.verdict == verdict and row.why.startswith("training-time test")
    assert "post-hoc" in row.numbers and "λ = 0 moves separating" in row.numbers
    assert "paper-literal search" in row.numbers and "lowered the MSE in 100%" in row.numbers


def test_separability_without_the_causal_test_is_not_tested():
    row, = separability_findings(None, _intervention())
    assert row.verdict == "not tested" and "saema causal" in row.why and "post-hoc" in row.numbers


def test_missing_groups_are_not_tested_and_the_dataset_holds_every_row():
    ds = _stratification({"latent": [10, 20, 30], "resid": [8, 8, 8], "dense_ae": [8, 8, 8]})
    groups = {"stratification": ds.expand_dims(model=["m"], hook=[HOOK]), "structure": None, "intervention": None}
    rows = claim_findings(groups, "m", HOOK)
    assert [(f.claim, f.verdict) for f in rows if f.verdict == "not tested"] == [
        ("local_global", "not tested"), ("separability", "not tested")]
    out = findings_dataset({("m", HOOK): rows})
    assert out["verdict"].sel(model="m", hook=HOOK, claim="stratification", space="latent").item() == "supported"
    assert set(out["verdict"].values.ravel()) <= {"", "supported", "not supported", "not informative", "not tested"}


def test_identity_agreement():
    labels = np.array([0, 0, 1, 1, -1, 2, 2])
    assert identity_agreement(labels, np.array(list("aabbxcc"))) == pytest.approx(1.0)
    assert identity_agreement(labels, np.array(list("abababa"))) < 0.2
    assert np.isnan(identity_agreement(np.array([0, 0, -1]), np.array(list("abc"))))
    with pytest.raises(ValueError, match="same tokens"):
        identity_agreement(labels, np.array(list("ab")))
