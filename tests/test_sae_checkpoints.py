"""SAE checkpoint formats: SAELens (6.x and flat), dictionary_learning, sparsify; saving; errors."""

from __future__ import annotations

import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import storage.sae_checkpoints as checkpoints
from saema_core.sae import SAE, SAEConfig, build_sae
from storage.sae_checkpoints import (
    CheckpointError,
    detect_format,
    load_sae,
    load_sae_from_release,
    sae_hash,
    save_sae,
)

try:
    import sae_lens
except ImportError:
    sae_lens = None

requires_saelens = pytest.mark.skipif(sae_lens is None, reason="the optional sae-lens is not installed")

FIXTURES = Path(__file__).parent / "fixtures"
ARCHITECTURES = ("standard", "topk", "jumprelu", "gated", "dense")
D_IN, D_SAE = 6, 10


def random_sae(architecture: str = "topk", seed: int = 0, **overrides) -> SAE:
    """An SAE with random weights (positive thresholds) and a little provenance metadata."""
    fields = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE,
              "k": 3 if architecture == "topk" else None,
              "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"}}
    sae = build_sae(SAEConfig(**{**fields, **overrides}))
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            values = rng.normal(size=tuple(param.shape)) * (0.2 if name == "r_mag" else 1.0)
            param.copy_(torch.from_numpy(np.abs(values) if name == "threshold" else values))
    return sae


def inputs(n: int = 12, d_in: int = D_IN, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed))


def write_json(file: Path, content: object) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(content))


def saelens_folder(tmp_path: Path, sae: SAE, name: str = "sae") -> Path:
    return save_sae(sae, tmp_path / name)


