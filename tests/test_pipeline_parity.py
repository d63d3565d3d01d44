"""``sample_latents`` against diffusers' Kandinsky 5 pipelines, end to end on one tiny random DiT.

One fully random state dict is loaded strictly into our ``CrossDiT`` and into diffusers'
``Kandinsky5Transformer3DModel``. Both samplers then get the same prompt embeddings, the same initial noise and the
same timestep grid, and their final latents must agree within ``TOL`` (max abs) for T2V (with and without CFG) and
T2I. Everything runs in fp32: diffusers casts the timestep to the pipeline dtype, which in bf16 alone moves a tiny
model's output by ~0.4 (docs/kandinsky5.md §13).

* Grid. The pipelines call ``scheduler.set_timesteps(num_inference_steps)``, and the stock
  ``FlowMatchEulerDiscreteScheduler`` then builds a grid that is not the official one (it runs linearly between the
  already-shifted training sigmas and shifts that again). ``OfficialGridScheduler`` passes the official grid as
  ``sigmas=`` instead. Separate tests check diffusers' own ``shift`` formula against ``timestep_grid`` (1e-6) and
  that the stock grid differs.
* q/k rounding. The T2V/T2I cases run twice: with q and k kept fp32 on both sides (must hold) and with the shipped
  bf16 rounding after RoPE on both sides (see QK_MODES).
* Text. diffusers has no text key mask and trims padding instead (``prompt_cu_seqlens``), so it gets unpadded
  tokens; ours gets them with an all-True mask, and in a second case padded tokens (junk in the padding) + mask.
* I2V. The official rule (docs/kandinsky5.md §2.7, §5.4) is checked against a loop written here over our CrossDiT.
  diffusers' I2V (0.42.1) builds the same model input and samples the same way, but normalises the first four
  frames with one joint mean/std instead of one per frame; the last tests pin that down.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    Kandinsky5I2VPipeline,
    Kandinsky5T2IPipeline,
    Kandinsky5T2VPipeline,
)

from kandinsky5.pipeline import Conditioning, PromptEmbeddings, sample_latents  # noqa: E402
from kandinsky5.sampling import timestep_grid  # noqa: E402
from tests.models.conftest import _assert_no_zero_parameter, _random_state_dict, _tiny_config  # noqa: E402
from tests.models.test_dit_parity import build_pair, reference_model  # noqa: E402

TOL = 1e-4  # max abs difference of the final latents
# With bf16 q/k, a last-bit fp32 difference before the rounding (batched CFG runs other matmul shapes than
# diffusers' separate calls, and CPUs without AVX-512 block them differently) can flip one bf16 rounding.
# Seen on a 2-core AMD EPYC (AVX2): 3.5e-4 on latents of scale 22. So there the bound is relative.
TOL_BF16_QK = 5e-5  # times the largest |latent|
SPATIAL, TEMPORAL = 8, 4  # the pipelines' VAE factors when no VAE is given (Hunyuan: 8x, 4x; T2I: 8x)
VIDEO_ROPE_SCALE = (1.0, 3.16, 3.16)  # what the T2V pipeline picks outside 480..854 px (all sizes here)
IMAGE_ROPE_SCALE = (1.0, 1.0, 1.0)  # the T2I pipeline always uses 1
VIDEO_GRID, IMAGE_GRID = (3, 4, 6), (1, 4, 6)  # latent (T, H, W); H != W catches a transposed axis


class OfficialGridScheduler(FlowMatchEulerDiscreteScheduler):
    """The stock scheduler, handed our official grid ``timestep_grid(N, official_shift)`` as ``sigmas``.

    The pipelines only ever call ``set_timesteps(num_inference_steps, device=...)``. The scheduler keeps its default
    ``shift`` of 1 (given sigmas pass through unchanged) and appends the terminal 0, so both samplers step on
    bit-identical grids: one ulp of ``1000·t`` (6e-5) already moves a tiny random model's CFG latents by ~1e-4.
    ``test_scheduler_shift_equals_timestep_grid`` checks the grid against diffusers' own ``shift`` formula.
    """

    official_shift = 1.0

    @classmethod
    def with_shift(cls, shift: float) -> OfficialGridScheduler:
        scheduler = cls()
        scheduler.official_shift = shift
        return scheduler

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}: this scheduler builds its own sigmas")
        grid = timestep_grid(num_inference_steps, self.official_shift)
        super().set_timesteps(sigmas=grid[:-1].tolist(), device=device)


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors of a few kB: one intra-op thread is faster and keeps timings steady on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models():
    """(visual_cond, round_qk) → (config, ours, diffusers' transformer) sharing one fully random state dict.

    ``round_qk=True`` is the shipped numerics: q and k rounded to bf16 after RoPE on both sides (our default CrossDiT,
    diffusers' default processor). ``round_qk=False`` keeps them fp32 on both sides (diffusers through
    ``FP32RopeProcessor`` of test_dit_parity), where single forwards agree to ~1e-6 instead of ~1e-4.
    """
    cache = {}

    def get(visual_cond: bool, round_qk: bool = False):
        key = visual_cond, round_qk
        if key not in cache:
            config = _tiny_config(visual_cond=visual_cond)
            state = _random_state_dict(reference_model(config), seed=11 if visual_cond else 12)
            ours, ref = build_pair(config, state, round_qk=round_qk)
            _assert_no_zero_parameter(ours)
            cache[key] = (config, ours, ref)
        return cache[key]

    return get


# Both q/k modes must hold: with the shipped bf16 rounding after RoPE, any last-bit difference between the two DiTs
# (e.g. a fused multiply-add, or torch.polar instead of cos/sin for the RoPE table) grows to ~1e-4..2e-3 in the
# sampled latents, so this also guards our numerics against drifting from the official order of operations.
QK_MODES = [pytest.param(False, id="fp32-qk"), pytest.param(True, id="bf16-qk")]


# --- inputs -------------------------------------------------------------------------------------------


def random_text(gen: torch.Generator, config, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Qwen tokens (B, L, D), CLIP pooled (B, P)) with no padding."""
    tokens = torch.randn(batch, length, config.in_text_dim, generator=gen)
    pooled = torch.randn(batch, config.in_text_dim2, generator=gen)
    return tokens, pooled


def unpadded(tokens: torch.Tensor, pooled: torch.Tensor) -> PromptEmbeddings:
    return PromptEmbeddings(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), pooled)


