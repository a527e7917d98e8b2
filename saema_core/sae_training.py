"""Train a TopK or ReLU (L1) SAE, or the dense control autoencoder, on streamed activations.

The caller streams minibatches `(batch_size, d_in)` (from the activation store's training corpus); this
module only computes. Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", and the
dictionary_learning / sparsify implementations of it):

- **Input scaling** (SAELens `expected_average_only_in`): activations are multiplied by one constant
  s = √d_in / E‖x‖, estimated on the first batch, so that lr and l1_coefficient mean the same thing
  for every model. ReLU, TopK and the identity are positively homogeneous, so at the end s is folded
  into the biases (b_enc /= s, b_dec /= s): the saved SAE reads raw activations, its decoder rows stay
  unit-norm and its latents are in the units of x; its `normalize_activations` is "none".
- **Initialisation**: decoder rows W_dec[i] random unit vectors, W_enc = W_decᵀ (times d_in/d_sae for the
  dense control, whose every latent is active, so that the first reconstruction is not inflated
  d_sae/d_in-fold), b_enc = 0, b_dec = geometric median (or mean) of the first batch.
- **Unit-norm decoder rows**: before each Adam step the gradient component parallel to each row is
  removed; after it the rows are renormalised.
- **Loss**: ‖x − x̂‖² summed over d_in, mean over tokens, plus
  TopK: AuxK (Gao et al. §A.2): the k_aux (default d_in/2, their §B.1) largest ReLU'd pre-activations
  among dead latents reconstruct the main residual e = x − x̂ through W_dec (no bias); that error,
  normalised by the residual's variance ‖e − ē‖², is weighted by aux_k_coefficient (1/32);
  ReLU: l1_coefficient · Σ|z| per token (decoder rows have unit norm, so this is the
  decoder-norm-weighted L1 of Anthropic's April 2024 update);
  dense: nothing.
- **Dead latents**: a latent is dead once it has not fired (latent ≠ 0) for `dead_tokens_threshold`
  tokens. TopK revives them through AuxK. ReLU resamples them (Bricken et al. 2023, "Towards
  Monosemanticity"): each dead latent is re-pointed at a token of the current batch drawn with
  probability ∝ its squared reconstruction error, its encoder column set to that direction times
  0.2 × the mean alive encoder norm, its b_enc to 0, its Adam moments to 0, and its counter restarted.
- **Determinism**: all randomness comes from one torch.Generator seeded by `TrainingConfig.seed`; the
  global torch RNG is neither used nor changed. Same seed and batches → identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saema_core.sae import SAE, SAEConfig, build_sae

#: b_dec initialisations accepted by `TrainingConfig.b_dec_init`.
B_DEC_INITS = ("geometric_median", "mean", "zeros")

#: Ratio of a resampled encoder column's norm to the mean alive one (Bricken et al. 2023).
RESAMPLE_ENCODER_NORM_RATIO = 0.2

BatchSource = Iterable[Tensor] | Callable[[], Tensor]
"""Minibatches (batch_size, d_in): an iterable of tensors or a zero-argument callable returning one."""


def _check_positive(name: str, value: object, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}, got {value!r}")


def _check_non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """How to train; the SAE's own shape (architecture, d_in, d_sae, k) is its SAEConfig."""

    n_steps: int = 10_000
    """Optimiser steps; the run reads n_steps × batch_size tokens (`n_tokens`)."""
    batch_size: int = 4096
    """Rows per minibatch; every batch from the source must have exactly this many."""
    lr: float | None = None
    """Adam learning rate; None → 2e-4 / √(d_sae / 2¹⁴), Gao et al.'s scaling law (their Fig. 3)."""
    l1_coefficient: float = 5.0
    """ReLU SAEs: weight of Σ|z| per token (on inputs scaled to E‖x‖ = √d_in)."""
    aux_k_coefficient: float = 1 / 32
    """TopK SAEs: weight of the AuxK loss (Gao et al. §A.2); 0 disables it."""
    k_aux: int | None = None
    """TopK SAEs: dead latents used by AuxK; None → d_in // 2 (Gao et al. §B.1)."""
    dead_tokens_threshold: int = 10_000_000
    """A latent that has not fired for this many tokens is dead (Gao et al. use 10M)."""
    b_dec_init: str = "geometric_median"
    """"geometric_median", "mean" or "zeros" of the first batch."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""
    seed: int = 0
    """Seeds the weight initialisation and the resampling draws."""

    def __post_init__(self) -> None:
        _check_positive("n_steps", self.n_steps, integer=True)
        _check_positive("batch_size", self.batch_size, integer=True)
        _check_positive("dead_tokens_threshold", self.dead_tokens_threshold, integer=True)
        if self.lr is not None:
            _check_positive("lr", self.lr)
        if self.k_aux is not None:
            _check_positive("k_aux", self.k_aux, integer=True)
        if self.max_grad_norm is not None:
            _check_positive("max_grad_norm", self.max_grad_norm)
        _check_non_negative("l1_coefficient", self.l1_coefficient)
        _check_non_negative("aux_k_coefficient", self.aux_k_coefficient)
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if type(self.seed) is not int or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def n_tokens(self) -> int:
        """Tokens read by a full run."""
        return self.n_steps * self.batch_size

    def learning_rate(self, d_sae: int) -> float:
        """`lr`, or Gao et al.'s default for `d_sae` latents."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)


