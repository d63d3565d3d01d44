"""Sampler tests against closed-form velocity fields and the documented official values."""

from __future__ import annotations

import math

import pytest
import torch

from kandinsky5.sampling import (
    TIMESTEP_SCALE,
    denoise,
    guided_velocity,
    initial_noise,
    latent_frames,
    normalize_first_frames,
    random_seed,
    timestep_grid,
    valid_num_frames,
)

# ------------------------------------------------------------------------------------------ grid


@pytest.mark.parametrize("num_steps", [1, 4, 16, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 10.0])
def test_grid_matches_formula(num_steps: int, shift: float) -> None:
    t = timestep_grid(num_steps, shift)
    assert t.shape == (num_steps + 1,) and t.dtype == torch.float32
    u = [1.0 - i / num_steps for i in range(num_steps + 1)]
    expected = torch.tensor([shift * v / (1.0 + (shift - 1.0) * v) for v in u], dtype=torch.float64)
    torch.testing.assert_close(t.double(), expected, rtol=0, atol=1e-7)
    assert t[0].item() == 1.0 and t[-1].item() == 0.0
    assert bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize(
    "num_steps, shift, expected",
    [
        (4, 1.0, [1, 0.75, 0.5, 0.25, 0]),
        (4, 3.0, [1, 0.9, 0.75, 0.5, 0]),
        (4, 5.0, [1, 0.9375, 0.8333, 0.625, 0]),
        (4, 10.0, [1, 0.9677, 0.9091, 0.7692, 0]),
        (16, 5.0, [1.0, .9868, .9722, .9559, .9375, .9167, .8929, .8654, .8333, .7955, .75,
                   .6944, .625, .5357, .4167, .25, 0]),
        (16, 10.0, [1.0, .9934, .9859, .9774, .9677, .9565, .9434, .9278, .9091, .8861,
                    .8571, .8197, .7692, .6977, .5882, .4, 0]),
    ],
)  # fmt: skip
def test_grid_golden_values(num_steps: int, shift: float, expected: list[float]) -> None:
    torch.testing.assert_close(timestep_grid(num_steps, shift), torch.tensor(expected), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shift, tail", [(5.0, [0.2419, 0.1724, 0.0926, 0.0]), (10.0, [0.3896, 0.2941, 0.1695, 0.0])])
def test_grid_golden_tail_50_steps(shift: float, tail: list[float]) -> None:
    torch.testing.assert_close(timestep_grid(50, shift)[-4:], torch.tensor(tail), rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_steps, shift", [(0, 5.0), (-3, 5.0), (4, 0.0), (4, -1.0)])
def test_grid_rejects_bad_input(num_steps: int, shift: float) -> None:
    with pytest.raises(ValueError, match="num_steps|shift"):
        timestep_grid(num_steps, shift)


def test_timestep_scale() -> None:
    assert TIMESTEP_SCALE == 1000.0


# ------------------------------------------------------------------------------------------ Euler


@pytest.mark.parametrize("num_steps, shift", [(1, 1.0), (4, 5.0), (16, 10.0), (7, 0.5)])
def test_straight_path_lands_on_data(num_steps: int, shift: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, 4, 4, 2, generator=gen)
    eps = torch.randn(1, 3, 4, 4, 2, generator=gen)
    grid = timestep_grid(num_steps, shift)

    # Constant field: the exact velocity of x_t = (1 - t)·x0 + t·eps.
    out = denoise(lambda x, t: eps - x0, eps, grid)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)

    # State-dependent form of the same field, v(x, t) = (x - x0) / t: Euler is still exact (straight lines).
    out = denoise(lambda x, t: (x - x0) / t, eps, grid)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)


def test_linear_ode_converges_to_exponential() -> None:
    x1 = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64).reshape(1, 3, 2, 2, 1)
    exact = x1 * math.exp(-1.0)  # dx/dt = x from t = 1 to 0
    errors = []
    for n in (8, 16, 32, 64):
        grid = timestep_grid(n, 1.0).double()
        errors.append((denoise(lambda x, t: x, x1, grid) - exact).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))
    for a, b in zip(errors, errors[1:], strict=False):
        assert 1.8 < a / b < 2.2  # first order: doubling the steps halves the error
    assert errors[-1] < 1e-2