def cu_seqlens(batch: int, length: int) -> torch.Tensor:
    """diffusers' cumulative lengths for ``batch`` prompts of ``length`` tokens each: [0, L, 2L, ...]."""
    return torch.arange(batch + 1, dtype=torch.int32) * length


def diffusers_text(tokens, pooled, negative=None) -> dict:
    """The embedding keywords of the Kandinsky 5 pipelines (negative: (tokens, pooled) or None)."""
    kwargs = dict(
        prompt_embeds_qwen=tokens,
        prompt_embeds_clip=pooled,
        prompt_cu_seqlens=cu_seqlens(tokens.shape[0], tokens.shape[1]),
    )
    if negative is not None:
        neg_tokens, neg_pooled = negative
        kwargs.update(
            negative_prompt_embeds_qwen=neg_tokens,
            negative_prompt_embeds_clip=neg_pooled,
            negative_prompt_cu_seqlens=cu_seqlens(neg_tokens.shape[0], neg_tokens.shape[1]),
        )
    return kwargs


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, noise: torch.Tensor, round_qk: bool = False) -> None:
    diff, scale = max_diff(ours, theirs), theirs.abs().max().item()
    tol = max(TOL, TOL_BF16_QK * scale) if round_qk else TOL
    assert diff <= tol, f"max |ours - diffusers| = {diff:.3g} (latent scale {scale:.3g})"
    # The sampler really moved the latents (a no-op sampler on both sides would also "agree").
    assert max_diff(theirs, noise) > 0.5


# --- diffusers' pipelines -----------------------------------------------------------------------------


def no_components(**given) -> dict:
    """VAE and text encoders (None unless given): not needed with precomputed embeddings and latent output."""
    return dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None) | given