def training_sae_config(
    d_in: int, d_sae: int, architecture: str = "topk", k: int = 32,
    metadata: dict[str, Any] | None = None,
) -> SAEConfig:
    """The SAEConfig of an SAE to train: TopK with k=32 by default; k is dropped for other architectures."""
    return SAEConfig(
        architecture=architecture, d_in=d_in, d_sae=d_sae, k=k if architecture == "topk" else None,
        metadata=dict(metadata or {}),
    )


class StepStats(NamedTuple):
    """What one training step measured (mse and l0 on the step's batch, before the update)."""

    loss: float
    """Total loss in training units (inputs scaled by the scale factor)."""
    mse: float
    """‖x − x̂‖² summed over d_in, mean over tokens, in the input's own units."""
    l0: float
    """Mean number of non-zero latents per token."""
    dead_fraction: float
    """Fraction of latents that have not fired for `dead_tokens_threshold` tokens."""
    penalty: float
    """The sparsity / AuxK term of the loss (training units)."""
    extra: float = 0.0
    """The caller's `extra_loss` term (training units; 0 without one)."""


ExtraLoss = Callable[[Tensor, Tensor, Tensor], Tensor]
"""extra_loss(x, latents, mse) → a 0-d term added to the loss: x [B, d_in] the batch in raw units,
latents [B, d_sae] in training units (raw latents × the input scale), mse the step's 0-d MSE term."""


@dataclass(frozen=True)
class TrainingHistory:
    """Per-step loss curves of a run (arrays of length n_steps)."""

    loss: np.ndarray
    mse: np.ndarray
    l0: np.ndarray
    dead_fraction: np.ndarray
    penalty: np.ndarray
    extra: np.ndarray
    scale_factor: float
    """The input scale s (√d_in / E‖x‖ on the first batch) used during training."""

    @classmethod
    def from_steps(cls, steps: list[StepStats], scale_factor: float) -> TrainingHistory:
        columns = np.asarray(steps, dtype=np.float64).reshape(len(steps), len(StepStats._fields))
        return cls(*columns.T, scale_factor=scale_factor)

    def as_dict(self) -> dict[str, Any]:
        """Plain lists and floats, for JSON or an xarray Dataset along `step`."""
        return {key: value.tolist() if isinstance(value, np.ndarray) else value
                for key, value in asdict(self).items()}


class TrainingResult(NamedTuple):
    """A trained SAE (eval mode, parameters frozen, reading raw activations) and its loss curves."""

    sae: SAE
    history: TrainingHistory


# ----------------------------------------------------------------------------------------------
# Per-architecture objective


class _Forward(NamedTuple):
    pre: Tensor  # [B, d_sae] pre-activations
    latents: Tensor  # [B, d_sae]
    error: Tensor  # [B, d_in] x - x̂, training units


def _no_penalty(sae: SAE, fwd: _Forward, dead: Tensor, cfg: TrainingConfig) -> Tensor:
    return fwd.error.new_zeros(())


def _l1_penalty(sae: SAE, fwd: _Forward, dead: Tensor, cfg: TrainingConfig) -> Tensor:
    return cfg.l1_coefficient * fwd.latents.abs().sum(-1).mean()