def naive_topk(pre: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest entries of each row of a ReLU'd pre-activation matrix."""
    out = np.zeros_like(pre)
    for t, row in enumerate(pre):
        for i in np.argsort(-row)[:k]:
            out[t, i] = max(row[i], 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# saema's own folders


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_load_round_trip_gives_identical_latents(tmp_path, architecture):
    sae = random_sae(architecture, normalize_activations="constant_norm_rescale",
                     apply_b_dec_to_input=architecture != "jumprelu")
    loaded = load_sae(saelens_folder(tmp_path, sae), expected_d_in=D_IN)
    x = inputs()
    assert type(loaded) is type(sae)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)
    assert sae_hash(loaded) == sae_hash(sae)
    assert loaded.cfg.metadata["hook_name"] == "blocks.1.hook_resid_post"
    assert loaded.cfg.metadata["source_format"] == "saelens"
    assert not any(p.requires_grad for p in loaded.parameters())


def test_saved_folder_is_a_saelens_6_folder(tmp_path):
    folder = saelens_folder(tmp_path, random_sae("topk"))
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["d_sae"] == D_SAE
    assert cfg["metadata"]["model_name"] == "tiny" and cfg["metadata"]["sae_lens_version"]
    assert set(load_file(folder / "sae_weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert detect_format(folder) == "saelens"


def test_save_overwrites_an_existing_checkpoint(tmp_path):
    target = tmp_path / "sae"
    save_sae(random_sae("topk", seed=1), target)
    newer = random_sae("topk", seed=2)
    save_sae(newer, target)
    assert sae_hash(load_sae(target)) == sae_hash(newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_failed_write_leaves_the_previous_checkpoint_in_place(tmp_path, monkeypatch):
    target = tmp_path / "sae"
    good = random_sae("topk", seed=1)
    save_sae(good, target)

    def write_half_then_fail(tensors, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_sae(random_sae("topk", seed=2), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sae_hash(load_sae(target)) == sae_hash(good)


def test_failed_swap_restores_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "sae"
    good = random_sae("topk", seed=1)
    save_sae(good, target)
    real_rename, calls = os.rename, []

    def rename_failing_second_call(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(checkpoints.os, "rename", rename_failing_second_call)
    with pytest.raises(OSError, match="rename failed"):
        save_sae(random_sae("topk", seed=2), target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sae_hash(load_sae(target)) == sae_hash(good)


def test_save_refuses_non_finite_weights_and_unserialisable_metadata(tmp_path):
    sae = random_sae("standard")
    with torch.no_grad():
        sae.b_dec[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"sae.*tensor 'b_dec' has 1 NaN/Inf values"):
        save_sae(sae, tmp_path / "sae")
    odd = random_sae("standard", metadata={"when": object()})
    with pytest.raises(CheckpointError, match=r"cfg.json: metadata is not JSON-serialisable"):
        save_sae(odd, tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def test_sae_hash_tracks_weights_and_computation_but_not_metadata():
    sae = random_sae("topk")
    same = random_sae("topk", metadata={"model_name": "other"})
    assert sae_hash(sae) == sae_hash(same)
    assert sae_hash(sae) != sae_hash(random_sae("topk", k=4))
    with torch.no_grad():
        same.W_dec[0, 0] += 1e-6
    assert sae_hash(sae) != sae_hash(same)
    assert len(sae_hash(sae)) == 64


# ---------------------------------------------------------------------------------------------
# Committed SAELens fixtures: latents from an independent numpy encode


@pytest.mark.parametrize("name", ["saelens_topk", "saelens_jumprelu"])
def test_committed_saelens_fixtures_encode_to_the_reference_latents(name):
    folder = FIXTURES / name
    reference = load_file(folder / "reference.safetensors")
    sae = load_sae(folder, expected_d_in=8)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (8, 16)
    assert sae.cfg.metadata["hook_name"] == "blocks.0.hook_resid_post"
    torch.testing.assert_close(sae.encode(reference["x"]), reference["latents"], atol=1e-5, rtol=0)


@requires_saelens
@pytest.mark.parametrize("name", ["saelens_topk", "saelens_jumprelu"])
def test_committed_fixtures_match_saelens_itself(name):
    folder = FIXTURES / name
    reference = load_file(folder / "reference.safetensors")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    torch.testing.assert_close(theirs.encode(reference["x"]).detach(), reference["latents"],
                               atol=1e-5, rtol=0)


@requires_saelens
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_reads_saema_folders_and_encodes_identically(tmp_path, architecture):
    sae = random_sae(architecture, apply_b_dec_to_input=architecture != "gated")
    theirs = sae_lens.SAE.load_from_disk(str(saelens_folder(tmp_path, sae)), device="cpu")
    x = inputs()
    torch.testing.assert_close(theirs.encode(x).detach(), sae.encode(x), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"


# ---------------------------------------------------------------------------------------------
# Pre-6 (flat) SAELens configs


def flat_saelens_folder(tmp_path: Path, sae: SAE, **cfg) -> Path:
    folder = tmp_path / "flat"
    base = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "device": "cpu",
            "model_name": "gpt2-small", "hook_point": "blocks.3.hook_resid_pre", "hook_point_layer": 3,
            "hook_point_head_index": None, "context_size": 128, "apply_b_dec_to_input": True,
            "normalize_activations": "none", "sae_lens_training_version": "3.14.0"}
    write_json(folder / "cfg.json", {**base, **cfg})
    save_file(sae.state_dict_saelens(), folder / "sae_weights.safetensors")
    return folder


def test_flat_topk_config_reads_k_from_activation_fn_kwargs(tmp_path):
    sae = random_sae("topk", k=4)
    folder = flat_saelens_folder(tmp_path, sae, activation_fn_str="topk",
                                 activation_fn_kwargs={"k": 4})
    loaded = load_sae(folder)
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 4
    assert loaded.cfg.metadata["hook_name"] == "blocks.3.hook_resid_pre"
    assert loaded.cfg.metadata["model_name"] == "gpt2-small"
    assert torch.equal(loaded.encode(inputs()), sae.encode(inputs()))


def test_flat_relu_config_without_architecture_is_standard(tmp_path):
    sae = random_sae("standard")
    tensors = {**sae.state_dict_saelens(), "scaling_factor": torch.ones(D_SAE)}
    folder = flat_saelens_folder(tmp_path, sae, activation_fn_str="relu", normalize_activations=False)
    save_file(tensors, folder / "sae_weights.safetensors")
    loaded = load_sae(folder)
    assert loaded.cfg.architecture == "standard"
    assert loaded.cfg.normalize_activations == "none"
    assert torch.equal(loaded.encode(inputs()), sae.encode(inputs()))


@requires_saelens
def test_flat_config_upgrade_agrees_with_saelens(tmp_path):
    sae = random_sae("topk", k=4)
    folder = flat_saelens_folder(tmp_path, sae, activation_fn_str="topk",
                                 activation_fn_kwargs={"k": 4})
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    torch.testing.assert_close(theirs.encode(inputs()).detach(), load_sae(folder).encode(inputs()))


# ---------------------------------------------------------------------------------------------
# dictionary_learning (ae.pt + config.json)


def dictionary_learning_folder(tmp_path: Path, dict_class: str, state_dict: dict, **trainer) -> Path:
    folder = tmp_path / dict_class
    folder.mkdir()
    torch.save(state_dict, folder / "ae.pt")
    trainer = {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE,
               "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 3, "submodule_name": "resid_post_layer_3",
               **trainer}
    write_json(folder / "config.json", {"trainer": trainer, "buffer": {"d_submodule": D_IN}})
    return folder


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 100 * len(shape)))


def linear_ae_state(b_dec_name: str) -> dict[str, torch.Tensor]:
    """nn.Linear layout: encoder.weight [d_sae, d_in], decoder.weight [d_in, d_sae]."""
    return {"encoder.weight": _rand(D_SAE, D_IN, seed=1), "encoder.bias": _rand(D_SAE, seed=2),
            "decoder.weight": _rand(D_IN, D_SAE, seed=3), b_dec_name: _rand(D_IN, seed=4)}


def dl_relu_encode(sd, x, b_dec_name):
    """dictionary_learning: relu(encoder(x - b_dec)), with nn.Linear's x @ weight.T + bias."""
    pre = (x - sd[b_dec_name].numpy()) @ sd["encoder.weight"].numpy().T + sd["encoder.bias"].numpy()
    return np.maximum(pre, 0.0)


def test_dictionary_learning_autoencoder(tmp_path):
    sd = linear_ae_state("bias")
    sae = load_sae(dictionary_learning_folder(tmp_path, "AutoEncoder", sd), expected_d_in=D_IN)
    x = inputs().numpy()
    assert sae.cfg.architecture == "standard" and sae.cfg.apply_b_dec_to_input
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), dl_relu_encode(sd, x, "bias"),
                               atol=1e-5)
    recon = sae.decode(sae.encode(torch.from_numpy(x))).numpy()
    expected = dl_relu_encode(sd, x, "bias") @ sd["decoder.weight"].numpy().T + sd["bias"].numpy()
    np.testing.assert_allclose(recon, expected, atol=1e-4)
    assert sae.cfg.metadata["model_name"] == "EleutherAI/pythia-70m-deduped"
    assert sae.cfg.metadata["source_format"] == "dictionary_learning"


def test_dictionary_learning_topk(tmp_path):
    sd = {**linear_ae_state("b_dec"), "k": torch.tensor(3, dtype=torch.int32),
          "threshold": torch.tensor(-1.0)}
    sae = load_sae(dictionary_learning_folder(tmp_path, "AutoEncoderTopK", sd, k=3))
    x = inputs().numpy()
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(),
                               naive_topk(dl_relu_encode(sd, x, "b_dec"), 3), atol=1e-5)


def test_dictionary_learning_batch_topk_uses_its_threshold(tmp_path):
    sd = {**linear_ae_state("b_dec"), "k": torch.tensor(3, dtype=torch.int32),
          "threshold": torch.tensor(0.7)}
    sae = load_sae(dictionary_learning_folder(tmp_path, "BatchTopKSAE", sd, k=3))
    x = inputs().numpy()
    post = dl_relu_encode(sd, x, "b_dec")
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), post * (post > 0.7), atol=1e-5)


def test_dictionary_learning_jumprelu(tmp_path):
    sd = {"W_enc": _rand(D_IN, D_SAE, seed=1), "b_enc": _rand(D_SAE, seed=2),
          "W_dec": _rand(D_SAE, D_IN, seed=3), "b_dec": _rand(D_IN, seed=4),
          "threshold": _rand(D_SAE, seed=5).abs()}
    sae = load_sae(dictionary_learning_folder(tmp_path, "JumpReluAutoEncoder", sd))
    x = inputs().numpy()
    pre = x @ sd["W_enc"].numpy() + sd["b_enc"].numpy()  # apply_b_dec_to_input is False there
    expected = np.maximum(pre * (pre > sd["threshold"].numpy()), 0.0)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), expected, atol=1e-5)


