"""The registry of official Kandinsky 5.0 releases: one typed record per variant.

A :class:`Variant` ties together everything needed to run one release: the DiT architecture, the
sampling defaults, dense or NABLA attention, the VAE and text encoders, the Hub repositories holding the
weights, and the sizes the model was trained for. ``VARIANTS`` maps kebab-case names such as
``"video-lite-5s-sft"`` to these records; ``get_variant`` and ``variant_for_repo`` look them up.

Facts come from docs/kandinsky5.md (§3 configs, §4.5 NABLA, §5 sampler, §6 text, §7 VAEs, §8.9 files).
Where we deliberately differ from the official configs, the entry says so in a comment and
docs/variants.md explains why.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import re
from pathlib import Path
from typing import Literal

from kandinsky5.config import DiTConfig, NablaConfig, SamplingDefaults

__all__ = [
    "HubFiles",
    "TextEncoderSpec",
    "Variant",
    "VARIANTS",
    "get_variant",
    "list_variants",
    "variant_for_repo",
    "resolve_model_name",
    "variant_for_folder",
    "parameter_count",
    "packaged_path",
    "nano_variant",
    "NANO_DIT",
    "NANO_ROPE_SCALE",
    "NANO_SHIFT",
]

logger = logging.getLogger(__name__)

Task = Literal["t2v", "i2v", "t2i", "i2i"]
Attention = Literal["dense", "nabla"]
VaeKind = Literal["hunyuan", "flux", "nano"]  # nano: a small HunyuanVideo-architecture VAE, 4x in space
TextKind = Literal["qwen-clip", "minilm"]
Template = Literal["video", "image", "image_edit"]

VIDEO_TASKS = ("t2v", "i2v")
IMAGE_TASKS = ("t2i", "i2i")

# The Hunyuan video VAE compresses time 4x causally, so a video has 4k + 1 frames. RoPE3D has 128
# positions per axis (§2.4): at most 128 latent frames = 4 * 127 + 1 = 509 video frames, and at most 128
# token rows/columns = 128 * 16 = 2048 pixels per side (VAE x8, patch x2).
MAX_VIDEO_FRAMES = 4 * (128 - 1) + 1
MAX_SIDE = 128 * 16
NABLA_SIZE_MULTIPLE = 128  # NABLA tiles are 8x8 tokens = 128x128 pixels (§2.8, §4.6)

# Folder of the transformer weights inside a "-Diffusers" mirror (config.json +
# diffusion_pytorch_model*.safetensors).
DIFFUSERS_TRANSFORMER_SUBFOLDER = "transformer"

VIDEO_NEGATIVE_PROMPT = (
    "Static, 2D cartoon, cartoon, 2d animation, paintings, images, worst quality, low quality, ugly, "
    "deformed, walking backwards"
)

_NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HubFiles:
    """Where a variant's DiT weights live on the Hugging Face Hub.

    ``repo_id`` is the official single-file repository and ``filename`` the checkpoint path inside it
    (official key names, loads strictly into our DiT). ``diffusers_repo_id`` is the ``-Diffusers``
    mirror, whose ``transformer/`` folder holds the same weights under diffusers' key names, or None
    where no mirror is published.
    """

    repo_id: str
    filename: str
    diffusers_repo_id: str | None = None

    def __post_init__(self) -> None:
        for repo in (self.repo_id, self.diffusers_repo_id):
            if repo is not None and repo.count("/") != 1:
                raise ValueError(f"Hub repo ids look like 'owner/name', got {repo!r}")
        if not self.filename.endswith(".safetensors"):
            raise ValueError(f"checkpoint filename must be a .safetensors file, got {self.filename!r}")

    @property
    def diffusers_subfolder(self) -> str:
        return DIFFUSERS_TRANSFORMER_SUBFOLDER


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderSpec:
    """The two text encoders (§6): Qwen2.5-VL token states and the CLIP pooled vector.

    ``qwen_max_length`` is the padded token count after the template prefix is cropped (256 for video,
    512 for images); ``template`` picks the Qwen system prompt (I2V uses the video template too).
    ``kind="minilm"`` is nano's stand-in for both (kandinsky5.nano.text): installed from PyPI, so its
    repo ids are unused.
    """

    kind: TextKind = "qwen-clip"
    qwen_repo_id: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    qwen_max_length: int
    template: Template
    clip_repo_id: str = "openai/clip-vit-large-patch14"
    clip_max_length: int = 77

    def __post_init__(self) -> None:
        if self.kind not in ("qwen-clip", "minilm"):
            raise ValueError(f"kind must be 'qwen-clip' or 'minilm', got {self.kind!r}")
        if self.qwen_max_length < 1:
            raise ValueError(f"qwen_max_length must be >= 1, got {self.qwen_max_length}")
        if self.template not in ("video", "image", "image_edit"):
            raise ValueError(f"template must be 'video', 'image' or 'image_edit', got {self.template!r}")
        if not 1 <= self.clip_max_length <= 77:
            raise ValueError(f"clip_max_length must be in [1, 77] (CLIP context), got {self.clip_max_length}")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One official release: architecture, defaults, components and weights.

    ``resolutions`` lists the allowed (height, width) pairs in pixels; every side is a multiple of
    ``size_multiple`` (16 for dense video and images, 128 under NABLA). For I2V the pipeline derives the
    size from the input image (same area class, same multiple); the list then holds the text-only sizes.
    ``max_num_frames`` is the longest video the checkpoint was trained for (1 for images).
    ``packaged`` names a folder inside the installed package that holds the weights (nano), in which
    case ``hub`` is None.
    """

    name: str
    description: str
    task: Task
    dit: DiTConfig
    sampling: SamplingDefaults
    attention: Attention
    nabla: NablaConfig | None
    vae: VaeKind
    vae_repo_id: str
    text: TextEncoderSpec
    hub: HubFiles | None
    max_num_frames: int
    resolutions: tuple[tuple[int, int], ...]
    size_multiple: int
    vae_subfolder: str = "vae"
    packaged: str | None = None

    def __post_init__(self) -> None:
        def fail(message: str) -> None:
            raise ValueError(f"variant {self.name!r}: {message}")

        if not _NAME_PATTERN.match(self.name):
            fail("names are kebab case, e.g. 'video-lite-5s-sft'")
        if self.task not in VIDEO_TASKS + IMAGE_TASKS:
            fail(f"task must be one of {VIDEO_TASKS + IMAGE_TASKS}, got {self.task!r}")

        # Attention: a NABLA config exactly when NABLA is on, and pixel sizes that tile into 8x8 tokens.
        if self.attention not in ("dense", "nabla"):
            fail(f"attention must be 'dense' or 'nabla', got {self.attention!r}")
        if (self.attention == "nabla") != (self.nabla is not None):
            fail(f"a NablaConfig is required iff attention == 'nabla' (attention={self.attention!r})")
        if self.size_multiple < 1 or self.size_multiple % 16:
            fail(f"size_multiple must be a positive multiple of 16 (VAE x8, patch 2), got {self.size_multiple}")
        if self.attention == "nabla" and self.size_multiple % NABLA_SIZE_MULTIPLE:
            fail(f"NABLA needs sizes that are multiples of {NABLA_SIZE_MULTIPLE}, got {self.size_multiple}")

        # Sizes: each allowed size fits the grid and RoPE; the default is one of them.
        if not self.resolutions:
            fail("resolutions must list at least one (height, width)")
        for height, width in self.resolutions:
            if height % self.size_multiple or width % self.size_multiple:
                fail(f"size {height}x{width} is not a multiple of size_multiple={self.size_multiple}")
            if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
                fail(f"size {height}x{width} exceeds the RoPE limit of {MAX_SIDE} pixels per side")
        default_size = (self.sampling.height, self.sampling.width)
        if default_size not in self.resolutions:
            fail(f"default (height, width) {default_size} is not in resolutions {self.resolutions}")

        # Frames: videos have 4k + 1 frames within the RoPE cap; images have exactly one.
        frames = self.sampling.num_frames
        if self.is_video:
            if not 1 <= self.max_num_frames <= MAX_VIDEO_FRAMES or (self.max_num_frames - 1) % 4:
                fail(f"max_num_frames must be 4k+1 and <= {MAX_VIDEO_FRAMES}, got {self.max_num_frames}")
            if (frames - 1) % 4:
                fail(f"num_frames must be 4k+1, got {frames}; try {4 * round((frames - 1) / 4) + 1}")
            if frames > self.max_num_frames:
                fail(f"default num_frames {frames} exceeds max_num_frames {self.max_num_frames}")
        elif frames != 1 or self.max_num_frames != 1:
            fail(f"image variants have num_frames = max_num_frames = 1, got {frames}, {self.max_num_frames}")

        # Conditioning: every video checkpoint and image editing take [x | cond | mask]; T2I does not,
        # except nano, whose one DiT does T2V, I2V and T2I (images are 1-frame clips, condition zero).
        wants_cond = self.task != "t2i" or self.vae == "nano"
        if self.dit.visual_cond != wants_cond:
            fail(f"task {self.task!r} needs DiTConfig.visual_cond={wants_cond}")

        # Components that must agree with the task.
        if self.vae == "nano" and (self.text.kind != "minilm" or self.packaged is None or self.task == "i2i"):
            fail("the nano VAE goes with the MiniLM text encoder, packaged weights and t2v / i2v / t2i")
        if (self.hub is None) == (self.packaged is None):
            fail("weights come either from the Hub (hub) or from the package (packaged)")
        if self.vae == "hunyuan" and not self.is_video:
            fail("the Hunyuan VAE is a video VAE; image tasks use 'flux'")
        if self.vae == "flux" and self.is_video:
            fail("the FLUX VAE is an image VAE; video tasks use 'hunyuan'")
        template = {"t2v": "video", "i2v": "video", "t2i": "image", "i2i": "image_edit"}[self.task]
        # (nano ignores the template, but keeps the task's name for it.)
        if self.text.template != template:
            fail(f"task {self.task!r} uses the {template!r} Qwen template, got {self.text.template!r}")

    @property
    def is_video(self) -> bool:
        return self.task in VIDEO_TASKS

    @property
    def num_parameters(self) -> int:
        """DiT parameter count (text encoders and VAE excluded)."""
        return parameter_count(self.dit)