def test_denoise_does_not_modify_input_and_passes_0dim_t() -> None:
    x = torch.randn(1, 2, 3, 3, 4)
    before = x.clone()
    seen: list[torch.Tensor] = []

    def velocity(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return torch.ones_like(xt)

    grid = timestep_grid(4, 3.0)
    out = denoise(velocity, x, grid)
    assert torch.equal(x, before)
    assert all(t.ndim == 0 and t.is_floating_point() for t in seen)
    assert [t.item() for t in seen] == grid[:-1].tolist()
    torch.testing.assert_close(out, x - 1.0)


def test_callback_and_progress() -> None:
    calls: list[tuple[int, float]] = []
    grid = timestep_grid(3, 1.0)
    denoise(lambda x, t: x, torch.zeros(1, 1, 2, 2, 1), grid,
            callback=lambda i, t, x: calls.append((i, t.item())), progress=True)  # fmt: skip
    assert calls == [(i, grid[i].item()) for i in range(3)]


@pytest.mark.parametrize(
    "timesteps",
    [
        torch.tensor([1.0]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([0.0, 1.0]),
        torch.tensor([1.0, 0.5, 0.5, 0.0]),
    ],
)
def test_denoise_rejects_bad_timesteps(timesteps: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="timesteps"):
        denoise(lambda x, t: x, torch.zeros(1, 1, 1, 1, 1), timesteps)


# ------------------------------------------------------------------------------------------ I2V rule


def test_first_frame_imposed_before_every_call_and_in_result() -> None:
    x = torch.randn(2, 4, 3, 3, 2)
    image = torch.full((2, 3, 3, 2), 7.0)
    frame0_seen: list[torch.Tensor] = []

    def velocity(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        frame0_seen.append(xt[:, 0].clone())
        return torch.randn_like(xt)  # moves frame 0 away from the image every step

    out = denoise(velocity, x, timestep_grid(5, 5.0), first_frame=image)
    assert len(frame0_seen) == 5
    assert all(torch.equal(f, image) for f in frame0_seen)
    assert torch.equal(out[:, 0], image)
    assert not torch.equal(out[:, 1:], x[:, 1:])


def test_first_frame_shape_is_checked() -> None:
    with pytest.raises(ValueError, match="first_frame"):
        denoise(
            lambda x, t: x,
            torch.zeros(1, 4, 3, 3, 2),
            timestep_grid(2, 1.0),
            first_frame=torch.zeros(1, 3, 3),
        )


# ------------------------------------------------------------------------------------------ guidance


def test_guidance_one_never_calls_uncond() -> None:
    counts = {"cond": 0, "uncond": 0}

    def cond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        counts["cond"] += 1
        return x

    def uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        counts["uncond"] += 1
        return -x

    for w in (1.0, 1.0 + 5e-7):
        denoise(guided_velocity(cond, uncond, w), torch.ones(1, 1, 2, 2, 1), timestep_grid(4, 5.0))
    assert counts == {"cond": 8, "uncond": 0}
    denoise(guided_velocity(cond, None, 1.0), torch.ones(1, 1, 2, 2, 1), timestep_grid(4, 5.0))
    assert counts["uncond"] == 0


@pytest.mark.parametrize("w", [0.0, 3.5, 5.0])
def test_guidance_formula(w: float) -> None:
    v_c, v_u = torch.randn(2, 1, 2, 3, 3, 4)
    velocity = guided_velocity(lambda x, t: v_c, lambda x, t: v_u, w)
    torch.testing.assert_close(velocity(torch.zeros(1), torch.tensor(0.5)), v_u + w * (v_c - v_u))


def test_guidance_without_uncond_raises() -> None:
    with pytest.raises(ValueError, match="uncond"):
        guided_velocity(lambda x, t: x, None, 5.0)


# ------------------------------------------------------------------------------------------ noise


def test_noise_is_reproducible_and_dtype_independent() -> None:
    shape = (1, 3, 4, 6, 16)
    a = initial_noise(shape, seed=1137)
    assert a.shape == shape and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, initial_noise(shape, seed=1137))
    assert not torch.equal(a, initial_noise(shape, seed=1138))
    assert torch.equal(initial_noise(shape, 1137, dtype=torch.bfloat16), a.to(torch.bfloat16))
    assert torch.equal(initial_noise(shape, 1137, dtype=torch.float64), a.double())
    expected = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(1137))
    assert torch.equal(a, expected)
    initial_noise((2,), seed=2**64 - 1)  # the full generator range is accepted


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_noise_rejects_bad_seed(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        initial_noise((2, 2), seed=seed)  # type: ignore[arg-type]


def test_random_seed_range_and_global_rng_untouched() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    seeds = {random_seed() for _ in range(20)}
    assert torch.equal(before, torch.get_rng_state())
    assert all(isinstance(s, int) and 0 <= s <= 2**32 - 1 for s in seeds)
    assert len(seeds) > 1


# ------------------------------------------------------------------------------------------ frames


@pytest.mark.parametrize(
    "requested, valid, latent",
    [(120, 121, 31), (121, 121, 31), (1, 1, 1), (2, 5, 2), (5, 5, 2), (241, 241, 61)],
)
def test_frame_rule(requested: int, valid: int, latent: int) -> None:
    assert valid_num_frames(requested) == valid
    assert latent_frames(requested) == latent


@pytest.mark.parametrize("bad", [0, -4])
def test_frame_rule_rejects_bad_counts(bad: int) -> None:
    with pytest.raises(ValueError, match=r"num_frames must be >= 1.*try|use 1"):
        valid_num_frames(bad)
    with pytest.raises(ValueError, match="num_frames"):
        latent_frames(bad)


# ------------------------------------------------------------------------------------------ normalisation


def _frame_stats(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = frames.flatten(2)  # (B, n, H*W*C)
    return flat.mean(-1), flat.std(-1)


@pytest.mark.parametrize("T", [5, 9, 31])
def test_normalize_first_frames_matches_clamped_reference(T: int) -> None:
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, T, 6, 8, 4, generator=gen, dtype=torch.float64)
    # Source frames: some within the clamp window of the reference stats, some far outside it.
    offsets = torch.tensor([0.02, -0.5, 0.5, 0.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
    scales = torch.tensor([1.05, 0.5, 2.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1, 1)
    latent[:, :4] = latent[:, :4] * scales + offsets
    latent[1] = latent[1] * 0.8 + 0.3  # the second batch item has its own reference stats

    out = normalize_first_frames(latent)

    src_mean, src_std = _frame_stats(latent[:, :4])
    ref = latent[:, 4:9].flatten(1)
    ref_mean, ref_std = ref.mean(1, keepdim=True), ref.std(1, keepdim=True)
    want_mean = torch.maximum(torch.minimum(ref_mean, src_mean + 0.10), src_mean - 0.05)
    want_std = torch.maximum(torch.minimum(ref_std, src_std + 0.25), src_std - 0.10)
    got_mean, got_std = _frame_stats(out[:, :4])
    torch.testing.assert_close(got_mean, want_mean)
    torch.testing.assert_close(got_std, want_std)
    assert torch.equal(out[:, 4:], latent[:, 4:])
    assert not torch.equal(want_mean, ref_mean.expand_as(want_mean))  # the clamp was exercised


def test_normalize_first_frames_single_frame_unchanged() -> None:
    latent = torch.randn(1, 1, 4, 4, 16)
    out = normalize_first_frames(latent)
    assert isinstance(out, torch.Tensor) and torch.equal(out, latent) and out is not latent


@pytest.mark.parametrize("T", [2, 3, 4])
def test_normalize_first_frames_short_latent_uses_last_frame(T: int) -> None:
    latent = torch.randn(1, T, 4, 4, 3, generator=torch.Generator().manual_seed(1)) * 1.1 + 0.04
    out = normalize_first_frames(latent)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, -1], latent[:, -1])
    src_mean, _ = _frame_stats(latent[:, :-1])
    got_mean, _ = _frame_stats(out[:, :-1])
    want = torch.clamp(latent[:, -1].mean(), src_mean - 0.05, src_mean + 0.10)
    torch.testing.assert_close(got_mean, want)


def test_normalize_first_frames_keeps_dtype_and_input() -> None:
    latent = torch.randn(1, 8, 4, 4, 2).to(torch.bfloat16)
    before = latent.clone()
    out = normalize_first_frames(latent)
    assert out.dtype == torch.bfloat16 and torch.equal(latent, before)
    with pytest.raises(ValueError, match=r"\(B, T, H, W, C\)"):
        normalize_first_frames(torch.zeros(4, 4, 4, 2))
