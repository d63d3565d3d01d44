"""The ``kandinsky5`` command line: through ``main`` and through a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kandinsky5.cli import main
from kandinsky5.variants import list_variants

SRC = Path(__file__).resolve().parents[1] / "src"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "kandinsky5.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_models_lists_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "task", "DiT"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == [v.name for v in list_variants()]


def test_models_shows_sizes_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    main(["models"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["video-lite-5s-sft"][1:8] == ["t2v", "2.01B", "512x768", "121", "50", "5", "5"]
    assert rows["video-lite-10s-distilled"][5:7] == ["16", "1"]
    assert rows["video-pro-10s-hd"][2:4] == ["19.31B", "768x1280"]
    assert rows["video-pro-10s-hd"][-2:] == ["nabla", "P=0.7"]
    assert rows["image-lite-edit"][1:4] == ["i2i", "6.02B", "1024x1024"]


def test_models_filters_by_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--task", "i2v"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names == [v.name for v in list_variants() if v.task == "i2v"] and names


def test_help_through_main(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "models" in out and "examples:" in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: kandinsky5" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_help_in_a_fresh_interpreter_does_not_import_torch() -> None:
    code = "import sys; from kandinsky5.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_python_dash_m_help() -> None:
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    assert "kandinsky5 models" in result.stdout


def test_python_dash_m_models() -> None:
    result = _run("models")
    assert result.returncode == 0, result.stderr
    assert "video-pro-i2v-5s-hd" in result.stdout


@pytest.mark.skipif(shutil.which("kandinsky5") is None, reason="package not installed (no console script)")
def test_installed_entry_point() -> None:
    result = subprocess.run(["kandinsky5", "models"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "image-lite" in result.stdout


# --------------------------------------------------------------------------------------------------
# generate and download: bad requests through a fresh interpreter
# --------------------------------------------------------------------------------------------------


def _run_in(folder: Path, *args: str, hf_home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m kandinsky5.cli ARGS`` in ``folder``, offline, with an empty Hugging Face cache."""
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home or folder / ".hf")}
    return subprocess.run(
        [sys.executable, "-m", "kandinsky5.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=folder,
        timeout=120,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "not-an-image.png").write_text("hello")
    return folder


BAD_REQUESTS = {
    "size not a multiple": (["-m", "video-lite-5s-sft", "--size", "770x512"], ["multiples of 16", "768x512"]),
    "size format": (["-m", "video-lite-5s-sft", "--size", "768by512"], ["--size", "WIDTHxHEIGHT"]),
    "size multiple under NABLA": (["-m", "video-lite-10s-sft", "--size", "768x528"], ["multiples of 128"]),
    "zero frames": (["-m", "video-lite-5s-sft", "--frames", "0"], ["num_frames", "from 1 to 121", "got 0"]),
    "too many frames": (["-m", "video-lite-5s-sft", "--frames", "122"], ["num_frames", "from 1 to 121", "got 122"]),
    "too many seconds": (["-m", "video-lite-5s-sft", "--seconds", "6"], ["from 1 to 121", "got 145"]),
    "frames and seconds": (["-m", "video-lite-5s-sft", "--frames", "9", "--seconds", "1"], ["not allowed with"]),
    "frames of an image": (["-m", "image-lite", "--frames", "5"], ["makes images"]),
    "unknown model": (["-m", "video-lite-5s-stf"], ["unknown model", "video-lite-5s-sft", "kandinsky5 models"]),
    "unknown repo": (["-m", "someone/some-model"], ["unknown model", "--variant"]),
    "missing folder": (["-m", "./weights/lite"], ["no such folder", "weights/lite"]),
    "unknown --variant": (["-m", "video-lite-5s-sft", "--variant", "video-lite-5s"], ["unknown variant"]),
    "missing image": (["-m", "video-lite-i2v-5s", "--image", "cat.jpg"], ["--image cat.jpg", "not found"]),
    "not an image": (["-m", "video-lite-i2v-5s", "--image", "not-an-image.png"], ["not an image"]),
    "no image for i2v": (["-m", "video-lite-i2v-5s"], ["animates an image", "--image"]),
    "image for t2v": (
        ["-m", "video-lite-5s-sft", "--image", "not-an-image.png"],
        ["takes text only", "image-to-video"],
    ),
    "video suffix for an image": (["-m", "image-lite", "-o", "out.mp4"], ["unsupported suffix .mp4", ".png"]),
    "unsupported suffix": (["-m", "video-lite-5s-sft", "-o", "out.avi"], ["unsupported suffix .avi", ".mp4"]),
    "folder under a file": (["-m", "video-lite-5s-sft", "-o", "not-an-image.png/out.mp4"], ["cannot create folder"]),
    "zero steps": (["-m", "video-lite-5s-sft", "--steps", "0"], ["num_inference_steps", ">= 1"]),
}


@pytest.mark.parametrize("args, words", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_generate_request_is_one_line_and_leaves_nothing(out_dir: Path, args: list[str], words: list[str]) -> None:
    before = sorted(os.listdir(out_dir))
    result = _run_in(out_dir, "generate", "a red fox", *args)
    _assert_one_line_error(result, *words)
    assert sorted(os.listdir(out_dir)) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_output_folder_not_writable(out_dir: Path) -> None:
    locked = out_dir / "locked"
    locked.mkdir(mode=0o500)
    result = _run_in(out_dir, "generate", "a red fox", "-m", "video-lite-5s-sft", "-o", "locked/out.mp4")
    _assert_one_line_error(result, "cannot write to", "permission denied")
    assert os.listdir(locked) == []


def test_existing_output_is_not_replaced_without_overwrite(out_dir: Path) -> None:
    (out_dir / "taken.mp4").write_bytes(b"earlier result")
    result = _run_in(out_dir, "generate", "a red fox", "-m", "video-lite-5s-sft", "-o", "taken.mp4")
    _assert_one_line_error(result, "taken.mp4 already exists", "--overwrite")
    assert (out_dir / "taken.mp4").read_bytes() == b"earlier result"


def test_missing_weights_offline_say_how_to_get_them(out_dir: Path, tmp_path: Path) -> None:
    hf_home = tmp_path / "empty-hf-home"
    hf_home.mkdir()
    before = sorted(os.listdir(out_dir))
    result = _run_in(out_dir, "generate", "a red fox", "-m", "video-lite-5s-sft", "-o", "fox.mp4", hf_home=hf_home)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]  # INFO lines about what is being resolved come first
    assert last.startswith("kandinsky5: error:") and "kandinsky5 download video-lite-5s-sft" in last
    assert "model/kandinsky5lite_t2v_sft_5s.safetensors" in last
    assert sorted(os.listdir(out_dir)) == before

    result = _run_in(out_dir, "download", "video-lite-5s-sft", hf_home=hf_home)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "kandinsky5 download video-lite-5s-sft" in result.stderr.strip().splitlines()[-1]


def test_generate_help_teaches_by_example() -> None:
    result = _run("generate", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "examples:" in text and "--offload" in text and "--image cat.jpg" in text and ".png" in text
    assert 'kandinsky5 generate "a red fox runs through fresh snow"\n' in text  # the default model
    assert "kandinskylab/Kandinsky-5.0-T2V-Lite" in text


def test_missing_default_model_asks_for_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from kandinsky5 import cli

    monkeypatch.setattr(cli, "DEFAULT_MODEL", "not-registered-yet")
    assert main(["generate", "a red fox"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'not-registered-yet'" in err and "-m MODEL" in err


# --------------------------------------------------------------------------------------------------
# Small pieces: seconds to frames, file names from prompts
# --------------------------------------------------------------------------------------------------


def test_seconds_count_the_first_frame() -> None:
    from kandinsky5.cli import _num_frames
    from kandinsky5.variants import get_variant

    assert _num_frames(get_variant("video-lite-5s-sft"), None, 5) == 121
    assert _num_frames(get_variant("video-lite-10s-sft"), None, 10) == 241
    assert _num_frames(get_variant("video-lite-5s-sft"), None, 0.5) == 13
    assert _num_frames(get_variant("video-lite-5s-sft"), 7, None) == 7
    assert _num_frames(get_variant("video-lite-5s-sft"), None, None) is None


def test_file_names_from_prompts() -> None:
    from kandinsky5.cli import _slug

    assert _slug("A red fox, running through fresh snow at dawn!") == "a-red-fox-running-through-fresh-snow-at"
    assert len(_slug("word " * 30)) <= 40
    assert _slug("Рыжая лиса бежит по снегу") == "рыжая-лиса-бежит-по-снегу"
    assert _slug("x" * 50) == "x" * 40
    assert _slug("!!!") == "kandinsky5"


# --------------------------------------------------------------------------------------------------
# Whole runs on tiny random models (see tests/test_generate.py for how they are built)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_components import save_tiny_clip, save_tiny_flux_vae, save_tiny_hunyuan_vae, save_tiny_qwen

    parts = tmp_path_factory.mktemp("parts")
    save_tiny_qwen(parts / "qwen")
    save_tiny_clip(parts / "clip")
    save_tiny_hunyuan_vae(parts / "hunyuan")
    save_tiny_flux_vae(parts / "flux")
    return parts


@pytest.fixture
def tiny_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_parts: Path):
    """``tiny_repo(task, layout)`` → (variant name, repo folder), the variant registered for this test."""
    from kandinsky5 import variants
    from tests.test_generate import build_repo, tiny_variant

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def make(task: str, layout: str = "official") -> tuple[str, Path]:
        variant = tiny_variant(task)
        monkeypatch.setitem(variants.VARIANTS, variant.name, variant)
        return variant.name, build_repo(tmp_path / f"repo-{task}-{layout}", tiny_parts, variant, layout)

    return make


def _decode(path: Path) -> tuple[int, tuple[int, int], float]:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return len(frames), frames[0].shape[:2], float(stream.average_rate)


def test_generate_writes_the_video_and_says_where(tiny_repo, tmp_path, capsys) -> None:
    name, repo = tiny_repo("t2v", "diffusers")
    out = tmp_path / "clips" / "fox.mp4"
    argv = ["generate", "a red fox runs", "-m", str(repo), "--variant", name, "-o", str(out)]
    assert main([*argv, "--frames", "6", "--size", "48x32", "--seed", "3", "--device", "cpu", "--steps", "1"]) == 0
    captured = capsys.readouterr()
    assert _decode(out) == (6, (32, 48), 24.0)
    assert json.loads(out.with_name("fox.mp4.json").read_text())["seed"] == 3
    last = captured.out.strip().splitlines()[-1]
    assert re.fullmatch(rf"saved {re.escape(str(out))} \(6 frames, 48x32, 24 fps\) in \d+\.\d s", last), last
    assert "denoise" in captured.err, "the progress bar goes to stderr"


def test_generate_names_the_file_after_the_prompt(tiny_repo, tmp_path, monkeypatch, capsys) -> None:
    name, repo = tiny_repo("t2v")  # official layout: the folder says which variant it holds
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "A red fox runs!", "-m", str(repo), "--seconds", "0.25", "--device", "cpu"]
    for expected, more in [
        ("a-red-fox-runs.mp4", []),
        ("a-red-fox-runs-2.mp4", []),
        ("a-red-fox-runs.mp4", ["--overwrite"]),
    ]:
        assert main([*argv, *more]) == 0
        assert capsys.readouterr().out.startswith(f"saved {expected} (7 frames, 32x32, 24 fps)")
        assert _decode(tmp_path / expected)[0] == 7
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == ["a-red-fox-runs-2.mp4", "a-red-fox-runs.mp4"]


def test_generate_an_image(tiny_repo, tmp_path, capsys) -> None:
    import PIL.Image

    name, repo = tiny_repo("t2i")
    out = tmp_path / "square.png"
    argv = ["generate", "a blue square", "-m", str(repo), "--variant", name, "-o", str(out), "--size", "48x32"]
    assert main(argv) == 0
    with PIL.Image.open(out) as image:
        assert image.size == (48, 32)
    assert re.fullmatch(rf"saved {re.escape(str(out))} \(48x32\) in \d+\.\d s", capsys.readouterr().out.strip())


def test_size_must_fit_the_model_before_loading(tiny_repo, tmp_path, monkeypatch, capsys) -> None:
    import kandinsky5.api

    name, repo = tiny_repo("t2v")
    monkeypatch.setattr(kandinsky5.api, "load", lambda *a, **k: pytest.fail("loaded weights for a bad request"))
    out = tmp_path / "x.mp4"
    assert main(["generate", "a fox", "-m", str(repo), "--size", "40x32", "-o", str(out)]) == 2
    assert "multiples of 16" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_download_to_a_folder_that_generate_reads(tiny_repo, tmp_path, monkeypatch, capsys, layout) -> None:
    """The Hub is stood in for by a tiny repo folder; ``--to`` must give a folder ``generate -m`` runs."""
    from kandinsky5 import hub

    name, repo = tiny_repo("t2v", layout)
    real = hub.resolve_pipeline_files
    asked = []

    def from_the_tiny_repo(source, variant, **kwargs):
        asked.append(str(source))
        return real(source if Path(source).is_dir() else repo, variant, **kwargs)

    monkeypatch.setattr(hub, "resolve_pipeline_files", from_the_tiny_repo)
    model = name if layout == "official" else "someone/tiny-Diffusers"
    target = tmp_path / "weights"
    assert main(["download", model, "--variant", name, "--to", str(target)]) == 0
    assert asked[0] == ("tests/tiny" if layout == "official" else "someone/tiny-Diffusers")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"{name}: every file is in {target}")
    if layout == "official":
        dit = target / "model" / "tiny_t2v.safetensors"
        assert dit.samefile(repo / "model" / "tiny_t2v.safetensors"), "hard-linked, not copied"
        assert (target / "text_encoder2" / "config.json").is_file()
        variant_args: list[str] = []  # the official layout names the variant through its file
    else:
        assert (target / "transformer" / "config.json").is_file() and (target / "tokenizer_2").is_dir()
        variant_args = ["--variant", name]
    out = tmp_path / "fox.mp4"
    assert main(["generate", "a fox", "-m", str(target), *variant_args, "-o", str(out), "--frames", "1"]) == 0
    assert _decode(out)[0] == 1


def test_train_reports_a_bad_config_in_one_line(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model = "video-lite-5s-sft"\nlearning_rate_typo = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "kandinsky5.cli", "train", str(config)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "learning_rate_typo" in result.stderr and "Traceback" not in result.stderr
