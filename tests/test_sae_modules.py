"""SAE modules against naive numpy oracles, hand-computed cases, config validation and the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saema_core.sae import (
    NORMALIZATIONS,
    SAE,
    SAE_REGISTRY,
    SAEConfig,
    SAEOutput,
    build_sae,
    register_architecture,
)

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "dense")


def build_cfg(**overrides) -> SAEConfig:
    """A small config; each test states only what it varies."""
    fields = {"architecture": "topk", "d_in": 6, "d_sae": 10, "k": 3}
    fields.update(overrides)
    if fields["architecture"] != "topk" and "k" not in overrides:
        fields["k"] = None
    return SAEConfig(**fields)


def random_sae(cfg: SAEConfig, seed: int = 0) -> SAE:
    """An SAE with random weights (positive thresholds, small r_mag)."""
    rng = np.random.default_rng(seed)
    sae = build_sae(cfg)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            values = rng.normal(size=tuple(param.shape))
            if name == "threshold":
                values = np.abs(values) * 0.3
            if name == "r_mag":
                values = values * 0.2
            param.copy_(torch.from_numpy(values))
    return sae


def params_np(sae: SAE) -> dict[str, np.ndarray]:
    return {name: p.detach().double().numpy() for name, p in sae.named_parameters()}


# ---------------------------------------------------------------------------------------------
# Naive oracles, one token at a time, written from the SAELens definitions


def naive_sae_input(x: np.ndarray, p: dict, cfg: SAEConfig) -> tuple[np.ndarray, float]:
    scale = 1.0
    if cfg.normalize_activations == "constant_norm_rescale":
        scale = np.sqrt(cfg.d_in) / np.linalg.norm(x)
    x = x * scale
    if cfg.apply_b_dec_to_input:
        x = x - p["b_dec"]
    return x, scale


def naive_latents(sae_in: np.ndarray, p: dict, cfg: SAEConfig) -> np.ndarray:
    out = np.zeros(cfg.d_sae)
    if cfg.architecture == "gated":
        for i in range(cfg.d_sae):
            proj = sum(sae_in[j] * p["W_enc"][j, i] for j in range(cfg.d_in))
            gate = proj + p["b_gate"][i] > 0
            out[i] = max(proj * np.exp(p["r_mag"][i]) + p["b_mag"][i], 0.0) if gate else 0.0
        return out
    pre = np.array([sum(sae_in[j] * p["W_enc"][j, i] for j in range(cfg.d_in)) + p["b_enc"][i]
                    for i in range(cfg.d_sae)])
    if cfg.architecture == "standard":
        return np.maximum(pre, 0.0)
    if cfg.architecture == "dense":
        return pre
    if cfg.architecture == "jumprelu":
        return np.where(pre > p["threshold"], np.maximum(pre, 0.0), 0.0)
    for i in sorted(range(cfg.d_sae), key=lambda i: -pre[i])[: cfg.k]:  # topk
        out[i] = max(pre[i], 0.0)
    return out


def naive_forward(x: np.ndarray, p: dict, cfg: SAEConfig) -> tuple[np.ndarray, np.ndarray]:
    sae_in, scale = naive_sae_input(x, p, cfg)
    z = naive_latents(sae_in, p, cfg)
    recon = np.array([sum(z[i] * p["W_dec"][i, j] for i in range(cfg.d_sae)) + p["b_dec"][j]
                      for j in range(cfg.d_in)])
    return z, recon / scale


@pytest.mark.parametrize("normalize", NORMALIZATIONS)
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_forward_matches_naive_oracle(architecture, apply_b_dec, normalize):
    cfg = build_cfg(architecture=architecture, apply_b_dec_to_input=apply_b_dec,
                    normalize_activations=normalize, dtype="float64")
    sae = random_sae(cfg, seed=1)
    x = np.random.default_rng(2).normal(size=(7, cfg.d_in))
    latents, recon = sae(torch.from_numpy(x))
    p = params_np(sae)
    for t in range(x.shape[0]):
        z_ref, recon_ref = naive_forward(x[t], p, cfg)
        np.testing.assert_allclose(latents[t].detach().numpy(), z_ref, atol=1e-10)
        np.testing.assert_allclose(recon[t].detach().numpy(), recon_ref, atol=1e-10)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_float32_encode_agrees_with_float64(architecture):
    cfg64 = build_cfg(architecture=architecture, dtype="float64")
    sae64 = random_sae(cfg64, seed=3)
    sae32 = build_sae(build_cfg(architecture=architecture))
    sae32.load_saelens_tensors(sae64.state_dict_saelens())
    x = torch.randn(5, cfg64.d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(sae32.encode(x).double(), sae64.encode(x), atol=1e-5, rtol=1e-5)


def test_forward_returns_named_output_and_keeps_leading_dims():
    sae = random_sae(build_cfg())
    x = torch.randn(2, 3, 6)
    out = sae(x)
    assert isinstance(out, SAEOutput)
    assert out.latents.shape == (2, 3, 10) and out.reconstruction.shape == (2, 3, 6)
    torch.testing.assert_close(out.latents[1], sae.encode(x[1]))
    torch.testing.assert_close(out.reconstruction, sae.decode(out.latents))


def test_decode_with_input_scale_undoes_constant_norm_rescale():
    sae = random_sae(build_cfg(normalize_activations="constant_norm_rescale"))
    x = torch.randn(4, 6) * 7.0
    latents, recon = sae(x)
    torch.testing.assert_close(sae.decode(latents, sae.input_scale(x)), recon)
    # Rescaled inputs all have norm sqrt(d_in): scaling x scales nothing but the reconstruction.
    torch.testing.assert_close(sae.encode(3.0 * x), latents, atol=1e-5, rtol=1e-5)


def test_constant_norm_rescale_keeps_zero_tokens_finite():
    sae = random_sae(build_cfg(normalize_activations="constant_norm_rescale"))
    latents, recon = sae(torch.zeros(2, 6))
    assert torch.isfinite(latents).all() and torch.isfinite(recon).all()


def test_jumprelu_hand_computed():
    sae = build_sae(build_cfg(architecture="jumprelu", d_in=3, d_sae=3, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.threshold.copy_(torch.tensor([1.0, 1.0, -2.0]))
    # 0.5 is below its threshold; 1.5 passes; -1 passes the negative threshold but ReLU zeroes it.
    z = sae.encode(torch.tensor([[0.5, 1.5, -1.0]]))
    torch.testing.assert_close(z, torch.tensor([[0.0, 1.5, 0.0]]))


def test_gated_hand_computed():
    sae = build_sae(build_cfg(architecture="gated", d_in=2, d_sae=2, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_gate.copy_(torch.tensor([0.0, -5.0]))  # latent 1's gate stays shut for x1 < 5
        sae.r_mag.copy_(torch.tensor([np.log(2.0), 0.0]))
        sae.b_mag.copy_(torch.tensor([1.0, 0.0]))
    z = sae.encode(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(z, torch.tensor([[7.0, 0.0]]))  # 2·3 + 1 = 7


def test_topk_hand_computed_relu_after_selection():
    sae = build_sae(build_cfg(d_in=4, d_sae=4, k=2, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
    z = sae.encode(torch.tensor([[3.0, -1.0, -2.0, -0.5], [1.0, 2.0, 3.0, 4.0]]))
    # Row 0: the top 2 are 3 and -0.5; ReLU turns -0.5 into 0, so only one latent fires.
    torch.testing.assert_close(z, torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0]]))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_topk_fires_at_most_k_and_keeps_the_largest(k, seed):
    sae = random_sae(build_cfg(k=k), seed=seed)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(seed))
    z = sae.encode(x)
    assert int((z != 0).sum(-1).max()) <= k
    pre = sae.hidden_pre(sae.sae_input(x))
    kth = pre.topk(k, dim=-1).values[:, -1:]
    assert bool(((z == 0) | (pre >= kth)).all())


def test_encode_topk_gives_the_dense_latents_as_pairs():
    sae = random_sae(build_cfg(k=4), seed=5)
    x = torch.randn(2, 7, 6)
    pairs = sae.encode_topk(x)
    assert pairs.values.shape == pairs.indices.shape == (2, 7, 4)
    dense = torch.zeros(2, 7, 10).scatter_(-1, pairs.indices, pairs.values)
    torch.testing.assert_close(dense, sae.encode(x))


@settings(max_examples=25, deadline=None)
@given(architecture=st.sampled_from(ARCHITECTURES), n=st.integers(0, 40), budget=st.integers(1, 200),
       seed=st.integers(0, 2**16), normalize=st.sampled_from(["none", "constant_norm_rescale"]))
def test_encode_csr_equals_encode_in_any_chunking(architecture, n, budget, seed, normalize):
    from saema_core.sae.sparse import encode_csr

    sae = random_sae(build_cfg(architecture=architecture, normalize_activations=normalize), seed=seed % 7)
    x = np.random.default_rng(seed).normal(size=(n, 6)).astype(np.float32)
    csr = encode_csr(sae, x, max_elements=budget)
    dense = sae.encode(torch.from_numpy(x)).detach().numpy()
    assert csr.shape == (n, 10) and csr.has_canonical_format
    np.testing.assert_array_equal(csr.toarray(), dense)
    assert csr.nnz == np.count_nonzero(dense)  # no stored zeros


def test_latent_store_pairs_of_a_csr_round_trip():
    import scipy.sparse as sp

    from storage.latent_store import pairs_of_csr, to_csr

    dense = np.array([[0, 2.0, 0, 1.0], [0, 0, 0, 0], [3.0, 0, 0, 0]], dtype=np.float32)
    index, values = pairs_of_csr(sp.csr_array(dense))
    np.testing.assert_array_equal(index, [[1, 3], [-1, -1], [0, -1]])
    np.testing.assert_array_equal(values, [[2, 1], [0, 0], [3, 0]])
    np.testing.assert_array_equal(to_csr(index, values, 4).toarray(), dense)


def test_dense_latents_are_dense():
    sae = random_sae(build_cfg(architecture="dense"))
    z = sae.encode(torch.randn(50, 6))
    assert bool((z != 0).all())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_state_dict_saelens_has_the_saelens_names_and_shapes(architecture):
    cfg = build_cfg(architecture=architecture)
    tensors = build_sae(cfg).state_dict_saelens()
    expected = type(build_sae(cfg)).parameter_shapes(cfg)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert expected["W_enc"] == (6, 10) and expected["W_dec"] == (10, 6)


def test_load_saelens_tensors_names_missing_and_wrong_shapes():
    sae = build_sae(build_cfg())
    tensors = sae.state_dict_saelens()
    del tensors["b_enc"]
    with pytest.raises(ValueError, match=r"missing \['b_enc'\]"):
        sae.load_saelens_tensors(tensors)
    tensors = sae.state_dict_saelens()
    tensors["W_enc"] = torch.zeros(10, 6)
    with pytest.raises(ValueError, match=r"'W_enc' has shape \(10, 6\), expected \(6, 10\)"):
        sae.load_saelens_tensors(tensors)


def test_encode_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"d_in=6.*\(3, 5\)"):
        build_sae(build_cfg()).encode(torch.zeros(3, 5))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"architecture": "relu"}, r"unknown SAE architecture 'relu'; known architectures: dense, gated"),
        ({"k": None}, r"k must be a positive integer, got None"),
        ({"k": 0}, r"k must be a positive integer, got 0"),
        ({"k": 11}, r"k=11 cannot exceed d_sae=10"),
        ({"architecture": "standard", "k": 3}, r"k=3 is only used by top-k architectures"),
        ({"d_in": 0}, r"d_in must be a positive integer, got 0"),
        ({"d_sae": 2.5}, r"d_sae must be a positive integer, got 2.5"),
        ({"d_in": True}, r"d_in must be a positive integer, got True"),
        ({"normalize_activations": "layer_norm"}, r"normalize_activations must be one of .*'layer_norm'"),
        ({"dtype": "int8"}, r"dtype must be one of .*'int8'"),
        ({"apply_b_dec_to_input": 1}, r"apply_b_dec_to_input must be a bool, got 1"),
        ({"metadata": 3}, r"metadata must be a mapping, got 3"),
    ],
)
def test_config_validation_names_the_bad_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_cfg(**overrides)


def test_config_copies_metadata():
    meta = {"model_name": "m"}
    cfg = build_cfg(metadata=meta)
    meta["model_name"] = "changed"
    assert cfg.metadata == {"model_name": "m"}


def test_registry_holds_the_built_in_architectures_and_refuses_replacement():
    assert set(ARCHITECTURES) <= set(SAE_REGISTRY)
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("topk", SAE_REGISTRY["standard"])


def test_a_new_architecture_registers_and_builds():
    class AbsSAE(SAE):
        architecture = "test_abs"

        def activation(self, hidden_pre):
            return hidden_pre.abs()

    register_architecture("test_abs", AbsSAE)
    try:
        sae = build_sae(build_cfg(architecture="test_abs"))
        assert isinstance(sae, AbsSAE)
        assert bool((sae.encode(torch.randn(3, 6)) >= 0).all())
    finally:
        del SAE_REGISTRY["test_abs"]


def test_an_sae_class_refuses_a_config_of_another_architecture():
    with pytest.raises(ValueError, match="is built by StandardSAE, not TopKSAE"):
        SAE_REGISTRY["topk"](build_cfg(architecture="standard"))


def test_the_encoding_budget_comes_from_the_environment_and_leaves_the_latents_unchanged(tmp_path, monkeypatch):
    """`--encode-elements` sets $SAEMA_ENCODE_ELEMENTS, which a stratify cell's encoder passes to encode_csr."""
    from saema_core.sae.sparse import ENCODE_ELEMENTS
    from storage.sae_checkpoints import save_sae
    from tasks import stratify
    from tasks.allocator import ENCODE_ELEMENTS_ENV, encode_elements, set_encode_elements

    sae = build_sae(SAEConfig(architecture="topk", d_in=8, d_sae=32, k=4))
    save_sae(sae, tmp_path / "sae")
    x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    monkeypatch.delenv(ENCODE_ELEMENTS_ENV, raising=False)
    assert encode_elements() == ENCODE_ELEMENTS
    default = stratify.encoder_for("latent", str(tmp_path / "sae"))(x)
    budgets = []
    real = stratify.encode_csr
    monkeypatch.setattr(stratify, "encode_csr", lambda s, v, budget: budgets.append(budget) or real(s, v, budget))
    monkeypatch.setenv(ENCODE_ELEMENTS_ENV, "96")  # 3 tokens at a time
    small = stratify.encoder_for("latent", str(tmp_path / "sae"))(x)
    assert budgets == [96]
    assert (small != default).nnz == 0
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv(ENCODE_ELEMENTS_ENV, bad)
        with pytest.raises(ValueError, match="SAEMA_ENCODE_ELEMENTS"):
            encode_elements()
    with pytest.raises(ValueError, match="--encode-elements must be ≥ 1"):
        set_encode_elements(0)