@functools.cache
def parameter_count(cfg: DiTConfig) -> int:
    """Exact number of DiT parameters for ``cfg``, counted on a meta-device model (no memory used)."""
    import torch

    from kandinsky5.models import CrossDiT

    with torch.device("meta"):
        return sum(p.numel() for p in CrossDiT(cfg).parameters())


# --------------------------------------------------------------------------------------------------
# Architectures (§3.1) and shared settings
# --------------------------------------------------------------------------------------------------

LITE_VIDEO_DIT = DiTConfig(
    model_dim=1792,
    ff_dim=7168,
    time_dim=512,
    num_text_blocks=2,
    num_visual_blocks=32,
    axes_dims=(16, 24, 24),
    visual_cond=True,
)
PRO_VIDEO_DIT = DiTConfig(
    model_dim=4096,
    ff_dim=16384,
    time_dim=1024,
    num_text_blocks=4,
    num_visual_blocks=60,
    axes_dims=(32, 48, 48),
    visual_cond=True,
)
IMAGE_T2I_DIT = DiTConfig(
    model_dim=2560,
    ff_dim=10240,
    time_dim=512,
    num_text_blocks=2,
    num_visual_blocks=50,
    axes_dims=(32, 48, 48),
    visual_cond=False,
)
# Editing = the official instruct_type="channel": [noise | edit latent | ones] in, 16 channels out.
IMAGE_I2I_DIT = dataclasses.replace(IMAGE_T2I_DIT, visual_cond=True)