def test_dictionary_learning_gated(tmp_path):
    sd = {"encoder.weight": _rand(D_SAE, D_IN, seed=1), "gate_bias": _rand(D_SAE, seed=2),
          "r_mag": _rand(D_SAE, seed=3) * 0.2, "mag_bias": _rand(D_SAE, seed=4),
          "decoder.weight": _rand(D_IN, D_SAE, seed=5), "decoder_bias": _rand(D_IN, seed=6)}
    sae = load_sae(dictionary_learning_folder(tmp_path, "GatedAutoEncoder", sd))
    x = inputs().numpy()
    x_enc = (x - sd["decoder_bias"].numpy()) @ sd["encoder.weight"].numpy().T
    gate = (x_enc + sd["gate_bias"].numpy()) > 0
    magnitude = np.maximum(np.exp(sd["r_mag"].numpy()) * x_enc + sd["mag_bias"].numpy(), 0.0)
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), gate * magnitude, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# EleutherAI sparsify (cfg.json + sae.safetensors)


def sparsify_state() -> dict[str, torch.Tensor]:
    return {"encoder.weight": _rand(D_SAE, D_IN, seed=1), "encoder.bias": _rand(D_SAE, seed=2),
            "W_dec": _rand(D_SAE, D_IN, seed=3), "b_dec": _rand(D_IN, seed=4)}


