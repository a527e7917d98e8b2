"""Hooks capture the residual stream exactly, for every supported architecture."""

from __future__ import annotations

import pytest
import torch

from saema_core.hooks import HookError, capture_residuals, find_blocks, hook_names, parse_hook
from storage.models import ModelSpec, load_model
from tests.tiny_models import ARCHITECTURES, N_LAYERS

PROMPTS = ["The month of March is cold.", "Saturn has rings"]


def _inputs(lm):
    encoded = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hooks_equal_hidden_states(tiny_model_dirs, arch):
    """resid_pre L is hidden_states[L]; resid_post L is hidden_states[L+1] except the last block of
    pre-norm models, whose hidden_states[-1] has the final norm applied (never use it)."""
    lm = load_model(ModelSpec(name=tiny_model_dirs[arch]))
    inputs = _inputs(lm)
    captured = capture_residuals(lm.model, inputs, hook_names(N_LAYERS))
    with torch.inference_mode():
        reference = lm.model(**inputs, output_hidden_states=True).hidden_states
    for layer in range(N_LAYERS):
        torch.testing.assert_close(captured[f"blocks.{layer}.hook_resid_pre"], reference[layer],
                                   atol=1e-5, rtol=0)
        if layer < N_LAYERS - 1 or arch == "bert":
            torch.testing.assert_close(captured[f"blocks.{layer}.hook_resid_post"], reference[layer + 1],
                                       atol=1e-5, rtol=0)
    assert captured["blocks.0.hook_resid_pre"].shape[-1] == lm.d_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_stops_after_deepest_hook(tiny_model_dirs, arch):
    lm = load_model(ModelSpec(name=tiny_model_dirs[arch]))
    blocks = find_blocks(lm.model)
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        capture_residuals(lm.model, _inputs(lm), ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == [0], f"blocks after the deepest hook ran: {calls}"


def test_unknown_hook_lists_valid_ones():
    with pytest.raises(HookError, match=r"blocks\.0\.hook_resid_pre.*blocks\.2\.hook_resid_post"):
        parse_hook("blocks.3.hook_resid_post", n_layers=3)
    with pytest.raises(HookError, match="does not exist"):
        parse_hook("blocks.1.hook_mlp_out", n_layers=3)
    assert parse_hook("blocks.2.hook_resid_pre", 3).layer == 2