# (height, width) lists from the official pipelines (§5.1). Every entry is a multiple of 128, so the
# same lists serve dense and NABLA variants.
SD_RESOLUTIONS = ((512, 768), (512, 512), (768, 512))
HD_RESOLUTIONS = (
    (1024, 1024),
    (768, 1280),
    (1280, 768),
    (640, 1408),
    (1408, 640),
    (896, 1152),
    (1152, 896),
)
SD_ROPE_SCALE = (1.0, 2.0, 2.0)
HD_ROPE_SCALE = (1.0, 3.16, 3.16)

HUNYUAN_VAE_REPO = "hunyuanvideo-community/HunyuanVideo"
FLUX_VAE_REPO = "black-forest-labs/FLUX.1-dev"  # gated: needs an accepted licence and an HF token

VIDEO_TEXT = TextEncoderSpec(qwen_max_length=256, template="video")
IMAGE_TEXT = TextEncoderSpec(qwen_max_length=512, template="image")
EDIT_TEXT = TextEncoderSpec(qwen_max_length=512, template="image_edit")

_REPO_PREFIX = "kandinskylab/Kandinsky-5.0-"


def _hub(repo: str, file_stem: str, diffusers_repo: str | None) -> HubFiles:
    """HubFiles from the repo tails that follow ``kandinskylab/Kandinsky-5.0-`` and the file stem."""
    return HubFiles(
        repo_id=_REPO_PREFIX + repo,
        filename=f"model/{file_stem}.safetensors",
        diffusers_repo_id=None if diffusers_repo is None else _REPO_PREFIX + diffusers_repo,
    )


