"""End to end on tiny random components saved like real repositories: from_pretrained → generate → save.

Each task gets a tiny variant (a real variant with a tiny DiT and small default sizes) registered for
the test, and a folder in the diffusers layout or the official layout built with the real file names.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest
import torch

from kandinsky5 import variants
from kandinsky5.api import Kandinsky5ImageLite, Kandinsky5VideoLite
from kandinsky5.checkpoint import save_dit
from kandinsky5.config import DiTConfig
from kandinsky5.models import CrossDiT
from kandinsky5.variants import HubFiles
from tests.tiny_components import (
    CLIP_HIDDEN,
    QWEN_HIDDEN,
    save_tiny_clip,
    save_tiny_flux_vae,
    save_tiny_hunyuan_vae,
    save_tiny_qwen,
)

BASES = {"t2v": "video-lite-5s-sft", "i2v": "video-lite-i2v-5s", "t2i": "image-lite", "i2i": "image-lite-edit"}
NAMES = {
    "t2v": "video-lite-tiny-t2v",
    "i2v": "video-lite-tiny-i2v",
    "t2i": "image-lite-tiny",
    "i2i": "image-lite-tiny-edit",
}
SIZES = ((32, 32), (32, 48), (48, 32))


def tiny_variant(task: str) -> variants.Variant:
    base = variants.get_variant(BASES[task])
    dit = DiTConfig(
        model_dim=32, ff_dim=64, time_dim=16, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
        in_text_dim=QWEN_HIDDEN, in_text_dim2=CLIP_HIDDEN, visual_cond=task != "t2i",
    )  # fmt: skip
    frames = 9 if base.is_video else 1
    sampling = dataclasses.replace(base.sampling, num_inference_steps=2, height=32, width=32, num_frames=frames)
    hub = HubFiles(repo_id="tests/tiny", filename=f"model/tiny_{task}.safetensors")
    return dataclasses.replace(
        base, name=NAMES[task], dit=dit, sampling=sampling, hub=hub, resolutions=SIZES, size_multiple=16,
        text=dataclasses.replace(base.text, qwen_max_length=24),
    )  # fmt: skip


@pytest.fixture(scope="module")
def shared_parts(tmp_path_factory) -> Path:
    """Text encoders and VAEs, built once and copied into each repo folder."""
    parts = tmp_path_factory.mktemp("parts")
    save_tiny_qwen(parts / "qwen")
    save_tiny_clip(parts / "clip")
    save_tiny_hunyuan_vae(parts / "hunyuan")
    save_tiny_flux_vae(parts / "flux")
    return parts


def build_repo(root: Path, parts: Path, variant: variants.Variant, layout: str) -> Path:
    torch.manual_seed(0)
    dit = CrossDiT(variant.dit)
    for p in dit.parameters():
        p.data.normal_(0, 0.2)
    vae = parts / ("flux" if variant.vae == "flux" else "hunyuan") / "vae"
    if layout == "diffusers":
        save_dit(dit, root, layout="diffusers")
        for name, src in [("vae", vae), ("text_encoder", parts / "qwen"), ("tokenizer", parts / "qwen"),
                          ("text_encoder_2", parts / "clip"), ("tokenizer_2", parts / "clip")]:  # fmt: skip
            shutil.copytree(src, root / name)
    else:
        save_dit(dit, root / variant.hub.filename)
        shutil.copytree(vae, root / ("flux/vae" if variant.vae == "flux" else "vae"))
        shutil.copytree(parts / "qwen", root / "text_encoder")
        shutil.copytree(parts / "clip", root / "text_encoder2")
    return root


@pytest.fixture
def tiny(monkeypatch, tmp_path, shared_parts):
    """``tiny(task, layout)`` → (model class, variant name, repo folder)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def make(task: str, layout: str = "diffusers"):
        variant = tiny_variant(task)
        monkeypatch.setitem(variants.VARIANTS, variant.name, variant)
        repo = build_repo(tmp_path / f"{task}-{layout}", shared_parts, variant, layout)
        cls = Kandinsky5VideoLite if variant.is_video else Kandinsky5ImageLite
        return cls, variant.name, repo

    return make