def sparsify_folder(tmp_path: Path, tensors: dict, **cfg) -> Path:
    folder = tmp_path / "layers.3"
    folder.mkdir()
    save_file(tensors, folder / "sae.safetensors")
    base = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
            "num_latents": D_SAE, "k": 3, "multi_topk": False, "skip_connection": False,
            "transcode": False, "d_in": D_IN}
    write_json(folder / "cfg.json", {**base, **cfg})
    return folder


@pytest.mark.parametrize("sizing", [{"num_latents": D_SAE}, {"num_latents": 0, "expansion_factor": 2}])
def test_sparsify_topk(tmp_path, sizing):
    d_sae = D_SAE if sizing["num_latents"] else 2 * D_IN
    tensors = {"encoder.weight": _rand(d_sae, D_IN, seed=1), "encoder.bias": _rand(d_sae, seed=2),
               "W_dec": _rand(d_sae, D_IN, seed=3), "b_dec": _rand(D_IN, seed=4)}
    folder = sparsify_folder(tmp_path, tensors, **sizing)
    assert detect_format(folder) == "sparsify"
    sae = load_sae(folder)
    x = inputs().numpy()
    pre = np.maximum((x - tensors["b_dec"].numpy()) @ tensors["encoder.weight"].numpy().T
                     + tensors["encoder.bias"].numpy(), 0.0)
    assert sae.cfg.d_sae == d_sae and sae.cfg.metadata["hookpoint"] == "layers.3"
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), naive_topk(pre, 3), atol=1e-5)
    recon = sae(torch.from_numpy(x)).reconstruction.numpy()
    expected = naive_topk(pre, 3) @ tensors["W_dec"].numpy() + tensors["b_dec"].numpy()
    np.testing.assert_allclose(recon, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Bad input: the error names the file and the problem


def corrupt_saelens(tmp_path: Path, edit_tensors=None, edit_cfg=None) -> Path:
    folder = saelens_folder(tmp_path, random_sae("topk"))
    if edit_tensors is not None:
        tensors = load_file(folder / "sae_weights.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "sae_weights.safetensors")
    if edit_cfg is not None:
        cfg = json.loads((folder / "cfg.json").read_text())
        edit_cfg(cfg)
        write_json(folder / "cfg.json", cfg)
    return folder


@pytest.mark.parametrize(
    ("edit_tensors", "edit_cfg", "file", "message"),
    [
        (lambda t: t.pop("b_enc"), None, "sae_weights.safetensors", r"missing \['b_enc'\], unexpected \[\]"),
        (lambda t: t.update(extra=torch.zeros(2)), None, "sae_weights.safetensors",
         r"missing \[\], unexpected \['extra'\]"),
        (None, lambda c: c.update(d_sae=12), "sae_weights.safetensors",
         r"tensor 'W_enc' has shape \(6, 10\), but .*cfg.json says architecture=topk, d_in=6, d_sae=12"),
        (lambda t: t["W_dec"].__setitem__((0, 0), float("nan")), None, "sae_weights.safetensors",
         r"tensor 'W_dec' has 1 NaN/Inf values"),
        (lambda t: t["b_dec"].__setitem__(slice(0, 2), float("inf")), None, "sae_weights.safetensors",
         r"tensor 'b_dec' has 2 NaN/Inf values"),
        (None, lambda c: c.update(architecture="mystery"), "cfg.json",
         r"unknown SAE architecture 'mystery'; known architectures: dense, gated, jumprelu"),
        (None, lambda c: c.pop("d_in"), "cfg.json", r"missing required key 'd_in'"),
        (None, lambda c: c.update(k=0), "cfg.json", r"k must be a positive integer, got 0"),
        (None, lambda c: c.update(normalize_activations="layer_norm"), "cfg.json",
         r"normalize_activations must be one of"),
        (None, lambda c: c.update(rescale_acts_by_decoder_norm=True), "cfg.json",
         r"rescale_acts_by_decoder_norm=true is not supported"),
        (lambda t: t.update(scaling_factor=torch.full((D_SAE,), 2.0)), None,
         "sae_weights.safetensors", r"'scaling_factor' is not all ones"),
    ],
)
def test_bad_saelens_folders_name_the_file_and_the_problem(tmp_path, edit_tensors, edit_cfg, file,
                                                           message):
    folder = corrupt_saelens(tmp_path, edit_tensors, edit_cfg)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_sae(folder)
    assert str(folder / file) in str(caught.value)


def test_d_in_mismatch_names_the_folder(tmp_path):
    folder = saelens_folder(tmp_path, random_sae("topk"))
    with pytest.raises(CheckpointError, match=r"d_in=6 activations, but d_in=384 was expected") as caught:
        load_sae(folder, expected_d_in=384)
    assert str(folder) in str(caught.value)


def test_unreadable_files_name_the_file(tmp_path):
    folder = saelens_folder(tmp_path, random_sae("topk"))
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cfg.json: cannot read as JSON"):
        load_sae(folder)
    folder = saelens_folder(tmp_path, random_sae("topk"), name="other")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match=r"sae_weights.safetensors: cannot read as safetensors"):
        load_sae(folder)
    write_json(tmp_path / "list" / "cfg.json", [1, 2])
    save_file({"x": torch.zeros(1)}, tmp_path / "list" / "sae_weights.safetensors")
    with pytest.raises(CheckpointError, match=r"list/cfg.json: expected a JSON object, got list"):
        load_sae(tmp_path / "list")


def test_unknown_folders_and_files_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"empty: not a known SAE checkpoint \(found \['notes.txt'\]"):
        load_sae(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"notes.txt: not a folder"):
        load_sae(tmp_path / "empty" / "notes.txt")


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("make", "file", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "config.json", r"missing; dictionary_learning's ae.pt needs"),
        (lambda f: write_json(f / "config.json", {"trainer": {"dict_class": "Crosscoder"}}),
         "config.json", r"unknown dictionary_learning dict_class 'Crosscoder'; known: AutoEncoder"),
        (lambda f: write_json(f / "config.json", {"buffer": {}}), "config.json", r"missing the 'trainer'"),
        (lambda f: torch.save({"weights": NotATensor()}, f / "ae.pt"), "ae.pt",
         r"cannot read as a torch state dict"),
        (lambda f: (f / "ae.pt").write_bytes(b"garbage"), "ae.pt", r"cannot read as a torch state dict"),
    ],
)
def test_bad_dictionary_learning_folders(tmp_path, make, file, message):
    folder = dictionary_learning_folder(tmp_path, "AutoEncoder", linear_ae_state("bias"))
    make(folder)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_sae(folder)
    assert str(folder / file) in str(caught.value)