# Shift (the official scheduler_scale): the official code ignores the YAML value and its call defaults
# disagree (pipelines 10 / 3, test.py 5). We follow the README's recommendation: 5 for 5 s video, 10 for
# 10 s video and for every I2V variant (the Pro I2V HD YAML says 5; the README wins), and 3 for images
# (the T2I/I2I pipelines' default). See docs/variants.md.
def _video_shift(seconds: int, task: Task) -> float:
    return 10.0 if seconds == 10 or task == "i2v" else 5.0


def _video_variant(
    name: str,
    description: str,
    *,
    task: Task,
    dit: DiTConfig,
    seconds: int,
    hd: bool,
    nabla_p: float | None,
    hub: HubFiles,
    steps: int = 50,
    guidance: float = 5.0,
) -> Variant:
    """A video variant: SD (768x512 class) or HD (1280x768 class), dense or NABLA, 24 fps."""
    frames = 24 * seconds + 1  # 121 for 5 s, 241 for 10 s (31 / 61 latent frames)
    height, width = (768, 1280) if hd else (512, 768)
    nabla = None if nabla_p is None else NablaConfig(P=nabla_p, wT=11, wH=3, wW=3)
    return Variant(
        name=name,
        description=description,
        task=task,
        dit=dit,
        sampling=SamplingDefaults(
            num_inference_steps=steps,
            guidance_scale=guidance,
            shift=_video_shift(seconds, task),
            height=height,
            width=width,
            num_frames=frames,
            fps=24,
            rope_scale=HD_ROPE_SCALE if hd else SD_ROPE_SCALE,
            negative_prompt=VIDEO_NEGATIVE_PROMPT,
        ),
        attention="dense" if nabla is None else "nabla",
        nabla=nabla,
        vae="hunyuan",
        vae_repo_id=HUNYUAN_VAE_REPO,
        text=VIDEO_TEXT,
        hub=hub,
        max_num_frames=frames,
        resolutions=HD_RESOLUTIONS if hd else SD_RESOLUTIONS,
        size_multiple=16 if nabla is None else NABLA_SIZE_MULTIPLE,
    )


# --------------------------------------------------------------------------------------------------
# Family factories
# --------------------------------------------------------------------------------------------------

_LITE_STAGES = {
    # stage: (Hub tag, steps, guidance, what it is)
    "sft": ("sft", 50, 5.0, "supervised fine-tune, best quality"),
    "pretrain": ("pretrain", 50, 5.0, "pretrained base, for fine-tuning"),
    "nocfg": ("nocfg", 50, 1.0, "CFG-distilled, one pass per step"),
    "distilled": ("distilled16steps", 16, 1.0, "diffusion-distilled to 16 steps, no CFG"),
}


def _video_lite_t2v(seconds: int, stage: str) -> Variant:
    """Video Lite text-to-video: 5 s dense or 10 s NABLA (P 0.9), all four training stages."""
    tag, steps, guidance, what = _LITE_STAGES[stage]
    # The official k5_lite_t2v_10s_nocfg_sd.yaml loads the *sft* 10 s checkpoint (a config bug, §3.2).
    # We point "nocfg 10s" at the nocfg file its Hub repo actually ships.
    file_stem = f"kandinsky5lite_t2v_{tag}_{seconds}s"
    repo = f"T2V-Lite-{tag}-{seconds}s"
    return _video_variant(
        f"video-lite-{seconds}s-{stage}",
        f"Video Lite 2B text-to-video, {seconds} s, {what}",
        task="t2v",
        dit=LITE_VIDEO_DIT,
        seconds=seconds,
        hd=False,
        nabla_p=0.9 if seconds == 10 else None,
        hub=_hub(repo, file_stem, f"{repo}-Diffusers"),
        steps=steps,
        guidance=guidance,
    )


