"""CrossDiT against diffusers' ``Kandinsky5Transformer3DModel`` on the same random weights.

Both models load one random state dict with ``strict=True`` (so the key sets are equal), with the
zero-initialised modulation and output layers randomised too. Inputs follow the task rules of
docs/kandinsky5.md §2.7: T2V and I2V share the 2C+1-channel architecture, T2I is C channels, T=1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Attention  # noqa: E402

from kandinsky5.config import DiTConfig  # noqa: E402
from kandinsky5.models import CrossDiT, keeps_fp32  # noqa: E402

# Token grids stay tiny; each architecture is built once per module (see ``models``).
ARCHS = {
    # name: (DiTConfig overrides, latent (T, H, W))
    "video": (dict(visual_cond=True), (3, 4, 6)),
    "image": (dict(visual_cond=False), (1, 6, 4)),
    "video-pt2": (dict(visual_cond=True, patch_size=(2, 2, 2)), (4, 4, 4)),  # temporal patching
}
TASKS = {"t2v": "video", "i2v": "video", "t2i": "image", "t2v-pt2": "video-pt2"}

# (batch, model times 1000·t per sample, RoPE scale, text length): odd lengths, SD and HD scales.
CASES = [
    (1, (0.0,), (1.0, 1.0, 1.0), 5),
    (2, (137.5, 999.9), (1.0, 2.0, 2.0), 7),
    (2, (500.0, 0.0), (1.0, 3.16, 3.16), 9),
    (1, (999.9,), (1.0, 3.16, 3.16), 1),
]


class FP32RopeProcessor:
    """diffusers' Kandinsky 5 attention without the bf16 rounding of q and k after RoPE.

    Same call signature as ``Kandinsky5AttnProcessor`` (dense path only); the rotation is
    ``(rope · pairs).sum(-1)`` over diffusers' 2×2 matrices, kept in fp32.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        assert sparse_params is None, "dense attention only"
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (attn.num_heads, -1))  # (B, S, heads, D)

        q = heads(attn.to_query(hidden_states))
        k, v = heads(attn.to_key(source)), heads(attn.to_value(source))
        q = attn.query_norm(q.float()).type_as(q)
        k = attn.key_norm(k.float()).type_as(k)
        if rotary_emb is not None:

            def rotate(t: torch.Tensor) -> torch.Tensor:
                pairs = t.float().unflatten(-1, (-1, 1, 2))  # (B, S, heads, D/2, 1, 2)
                return (rotary_emb * pairs).sum(-1).flatten(-2).type_as(t)

            q, k = rotate(q), rotate(k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.out_layer(out.transpose(1, 2).flatten(-2))


def reference_model(config: DiTConfig) -> torch.nn.Module:
    c = config
    return diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=c.in_visual_dim,
        in_text_dim=c.in_text_dim,
        in_text_dim2=c.in_text_dim2,
        time_dim=c.time_dim,
        out_visual_dim=c.out_visual_dim,
        patch_size=c.patch_size,
        model_dim=c.model_dim,
        ff_dim=c.ff_dim,
        num_text_blocks=c.num_text_blocks,
        num_visual_blocks=c.num_visual_blocks,
        axes_dims=c.axes_dims,
        visual_cond=c.visual_cond,
    ).eval()


def build_pair(config: DiTConfig, state: dict, round_qk: bool) -> tuple[CrossDiT, torch.nn.Module]:
    ours = CrossDiT(config, round_qk_to_bf16=round_qk).eval()
    ref = reference_model(config)
    ours.load_state_dict(state, strict=True)
    ref.load_state_dict(state, strict=True)
    if not round_qk:
        for module in ref.modules():
            if isinstance(module, Kandinsky5Attention):
                module.set_processor(FP32RopeProcessor())
    return ours, ref


@pytest.fixture(scope="module")
def models(tiny_config, random_state_dict, assert_no_zero_parameter):
    """(arch, round_qk) → (config, ours, ref) with shared random weights, built on first use."""
    cache = {}

    def get(arch: str, round_qk: bool):
        if (arch, round_qk) not in cache:
            config = tiny_config(**ARCHS[arch][0])
            state = random_state_dict(reference_model(config), seed=len(arch))
            ours, ref = build_pair(config, state, round_qk)
            assert_no_zero_parameter(ours)
            assert_no_zero_parameter(ref)
            cache[arch, round_qk] = (config, ours, ref)
        return cache[arch, round_qk]

    return get


def task_latents(task: str, config: DiTConfig, batch: int, grid: tuple, gen: torch.Generator) -> torch.Tensor:
    """(B, T, H, W, channels) model input built by the task's conditioning rule (§2.7)."""
    c = config.in_visual_dim
    x_t = torch.randn(batch, *grid, c, generator=gen)
    if not config.visual_cond:  # T2I: the noisy latent alone
        return x_t
    cond = torch.zeros_like(x_t)
    mask = torch.zeros(batch, *grid, 1)
    if task == "i2v":  # clean first-frame latent written into x_t; its mask frame is 1
        x_t[:, 0] = torch.randn(batch, *grid[1:], c, generator=gen)
        mask[:, 0] = 1.0
    return torch.cat([x_t, cond, mask], dim=-1)


