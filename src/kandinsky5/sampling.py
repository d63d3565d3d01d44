"""Flow-matching sampler: shifted timestep grid, seeded noise, CFG velocity and the Euler loop.

The sampler never knows which network runs: it integrates any ``velocity(x, t)`` callable from
t = 1 (noise) to t = 0 (data) along the path ``x_t = (1 - t)·x_0 + t·ε`` (docs/kandinsky5.md §5).
Latents are laid out (B, T, H, W, C).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

__all__ = [
    "TIMESTEP_SCALE",
    "Velocity",
    "denoise",
    "guided_velocity",
    "initial_noise",
    "latent_frames",
    "normalize_first_frames",
    "random_seed",
    "timestep_grid",
    "valid_num_frames",
]

TIMESTEP_SCALE = 1000.0  # the DiT is trained on time = 1000·t; the sampler itself works with t in [0, 1]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t) -> v = dx/dt, same shape as x


# --- Timesteps and frame counts -------------------------------------------------------------------


def timestep_grid(num_steps: int, shift: float) -> torch.Tensor:
    """Official shifted grid ``t = s·u / (1 + (s-1)·u)`` over ``u = linspace(1, 0, num_steps + 1)``.

    Returns float32 (what the time embedding consumes), ``num_steps + 1`` entries from exactly 1.0 to
    exactly 0.0. Computed in float64 and rounded once, so each entry is correctly rounded on any device
    (the official fp32 grid differs by at most 1.2e-7). A larger ``shift`` spends more steps near noise.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}; use e.g. 50 (sft) or 16 (distilled)")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}; use 1.0 for no shift, 5.0 or 10.0 for video")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    t = shift * u / (1.0 + (shift - 1.0) * u)
    return t.to(torch.float32)


def valid_num_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Smallest frame count ``k·temporal_factor + 1`` that is >= ``num_frames``.

    The causal video VAE encodes the first frame alone and then groups of ``temporal_factor``, so it
    works on 4k+1 frames. A request for F frames generates ``valid_num_frames(F)`` frames and the
    caller keeps the first F after decoding (120 → generate 121, drop the last; 2..5 → generate 5).
    """
    if temporal_factor < 1:
        raise ValueError(f"temporal_factor must be >= 1, got {temporal_factor}")
    if num_frames < 1:
        raise ValueError(
            f"num_frames must be >= 1, got {num_frames}; use 1 for a single image or 121 for 5 s at 24 fps"
        )
    groups = -(-(num_frames - 1) // temporal_factor)  # ceil((F - 1) / temporal_factor)
    return groups * temporal_factor + 1


def latent_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """Latent frames for ``num_frames`` video frames (121 → 31, 120 → 31, 1 → 1); see ``valid_num_frames``."""
    return (valid_num_frames(num_frames, temporal_factor) - 1) // temporal_factor + 1


# --- Noise and seeds ------------------------------------------------------------------------------


def random_seed() -> int:
    """A fresh seed in [0, 2**32 - 1] for when the user gives none; leaves torch's global RNG alone."""
    return secrets.randbelow(2**32)


def initial_noise(
    shape: Sequence[int],
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on a CPU generator in float32, then moved and cast.

    Drawing on the CPU in one fixed dtype is what makes a seed reproducible: the same seed gives the
    same picture on CPU, CUDA or MPS, and a bf16 run sees the rounding of the fp32 draw. (The
    official code draws bf16 noise from a CUDA generator, so its noise is device-specific.)
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**64 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}; try random_seed()")
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


# --- Guidance and the Euler loop ------------------------------------------------------------------


def guided_velocity(cond: Velocity, uncond: Velocity | None, guidance_scale: float) -> Velocity:
    """Classifier-free guidance ``v_u + w·(v_c - v_u)`` as one velocity callable.

    With ``|w - 1| <= 1e-6`` the result is ``cond`` itself: the unconditional pass is skipped, which
    halves the cost for CFG-distilled and distilled checkpoints (same threshold as the official code).
    """
    if abs(guidance_scale - 1.0) <= 1e-6:
        return cond
    if uncond is None:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs an unconditional velocity; pass uncond "
            "(the negative-prompt pass) or set guidance_scale=1.0"
        )

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c = cond(x, t)
        v_u = uncond(x, t)
        return v_u + guidance_scale * (v_c - v_u)

    return velocity