def _video_lite_i2v() -> Variant:
    return _video_variant(
        "video-lite-i2v-5s",
        "Video Lite 2B image-to-video, 5 s (also works as T2V)",
        task="i2v",
        dit=LITE_VIDEO_DIT,
        seconds=5,
        hd=False,
        nabla_p=None,
        hub=_hub("I2V-Lite-5s", "kandinsky5lite_i2v_5s", "I2V-Lite-5s-Diffusers"),
    )


# NABLA threshold P per (task, seconds, quality) as shipped (§4.5); None = dense attention.
_PRO_NABLA_P = {
    ("t2v", 5, "sd"): None,
    ("t2v", 5, "hd"): 0.8,
    ("t2v", 10, "sd"): 0.9,
    ("t2v", 10, "hd"): 0.7,
    ("i2v", 5, "sd"): None,
    ("i2v", 5, "hd"): 0.8,
}


def _video_pro(task: Task, seconds: int, quality: str, stage: str = "sft") -> Variant:
    """Video Pro 19B. SD and HD share one checkpoint; HD changes RoPE scale, sizes and NABLA."""
    kind = task.upper()
    repo = f"{kind}-Pro-{stage}-{seconds}s"
    # Only the 5 s SFT checkpoints have a published -Diffusers mirror (Video Pro Diffusers collection).
    diffusers = f"{repo}-Diffusers" if (stage, seconds) == ("sft", 5) else None
    what = "image-to-video" if task == "i2v" else "text-to-video"
    stage_words = "pretrained base, for fine-tuning" if stage == "pretrain" else "SFT"
    infix = "-i2v" if task == "i2v" else ""
    suffix = "-pretrain" if stage == "pretrain" else ""
    return _video_variant(
        f"video-pro{infix}-{seconds}s{suffix}-{quality}",
        f"Video Pro 19B {what}, {seconds} s, {quality.upper()}, {stage_words}",
        task=task,
        dit=PRO_VIDEO_DIT,
        seconds=seconds,
        hd=quality == "hd",
        nabla_p=_PRO_NABLA_P[task, seconds, quality],
        hub=_hub(repo, f"kandinsky5pro_{task}_{stage}_{seconds}s", diffusers),
    )


def _image_lite(task: Task, stage: str) -> Variant:
    """Image Lite 6B: text-to-image or instruction editing, 1024-class sizes, FLUX VAE, shift 3."""
    edit = task == "i2i"
    kind = task.upper()
    official = f"{kind}-Lite" + ("-pretrain" if stage == "pretrain" else "")
    # The sft image repos carry no stage in their names; the pretrain file names follow the video
    # pattern (<stem>_pretrain) but are not confirmed by the official code (see docs/variants.md).
    stem = f"kandinsky5lite_{task}" + ("_pretrain" if stage == "pretrain" else "")
    what = "image editing" if edit else "text-to-image"
    return Variant(
        name="image-lite" + ("-edit" if edit else "") + ("-pretrain" if stage == "pretrain" else ""),
        description=f"Image Lite 6B {what}, " + ("pretrained base" if stage == "pretrain" else "SFT"),
        task=task,
        dit=IMAGE_I2I_DIT if edit else IMAGE_T2I_DIT,
        sampling=SamplingDefaults(
            num_inference_steps=50,
            guidance_scale=3.5,
            shift=3.0,
            height=1024,
            width=1024,
            num_frames=1,
            fps=24,  # unused for images
            rope_scale=(1.0, 1.0, 1.0),
            negative_prompt="",
        ),
        attention="dense",
        nabla=None,
        vae="flux",
        vae_repo_id=FLUX_VAE_REPO,
        text=EDIT_TEXT if edit else IMAGE_TEXT,
        hub=_hub(official, stem, f"{kind}-Lite-{stage}-Diffusers"),
        max_num_frames=1,
        resolutions=HD_RESOLUTIONS,
        size_multiple=16,
    )