def _auxk_penalty(sae: SAE, fwd: _Forward, dead: Tensor, cfg: TrainingConfig) -> Tensor:
    """Gao et al. §A.2: dead latents reconstruct the residual of the live ones."""
    n_dead = int(dead.sum())
    if n_dead == 0 or cfg.aux_k_coefficient == 0:
        return fwd.error.new_zeros(())
    k_aux = min(cfg.k_aux or max(sae.cfg.d_in // 2, 1), n_dead)
    dead_pre = torch.where(dead, fwd.pre.relu(), -torch.inf)
    top = dead_pre.topk(k_aux, dim=-1, sorted=False)
    aux_latents = torch.zeros_like(fwd.pre).scatter_(-1, top.indices, top.values)
    residual = fwd.error.detach()
    aux_mse = (residual - aux_latents @ sae.W_dec).pow(2).sum(-1).mean()
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    return cfg.aux_k_coefficient * aux_mse / variance.clamp_min(torch.finfo(variance.dtype).eps)


@dataclass(frozen=True)
class _Objective:
    penalty: Callable[[SAE, _Forward, Tensor, TrainingConfig], Tensor]
    resamples_dead: bool
    encoder_init_scale: Callable[[SAEConfig], float]


_OBJECTIVES: dict[str, _Objective] = {
    "topk": _Objective(_auxk_penalty, False, lambda cfg: 1.0),
    "standard": _Objective(_l1_penalty, True, lambda cfg: 1.0),
    "dense": _Objective(_no_penalty, False, lambda cfg: cfg.d_in / cfg.d_sae),
}


def _objective(cfg: SAEConfig) -> _Objective:
    if cfg.architecture not in _OBJECTIVES:
        raise ValueError(
            f"cannot train architecture {cfg.architecture!r}; trainable: {sorted(_OBJECTIVES)}"
        )
    if cfg.normalize_activations != "none":
        raise ValueError(
            f"train with normalize_activations='none' (training scales inputs itself), "
            f"got {cfg.normalize_activations!r}"
        )
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"training needs a float32 or float64 SAE, got dtype {cfg.dtype!r}")
    return _OBJECTIVES[cfg.architecture]


# ----------------------------------------------------------------------------------------------
# Initialisation


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-7) -> Tensor:
    """Geometric median [d] of points [n, d] by Weiszfeld's iteration, in float64."""
    x = points.to(torch.float64)
    guess = x.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (x - guess).norm(dim=1).clamp_min(1e-12)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        moved = float((new - guess).norm())
        guess = new
        if moved <= tol * max(float(guess.norm()), 1.0):
            break
    return guess.to(points.dtype)


def input_scale_factor(x: Tensor) -> float:
    """s = √d_in / mean‖x‖ over the rows of x [n, d_in] (SAELens `expected_average_only_in`)."""
    mean_norm = float(x.to(torch.float64).norm(dim=-1).mean())
    if not mean_norm > 0:
        raise ValueError("cannot scale training activations: the first batch has zero mean norm")
    return math.sqrt(x.shape[-1]) / mean_norm


def _b_dec_init(x: Tensor, mode: str) -> Tensor:
    inits = {
        "geometric_median": geometric_median,
        "mean": lambda points: points.mean(0),
        "zeros": lambda points: points.new_zeros(points.shape[-1]),
    }
    return inits[mode](x)