def diffusers_t2v(ref, noise, steps, shift, guidance, text: dict) -> torch.Tensor:
    pipe = Kandinsky5T2VPipeline(transformer=ref, scheduler=OfficialGridScheduler.with_shift(shift), **no_components())
    pipe.set_progress_bar_config(disable=True)
    _, t, h, w, _ = noise.shape
    # T2V model input: [x | zero condition | zero mask]; the pipeline only steps the first C channels.
    start = torch.cat([noise, torch.zeros_like(noise), torch.zeros_like(noise[..., :1])], dim=-1)
    (latents,) = pipe(
        **text,
        height=h * SPATIAL,
        width=w * SPATIAL,
        num_frames=(t - 1) * TEMPORAL + 1,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=start,  # the pipeline updates this tensor in place: it is a fresh one
        output_type="latent",
        return_dict=False,
    )
    return latents  # (B, T, H, W, C), channels last like ours


def diffusers_t2i(ref, noise, steps, shift, guidance, text: dict) -> torch.Tensor:
    pipe = Kandinsky5T2IPipeline(transformer=ref, scheduler=OfficialGridScheduler.with_shift(shift), **no_components())
    pipe.set_progress_bar_config(disable=True)
    _, _, h, w, _ = noise.shape
    height, width = h * SPATIAL, w * SPATIAL
    # The pipeline snaps any other size to its trained ones (1024² class), whose RoPE positions would then not fit
    # our tiny latent; list the tiny size as allowed instead.
    pipe.resolutions = [(width, height)]
    (latents,) = pipe(
        **text,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=noise.clone(),
        output_type="latent",
        return_dict=False,
    )
    return latents


# --- timestep grid ------------------------------------------------------------------------------------


GRIDS = [(3, 5.0), (4, 5.0), (3, 3.0), (4, 3.0), (16, 10.0), (50, 5.0)]


@pytest.mark.parametrize("steps, shift", GRIDS)
def test_scheduler_shift_equals_timestep_grid(steps, shift):
    """diffusers' own shift ``s·u / (1 + (s-1)·u)`` on the official ``u`` gives our grid (it computes in fp32)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
    grid = timestep_grid(steps, shift)
    assert scheduler.sigmas.shape == grid.shape == (steps + 1,)
    assert max_diff(scheduler.sigmas, grid) <= 1e-6


@pytest.mark.parametrize("steps, shift", GRIDS)
def test_official_grid_scheduler_steps_on_our_grid(steps, shift):
    scheduler = OfficialGridScheduler.with_shift(shift)
    scheduler.set_timesteps(steps)
    grid = timestep_grid(steps, shift)
    assert torch.equal(scheduler.sigmas, grid)
    # The model time the pipelines pass, 1000·sigma in fp32, is the one ``dit_velocity`` passes.
    assert torch.equal(scheduler.timesteps, grid[:-1] * 1000.0)


def test_stock_scheduler_grid_is_not_the_official_one():
    """Why ``OfficialGridScheduler`` exists: ``set_timesteps(N)`` on the stock scheduler gives another grid."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(4)
    official = timestep_grid(4, 5.0)  # 1, .9375, .8333, .625, 0
    assert max_diff(scheduler.sigmas, official) > 0.5  # its last nonzero sigma is ~0.024, not 0.625


# --- T2V and T2I ----------------------------------------------------------------------------------------

# (id, guidance, batch, prompt tokens, negative tokens or None, seed, steps). Equal prompt and negative lengths take
# our batched-CFG path (one DiT call of batch 2B), different lengths the two-call path.
T2V_CASES = [
    ("cfg5-b1-lengths-differ", 5.0, 1, 7, 5, 0, 4),
    ("cfg5-b2-batched", 5.0, 2, 6, 6, 1, 3),
    ("cfg1-b2", 1.0, 2, 5, None, 2, 4),
    ("cfg1-b1-negative-ignored", 1.0, 1, 4, 6, 3, 3),
]
T2I_CASES = [
    ("cfg3.5-b1-lengths-differ", 3.5, 1, 7, 4, 4, 4),
    ("cfg3.5-b2-batched", 3.5, 2, 5, 5, 5, 3),
]


