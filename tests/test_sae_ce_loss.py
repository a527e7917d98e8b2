"""The spliced-in CE loss (`ce_loss_score`): known scores for identity and zero SAEs, agreement with a
hand-written forward hook and the model's own `labels=` loss, LM-head loading, and the SAE task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st

from flows.config import ExtractConfig
from flows.sae import sae_eval_dataset
from saema_core.hooks import HookError, replaced_residual
from saema_core.sae import SAEConfig, build_sae
from saema_core.splice import (
    CELossConfig,
    causal_lm_batch,
    choose_masked_positions,
    masked_lm_batch,
    score_or_reason,
    spliced_ce_losses,
)
from storage.models import ModelSpec, load_lm_head_model
from storage.sae_checkpoints import sae_hash, save_sae
from tasks.extract import extract_corpus
from tasks.sae import SAERef, evaluate_sae

HOOK = "blocks.1.hook_resid_post"
TEXTS = ["The month of March is cold and wet.", "Saturn has rings", "Helium is a noble gas in group 18."]
# Layer modules written out by hand, so the oracle hook shares no code with saema_core.hooks.
ORACLE_BLOCK = {"causal": lambda m: m.transformer.h[1], "masked": lambda m: m.bert.encoder.layer[1],
                "gemma": lambda m: m.model.layers[1]}
KINDS = ["causal", "masked", "gemma"]  # GPT-2 and Gemma 3 (with <bos>, sliding-window layers) are causal


@pytest.fixture(scope="module")
def lm_dirs(tiny_model_dirs, tmp_path_factory) -> dict[str, str]:
    """{kind: folder}: the tiny GPT-2 and BERT configs built `from_config` with their LM heads, saved."""
    root = tmp_path_factory.mktemp("lm_heads")
    loaders = {"causal": ("gpt2", transformers.AutoModelForCausalLM),
               "masked": ("bert", transformers.AutoModelForMaskedLM)}
    folders = {}
    for kind, (arch, auto) in loaders.items():
        torch.manual_seed(0)
        model = auto.from_config(transformers.AutoConfig.from_pretrained(tiny_model_dirs[arch]))
        folders[kind] = str(root / kind)
        model.save_pretrained(folders[kind])
        transformers.AutoTokenizer.from_pretrained(tiny_model_dirs[arch]).save_pretrained(folders[kind])
    folders["gemma"] = tiny_model_dirs["gemma3"]  # saved as Gemma3ForCausalLM
    return folders


def _lm(lm_dirs, kind: str):
    loaded = load_lm_head_model(ModelSpec(name=lm_dirs[kind]))
    assert loaded.lm is not None, loaded.reason
    return loaded.lm


def _tokens(lm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and special-token mask (sequences, seq) of TEXTS."""
    encoded = lm.tokenizer(TEXTS, return_tensors="pt", padding=True)
    ids, attention = encoded["input_ids"], encoded["attention_mask"]
    special = torch.isin(ids, torch.tensor(lm.tokenizer.all_special_ids))
    return ids, attention, special


def _identity_sae(d: int):
    sae = build_sae(SAEConfig("dense", d_in=d, d_sae=d))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    return sae


def _random_sae(d: int, seed: int = 0):
    sae = build_sae(SAEConfig("standard", d_in=d, d_sae=4 * d))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return sae


def _losses(lm, sae, hook: str = HOOK, reference=None, **cfg):
    ids, attention, special = _tokens(lm)
    config = CELossConfig(kind=lm.kind, **cfg)
    return spliced_ce_losses(lm.model, hook, sae, ids, attention, special, config, lm.tokenizer.mask_token_id,
                             reference)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_sae_costs_nothing_and_zero_sae_is_ablation(lm_dirs, kind):
    lm = _lm(lm_dirs, kind)
    d = lm.model.config.hidden_size
    identity = _losses(lm, _identity_sae(d))
    assert identity.sae == identity.clean and identity.score == 1.0 and identity.reason == ""
    assert identity.zero_ablation != identity.clean
    zero = _losses(lm, build_sae(SAEConfig("standard", d_in=d, d_sae=2 * d)))  # zero weights: x̂ = 0
    assert zero.sae == zero.zero_ablation and zero.score == 0.0
    assert (zero.clean, zero.zero_ablation) == (identity.clean, identity.zero_ablation)