def test_dictionary_learning_config_contradicting_weights(tmp_path):
    folder = dictionary_learning_folder(tmp_path, "AutoEncoder", linear_ae_state("bias"), dict_size=12)
    with pytest.raises(CheckpointError, match=r"ae.pt: tensor 'encoder.weight' has shape \(10, 6\), "
                                              r"but .*config.json says d_in=6, d_sae=12"):
        load_sae(folder)


def test_dictionary_learning_k_buffer_contradicting_config(tmp_path):
    sd = {**linear_ae_state("b_dec"), "k": torch.tensor(3), "threshold": torch.tensor(-1.0)}
    folder = dictionary_learning_folder(tmp_path, "AutoEncoderTopK", sd, k=5)
    with pytest.raises(CheckpointError, match=r"ae.pt: buffer k=3 contradicts k=5 in .*config.json"):
        load_sae(folder)


def test_batch_topk_without_learned_threshold_is_refused(tmp_path):
    sd = {**linear_ae_state("b_dec"), "k": torch.tensor(3), "threshold": torch.tensor(-1.0)}
    folder = dictionary_learning_folder(tmp_path, "BatchTopKSAE", sd, k=3)
    with pytest.raises(CheckpointError, match=r"ae.pt: BatchTopKSAE threshold is -1.0 \(< 0\)"):
        load_sae(folder)