def decode_mp4(path: Path) -> tuple[int, tuple[int, int], float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return len(frames), frames[0].shape[:2], float(stream.average_rate)


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_text_to_video_writes_the_asked_frames(tiny, tmp_path, layout):
    cls, name, repo = tiny("t2v", layout)
    model = cls.from_pretrained(repo, variant=name, device="cpu")
    video = model.generate("a red fox runs", num_frames=6, seed=3, progress=False)
    assert video.frames.shape == (6, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.metadata["seed"] == 3 and video.metadata["model"] == name
    out = video.save(tmp_path / "out.mp4")
    assert decode_mp4(out) == (6, (32, 32), 24.0)
    again = model.generate("a red fox runs", num_frames=6, seed=3, progress=False)
    assert np.array_equal(video.frames, again.frames), "a seed gives the same video"


def test_local_folder_finds_its_variant_from_the_checkpoint_name(tiny, tmp_path):
    cls, name, repo = tiny("t2v", "official")
    model = cls.from_pretrained(repo, device="cpu")
    assert model.variant.name == name


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_image_to_video_animates_the_given_image(tiny, tmp_path, layout):
    cls, name, repo = tiny("i2v", layout)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    image.save(tmp_path / "first.png")
    model = cls.from_pretrained(repo, variant=name, device="cpu")
    video = model.generate("the fox turns its head", image=tmp_path / "first.png", num_frames=5, progress=False)
    assert video.frames.shape[0] == 5
    assert video.frames.shape[1] % 16 == 0 and video.frames.shape[2] % 16 == 0
    with pytest.raises(ValueError, match="animates an image"):
        model.generate("no image given", progress=False)


@pytest.mark.parametrize("layout", ["diffusers", "official"])
@pytest.mark.parametrize("task", ["t2i", "i2i"])
def test_images_have_the_asked_size(tiny, tmp_path, task, layout):
    cls, name, repo = tiny(task, layout)
    model = cls.from_pretrained(repo, variant=name, device="cpu")
    source = PIL.Image.new("RGB", (50, 30), (200, 40, 40)) if task == "i2i" else None
    image = model.generate("a blue square", height=32, width=48, image=source, seed=1, progress=False)
    path = image.save(tmp_path / "out.png")
    with PIL.Image.open(path) as saved:
        assert saved.size == (48, 32)


def test_bad_requests_fail_before_any_work(tiny):
    cls, name, repo = tiny("t2v")
    model = cls.from_pretrained(repo, variant=name, device="cpu")
    with pytest.raises(ValueError, match="multiples of 16"):
        model.generate("x", height=40, progress=False)
    with pytest.raises(ValueError, match="num_frames must be"):
        model.generate("x", num_frames=0, progress=False)
    with pytest.raises(ValueError, match="takes text only"):
        model.generate("x", image=PIL.Image.new("RGB", (8, 8)), progress=False)
    with pytest.raises(ValueError, match=r"runs image-lite-\* variants"):
        Kandinsky5ImageLite.from_pretrained(repo, variant=name)


def test_model_offload_keeps_one_component_on_the_accelerator(tiny):
    """Trace where each component sits while each one runs; 'meta' stands in for the accelerator."""
    from kandinsky5.offload import Placement

    cls, name, repo = tiny("t2v")
    model = cls.from_pretrained(repo, variant=name, device="cpu")
    location: dict[str, str] = {}
    components = {"text_encoder": model.text_encoder, "dit": model.dit, "vae": model.vae}
    for key, component in components.items():
        component.to = lambda device, key=key: location.__setitem__(key, torch.device(device).type)
    model.placement = Placement(torch.device("meta"), offload=True)
    for component in components.values():
        model.placement.place(component)
    snapshots = []
    real_encode, real_forward, real_decode = model.text_encoder.encode, model.dit.forward, model.vae.decode
    model.text_encoder.encode = lambda *a, **k: (snapshots.append(("text", dict(location))), real_encode(*a, **k))[1]
    model.dit.forward = lambda *a, **k: (snapshots.append(("dit", dict(location))), real_forward(*a, **k))[1]
    model.vae.decode = lambda *a, **k: (snapshots.append(("vae", dict(location))), real_decode(*a, **k))[1]
    model.generate("a fox", num_frames=5, progress=False)
    running = {"text": "text_encoder", "dit": "dit", "vae": "vae"}
    for stage, where in snapshots:
        assert where[running[stage]] == "meta"
        assert all(place == "cpu" for key, place in where.items() if key != running[stage]), (stage, where)
    assert {stage for stage, _ in snapshots} == {"text", "dit", "vae"}
    assert set(location.values()) == {"cpu"}, "everything is back in host memory after the run"


def test_load_returns_the_family_class(tiny):
    import kandinsky5

    _, name, repo = tiny("t2i")
    assert type(kandinsky5.load(repo, variant=name, device="cpu")) is Kandinsky5ImageLite


def test_nabla_can_be_switched_on_and_reports_kept_blocks(tiny):
    from kandinsky5.config import NablaConfig

    cls, name, repo = tiny("t2v")
    model = cls.from_pretrained(repo, variant=name, device="cpu")
    kwargs = dict(height=128, width=128, num_frames=5, seed=2, progress=False)
    dense = model.generate("a fox", attention="dense", **kwargs)
    model.record_attention_stats = True
    full = model.generate("a fox", attention="nabla", nabla=NablaConfig(P=1.0), **kwargs)
    assert np.abs(dense.frames.astype(int) - full.frames.astype(int)).max() <= 1, "P = 1 keeps every block"
    assert len(model.last_attention.stats) == 2 * 2  # one record per layer per step (CFG runs as one batch)
    assert model.last_attention.stats_per_layer(model.dit.config.num_visual_blocks) == [1.0, 1.0]
    with pytest.raises(ValueError, match="128 pixels"):
        model.generate("a fox", attention="nabla", height=32, width=32, num_frames=5, progress=False)