def denoise(
    velocity: Velocity,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    first_frame: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t)`` with Euler steps along ``timesteps`` (1 → 0).

    Args:
        velocity: ``(x, t) -> v`` with ``t`` a 0-dim float tensor in [0, 1]; scaling by
            ``TIMESTEP_SCALE`` for the DiT is the caller's job.
        x: starting latent (B, T, H, W, C), usually ``initial_noise``; never modified.
        timesteps: 1-D decreasing grid, e.g. ``timestep_grid``.
        first_frame: I2V conditioning latent shaped like ``x[:, 0]``; written into frame 0 before
            every step and once after the last (official rule), so the network always sees it clean.
        callback: ``callback(step_index, t, x)`` after each step. ``x`` is the sampler's working
            tensor, updated in place by the next step: clone it to keep it.
        progress: show a tqdm bar with one tick per step.

    Returns the final latent, same shape and dtype as ``x``.
    """
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(
            f"timesteps must be 1-D with at least 2 entries, got shape {tuple(timesteps.shape)}; "
            "use timestep_grid(num_steps, shift)"
        )
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise ValueError("timesteps must be strictly decreasing, from noise (t=1) to data (t=0)")
    if first_frame is not None and (x.ndim < 2 or first_frame.shape != x.shape[:1] + x.shape[2:]):
        raise ValueError(
            f"first_frame must be shaped like x[:, 0] of x {tuple(x.shape)}, got {tuple(first_frame.shape)}; "
            "pass the image latent as one frame (B, H, W, C)"
        )

    x = x.clone()  # private working buffer: everything below updates it in place
    steps = tqdm(range(timesteps.numel() - 1), desc="denoise", disable=not progress)
    for i in steps:
        t, t_next = timesteps[i], timesteps[i + 1]
        if first_frame is not None:
            x[:, 0] = first_frame
        x += (t_next - t) * velocity(x, t)  # Euler step; dt < 0
        if callback is not None:
            callback(i, t, x)
    if first_frame is not None:
        x[:, 0] = first_frame
    return x


# --- I2V post-processing --------------------------------------------------------------------------


def normalize_first_frames(latent: torch.Tensor, num_frames: int = 4, num_reference: int = 5) -> torch.Tensor:
    """Official post-hoc I2V fix: match the first frames' statistics to the frames after them.

    The clean image latent pasted into frame 0 (and the frames the VAE decodes with it) can differ in
    brightness/contrast from the generated frames. Each of the first ``num_frames`` latent frames is
    standardised over (H, W, C) and remapped to one mean/std taken over the following reference
    frames, with that target clamped to ``[m - 0.05, m + 0.10]`` and ``[σ - 0.10, σ + 0.25]`` of the
    frame's own mean m and std σ (unbiased std, as in the official code). Statistics are per batch
    item, computed in float32 (float64 stays float64); the result has ``latent``'s dtype.

    Args:
        latent: (B, T, H, W, C).
        num_frames: leading frames to renormalise (official: 4).
        num_reference: reference frames (official: 5, i.e. frames 4..8 where they exist).

    Frame counts, where we deliberately differ from the official code:
        * T == 1: returned unchanged (a copy); the official function returns a tuple here (a bug).
        * 2 <= T <= num_frames: the official reference slice is empty and gives NaN. We renormalise the
          first T - 1 frames against the last frame, so at least one reference frame always remains.
        * T > num_frames: identical to the official formula (reference = the frames that exist among
          ``num_frames .. num_frames + num_reference - 1``).
    """
    if latent.ndim != 5:
        raise ValueError(f"latent must be (B, T, H, W, C), got shape {tuple(latent.shape)}")
    if num_frames < 1 or num_reference < 1:
        raise ValueError(f"num_frames and num_reference must be >= 1, got {num_frames}, {num_reference}")
    out = latent.clone()
    n_src = min(num_frames, latent.shape[1] - 1)  # keep at least one reference frame; 0 when T == 1
    if n_src == 0:
        return out

    work = torch.float64 if latent.dtype == torch.float64 else torch.float32
    src = latent[:, :n_src].to(work)  # (B, n_src, H, W, C)
    ref = latent[:, n_src : n_src + num_reference].to(work)  # (B, n_ref, H, W, C)

    src_mean = src.mean(dim=(2, 3, 4), keepdim=True)  # (B, n_src, 1, 1, 1)
    src_std = src.std(dim=(2, 3, 4), keepdim=True)
    ref_mean = ref.mean(dim=(1, 2, 3, 4)).view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1): one scalar per item
    ref_std = ref.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1)

    target_mean = torch.clamp(ref_mean, src_mean - 0.05, src_mean + 0.10)
    target_std = torch.clamp(ref_std, src_std - 0.10, src_std + 0.25)
    # A constant frame (std 0) would divide by zero (NaN in the official code); it maps to the target mean.
    standardised = (src - src_mean) / src_std.clamp_min(torch.finfo(work).tiny)
    out[:, :n_src] = (standardised * target_std + target_mean).to(latent.dtype)
    return out