def test_dictionary_learning_missing_tensor(tmp_path):
    sd = linear_ae_state("bias")
    del sd["encoder.bias"]
    folder = dictionary_learning_folder(tmp_path, "AutoEncoder", sd)
    with pytest.raises(CheckpointError, match=r"ae.pt: tensor keys do not match: missing \['encoder.bias'\]"):
        load_sae(folder)


@pytest.mark.parametrize(
    ("cfg", "tensors", "file", "message"),
    [
        ({"transcode": True}, None, "cfg.json", r"transcoder \(transcode=true\) is not an autoencoder"),
        ({"skip_connection": True}, None, "cfg.json", r"skip connections \(W_skip\) are not supported"),
        ({"activation": "groupmax"}, None, "cfg.json", r"activation 'groupmax' is not supported"),
        ({"num_latents": 0, "expansion_factor": 0}, None, "cfg.json",
         r"neither 'num_latents' nor 'expansion_factor' is set"),
        ({"k": None}, None, "cfg.json", r"missing required key 'k'"),
        ({}, {"W_skip": torch.zeros(D_IN, D_IN)}, "sae.safetensors", r"unexpected \['W_skip'\]"),
        ({"num_latents": 12}, None, "sae.safetensors",
         r"tensor 'encoder.weight' has shape \(10, 6\), but .*cfg.json says d_in=6, d_sae=12"),
    ],
)
def test_bad_sparsify_folders(tmp_path, cfg, tensors, file, message):
    folder = sparsify_folder(tmp_path, {**sparsify_state(), **(tensors or {})}, **cfg)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_sae(folder)
    assert str(folder / file) in str(caught.value)


def test_flat_config_with_unsupported_activation(tmp_path):
    folder = flat_saelens_folder(tmp_path, random_sae("standard"), activation_fn_str="tanh-relu")
    with pytest.raises(CheckpointError, match=r"flat/cfg.json: activation_fn 'tanh-relu' is not supported"):
        load_sae(folder)


# ---------------------------------------------------------------------------------------------
# SAELens pretrained releases (optional sae-lens + network)


def fake_sae_lens(from_pretrained) -> types.ModuleType:
    module = types.ModuleType("sae_lens")
    module.SAE = types.SimpleNamespace(from_pretrained=from_pretrained)
    return module


def test_release_without_sae_lens_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # makes `import sae_lens` fail
    with pytest.raises(CheckpointError, match=r"release 'gpt2-small-res-jb'.*sae-lens is not installed"):
        load_sae_from_release("gpt2-small-res-jb", "blocks.0.hook_resid_pre")


def test_release_without_network_says_so(monkeypatch):
    def offline(release, sae_id, device):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setitem(sys.modules, "sae_lens", fake_sae_lens(offline))
    with pytest.raises(CheckpointError, match=r"cannot download it, no network access to the Hub\?"):
        load_sae_from_release("gpt2-small-res-jb", "blocks.0.hook_resid_pre")