def _oracle_loss(lm, kind, replace, ids, attention, positions, labels) -> float:
    """The model's own mean loss (`labels=`) with the block output patched by a plain forward hook."""
    def patch(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = torch.where(positions[..., None], replace(hidden), hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = ORACLE_BLOCK[kind](lm.model).register_forward_hook(patch) if replace else None
    try:
        with torch.inference_mode():
            return float(lm.model(input_ids=ids, attention_mask=attention, labels=labels).loss)
    finally:
        if handle is not None:
            handle.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_spliced_losses_equal_a_hand_written_hook_and_the_models_own_loss(lm_dirs, kind):
    lm = _lm(lm_dirs, kind)
    ids, attention, special = _tokens(lm)
    assert (attention == 0).any(), "the batch must contain padding"
    sae = _random_sae(lm.model.config.hidden_size)
    if lm.kind == "causal":
        inputs, labels = ids, ids.masked_fill(attention == 0, -100)  # the model shifts the labels
    else:
        batch = masked_lm_batch(ids, attention, special, lm.tokenizer.mask_token_id, 0.15,
                                torch.Generator().manual_seed(7))
        inputs, labels = batch.input_ids, ids.masked_fill(~batch.scored, -100)
    positions = attention.bool() & ~special
    with torch.inference_mode():
        def reconstruct(x):
            return sae(x).reconstruction
        expected = [_oracle_loss(lm, kind, f, inputs, attention, positions, labels)
                    for f in (None, reconstruct, torch.zeros_like)]
    # Two rows per forward: the pooled per-token mean must equal the one-forward mean.
    got = _losses(lm, sae, seed=7, batch_size=2 if lm.kind == "causal" else len(TEXTS))
    np.testing.assert_allclose([got.clean, got.sae, got.zero_ablation], expected, rtol=1e-5)
    assert got.sae != pytest.approx(got.clean, rel=1e-3), "the random SAE must change the output"
    assert got.n_tokens == int((labels != -100).sum()) - (len(TEXTS) if lm.kind == "causal" else 0)


@pytest.mark.parametrize("kind", KINDS)
def test_resid_pre_of_a_block_is_resid_post_of_the_previous_one(lm_dirs, kind):
    lm = _lm(lm_dirs, kind)
    sae = _random_sae(lm.model.config.hidden_size, seed=1)
    post = _losses(lm, sae, hook="blocks.0.hook_resid_post")
    pre = _losses(lm, sae, hook="blocks.1.hook_resid_pre")
    assert post == pre


def test_replaced_residual_changes_logits_and_is_removed_afterwards(lm_dirs):
    lm = _lm(lm_dirs, "causal")
    ids, attention, _ = _tokens(lm)
    with torch.inference_mode():
        clean = lm.model(input_ids=ids, attention_mask=attention).logits
        with replaced_residual(lm.model, HOOK, lambda x: 2 * x):
            doubled = lm.model(input_ids=ids, attention_mask=attention).logits
        after = lm.model(input_ids=ids, attention_mask=attention).logits
    assert not torch.allclose(clean, doubled) and torch.equal(clean, after)
    truncated = replaced_residual(lm.model, HOOK, lambda x: x[..., :3])
    with pytest.raises(HookError, match="expected"), torch.inference_mode(), truncated:
        lm.model(input_ids=ids, attention_mask=attention)
    with pytest.raises(HookError, match="does not exist"), replaced_residual(
            lm.model, "blocks.9.hook_resid_post", lambda x: x):
        pass


def test_causal_targets_skip_padding():
    batch = causal_lm_batch(torch.tensor([[5, 6, 7, 0]]), torch.tensor([[1, 1, 1, 0]]))
    assert batch.targets[0, :2].tolist() == [6, 7]
    assert batch.scored.tolist() == [[True, True, False, False]]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1))
@example(1, 11, 0.9499999999999998, 153045)  # 10 maskable: 9.4999… must round to 9 (float32 gave 10)
def test_masked_positions_are_a_seeded_share_of_the_maskable(rows, seq, fraction, seed):
    maskable = torch.rand(rows, seq, generator=torch.Generator().manual_seed(seed)) < 0.6
    chosen = choose_masked_positions(maskable, fraction, torch.Generator().manual_seed(seed))
    assert not (chosen & ~maskable).any()
    for n, k in zip(maskable.sum(1).tolist(), chosen.sum(1).tolist()):
        assert k == (min(n, max(1, round(n * fraction))) if n else 0)
    again = choose_masked_positions(maskable, fraction, torch.Generator().manual_seed(seed))
    assert torch.equal(chosen, again)