@torch.no_grad()
def _initial_sae(cfg: SAEConfig, train_cfg: TrainingConfig, x: Tensor, gen: torch.Generator) -> SAE:
    """Unit-norm random decoder rows, tied encoder, b_enc = 0, b_dec from the (scaled) first batch."""
    sae = build_sae(cfg)
    directions = torch.randn(cfg.d_sae, cfg.d_in, generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    sae.W_dec.copy_(directions)
    sae.W_enc.copy_(directions.T * _objective(cfg).encoder_init_scale(cfg))
    sae.b_dec.copy_(_b_dec_init(x, train_cfg.b_dec_init))
    return sae


@torch.no_grad()
def _scaled_copy(init: SAE, cfg: SAEConfig, scale: float) -> SAE:
    """A copy of `init` (raw units) in training units: the inverse of `_fold_input_scale`."""
    fields = ("architecture", "d_in", "d_sae", "k", "apply_b_dec_to_input", "normalize_activations")
    if any(getattr(init.cfg, f) != getattr(cfg, f) for f in fields):
        raise ValueError(f"init SAE {init.cfg} does not have the shape of the config {cfg}")
    norms = init.W_dec.norm(dim=-1)
    if not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
        raise ValueError("init SAE must have unit-norm decoder rows (W_dec rows)")
    sae = build_sae(cfg)
    sae.load_saelens_tensors(init.state_dict_saelens())
    sae.b_enc *= scale
    sae.b_dec *= scale
    return sae


# ----------------------------------------------------------------------------------------------
# The training step


@dataclass
class _TrainingState:
    sae: SAE
    optimizer: torch.optim.Adam
    tokens_since_fired: Tensor  # [d_sae] int64
    scale: float
    generator: torch.Generator


@torch.no_grad()
def _remove_parallel_decoder_grad(W_dec: Tensor) -> None:
    """Project each decoder row's gradient onto the row's tangent space (rows have unit norm)."""
    if W_dec.grad is not None:
        parallel = (W_dec.grad * W_dec).sum(-1, keepdim=True)
        W_dec.grad -= parallel * W_dec


@torch.no_grad()
def _normalise_decoder_rows(W_dec: Tensor) -> None:
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(W_dec.dtype).eps)


def _forward(sae: SAE, x_scaled: Tensor) -> _Forward:
    pre = sae.hidden_pre(sae.sae_input(x_scaled))
    latents = sae.activation(pre)
    return _Forward(pre, latents, x_scaled - sae.decode(latents))


def _zero_adam_moments(optimizer: torch.optim.Adam, param: Tensor, index: tuple) -> None:
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0


@torch.no_grad()
def _resample_dead(state: _TrainingState, x_scaled: Tensor, error: Tensor, dead: Tensor) -> None:
    """Re-point dead latents at badly reconstructed tokens (Bricken et al. 2023)."""
    idx = dead.nonzero().squeeze(1)
    weights = error.pow(2).sum(-1)
    if idx.numel() == 0 or not float(weights.sum()) > 0:
        return
    sae = state.sae
    picks = torch.multinomial(weights, idx.numel(), replacement=True, generator=state.generator)
    directions = torch.nn.functional.normalize(x_scaled[picks] - sae.b_dec, dim=-1)
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean() if bool((~dead).any()) else 1.0
    sae.W_dec[idx] = directions
    sae.W_enc[:, idx] = directions.T * (RESAMPLE_ENCODER_NORM_RATIO * alive_norm)
    sae.b_enc[idx] = 0
    for param, index in ((sae.W_dec, (idx,)), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        _zero_adam_moments(state.optimizer, param, index)
    state.tokens_since_fired[idx] = 0


def _training_step(state: _TrainingState, cfg: TrainingConfig, x: Tensor,
                   extra_loss: ExtraLoss | None = None) -> StepStats:
    """One Adam step on batch x [batch_size, d_in] (raw units), with the caller's extra term if any."""
    sae, objective = state.sae, _objective(state.sae.cfg)
    x_scaled = x * state.scale
    fwd = _forward(sae, x_scaled)
    fired = (fwd.latents != 0).any(0)
    state.tokens_since_fired += x.shape[0]
    state.tokens_since_fired[fired] = 0
    dead = state.tokens_since_fired >= cfg.dead_tokens_threshold
    mse = fwd.error.pow(2).sum(-1).mean()
    penalty = objective.penalty(sae, fwd, dead, cfg)
    extra = extra_loss(x, fwd.latents, mse) if extra_loss is not None else mse.new_zeros(())
    loss = mse + penalty + extra
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    _remove_parallel_decoder_grad(sae.W_dec)
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.max_grad_norm)
    state.optimizer.step()
    _normalise_decoder_rows(sae.W_dec)
    if objective.resamples_dead:
        _resample_dead(state, x_scaled, fwd.error.detach(), dead)
    l0 = float((fwd.latents != 0).sum(-1).float().mean())
    return StepStats(float(loss.detach()), float(mse.detach()) / state.scale**2, l0,
                     float(dead.float().mean()), float(penalty.detach()), float(extra.detach()))


# ----------------------------------------------------------------------------------------------
# The loop


