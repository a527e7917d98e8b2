"""The spliced-in CE loss of an SAE: SAELens's `ce_loss_score` (DESIGN.md §4.7).

The model's own language-modelling loss is measured three times on the same tokens:

- `clean`: the unmodified forward;
- `sae`: the residual stream at the hook replaced by the SAE's reconstruction;
- `zero_ablation`: the residual stream at the hook replaced by zeros;

and ce_loss_score = (L_zero − L_sae) / (L_zero − L_clean): 1 when splicing in the SAE costs nothing,
0 when it is as bad as deleting the residual stream. The loss is the mean negative log-likelihood per
scored token (nats), pooled over every batch:

- causal LMs: every next token whose position is not padding (the model's `labels = input_ids` loss);
- masked LMs: a seeded `mask_fraction` of each sequence's non-special, non-padding tokens is replaced
  by the mask token, and the loss is taken on those positions only (the usual MLM objective, without
  BERT's 10 % random / 10 % unchanged variants, so that the three runs see identical inputs).

The replacement is applied only at non-special, non-padding positions by default (SAEBench's
`exclude_special_tokens_from_reconstruction`): the SAE was trained on those tokens only, and the
huge-norm BOS/CLS residuals would otherwise dominate the damage. Where L_zero ≈ L_clean the score is
undefined and is NaN with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saema_core.hooks import replaced_residual
from saema_core.sae import SAE
from saema_core.sae_metrics import ce_loss_score

LM_KINDS = ("causal", "masked")
RUNS = ("clean", "sae", "zero_ablation")


@dataclass(frozen=True)
class CELossConfig:
    """How the three losses are measured."""

    kind: str
    """`causal` (next-token loss) or `masked` (loss on masked tokens)."""
    mask_fraction: float = 0.15
    """Share of each sequence's maskable tokens replaced by the mask token (masked LMs; BERT's 15 %)."""
    seed: int = 0
    """Seeds the choice of masked tokens."""
    batch_size: int = 4
    """Sequences per forward; bounds the (batch, seq, vocab) logits in memory."""
    exclude_special_tokens: bool = True
    """Keep the clean residual at special tokens (SAEBench's default) instead of splicing there too."""
    rtol: float = 1e-4
    """The score is undefined (NaN) when |L_zero − L_clean| ≤ rtol · L_clean."""

    def __post_init__(self) -> None:
        if self.kind not in LM_KINDS:
            raise ValueError(f"kind must be one of {LM_KINDS}, got {self.kind!r}")
        if not 0 < self.mask_fraction < 1:
            raise ValueError(f"mask_fraction must be in (0, 1), got {self.mask_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if not self.rtol >= 0:
            raise ValueError(f"rtol must be ≥ 0, got {self.rtol}")


class LMBatch(NamedTuple):
    """What one forward is fed and scored on; all (batch, seq)."""

    input_ids: Tensor
    """Ids given to the model (masked LMs: with the mask token at the scored positions)."""
    targets: Tensor
    """Id the logits at each position must predict."""
    scored: Tensor
    """bool: positions whose loss counts."""


class CELosses(NamedTuple):
    """The three mean per-token losses (nats) and the score."""

    clean: float
    sae: float
    zero_ablation: float
    score: float
    """(zero_ablation − sae) / (zero_ablation − clean); NaN when undefined (see `reason`)."""
    n_tokens: int
    """Scored tokens."""
    reason: str
    """Why `score` is NaN; empty when it is defined."""


def causal_lm_batch(input_ids: Tensor, attention_mask: Tensor) -> LMBatch:
    """Next-token targets (batch, seq): position t predicts token t+1 when both are real tokens."""
    real = attention_mask.bool()
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    scored = torch.zeros_like(real)
    scored[:, :-1] = real[:, :-1] & real[:, 1:]
    return LMBatch(input_ids, targets, scored)


def choose_masked_positions(maskable: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """bool (batch, seq): per row, round(fraction · n) of its n maskable positions (at least one).

    Uniformly at random: a row's maskable positions are ranked by a seeded random key, and the
    lowest-ranked ones are taken.
    """
    keys = torch.rand(maskable.shape, generator=generator).to(maskable.device)
    keys = keys.masked_fill(~maskable, math.inf)
    rank = keys.argsort(dim=1).argsort(dim=1)
    n_maskable = maskable.sum(dim=1, keepdim=True)
    # In float64, as Python's round(n · f): float32 turns 10 × 0.9499999999999998 into 9.5, rounded to 10.
    count = torch.clamp((n_maskable.double() * fraction).round(), min=1).minimum(n_maskable)
    return (rank < count) & maskable


def masked_lm_batch(input_ids: Tensor, attention_mask: Tensor, special: Tensor, mask_token_id: int,
                    fraction: float, generator: torch.Generator) -> LMBatch:
    """A seeded share of non-special, non-padding tokens (batch, seq) replaced by the mask token."""
    chosen = choose_masked_positions(attention_mask.bool() & ~special, fraction, generator)
    return LMBatch(input_ids.masked_fill(chosen, mask_token_id), input_ids, chosen)


def sae_reconstruction(sae: SAE) -> Callable[[Tensor], Tensor]:
    """x (..., d_in) → the SAE's reconstruction, on x's device and in x's dtype."""
    parameter = next(sae.parameters())

    def reconstruct(x: Tensor) -> Tensor:
        return sae(x.to(parameter.device)).reconstruction.to(device=x.device, dtype=x.dtype)

    return reconstruct


def zeros(x: Tensor) -> Tensor:
    """The zero-ablation replacement."""
    return torch.zeros_like(x)


def at_positions(replace: Callable[[Tensor], Tensor], positions: Tensor) -> Callable[[Tensor], Tensor]:
    """x (batch, seq, d) → replace(x) where `positions` (batch, seq) is True, x elsewhere."""
    return lambda x: torch.where(positions[..., None], replace(x), x)


def nll_sum(model: torch.nn.Module, batch: LMBatch, attention_mask: Tensor) -> float:
    """Summed negative log-likelihood (nats, float64) of the scored targets under one forward."""
    logits = model(input_ids=batch.input_ids, attention_mask=attention_mask).logits
    scored_logits = logits[batch.scored].double()
    return float(F.cross_entropy(scored_logits, batch.targets[batch.scored], reduction="sum"))


def _lm_batch(cfg: CELossConfig, input_ids: Tensor, attention_mask: Tensor, special: Tensor,
              mask_token_id: int | None, generator: torch.Generator) -> LMBatch:
    if cfg.kind == "causal":
        return causal_lm_batch(input_ids, attention_mask)
    if mask_token_id is None:
        raise ValueError("a masked LM needs mask_token_id")
    return masked_lm_batch(input_ids, attention_mask, special, mask_token_id, cfg.mask_fraction, generator)


def _batch_nll_sums(model: torch.nn.Module, hook: str, sae: SAE, batch: LMBatch, attention_mask: Tensor,
                    positions: Tensor, runs: tuple[str, ...] = RUNS) -> dict[str, float]:
    """{run: summed NLL} for the clean, SAE-spliced and zero-ablated forwards of one batch (those in `runs`)."""
    replacements = {"clean": None, "sae": sae_reconstruction(sae), "zero_ablation": zeros}
    sums = {}
    for run in runs:
        if replacements[run] is None:
            sums[run] = nll_sum(model, batch, attention_mask)
            continue
        with replaced_residual(model, hook, at_positions(replacements[run], positions)):
            sums[run] = nll_sum(model, batch, attention_mask)
    return sums


def score_or_reason(clean: float, sae: float, zero_ablation: float, n_tokens: int,
                    rtol: float) -> tuple[float, str]:
    """The ce_loss_score, or NaN and why it is undefined."""
    if n_tokens == 0:
        return math.nan, "no tokens to score (every position is padding or special)"
    if not all(math.isfinite(v) for v in (clean, sae, zero_ablation)):
        return math.nan, f"non-finite loss: clean {clean}, sae {sae}, zero-ablation {zero_ablation}"
    if abs(zero_ablation - clean) <= rtol * abs(clean):
        return math.nan, (f"undefined: the zero-ablation loss {zero_ablation:.6g} equals the clean loss "
                          f"{clean:.6g} within rtol {rtol:g}, so the hook does not affect the loss")
    return ce_loss_score(clean, sae, zero_ablation), ""


@torch.inference_mode()
def spliced_ce_losses(model: torch.nn.Module, hook: str, sae: SAE, input_ids: Tensor,
                      attention_mask: Tensor, special: Tensor, cfg: CELossConfig,
                      mask_token_id: int | None = None, reference: tuple[float, float] | None = None) -> CELosses:
    """Clean, SAE-spliced and zero-ablated LM losses of `model` (with its LM head) and the score.

    `reference`: the (clean, zero-ablation) losses of these very sequences, measured before (they do
    not depend on the SAE): only the SAE-spliced forward runs, a third of the work.

    `input_ids`, `attention_mask` (1 = real token) and `special` (True = special token of the
    original ids) are (n_sequences, seq); they are fed `cfg.batch_size` rows at a time to the model's
    device. `hook` is a TransformerLens residual hook name; `sae` reads its d_model activations.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(cfg.seed)
    runs = ("sae",) if reference is not None else RUNS
    totals, n_tokens = dict.fromkeys(RUNS, 0.0), 0
    for start in range(0, len(input_ids), cfg.batch_size):
        rows = slice(start, start + cfg.batch_size)
        ids, attention, spec = (t[rows].to(device) for t in (input_ids, attention_mask, special))
        batch = _lm_batch(cfg, ids, attention, spec, mask_token_id, generator)
        positions = attention.bool() & ~spec if cfg.exclude_special_tokens else attention.bool()
        for run, value in _batch_nll_sums(model, hook, sae, batch, attention, positions, runs).items():
            totals[run] += value
        n_tokens += int(batch.scored.sum())
    means = {run: totals[run] / n_tokens if n_tokens else math.nan for run in RUNS}
    if reference is not None:
        means["clean"], means["zero_ablation"] = reference
    score, reason = score_or_reason(means["clean"], means["sae"], means["zero_ablation"], n_tokens, cfg.rtol)
    return CELosses(means["clean"], means["sae"], means["zero_ablation"], score, n_tokens, reason)
