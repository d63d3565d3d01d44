"""The generation core on a tiny random DiT: conditioning channels, CFG batching, I2V rule."""

import pytest
import torch

from kandinsky5.config import DiTConfig
from kandinsky5.models import CrossDiT
from kandinsky5.pipeline import Conditioning, PromptEmbeddings, dit_velocity, sample_latents
from kandinsky5.sampling import initial_noise, timestep_grid

TINY = DiTConfig(
    model_dim=32, ff_dim=64, time_dim=16, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
    in_text_dim=24, in_text_dim2=12, in_visual_dim=4, out_visual_dim=4,
)  # fmt: skip


def random_dit(config: DiTConfig = TINY) -> CrossDiT:
    torch.manual_seed(0)
    dit = CrossDiT(config).eval()
    for p in dit.parameters():
        p.data.normal_(0, 0.3)
    return dit


def prompt(length: int, real: int, seed: int) -> PromptEmbeddings:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length)[None] < real
    return PromptEmbeddings(torch.randn(1, length, 24, generator=g), mask, torch.randn(1, 12, generator=g))


def test_a_sample_predicting_dit_gives_the_velocity_of_its_sample():
    """Same weights, prediction "sample": the output x̂0 becomes the velocity (x − x̂0)/t."""
    import dataclasses

    as_velocity = random_dit()
    as_sample = CrossDiT(dataclasses.replace(TINY, prediction="sample")).eval()
    as_sample.load_state_dict(as_velocity.state_dict())
    x = initial_noise((1, 2, 4, 4, 4), seed=1)
    t = torch.tensor(0.4)
    emb = prompt(5, 3, seed=2)
    out = dit_velocity(as_velocity, emb, Conditioning(), (1.0, 1.0, 1.0))(x, t)  # the raw network output
    velocity = dit_velocity(as_sample, emb, Conditioning(), (1.0, 1.0, 1.0))(x, t)
    torch.testing.assert_close(velocity, (x - out) / 0.4)
    # one Euler step from t to 0 lands on the predicted sample
    grid = torch.tensor([0.4, 0.0])
    torch.testing.assert_close(sample_latents(as_sample, emb, None, x, grid, guidance_scale=1.0,
                                              rope_scale=(1.0, 1.0, 1.0)), out, atol=1e-5, rtol=0)  # fmt: skip


def test_batched_guidance_equals_two_passes():
    dit, grid = random_dit(), timestep_grid(3, 5.0)
    noise = initial_noise((1, 2, 4, 4, 4), seed=1)
    kwargs = dict(guidance_scale=5.0, rope_scale=(1.0, 2.0, 2.0))
    batched = sample_latents(dit, prompt(6, 4, 0), prompt(6, 2, 1), noise, grid, **kwargs)
    separate = sample_latents(dit, prompt(6, 4, 0), prompt(6, 2, 1), noise, grid, batch_guidance=False, **kwargs)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=0)


def test_guidance_one_ignores_the_negative_prompt():
    dit, grid = random_dit(), timestep_grid(2, 3.0)
    noise = initial_noise((1, 1, 4, 4, 4), seed=2)
    a = sample_latents(dit, prompt(5, 5, 0), None, noise, grid, guidance_scale=1.0, rope_scale=(1, 1, 1))
    b = sample_latents(dit, prompt(5, 5, 0), prompt(5, 3, 9), noise, grid, guidance_scale=1.0, rope_scale=(1, 1, 1))
    assert torch.equal(a, b)


def test_condition_channels_follow_the_official_layout():
    x = torch.randn(1, 3, 4, 4, 4)
    t2v = Conditioning().model_input(x, visual_cond=True)
    assert t2v.shape[-1] == 9 and not t2v[..., 4:].any()
    i2v = Conditioning(first_frame=torch.randn(1, 4, 4, 4)).model_input(x, visual_cond=True)
    assert not i2v[..., 4:8].any(), "I2V leaves the condition channels at zero"
    assert i2v[:, 0, ..., 8].eq(1).all() and not i2v[:, 1:, ..., 8].any()
    edit = torch.randn(1, 1, 4, 4, 4)
    i2i = Conditioning(edit_latent=edit).model_input(x[:, :1], visual_cond=True)
    assert torch.equal(i2i[..., 4:8], edit) and i2i[..., 8].eq(1).all()
    assert torch.equal(Conditioning().model_input(x, visual_cond=False), x)
    with pytest.raises(ValueError, match="no image conditioning"):
        Conditioning(edit_latent=edit).model_input(x, visual_cond=False)


def test_splice_first_frame_replaces_frame_zero_only():
    x, first = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 4, 4, 4)
    spliced = Conditioning(first_frame=first).splice_first_frame(x)
    assert torch.equal(spliced[:, 0], first) and torch.equal(spliced[:, 1:], x[:, 1:])
    assert not torch.equal(x[:, 0], first), "x itself is left as it was"
    assert Conditioning().splice_first_frame(x) is x


def test_i2v_keeps_the_first_frame_through_sampling():
    dit, grid = random_dit(), timestep_grid(3, 10.0)
    first = torch.randn(1, 4, 4, 4)
    seen = []
    velocity = dit_velocity(dit, prompt(5, 5, 0), Conditioning(first_frame=first), (1, 2, 2))

    def spy(x, t):
        seen.append(x[:, 0].clone())
        return velocity(x, t)

    from kandinsky5.sampling import denoise

    denoise(spy, initial_noise((1, 2, 4, 4, 4), seed=3), grid, first_frame=first)
    assert all(torch.equal(frame, first) for frame in seen)
    out = sample_latents(
        dit, prompt(5, 5, 0), None, initial_noise((1, 6, 4, 4, 4), seed=3), grid,
        guidance_scale=1.0, rope_scale=(1, 2, 2), conditioning=Conditioning(first_frame=first),
    )  # fmt: skip
    assert out.shape == (1, 6, 4, 4, 4) and torch.isfinite(out).all()