def test_score_is_nan_with_a_reason_when_undefined():
    assert score_or_reason(2.0, 4.0, 10.0, n_tokens=5, rtol=1e-4) == (0.75, "")
    score, reason = score_or_reason(3.0, 4.0, 3.0 + 1e-6, n_tokens=5, rtol=1e-4)
    assert math.isnan(score) and "equals the clean loss" in reason
    score, reason = score_or_reason(math.nan, math.nan, math.nan, n_tokens=0, rtol=1e-4)
    assert math.isnan(score) and "no tokens" in reason
    with pytest.raises(ValueError, match="kind"):
        CELossConfig(kind="seq2seq")


def test_lm_heads_are_found_or_refused_with_the_reason(lm_dirs, tiny_model_dirs):
    assert _lm(lm_dirs, "causal").kind == "causal" and _lm(lm_dirs, "masked").kind == "masked"
    # GPT-2 ties its head to the token embeddings, so even a base GPT2Model checkpoint has it.
    assert load_lm_head_model(ModelSpec(name=tiny_model_dirs["gpt2"])).lm.kind == "causal"
    for name in (tiny_model_dirs["bert"], tiny_model_dirs["llama"], "all-MiniLM-L6-v2"):
        loaded = load_lm_head_model(ModelSpec(name=name))
        assert loaded.lm is None and loaded.reason.startswith("no LM head in the checkpoint"), name


def _corpus_store(tmp_path, model_dir: str) -> str:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(TEXTS * 40))
    out = str(tmp_path / "out")
    cfg = ExtractConfig(out=out, model=ModelSpec(name=model_dir), hooks=(HOOK,), corpus=str(corpus),
                        corpus_seq_len=16, corpus_batch_size=4, corpus_max_tokens=512)
    extract_corpus.fn(cfg)
    return out


def _ref(sae, folder, kind: str) -> SAERef:
    save_sae(sae, folder)
    return SAERef(str(folder), folder.name, kind, sae_hash(sae), HOOK)


def test_evaluate_sae_scores_held_out_corpus_sequences(lm_dirs, tmp_path):
    out = _corpus_store(tmp_path, lm_dirs["causal"])
    d = _lm(lm_dirs, "causal").model.config.hidden_size
    refs = [_ref(_identity_sae(d), tmp_path / "identity", "sae"),
            _ref(build_sae(SAEConfig("dense", d_in=d, d_sae=d)), tmp_path / "zero", "dense_ae")]
    metrics = [evaluate_sae.fn(out, lm_dirs["causal"], ref, 0.25, ce_sequences=4) for ref in refs]
    assert [m["ce_loss_score"] for m in metrics] == [1.0, 0.0]
    assert metrics[0]["ce_loss_with_sae"] == metrics[0]["ce_loss_without_sae"]
    evaluation = sae_eval_dataset(lm_dirs["causal"], refs, metrics)
    assert evaluation["ce_loss_score"].values.tolist() == [[[1.0, 0.0]]]
    assert "reason" not in evaluation["ce_loss_score"].attrs


def test_evaluate_sae_without_lm_head_keeps_nan_and_reason(tiny_model_dirs, tmp_path):
    out = _corpus_store(tmp_path, tiny_model_dirs["bert"])
    ref = _ref(_identity_sae(32), tmp_path / "identity", "sae")
    metrics = evaluate_sae.fn(out, tiny_model_dirs["bert"], ref, 0.25)
    assert math.isnan(metrics["ce_loss_score"]) and math.isfinite(metrics["explained_variance"])
    reason = sae_eval_dataset(tiny_model_dirs["bert"], [ref], [metrics])["ce_loss_score"].attrs["reason"]
    assert reason.startswith("no LM head in the checkpoint") and HOOK in reason


@pytest.mark.parametrize("kind", KINDS)
def test_known_clean_and_ablation_losses_are_reused_and_give_the_same_score(lm_dirs, kind):
    lm = _lm(lm_dirs, kind)
    sae = _random_sae(lm.model.config.hidden_size, seed=2)
    full = _losses(lm, sae)
    calls = []
    handle = lm.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        reused = _losses(lm, sae, reference=(full.clean, full.zero_ablation))
    finally:
        handle.remove()
    assert reused == full
    assert len(calls) == -(-len(TEXTS) // 4)  # one forward per batch (the SAE-spliced one), not three