# nano (docs/nano.md): our own few-million-parameter model of the same architecture, trained on the
# shapes world by kandinsky5.nano.recipe; one set of weights in the package does T2V, I2V and T2I.
# 128 wide, 2 heads of 64 (RoPE axes 16 + 24 + 24), 1 text block and 6 visual blocks: 3.0 M parameters.
# Narrow because the CPU budget, not the data, limits nano: at equal training time a 128-wide DiT sees
# 2.3x the samples of a 256-wide one (2.9x on one thread) and ends lower and reads words better (docs/nano.md).
# A 17×64×64 clip is a 5×16×16 latent (nano's VAE is 4x in space) and, with 1×4×4 patches, 5×4×4 = 80
# tokens; an image 16 tokens. So a token covers 16×16 pixels, as with the real VAE's 8x and 1×2×2 patches.
# Text comes from MiniLM (384-d tokens and pooled vector).
# A token's patch holds 256 numbers, twice as many as the DiT is wide, so nano predicts the clean latent x0
# rather than the velocity (prediction="sample", docs/nano.md).
# nano's token grid is tiny (5×4×4), so with the official RoPE only the first pair or two of each axis
# turn by a useful angle between neighbours. Heads of 64 (the official axes split 16/24/24) and
# angles multiplied by 2 in time and 4 in space (rope_scale divides them) give every axis several
# pairs that tell positions apart (docs/nano.md).
NANO_ROPE_SCALE = (0.5, 0.25, 0.25)
# The recipe draws training timesteps shifted towards noise by 3, where the layout is decided; sampling on
# the same shifted grid spends the steps where the DiT learned most (docs/nano.md, "Sampler settings").
NANO_SHIFT = 3.0
NANO_DIT = DiTConfig(
    model_dim=128,
    ff_dim=512,
    time_dim=128,
    num_text_blocks=1,
    num_visual_blocks=6,
    axes_dims=(16, 24, 24),
    patch_size=(1, 4, 4),
    in_visual_dim=16,
    out_visual_dim=16,
    in_text_dim=384,
    in_text_dim2=384,
    visual_cond=True,
    prediction="sample",
)
NANO_PACKAGE_DIR = "nano/weights"  # inside the kandinsky5 package: transformer/ and vae/, diffusers layout
NANO_SIZE, NANO_FRAMES, NANO_FPS = 64, 17, 8


NANO_TASKS = ("t2v", "i2v", "t2i")


def _nano_name(task: str) -> str:
    return "nano" if task == "t2v" else f"nano-{task}"


def nano_variant(task: str) -> Variant:
    """The nano entry for ``task`` ("t2v", "i2v" or "t2i"); all three share one set of weights."""
    if task not in NANO_TASKS:
        raise ValueError(f"nano does {', '.join(NANO_TASKS)}, not {task!r}")
    return VARIANTS[_nano_name(task)]


def _nano(task: Task) -> Variant:
    video = task != "t2i"
    what = {"t2v": "text-to-video", "i2v": "image-to-video", "t2i": "text-to-image"}[task]
    return Variant(
        name=_nano_name(task),
        description=f"nano 3M (shapes world, runs on any CPU) {what}",
        task=task,
        dit=NANO_DIT,
        sampling=SamplingDefaults(
            num_inference_steps=16,
            guidance_scale=3.0,
            shift=NANO_SHIFT,
            height=NANO_SIZE,
            width=NANO_SIZE,
            num_frames=NANO_FRAMES if video else 1,
            fps=NANO_FPS,
            rope_scale=NANO_ROPE_SCALE,
            negative_prompt="",  # the recipe trains the unconditional branch on the empty prompt
        ),
        attention="dense",
        nabla=None,
        vae="nano",
        vae_repo_id="",
        text=TextEncoderSpec(kind="minilm", qwen_max_length=32, template="video" if video else "image"),
        hub=None,
        max_num_frames=NANO_FRAMES if video else 1,
        resolutions=((NANO_SIZE, NANO_SIZE),),
        size_multiple=16,
        packaged=NANO_PACKAGE_DIR,
    )