def run_case(models, round_qk: bool, task: str, guidance, batch, length, neg_length, seed, steps) -> None:
    video = task == "t2v"
    config, ours, ref = models(video, round_qk)
    shift, rope_scale = (5.0, VIDEO_ROPE_SCALE) if video else (3.0, IMAGE_ROPE_SCALE)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *(VIDEO_GRID if video else IMAGE_GRID), config.in_visual_dim, generator=gen)
    tokens, pooled = random_text(gen, config, batch, length)
    negative = None if neg_length is None else random_text(gen, config, batch, neg_length)

    mine = sample_latents(
        ours,
        unpadded(tokens, pooled),
        None if negative is None else unpadded(*negative),
        noise,
        timestep_grid(steps, shift),
        guidance_scale=guidance,
        rope_scale=rope_scale,
    )
    run = diffusers_t2v if video else diffusers_t2i
    theirs = run(ref, noise, steps, shift, guidance, diffusers_text(tokens, pooled, negative))
    assert mine.dtype == theirs.dtype == torch.float32
    assert_parity(mine, theirs, noise, round_qk)


@pytest.mark.parametrize("round_qk", QK_MODES)
@pytest.mark.parametrize("case", T2V_CASES, ids=[c[0] for c in T2V_CASES])
def test_t2v_matches_diffusers(models, case, round_qk):
    run_case(models, round_qk, "t2v", *case[1:])


@pytest.mark.parametrize("round_qk", QK_MODES)
@pytest.mark.parametrize("case", T2I_CASES, ids=[c[0] for c in T2I_CASES])
def test_t2i_matches_diffusers(models, case, round_qk):
    run_case(models, round_qk, "t2i", *case[1:])


@pytest.mark.parametrize("batch_guidance", [True, False], ids=["batched-cfg", "two-calls"])
@pytest.mark.parametrize("task", ["t2v", "t2i"])
def test_padded_text_with_mask_matches_diffusers_on_trimmed_text(models, task, batch_guidance):
    """Ours on a padded batch + key masks equals diffusers run prompt by prompt on the trimmed tokens.

    fp32 q/k only: masked attention over 8 keys and plain attention over fewer sum in another order, and bf16 q/k
    would amplify that last-bit difference whatever the rest of the DiT does.
    """
    video = task == "t2v"
    config, ours, ref = models(video)
    shift, rope_scale, guidance, steps = (5.0, VIDEO_ROPE_SCALE, 5.0, 3) if video else (3.0, IMAGE_ROPE_SCALE, 3.5, 3)
    gen = torch.Generator().manual_seed(6)
    noise = torch.randn(2, *(VIDEO_GRID if video else IMAGE_GRID), config.in_visual_dim, generator=gen)
    padded = 8
    lengths, neg_lengths = torch.tensor([7, 3]), torch.tensor([2, 8])  # includes a prompt with no padding

    def padded_prompt(real: torch.Tensor) -> PromptEmbeddings:
        tokens, pooled = random_text(gen, config, 2, padded)
        mask = torch.arange(padded)[None, :] < real[:, None]
        tokens = torch.where(mask[..., None], tokens, torch.full_like(tokens, 5.0))  # junk in the padding
        return PromptEmbeddings(tokens, mask, pooled)

    prompt, negative = padded_prompt(lengths), padded_prompt(neg_lengths)
    mine = sample_latents(
        ours,
        prompt,
        negative,
        noise,
        timestep_grid(steps, shift),
        guidance_scale=guidance,
        rope_scale=rope_scale,
        batch_guidance=batch_guidance,
    )
    run = diffusers_t2v if video else diffusers_t2i
    for i in range(2):
        n, m = int(lengths[i]), int(neg_lengths[i])
        text = diffusers_text(
            prompt.tokens[i : i + 1, :n],
            prompt.pooled[i : i + 1],
            (negative.tokens[i : i + 1, :m], negative.pooled[i : i + 1]),
        )
        theirs = run(ref, noise[i : i + 1], steps, shift, guidance, text)
        assert_parity(mine[i : i + 1], theirs, noise[i : i + 1])


# --- I2V: the official rule -----------------------------------------------------------------------------


