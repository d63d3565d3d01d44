"""Timestep sampling statistics and the flow-matching loss against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from kandinsky5.sampling import timestep_grid
from kandinsky5.train.loss import SAMPLE_MIN_T, flow_matching_loss, interpolate, sample_timesteps, shift_timesteps


def _logit(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    return torch.log(t / (1 - t))


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)])
def test_unshifted_timesteps_are_logit_normal(mean: float, std: float):
    t = sample_timesteps(50_000, torch.Generator().manual_seed(0), mean=mean, std=std, shift=1.0)
    assert t.dtype == torch.float32 and t.shape == (50_000,)
    assert bool(((t > 0) & (t < 1)).all())
    z = _logit(t)
    assert abs(z.mean().item() - mean) < 0.03
    assert abs(z.std().item() - std) < 0.03


@pytest.mark.parametrize("shift", [3.0, 5.0, 10.0])
def test_shifted_timesteps_undo_to_logit_normal_and_lean_towards_noise(shift: float):
    t = sample_timesteps(50_000, torch.Generator().manual_seed(1), shift=shift).double()
    u = t / (shift - (shift - 1) * t)  # inverse of t = s·u / (1 + (s − 1)·u)
    z = _logit(u)
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03
    # P(t > 0.5) = P(u > 1 / (1 + s)) = Φ(log s) for the standard logit-normal.
    expected = 0.5 * (1 + math.erf(math.log(shift) / math.sqrt(2)))
    assert abs((t > 0.5).double().mean().item() - expected) < 0.01


def test_timesteps_come_only_from_the_generator():
    a = sample_timesteps(16, torch.Generator().manual_seed(7), shift=5.0)
    torch.manual_seed(123)  # the global RNG plays no part
    b = sample_timesteps(16, torch.Generator().manual_seed(7), shift=5.0)
    assert torch.equal(a, b)


def test_extreme_draws_stay_inside_the_open_interval():
    t = sample_timesteps(10_000, torch.Generator().manual_seed(0), mean=0.0, std=40.0, shift=10.0)
    assert bool(((t > 0) & (t < 1)).all())


def test_shift_matches_the_inference_grid():
    u = torch.linspace(1.0, 0.0, 17, dtype=torch.float64)
    assert torch.equal(shift_timesteps(u, 5.0).float(), timestep_grid(16, 5.0))


def test_sample_timesteps_rejects_bad_arguments():
    g = torch.Generator()
    with pytest.raises(ValueError, match="batch"):
        sample_timesteps(0, g)
    with pytest.raises(ValueError, match="std and shift"):
        sample_timesteps(4, g, std=0.0)


def test_interpolate_is_the_linear_path():
    x0, noise = torch.randn(3, 2, 4, 4, 5), torch.randn(3, 2, 4, 4, 5)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = interpolate(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    # d x_t / dt = ε − x0: the velocity target.
    dt = 1e-3
    slope = (interpolate(x0, noise, t + dt) - x_t) / dt
    torch.testing.assert_close(slope, noise - x0, atol=1e-2, rtol=0)


def test_loss_closed_forms():
    x0, noise = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    target = noise - x0
    assert flow_matching_loss(target, x0, noise).item() == 0.0
    torch.testing.assert_close(flow_matching_loss(target + 0.5, x0, noise), torch.tensor(0.25))
    zero = flow_matching_loss(torch.zeros_like(x0), x0, noise)
    torch.testing.assert_close(zero, target.square().mean())
    per_sample = flow_matching_loss(torch.zeros_like(x0), x0, noise, reduction="none")
    torch.testing.assert_close(per_sample, target.square().flatten(1).mean(1))


def test_loss_mask_drops_frames_and_bf16_is_computed_in_fp32():
    x0, noise = torch.zeros(1, 3, 2, 2, 4), torch.zeros(1, 3, 2, 2, 4)
    velocity = torch.zeros(1, 3, 2, 2, 4)
    velocity[:, 0] = 10.0  # a huge error on the conditioning frame only
    velocity[:, 1:] = 1.0
    mask = torch.tensor([[False, True, True]])
    assert flow_matching_loss(velocity, x0, noise, loss_mask=mask).item() == 1.0
    out = flow_matching_loss(velocity.bfloat16(), x0, noise)
    assert out.dtype == torch.float32


def test_sample_prediction_is_scored_by_its_velocity():
    """x̂0 from a sample-predicting DiT is scored as the velocity (x_t − x̂0)/t the sampler will use."""
    x0, noise = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    t = torch.tensor([0.9, 0.3, 0.05])
    x_t = interpolate(x0, noise, t)
    guess = x0 + 0.1 * torch.randn_like(x0)
    as_velocity = (x_t - guess) / t.reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(
        flow_matching_loss(guess, x0, noise, reduction="none", prediction="sample", t=t),
        flow_matching_loss(as_velocity, x0, noise, reduction="none"),
    )
    assert flow_matching_loss(x0, x0, noise, prediction="sample", t=t).item() == 0.0
    # near t = 0 the weight 1/t² stops growing at 1/SAMPLE_MIN_T²
    tiny = torch.full((3,), 1e-4)
    per_sample = flow_matching_loss(x0 + 1.0, x0, noise, reduction="none", prediction="sample", t=tiny)
    torch.testing.assert_close(per_sample, torch.full((3,), 1.0 / SAMPLE_MIN_T**2))


def test_loss_shape_errors():
    x = torch.zeros(1, 2, 2, 2, 4)
    with pytest.raises(ValueError, match="must match"):
        flow_matching_loss(torch.zeros(1, 2, 2, 2, 3), x, x)
    with pytest.raises(ValueError, match="loss_mask"):
        flow_matching_loss(x, x, x, loss_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        flow_matching_loss(x, x, x, reduction="sum")
    with pytest.raises(ValueError, match="needs t of shape"):
        flow_matching_loss(x, x, x, prediction="sample")
    with pytest.raises(ValueError, match="prediction must be"):
        flow_matching_loss(x, x, x, prediction="noise")
