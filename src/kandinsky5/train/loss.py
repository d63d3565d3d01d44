"""Flow-matching training math: timestep sampling, the noisy interpolant and the velocity loss.

The path matches the sampler (docs/kandinsky5.md §5): ``x_t = (1 − t)·x0 + t·ε`` with t = 1 pure noise,
and the network predicts ``v = dx_t/dt = ε − x0`` from model time ``1000·t``.

Kandinsky 5's training loss and timestep distribution are not published (§10.6). We use the plain MSE
on v and SD3's logit-normal timesteps, pushed through the same shift as the inference grid.
A DiT that predicts the sample x0 (``DiTConfig.prediction``, nano) is trained on the same velocity
error: its velocity ``(x_t − x̂0)/t`` misses the target by ``(x0 − x̂0)/t``.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..config import PREDICTIONS

__all__ = ["SAMPLE_MIN_T", "flow_matching_loss", "interpolate", "sample_timesteps", "shift_timesteps"]

# Keeps t strictly inside (0, 1) after rounding to float32 (1 − 1e-6 rounds below 1.0).
T_EPS = 1e-6
# A sample prediction's velocity error (x0 − x̂0)/t is weighted 1/t² at most 1/0.05² = 400, so the rare
# draws near t = 0 (where x_t already is x0) cannot dominate a batch; at t ≥ 0.05 it is the velocity error.
SAMPLE_MIN_T = 0.05


def shift_timesteps(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The inference shift ``t = s·u / (1 + (s − 1)·u)``: s > 1 moves mass towards noise (t → 1)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def sample_timesteps(
    batch: int,
    generator: torch.Generator,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Training timesteps t in (0, 1), shape (batch,), float32 on the CPU.

    ``u = sigmoid(mean + std·z)`` with ``z ~ N(0, 1)`` drawn from ``generator`` (logit-normal, SD3),
    then ``shift_timesteps(u, shift)``. Computed in float64 and clamped to [1e-6, 1 − 1e-6].
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if std <= 0 or shift <= 0:
        raise ValueError(f"std and shift must be > 0, got std={std}, shift={shift}")
    z = torch.randn(batch, generator=generator, dtype=torch.float32).double()
    u = torch.sigmoid(mean + std * z)
    return shift_timesteps(u, shift).clamp(T_EPS, 1.0 - T_EPS).float()


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·ε`` with one t per sample: x0, noise (B, ...), t (B,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must be (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    t = t.to(x0).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, ...)
    return (1.0 - t) * x0 + t * noise


def flow_matching_loss(
    output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    reduction: Literal["mean", "none"] = "mean",
    *,
    prediction: str = "velocity",
    t: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the model's velocity and the target ``ε − x0``, computed in fp32.

    Args:
        output: (B, T, H, W, C) model output: the velocity, or x0 with ``prediction="sample"``.
        x0, noise: (B, T, H, W, C) clean latents and the noise they were mixed with.
        loss_mask: optional (B, T) bool/0-1 weights of the latent frames that count (e.g. all but the
            conditioning frame for I2V); None = every frame.
        reduction: "mean" → scalar over the batch; "none" → (B,) per-sample losses.
        prediction: one of ``PREDICTIONS`` (``DiTConfig.prediction``).
        t: (B,) timesteps; needed by ``prediction="sample"`` (its velocity error is ``(x0 − x̂0)/t``,
            with t floored at ``SAMPLE_MIN_T``).
    """
    if output.shape != x0.shape or noise.shape != x0.shape:
        raise ValueError(
            f"output {tuple(output.shape)}, x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must match"
        )
    if prediction == "velocity":
        error = (output.float() - (noise.float() - x0.float())).square()  # (B, T, H, W, C)
    elif prediction == "sample":
        if t is None or t.shape != x0.shape[:1]:
            got = None if t is None else tuple(t.shape)
            raise ValueError(f"a sample prediction needs t of shape ({x0.shape[0]},), got {got}")
        weight = t.float().clamp_min(SAMPLE_MIN_T).reshape(-1, *([1] * (x0.ndim - 1)))
        error = ((x0.float() - output.float()) / weight).square()
    else:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    per_frame = error.flatten(2).mean(dim=2)  # (B, T): mean over H, W and the latent channels
    if loss_mask is None:
        per_sample = per_frame.mean(dim=1)
    else:
        if loss_mask.shape != per_frame.shape:
            raise ValueError(f"loss_mask must be (B, T) = {tuple(per_frame.shape)}, got {tuple(loss_mask.shape)}")
        weights = loss_mask.to(per_frame)
        per_sample = (per_frame * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_sample.mean()
