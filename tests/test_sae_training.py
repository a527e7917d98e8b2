"""SAE training on planted sparse data: dictionary recovery, AuxK revival, resampling, determinism."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import scipy.optimize
import torch

from saema_core.sae import build_sae
from saema_core.sae_training import (
    StepStats,
    TrainingConfig,
    TrainingHistory,
    _fold_input_scale,
    _scaled_copy,
    geometric_median,
    input_scale_factor,
    train_sae,
    training_sae_config,
)

D_IN, N_ATOMS, ACTIVE = 32, 64, 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def planted_dictionary(seed: int = 1) -> torch.Tensor:
    """N_ATOMS random unit-norm atoms [N_ATOMS, D_IN]."""
    atoms = torch.randn(N_ATOMS, D_IN, generator=torch.Generator().manual_seed(seed))
    return atoms / atoms.norm(dim=1, keepdim=True)


def planted_batches(atoms: torch.Tensor, batch_size: int, seed: int = 2) -> Iterator[torch.Tensor]:
    """x = codes @ atoms with ACTIVE atoms per sample, coefficients uniform in [0.5, 2]."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        support = torch.rand(batch_size, N_ATOMS, generator=gen).argsort(dim=1)[:, :ACTIVE]
        values = torch.rand(batch_size, ACTIVE, generator=gen) * 1.5 + 0.5
        yield torch.zeros(batch_size, N_ATOMS).scatter_(1, support, values) @ atoms