def run_both(ours, ref, config, x, text, pooled, time, scale):
    _, t, h, w, _ = x.shape
    pt, ph, pw = config.patch_size
    rope_pos = [torch.arange(t // pt), torch.arange(h // ph), torch.arange(w // pw)]
    with torch.no_grad():
        a = ours(x, text, pooled, time, rope_scale=scale)
        b = ref(
            x,
            text,
            time,
            pooled,
            visual_rope_pos=rope_pos,
            text_rope_pos=torch.arange(text.shape[1]),
            scale_factor=scale,
            return_dict=False,
        )
    return a, b


def case_inputs(task, config, grid, batch, times, text_len, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * batch + text_len)
    x = task_latents(task, config, batch, grid, gen)
    text = torch.randn(batch, text_len, config.in_text_dim, generator=gen)
    pooled = torch.randn(batch, config.in_text_dim2, generator=gen)
    return x.to(dtype), text.to(dtype), pooled.to(dtype), torch.tensor(times, dtype=torch.float32)


@pytest.mark.parametrize("round_qk, atol", [(True, 2e-4), (False, 1e-5)], ids=["bf16-qk", "fp32-qk"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-t{c[1][0]:g}-s{c[2][1]:g}-L{c[3]}")
@pytest.mark.parametrize("task", list(TASKS))
def test_fp32_parity(models, task, case, round_qk, atol):
    arch = TASKS[task]
    config, ours, ref = models(arch, round_qk)
    grid = ARCHS[arch][1]
    batch, times, scale, text_len = case
    x, text, pooled, time = case_inputs(task, config, grid, batch, times, text_len)

    a, b = run_both(ours, ref, config, x, text, pooled, time, scale)

    assert a.shape == b.shape == (batch, *grid, config.out_visual_dim)
    assert a.dtype == b.dtype == torch.float32
    assert b.std() > 0.5, "reference output is near-constant: weights not exercised"
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_qk_rounding_is_visible(models):
    """The two parity modes differ by more than their tolerance, so each checks its own path."""
    config, ours_rounded, _ = models("video", True)
    _, ours_exact, _ = models("video", False)
    ours_exact.load_state_dict(ours_rounded.state_dict())
    x, text, pooled, time = case_inputs("t2v", config, ARCHS["video"][1], 1, (500.0,), 5)
    with torch.no_grad():
        gap = (ours_rounded(x, text, pooled, time) - ours_exact(x, text, pooled, time)).abs().max()
    assert gap > 1e-4


def test_padded_text_with_mask_matches_trimmed_text(models):
    """Ours on padded text + key mask equals diffusers (no mask support) on each trimmed prompt."""
    config, ours, ref = models("video", False)
    lengths, padded = (5, 3), 9
    x, text, pooled, time = case_inputs("t2v", config, ARCHS["video"][1], 2, (137.5, 700.0), padded)
    text_mask = torch.arange(padded)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
    text = torch.where(text_mask[..., None], text, torch.full_like(text, 7.0))  # junk in the padding
    with torch.no_grad():
        ours_out = ours(x, text, pooled, time, text_mask=text_mask)
    for i, n in enumerate(lengths):
        one = slice(i, i + 1)
        _, ref_out = run_both(ours, ref, config, x[one], text[one, :n], pooled[one], time[one], (1, 1, 1))
        torch.testing.assert_close(ours_out[one], ref_out, rtol=0, atol=1e-5)


def cast_like_diffusers(ref: torch.nn.Module, dtype: torch.dtype) -> None:
    """What ``from_pretrained(torch_dtype=...)`` does: ``_keep_in_fp32_modules`` stay fp32."""
    keep = set(ref._keep_in_fp32_modules)
    for name, param in ref.named_parameters():
        in_fp32 = not keep.isdisjoint(name.split("."))
        param.data = param.data.to(torch.float32 if in_fp32 else dtype)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # diffusers' bf16 RMSNorm
@pytest.mark.parametrize("task", ["t2v", "i2v", "t2i"])
def test_bf16_parity(tiny_config, random_state_dict, task):
    arch = TASKS[task]
    config = tiny_config(**ARCHS[arch][0])
    state = random_state_dict(reference_model(config), seed=7)
    ours, ref = build_pair(config, state, round_qk=True)
    x, text, pooled, time = case_inputs(task, config, ARCHS[arch][1], 2, (137.5, 999.9), 7)
    scale = (1.0, 2.0, 2.0)
    fp32_out, _ = run_both(ours, ref, config, x, text, pooled, time, scale)

    ours.cast_(torch.bfloat16)
    cast_like_diffusers(ref, torch.bfloat16)
    ours_fp32 = {n for n, p in ours.named_parameters() if p.dtype == torch.float32}
    ref_fp32 = {n for n, p in ref.named_parameters() if p.dtype == torch.float32}
    assert ours_fp32 == ref_fp32 == {n for n in state if keeps_fp32(n)} != set()
    assert ours.dtype == torch.bfloat16

    bf16 = torch.bfloat16
    a, b = run_both(ours, ref, config, x.to(bf16), text.to(bf16), pooled.to(bf16), time, scale)

    assert a.dtype == b.dtype == bf16
    output_scale = fp32_out.abs().max().item()
    # Same rounding points on both sides: observed bit-exact on CPU; allow bf16 noise (~1% of scale).
    assert (a.float() - b.float()).abs().max().item() <= 1e-2 * output_scale
    # And the bf16 run is still the same function as the fp32 one, to bf16 accuracy.
    assert (a.float() - fp32_out).abs().max().item() <= 5e-2 * output_scale


def test_integer_and_float_text_masks_act_like_bool(models):
    """Tokenizers hand out 0/1 integer masks; SDPA would read a float one as an additive bias."""
    config, ours, _ = models("video", True)
    x, text, pooled, time = case_inputs("t2v", config, ARCHS["video"][1], 2, (137.5, 700.0), 6)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = ours(x, text, pooled, time, text_mask=mask.bool())
        for variant in (mask, mask.float()):
            torch.testing.assert_close(ours(x, text, pooled, time, text_mask=variant), expected)
    with pytest.raises(ValueError, match="text_mask must be"):
        ours(x, text, pooled, time, text_mask=mask[:, :4])