def official_first_frame_normalisation(latent: torch.Tensor) -> torch.Tensor:
    """docs/kandinsky5.md §5.4, per batch item: each of the first 4 frames gets its own mean/std over (H, W, C),
    remapped to one mean/std over the reference frames 4 .. 4 + min(5, T-1), clamped to [m - .05, m + .10] and
    [σ - .10, σ + .25] of the frame's own m, σ (unbiased std). Written for T > 4."""
    out = latent.clone()
    frames = latent.shape[1]
    for b in range(latent.shape[0]):
        reference = latent[b, 4 : 4 + min(5, frames - 1)]
        ref_mean, ref_std = reference.mean(), reference.std()
        for f in range(4):
            frame = latent[b, f]
            mean, std = frame.mean(), frame.std()
            target_mean = torch.clamp(ref_mean, mean - 0.05, mean + 0.10)
            target_std = torch.clamp(ref_std, std - 0.10, std + 0.25)
            out[b, f] = (frame - mean) / std * target_std + target_mean
    return out


def official_i2v(dit, prompt, negative, noise, first_frame, grid, guidance, rope_scale):
    """The official I2V sampler, step by step: returns (latents before, latents after the normalisation)."""
    x = noise.clone()
    batch = x.shape[0]
    condition = torch.zeros_like(x)  # condition channels stay zero for I2V
    mask = torch.zeros_like(x[..., :1])
    mask[:, 0] = 1.0  # frame 0 is the given image
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            x[:, 0] = first_frame  # clean image latent re-imposed before every step
            model_input = torch.cat([x, condition, mask], dim=-1)
            time = (1000.0 * t).reshape(1).expand(batch)
            v = dit(model_input, prompt.tokens, prompt.pooled, time, prompt.mask, rope_scale)
            if guidance != 1.0:
                v_neg = dit(model_input, negative.tokens, negative.pooled, time, negative.mask, rope_scale)
                v = v_neg + guidance * (v - v_neg)
            x = x + (t_next - t) * v
    x[:, 0] = first_frame  # and once more after the last step
    return x, official_first_frame_normalisation(x)


I2V_GRID = (10, 4, 4)  # 10 latent frames: frames 0-3 renormalised against frames 4-8, frame 9 untouched


@pytest.mark.parametrize("guidance, batch, seed", [(5.0, 2, 7), (1.0, 1, 8)], ids=["cfg5-b2", "cfg1-b1"])
def test_i2v_follows_the_official_rule(models, guidance, batch, seed):
    config, ours, _ = models(True)
    gen = torch.Generator().manual_seed(seed)
    c = config.in_visual_dim
    noise = torch.randn(batch, *I2V_GRID, c, generator=gen)
    first_frame = torch.randn(batch, *I2V_GRID[1:], c, generator=gen)
    prompt = unpadded(*random_text(gen, config, batch, 6))
    negative = unpadded(*random_text(gen, config, batch, 6))
    grid = timestep_grid(4, 10.0)

    mine = sample_latents(
        ours,
        prompt,
        negative,
        noise,
        grid,
        guidance_scale=guidance,
        rope_scale=VIDEO_ROPE_SCALE,
        conditioning=Conditioning(first_frame=first_frame),
    )
    before, expected = official_i2v(ours, prompt, negative, noise, first_frame, grid, guidance, VIDEO_ROPE_SCALE)

    diff = max_diff(mine, expected)
    assert diff <= TOL, f"max |ours - official rule| = {diff:.3g}"
    # The checks bite: the normalisation moved the first frames, and the conditioned run differs from plain T2V.
    assert max_diff(before, expected) > 1e-2
    assert torch.equal(expected[:, 4:], before[:, 4:])
    t2v = sample_latents(ours, prompt, negative, noise, grid, guidance_scale=guidance, rope_scale=VIDEO_ROPE_SCALE)
    assert max_diff(mine[:, 4:], t2v[:, 4:]) > 1e-2