def packaged_path(variant: Variant) -> Path | None:
    """The folder of a variant's weights shipped inside the package, or None for Hub variants."""
    if variant.packaged is None:
        return None
    return Path(__file__).resolve().parent / variant.packaged


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def _build_registry() -> dict[str, Variant]:
    variants = [
        # Video Lite 2B: four stages x two durations, then I2V.
        *(_video_lite_t2v(seconds, stage) for seconds in (5, 10) for stage in _LITE_STAGES),
        _video_lite_i2v(),
        # Video Pro 19B: SFT releases, then the pretrained bases listed in the README.
        *(_video_pro("t2v", seconds, quality) for seconds in (5, 10) for quality in ("sd", "hd")),
        *(_video_pro("i2v", 5, quality) for quality in ("sd", "hd")),
        *(_video_pro("t2v", seconds, quality, stage="pretrain") for seconds in (5, 10) for quality in ("sd", "hd")),
        # Image Lite 6B.
        _image_lite("t2i", "sft"),
        _image_lite("t2i", "pretrain"),
        _image_lite("i2i", "sft"),
        _image_lite("i2i", "pretrain"),
        # nano: our tiny model, weights in the package.
        *(_nano(task) for task in NANO_TASKS),
    ]
    registry: dict[str, Variant] = {}
    for variant in variants:
        if variant.name in registry:
            raise ValueError(f"duplicate variant name {variant.name!r}")
        registry[variant.name] = variant
    return registry


VARIANTS: dict[str, Variant] = _build_registry()


def list_variants() -> list[Variant]:
    """All registered variants, in registry order (Lite video, Pro video, Image)."""
    return list(VARIANTS.values())


def get_variant(name: str) -> Variant:
    """The variant called ``name``; raises ValueError naming close matches when there is none."""
    try:
        return VARIANTS[name]
    except KeyError:
        pass
    close = difflib.get_close_matches(name, VARIANTS, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown variant {name!r}.{hint} Run `kandinsky5 models` to list all {len(VARIANTS)} variants.")


def _repo_index() -> dict[str, Variant]:
    # Official and -Diffusers repo ids, lower-cased. A repo shared by several variants (Pro SD and HD
    # use one checkpoint) maps to the first registered one, the SD variant.
    index: dict[str, Variant] = {}
    for variant in VARIANTS.values():
        if variant.hub is None:
            continue
        for repo in (variant.hub.repo_id, variant.hub.diffusers_repo_id):
            if repo is not None:
                index.setdefault(repo.lower(), variant)
    return index


_BY_REPO = _repo_index()


def variant_for_repo(repo_id: str) -> Variant | None:
    """The variant whose official or ``-Diffusers`` Hub repo is ``repo_id`` (case-insensitive), or None.

    Pro SD and HD variants share a repository; for those the SD variant is returned.
    """
    return _BY_REPO.get(repo_id.strip().strip("/").lower())


# Short names people use for a family (the model card titles), each mapped to a sensible default:
# the SFT 5 s checkpoint of each video family, which the README recommends for general use.
ALIASES = {
    "kandinskylab/kandinsky-5.0-t2v-lite": "video-lite-5s-sft",
    "kandinskylab/kandinsky-5.0-i2v-lite": "video-lite-i2v-5s",
    "kandinskylab/kandinsky-5.0-t2v-pro": "video-pro-5s-sd",
    "kandinskylab/kandinsky-5.0-i2v-pro": "video-pro-i2v-5s-sd",
}


def resolve_model_name(name: str) -> Variant:
    """A variant from its name, an official or ``-Diffusers`` repo id, or a family short name."""
    if name in VARIANTS:
        return VARIANTS[name]
    by_repo = variant_for_repo(name)
    if by_repo is not None:
        return by_repo
    alias = ALIASES.get(name.strip().strip("/").lower())
    if alias is not None:
        logger.info("%s is a family name; using its default variant %s", name, alias)
        return VARIANTS[alias]
    return get_variant(name)  # raises with close matches


def variant_for_folder(folder: Path) -> Variant | None:
    """The variant whose official checkpoint file lies in ``folder/model/``, if exactly one matches."""
    names = {p.name for p in (folder / "model").glob("*.safetensors")}
    matches = {v.hub.filename for v in VARIANTS.values() if v.hub and Path(v.hub.filename).name in names}
    if len(matches) != 1:
        return None
    return next(v for v in VARIANTS.values() if v.hub and v.hub.filename in matches)