def _batch_reader(batches: BatchSource) -> Callable[[], Tensor]:
    if isinstance(batches, Iterable):
        iterator = iter(batches)
        return lambda: next(iterator)
    if callable(batches):
        return batches
    raise TypeError(f"batches must be an iterable of tensors or a callable, got {type(batches).__name__}")


def _checked_batch(batch: object, cfg: SAEConfig, train_cfg: TrainingConfig, step: int) -> Tensor:
    """The batch as a [batch_size, d_in] tensor of the SAE's dtype; errors name the step."""
    if not isinstance(batch, (Tensor, np.ndarray)):
        raise TypeError(f"step {step}: expected a tensor batch, got {type(batch).__name__}")
    x = torch.as_tensor(batch)
    if tuple(x.shape) != (train_cfg.batch_size, cfg.d_in) or not x.is_floating_point():
        raise ValueError(
            f"step {step}: expected a float batch of shape ({train_cfg.batch_size}, {cfg.d_in}), "
            f"got {x.dtype} {tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"step {step}: the batch has NaN/Inf values")
    return x.to(cfg.torch_dtype)


def _next_batch(read: Callable[[], Tensor], cfg: SAEConfig, train_cfg: TrainingConfig, step: int) -> Tensor:
    try:
        batch = read()
    except StopIteration:
        raise ValueError(
            f"the batch source ran out after {step} of n_steps={train_cfg.n_steps} batches"
        ) from None
    return _checked_batch(batch, cfg, train_cfg, step)


@torch.no_grad()
def _fold_input_scale(sae: SAE, scale: float) -> None:
    """Make the SAE read raw activations: valid because ReLU, TopK and identity are homogeneous."""
    sae.b_enc /= scale
    sae.b_dec /= scale


def _trained_config(cfg: SAEConfig, train_cfg: TrainingConfig, scale: float) -> SAEConfig:
    training = {**asdict(train_cfg), "lr": train_cfg.learning_rate(cfg.d_sae), "scale_factor": scale}
    return replace(cfg, normalize_activations="none", metadata={**cfg.metadata, "training": training})


def train_sae(
    cfg: SAEConfig,
    train_cfg: TrainingConfig,
    batches: BatchSource,
    progress: Callable[[int, StepStats], None] | None = None,
    init: SAE | None = None,
    extra_loss: ExtraLoss | None = None,
) -> TrainingResult:
    """Train an SAE of shape `cfg` ("topk", "standard" or "dense") on `n_steps` streamed batches.

    `batches` yields float tensors (batch_size, d_in) in raw activation units. `progress(step,
    stats)` is called after every step (wrap tqdm or a Prefect progress artifact in it). `init`: start
    from this SAE's weights (same shape as `cfg`, unit-norm decoder rows, reading raw activations, e.g.
    a previous result) instead of a fresh initialisation; it is not modified. `extra_loss` adds a term
    to every step's loss (see `ExtraLoss`; e.g. the separability term of `saema_core.causal`), recorded
    as `history.extra`. The returned SAE reads
    raw activations; its metadata gains a "training" entry with the settings used.
    """
    _objective(cfg)
    read = _batch_reader(batches)
    first = _next_batch(read, cfg, train_cfg, 0)
    scale = input_scale_factor(first)
    generator = torch.Generator().manual_seed(train_cfg.seed)
    if init is None:
        sae = _initial_sae(cfg, train_cfg, first * scale, generator)
    else:
        sae = _scaled_copy(init, cfg, scale)
    optimizer = torch.optim.Adam(sae.parameters(), lr=train_cfg.learning_rate(cfg.d_sae))
    tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.int64)
    state = _TrainingState(sae, optimizer, tokens_since_fired, scale, generator)
    steps: list[StepStats] = []
    x = first
    for step in range(train_cfg.n_steps):
        if step > 0:
            x = _next_batch(read, cfg, train_cfg, step)
        steps.append(_training_step(state, train_cfg, x, extra_loss))
        if progress is not None:
            progress(step, steps[-1])
    _fold_input_scale(sae, scale)
    trained = build_sae(_trained_config(cfg, train_cfg, scale))
    trained.load_saelens_tensors(sae.state_dict_saelens())
    trained.eval().requires_grad_(False)  # inference only; gradients w.r.t. inputs still flow
    return TrainingResult(trained, TrainingHistory.from_steps(steps, scale))
