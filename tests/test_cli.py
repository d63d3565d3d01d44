"""The ``kandinsky5`` command line: through ``main`` and through a fresh interpreter."""

from __future__ import annotations

import os
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