def test_diffusers_i2v_differs_only_in_the_first_frame_normalisation(models):
    """diffusers' I2V builds the official model input and samples the official way, but normalises the first four
    frames with one mean/std taken over all four (its batch axis shifts the official per-frame axes by one)."""
    config, ours, ref = models(True)
    gen = torch.Generator().manual_seed(9)
    c = config.in_visual_dim
    t, h, w = I2V_GRID
    noise = torch.randn(1, t, h, w, c, generator=gen)
    first_frame = torch.randn(1, h, w, c, generator=gen)
    tokens, pooled = random_text(gen, config, 1, 6)
    negative = random_text(gen, config, 1, 4)
    grid = timestep_grid(4, 10.0)
    before, official = official_i2v(
        ours, unpadded(tokens, pooled), unpadded(*negative), noise, first_frame, grid, 5.0, VIDEO_ROPE_SCALE
    )

    pipe = Kandinsky5I2VPipeline(transformer=ref, scheduler=OfficialGridScheduler.with_shift(10.0), **no_components())
    pipe.set_progress_bar_config(disable=True)
    # What diffusers' prepare_latents builds from an encoded image: frame 0 = image latent, zero condition
    # channels, mask 1 on frame 0 (passed in directly: no VAE here).
    start = noise.clone()
    start[:, 0] = first_frame
    mask = torch.zeros(1, t, h, w, 1)
    mask[:, 0] = 1.0
    start = torch.cat([start, torch.zeros_like(start), mask], dim=-1)
    seen = {}

    def keep_last(pipeline, step, timestep, tensors):
        seen["latents"] = tensors["latents"][..., :c].clone()
        return {}

    (theirs,) = pipe(
        image=PIL.Image.new("RGB", (w * SPATIAL, h * SPATIAL)),  # required, unused once latents are given
        **diffusers_text(tokens, pooled, negative),
        height=h * SPATIAL,
        width=w * SPATIAL,
        num_frames=(t - 1) * TEMPORAL + 1,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=start,
        output_type="latent",
        return_dict=False,
        callback_on_step_end=keep_last,
    )

    # Same sampling: frame 0 is never stepped, the other frames follow the official Euler steps.
    assert max_diff(seen["latents"], before) <= TOL
    # Different normalisation: not the official per-frame one ...
    assert max_diff(theirs, official) > 1e-2
    # ... but one joint mean/std over frames 0-3.
    joint = before.clone()
    source, reference = before[:, :4], before[:, 4 : 4 + min(5, t - 1)]
    mean, std = source.mean(), source.std()
    target_mean = torch.clamp(reference.mean(), mean - 0.05, mean + 0.10)
    target_std = torch.clamp(reference.std(), std - 0.10, std + 0.25)
    joint[:, :4] = (source - mean) / std * target_std + target_mean
    assert max_diff(theirs, joint) <= TOL


def test_diffusers_i2v_prepares_the_official_model_input():
    """From an encoded image, diffusers' I2V builds [noise with frame 0 = image latent | zeros | mask 1 on frame 0]:
    the condition channels stay zero, as in the official code."""
    from tests.tiny_components import build_tiny_hunyuan_vae

    config = _tiny_config(visual_cond=True)
    pipe = Kandinsky5I2VPipeline(
        transformer=reference_model(config),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        **no_components(vae=build_tiny_hunyuan_vae()),
    )
    channels = pipe.vae.config.latent_channels
    t, h, w = VIDEO_GRID
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (h * SPATIAL, w * SPATIAL, 3), np.uint8))
    kwargs = dict(
        batch_size=1,
        num_channels_latents=channels,
        height=h * SPATIAL,
        width=w * SPATIAL,
        num_frames=(t - 1) * TEMPORAL + 1,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        latents = pipe.prepare_latents(image, generator=torch.Generator().manual_seed(0), **kwargs)
        noise_only = torch.randn(1, t, h, w, channels, generator=torch.Generator().manual_seed(0))

    assert latents.shape == (1, t, h, w, 2 * channels + 1)
    x, condition, mask = latents[..., :channels], latents[..., channels:-1], latents[..., -1]
    assert not condition.any()
    assert mask[:, 0].eq(1).all() and not mask[:, 1:].any()
    assert torch.equal(x[:, 1:], noise_only[:, 1:])  # the noise of the other frames is left alone
    assert max_diff(x[:, 0], noise_only[:, 0]) > 0.1  # frame 0 holds the image latent