def test_release_is_converted_through_the_saelens_path(monkeypatch):
    sae = random_sae("jumprelu")
    cfg = checkpoints.saelens_config_dict(sae.cfg)

    def downloaded(release, sae_id, device):
        return types.SimpleNamespace(cfg=types.SimpleNamespace(to_dict=lambda: cfg),
                                     state_dict=sae.state_dict_saelens)

    monkeypatch.setitem(sys.modules, "sae_lens", fake_sae_lens(downloaded))
    loaded = load_sae_from_release("some-release", "layer_1", expected_d_in=D_IN)
    assert sae_hash(loaded) == sae_hash(sae)
    with pytest.raises(CheckpointError, match=r"release 'some-release', sae_id 'layer_1'.*d_in=384"):
        load_sae_from_release("some-release", "layer_1", expected_d_in=384)


# SAELens release names, resolved in a local Hugging Face cache (storage.sae_releases).

RELEASES_YAML = """
toy-res: {repo_id: toy-org/toy-saes, model: tiny, saes: [{id: blocks.1.hook_resid_post, path: res/layer_1}]}
toy-converted: {repo_id: toy-org/other, model: tiny, conversion_func: gemma_2, saes: [{id: a, path: a}]}
"""


@pytest.fixture
def release_cache(tmp_path, monkeypatch):
    """A SAELens release table with two releases, and a Hugging Face cache holding toy-res's SAE."""
    from huggingface_hub import constants

    from storage import sae_releases

    table = tmp_path / "pretrained_saes.yaml"
    table.write_text(RELEASES_YAML)
    monkeypatch.setattr(sae_releases, "directory_file", lambda: table)
    cache = tmp_path / "hf-cache"
    repo = cache / "models--toy-org--toy-saes"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    sae = random_sae("topk")
    save_sae(sae, repo / "snapshots" / commit / "res" / "layer_1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return sae, repo / "snapshots" / commit / "res" / "layer_1"


def test_a_saelens_release_name_loads_its_folder_from_the_local_cache(release_cache):
    from storage.sae_releases import resolve_checkpoint

    sae, folder = release_cache
    for name in ("toy-res/blocks.1.hook_resid_post", "saelens:toy-res/blocks.1.hook_resid_post"):
        assert resolve_checkpoint(name) == str(folder)
    loaded = load_sae(resolve_checkpoint("toy-res/blocks.1.hook_resid_post"), expected_d_in=D_IN)
    x = inputs()
    torch.testing.assert_close(loaded.encode(x), sae.eval().encode(x))
    assert resolve_checkpoint("toy-res") == "toy-res"  # no sae_id: a path, as given


@pytest.mark.parametrize("name, message", [
    ("saelens:toy-rez/blocks.1.hook_resid_post", "no SAELens release 'toy-rez'; did you mean toy-res"),
    ("saelens:toy-res/blocks.2.hook_resid_post", "no such sae_id in the release; did you mean blocks.1"),
    ("saelens:toy-converted/a", "converts this release from another layout ('gemma_2')"),
])
def test_a_bad_release_name_says_what_is_wrong(release_cache, name, message):
    from storage.sae_releases import resolve_checkpoint

    with pytest.raises(CheckpointError, match=re.escape(message)):
        resolve_checkpoint(name)


def test_a_release_missing_from_the_cache_says_how_to_get_it(release_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from storage.sae_releases import resolve_checkpoint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache .*hf download toy-org/toy-saes "
                                              r"--include 'res/layer_1/\*'"):
        resolve_checkpoint("toy-res/blocks.1.hook_resid_post")


def test_without_sae_lens_a_release_name_asks_for_it_and_a_path_stays_a_path(monkeypatch):
    from storage import sae_releases

    monkeypatch.setattr(sae_releases, "directory_file", lambda: None)
    with pytest.raises(CheckpointError, match=r"needs its table, from the optional package sae-lens"):
        sae_releases.resolve_checkpoint("saelens:gpt2-small-res-jb/blocks.8.hook_resid_pre")
    assert sae_releases.resolve_checkpoint("gpt2-small-res-jb/blocks.8.hook_resid_pre") == (
        "gpt2-small-res-jb/blocks.8.hook_resid_pre")  # preflight then says: no SAE checkpoint at …
