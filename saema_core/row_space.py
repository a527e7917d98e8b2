"""The decoder's row space and null space: how much of a latent move the reconstruction can see.

With a linear decoder D(z) = zW + b (W: K × d), a latent displacement δ changes the reconstruction
by δW only. R^K splits into the decoder's row space (the span of W's d columns as K-vectors: the row
space of the d × K map z ↦ zW) and its orthogonal complement, the null space {δ : δW = 0}. Only the
row-space part of a move can change the MSE; the null-space part changes separability for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

from saema_core.intervention import (
    Decoder,
    InterventionConfig,
    InterventionTrajectory,
    clusters_from_labels,
    control_path,
    mse,
    prepare_problem,
    random_direction,
    scale_to_norm,
    stack_trajectory,
    translate,
    translation_norm,
)
from saema_core.ranks import canonical_csr


class Decomposition(NamedTuple):
    """The applied displacement of a move split into W's row space and null space."""

    row_norm: float
    """‖δ_row‖_F over tokens."""
    null_norm: float
    """‖δ_null‖_F over tokens."""
    delta_mse_row: float
    """MSE(D(Z + δ_row)) − MSE(D(Z)): the whole reconstruction effect of a linear decoder's move
    up to the clamp (no clamp is applied to the parts)."""
    delta_mse_null: float
    """MSE(D(Z + δ_null)) − MSE(D(Z)): zero up to rounding (the check of the decomposition)."""


_LINEARITY_RTOL = 1e-4


def linear_decoder(decode: Decoder, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (K, d), b (d,)) of a decoder D(z) = zW + b, or ValueError saying why it is not one.

    W is read from the owner's `W_dec` and checked on random probes, so a decoder that merely has a
    `W_dec` but is not affine (a nonlinearity, a normalisation) is refused."""
    owner = getattr(decode, "__self__", decode)
    weights = getattr(owner, "W_dec", None)
    if not isinstance(weights, torch.Tensor) or weights.ndim != 2 or weights.shape[0] != n_latents:
        raise ValueError("the row/null-space decomposition needs a linear decoder D(z) = z·W_dec + b with a "
                         f"({n_latents}, d) W_dec; {type(owner).__name__} has none")
    with torch.no_grad():
        weights = weights.detach().to(torch.float64)
        bias = decode(torch.zeros(1, n_latents, dtype=weights.dtype)).reshape(-1).to(torch.float64)
        probes = torch.rand(4, n_latents, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        expected = probes @ weights + bias
        got = decode(probes).to(torch.float64)
    if not torch.allclose(got, expected, rtol=_LINEARITY_RTOL, atol=_LINEARITY_RTOL * float(expected.abs().max())):
        raise ValueError(f"the decoder of {type(owner).__name__} is not linear (D(z) ≠ z·W_dec + b on random "
                         f"probes); the row/null-space decomposition needs D(z) = zW + b")
    return weights, bias


def row_space_basis(weights: torch.Tensor) -> torch.Tensor:
    """(K, r) orthonormal basis of the latent directions the decoder (K, d) does not ignore, r = rank."""
    u, s, _ = torch.linalg.svd(weights.to(torch.float64), full_matrices=False)
    tolerance = s.max() * max(weights.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    return u[:, s > tolerance]


def split_displacement(delta: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """δ (n, K) = δ_row + δ_null with δ_row in span(basis) and δ_null orthogonal to it (float64)."""
    delta = delta.to(torch.float64)
    row = (delta @ basis) @ basis.T
    return row, delta - row


def applied_displacement(latents: torch.Tensor, labels, translations: np.ndarray | torch.Tensor,
                         clamp: bool) -> torch.Tensor:
    """clamp(Z + Δ) − Z (n, K) in float64: the move the decoder actually sees."""
    clusters = clusters_from_labels(labels, latents.shape[0])
    moved = translate(latents, clusters.token_cluster, torch.as_tensor(translations, dtype=latents.dtype), clamp)
    return moved.to(torch.float64) - latents.to(torch.float64)


def decompose_move(latents: torch.Tensor, labels, decode: Decoder, target: torch.Tensor,
                   translations: np.ndarray | torch.Tensor, clamp: bool,
                   basis: torch.Tensor | None = None) -> Decomposition:
    """Row/null-space split of a move's applied displacement and the MSE change of each part."""
    weights, bias = linear_decoder(decode, latents.shape[1])
    basis = row_space_basis(weights) if basis is None else basis
    row, null = split_displacement(applied_displacement(latents, labels, translations, clamp), basis)
    z, x = latents.to(torch.float64), target.to(torch.float64)
    before = mse(z @ weights + bias, x)
    return Decomposition(float(torch.linalg.norm(row)), float(torch.linalg.norm(null)),
                         float(mse((z + row) @ weights + bias, x) - before),
                         float(mse((z + null) @ weights + bias, x) - before))


def random_control_row(
    latents: torch.Tensor,
    labels: np.ndarray | torch.Tensor | Sequence[int],
    decode: Decoder,
    target: torch.Tensor,
    config: InterventionConfig,
    target_row_norm: float,
    seed: int = 0,
    basis: torch.Tensor | None = None,
    path: bool = True,
) -> InterventionTrajectory:
    """A random control matched on the *row-space* norm of the applied displacement: it moves the
    reconstruction as much as the optimised move does, whatever the optimiser did in the null space.
    Trajectory and `path` as in `random_control`."""
    if not target_row_norm >= 0:
        raise ValueError(f"target_row_norm must be >= 0, got {target_row_norm!r}")
    problem = prepare_problem(latents, labels, decode, target, config)
    basis = row_space_basis(linear_decoder(decode, latents.shape[1])[0]) if basis is None else basis
    direction = random_direction(len(problem.clusters.members), latents.shape[1], seed, latents.dtype)

    def row_norm(s: float) -> float:  # ‖δ_row‖ = ‖δ·basis‖: the basis is orthonormal
        moved = translate(problem.latents, problem.clusters.token_cluster, s * direction, config.clamp_nonnegative)
        return float(torch.linalg.norm((moved.to(torch.float64) - problem.latents.to(torch.float64)) @ basis))

    with torch.no_grad():
        scale = scale_to_norm(row_norm, target_row_norm, float(translation_norm(direction, problem.clusters.counts)))
        final = direction * scale
        steps = control_path(problem, final, config, path)
    return stack_trajectory(steps, final, problem.clusters)


class SubspaceDecoder:
    """An affine SAE decoder restricted to the latents `active`: D_A(z_A) = z_A·W_dec[active] + b_dec,
    equal to the full decoder on latents that are zero outside `active`."""

    def __init__(self, W_dec: torch.Tensor, b_dec: torch.Tensor, active: np.ndarray) -> None:
        self.active = np.asarray(active, dtype=np.int64)
        self.W_dec = W_dec.detach()[torch.from_numpy(self.active)]
        self.b_dec = b_dec.detach()
        self.d_sae = int(self.active.size)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec


def active_subspace(latents: sp.sparray | sp.spmatrix, W_dec: torch.Tensor,
                    b_dec: torch.Tensor) -> tuple[torch.Tensor, SubspaceDecoder]:
    """Z (n, |A|) on the union A of the tokens' supports (sparse `latents` (n, K)) and the decoder on A."""
    latents = canonical_csr(latents)
    active = np.unique(latents.indices)
    dense = latents[:, active].toarray().astype(np.float32)
    return torch.from_numpy(dense), SubspaceDecoder(W_dec, b_dec, active)