def mean_max_cosine(atoms: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over true atoms of the best cosine with a learned decoder row (rows are unit norm)."""
    rows = W_dec / W_dec.norm(dim=1, keepdim=True)
    return float((atoms @ rows.T).max(dim=1).values.mean())


def test_topk_recovers_a_planted_dictionary():
    atoms = planted_dictionary()
    cfg = training_sae_config(D_IN, 2 * N_ATOMS, "topk", k=ACTIVE)
    train_cfg = TrainingConfig(n_steps=400, batch_size=256, lr=3e-3, dead_tokens_threshold=2560)
    result = train_sae(cfg, train_cfg, planted_batches(atoms, 256))
    assert mean_max_cosine(atoms, result.sae.W_dec.detach()) >= 0.9
    assert result.history.l0[-1] <= ACTIVE
    assert result.history.mse[-50:].mean() < 0.2 * result.history.mse[:10].mean()


def test_relu_sae_with_l1_recovers_a_planted_dictionary():
    atoms = planted_dictionary()
    cfg = training_sae_config(D_IN, 2 * N_ATOMS, "standard")
    train_cfg = TrainingConfig(n_steps=400, batch_size=256, lr=3e-3, l1_coefficient=1.0,
                               dead_tokens_threshold=2560)
    result = train_sae(cfg, train_cfg, planted_batches(atoms, 256))
    assert mean_max_cosine(atoms, result.sae.W_dec.detach()) >= 0.9
    assert result.history.l0[-1] < 0.2 * result.history.l0[0]  # the L1 term made the code sparse


def test_dense_autoencoder_reconstructs_and_stays_dense():
    atoms = planted_dictionary()
    cfg = training_sae_config(D_IN, N_ATOMS, "dense")
    train_cfg = TrainingConfig(n_steps=300, batch_size=256, lr=3e-3)
    result = train_sae(cfg, train_cfg, planted_batches(atoms, 256))
    x = next(planted_batches(atoms, 256, seed=9))
    latents, recon = result.sae(x)
    assert bool((latents != 0).all())
    assert float((x - recon).pow(2).sum(-1).mean()) < 1e-3 * float(x.pow(2).sum(-1).mean())


def _sae_with_silenced_latents(architecture: str, n_silenced: int):
    """A trained-looking SAE whose last `n_silenced` latents can never win (or pass) activation."""
    cfg = training_sae_config(D_IN, N_ATOMS, architecture, k=ACTIVE)
    sae = build_sae(cfg)
    rows = planted_dictionary(seed=7)  # random unit directions, unrelated to the data's atoms
    with torch.no_grad():
        sae.W_dec.copy_(rows)
        encoder = rows.T.clone()
        encoder[:, -n_silenced:] *= 0.01  # tiny pre-activations: never in the top k
        sae.W_enc.copy_(encoder)
        if architecture == "standard":
            sae.b_enc[-n_silenced:] = -100.0  # never above zero
    return cfg, sae


def test_auxk_revives_dead_latents():
    atoms = planted_dictionary()
    cfg, init = _sae_with_silenced_latents("topk", N_ATOMS // 2)
    dead_at_end = {}
    for aux in (0.0, 1 / 32):
        train_cfg = TrainingConfig(n_steps=300, batch_size=256, lr=1e-3, aux_k_coefficient=aux,
                                   dead_tokens_threshold=10 * 256)
        history = train_sae(cfg, train_cfg, planted_batches(atoms, 256), init=init).history
        assert history.dead_fraction.max() == pytest.approx(0.5)
        dead_at_end[aux] = history.dead_fraction[-1]
    assert dead_at_end[0.0] == pytest.approx(0.5)  # without AuxK nothing brings them back
    assert dead_at_end[1 / 32] <= 0.25


def test_resampling_revives_dead_relu_latents():
    atoms = planted_dictionary()
    cfg, init = _sae_with_silenced_latents("standard", N_ATOMS // 2)
    train_cfg = TrainingConfig(n_steps=150, batch_size=256, lr=1e-3, l1_coefficient=1.0,
                               dead_tokens_threshold=10 * 256)
    history = train_sae(cfg, train_cfg, planted_batches(atoms, 256), init=init).history
    assert history.dead_fraction.max() == pytest.approx(0.5)
    assert history.dead_fraction[-1] <= 0.1


def test_training_is_deterministic_under_a_seed():
    atoms = planted_dictionary()
    cfg = training_sae_config(D_IN, N_ATOMS, "topk", k=ACTIVE)

    def run(seed: int):
        train_cfg = TrainingConfig(n_steps=20, batch_size=64, lr=1e-3, seed=seed)
        return train_sae(cfg, train_cfg, planted_batches(atoms, 64)).sae.state_dict_saelens()

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["W_dec"], other["W_dec"])


def test_training_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    cfg = training_sae_config(D_IN, N_ATOMS, "standard")
    train_sae(cfg, TrainingConfig(n_steps=3, batch_size=32), planted_batches(planted_dictionary(), 32))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("architecture", ["topk", "standard", "dense"])
def test_trained_decoder_rows_have_unit_norm(architecture):
    cfg = training_sae_config(D_IN, N_ATOMS, architecture, k=ACTIVE)
    train_cfg = TrainingConfig(n_steps=10, batch_size=64, lr=1e-2)
    sae = train_sae(cfg, train_cfg, planted_batches(planted_dictionary() * 40.0, 64)).sae
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_history_progress_and_metadata():
    calls = []
    cfg = training_sae_config(D_IN, N_ATOMS, "topk", k=ACTIVE, metadata={"hook_name": "h"})
    train_cfg = TrainingConfig(n_steps=5, batch_size=32, lr=1e-3)
    result = train_sae(cfg, train_cfg, planted_batches(planted_dictionary(), 32),
                       progress=lambda step, stats: calls.append((step, stats)))
    assert [step for step, _ in calls] == list(range(5))
    assert all(isinstance(stats, StepStats) for _, stats in calls)
    history = result.history
    assert isinstance(history, TrainingHistory)
    assert history.loss.shape == history.mse.shape == history.l0.shape == (5,)
    np.testing.assert_array_equal(history.mse, [stats.mse for _, stats in calls])
    assert json.loads(json.dumps(history.as_dict()))["l0"] == history.l0.tolist()
    meta = result.sae.cfg.metadata
    assert meta["hook_name"] == "h" and meta["training"]["n_steps"] == 5
    assert meta["training"]["scale_factor"] == pytest.approx(history.scale_factor)
    json.dumps(meta)  # savable as cfg.json


def test_callable_batch_source():
    batches = planted_batches(planted_dictionary(), 32)
    cfg = training_sae_config(D_IN, N_ATOMS, "dense")
    result = train_sae(cfg, TrainingConfig(n_steps=3, batch_size=32), lambda: next(batches))
    assert result.history.loss.shape == (3,)


def test_fold_input_scale_gives_the_same_function_on_raw_inputs():
    """Training runs on s·x; the folded SAE on x must give latents/s and reconstructions/s."""
    for architecture in ("topk", "standard", "dense"):
        sae = build_sae(training_sae_config(D_IN, N_ATOMS, architecture, k=ACTIVE))
        with torch.no_grad():
            for param in sae.parameters():
                param.copy_(torch.randn_like(param))
        x, scale = torch.randn(10, D_IN), 3.7
        latents_scaled, recon_scaled = sae(scale * x)
        _fold_input_scale(sae, scale)
        latents, recon = sae(x)
        torch.testing.assert_close(latents, latents_scaled / scale, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(recon, recon_scaled / scale, atol=1e-5, rtol=1e-4)
        back = _scaled_copy(_unit_rows(sae), sae.cfg, scale)
        torch.testing.assert_close(back.b_dec, sae.b_dec * scale)


def _unit_rows(sae):
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True)
    return sae


def test_geometric_median_known_answers():
    collinear = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    torch.testing.assert_close(geometric_median(collinear), torch.tensor([1.0, 0.0]), atol=1e-3,
                               rtol=0)
    points = torch.from_numpy(np.random.default_rng(0).normal(size=(40, 3)) ** 3)

    def objective(m):
        return np.linalg.norm(points.numpy() - m, axis=1).sum()

    oracle = scipy.optimize.minimize(objective, points.numpy().mean(0), method="Nelder-Mead",
                                     options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000}).x
    np.testing.assert_allclose(geometric_median(points).numpy(), oracle, atol=1e-4)


def test_input_scale_factor_makes_the_mean_norm_sqrt_d_in():
    x = torch.randn(100, D_IN) * 13.0
    assert float((x * input_scale_factor(x)).norm(dim=1).mean()) == pytest.approx(np.sqrt(D_IN))
    with pytest.raises(ValueError, match="zero mean norm"):
        input_scale_factor(torch.zeros(4, D_IN))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_steps": 0}, r"n_steps must be a positive integer, got 0"),
        ({"batch_size": 2.0}, r"batch_size must be a positive integer, got 2.0"),
        ({"lr": -1e-3}, r"lr must be a positive number, got -0.001"),
        ({"l1_coefficient": float("nan")}, r"l1_coefficient must be a finite number >= 0, got nan"),
        ({"aux_k_coefficient": -1}, r"aux_k_coefficient must be a finite number >= 0, got -1"),
        ({"k_aux": 0}, r"k_aux must be a positive integer, got 0"),
        ({"dead_tokens_threshold": 0}, r"dead_tokens_threshold must be a positive integer"),
        ({"b_dec_init": "median"}, r"b_dec_init must be one of .*'median'"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm must be a positive number, got 0.0"),
        ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
    ],
)
def test_training_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_default_learning_rate_follows_the_scaling_law():
    assert TrainingConfig().learning_rate(2**14) == pytest.approx(2e-4)
    assert TrainingConfig().learning_rate(2**16) == pytest.approx(1e-4)
    assert TrainingConfig(lr=5e-3).learning_rate(2**16) == 5e-3
    assert TrainingConfig(n_steps=10, batch_size=7).n_tokens == 70


def test_bad_batches_name_the_step():
    cfg = training_sae_config(D_IN, N_ATOMS, "topk", k=ACTIVE)
    train_cfg = TrainingConfig(n_steps=3, batch_size=8)
    good = torch.randn(8, D_IN)
    with pytest.raises(ValueError, match=r"step 1: expected a float batch of shape \(8, 32\), got .* \(8, 31\)"):
        train_sae(cfg, train_cfg, [good, torch.randn(8, D_IN - 1)])
    with pytest.raises(ValueError, match=r"step 2: the batch has NaN/Inf values"):
        train_sae(cfg, train_cfg, [good, good, good * float("nan")])
    with pytest.raises(ValueError, match=r"ran out after 2 of n_steps=3 batches"):
        train_sae(cfg, train_cfg, [good, good])
    with pytest.raises(TypeError, match=r"step 0: expected a tensor batch, got list"):
        train_sae(cfg, train_cfg, [[1.0, 2.0]])


def test_untrainable_configurations_are_refused():
    train_cfg = TrainingConfig(n_steps=1, batch_size=8)
    batch = [torch.randn(8, D_IN)]
    jumprelu = training_sae_config(D_IN, N_ATOMS, "jumprelu")
    with pytest.raises(ValueError, match=r"cannot train architecture 'jumprelu'; trainable: \['dense', 'standard', 'topk'\]"):
        train_sae(jumprelu, train_cfg, batch)
    from dataclasses import replace

    rescaled = replace(training_sae_config(D_IN, N_ATOMS), normalize_activations="constant_norm_rescale")
    with pytest.raises(ValueError, match="normalize_activations='none'"):
        train_sae(rescaled, train_cfg, batch)
    cfg = training_sae_config(D_IN, N_ATOMS, "topk", k=ACTIVE)
    other = build_sae(training_sae_config(D_IN, N_ATOMS, "topk", k=ACTIVE + 1))
    with pytest.raises(ValueError, match="does not have the shape of the config"):
        train_sae(cfg, train_cfg, batch, init=other)
