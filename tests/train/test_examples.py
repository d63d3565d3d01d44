"""The example training configs in examples/train/ load and pass every check (nothing is trained)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kandinsky5.train import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "train"


def test_the_documented_examples_exist():
    assert {path.name for path in EXAMPLES.glob("*.toml")} >= {"nano.toml", "lite-lora.toml", "lite-full.toml"}
    docs = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text(encoding="utf-8")
    for path in EXAMPLES.glob("*.toml"):
        assert f"examples/train/{path.name}" in docs


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*")), ids=lambda path: path.name)
def test_every_example_loads(path: Path):
    config = load_config(path)
    assert config.variant is not None  # each example fine-tunes a registered variant


def test_what_the_examples_promise():
    nano = load_config(EXAMPLES / "nano.toml")
    assert nano.model == "nano" and nano.init == "pretrained" and nano.validation_size == (64, 64)
    lora = load_config(EXAMPLES / "lite-lora.toml")
    assert lora.model == "video-lite-5s-sft" and lora.lora_rank == 16
    full = load_config(EXAMPLES / "lite-full.toml")
    assert full.lora_rank == 0 and full.gradient_checkpointing and full.ema_decay and full.validation_prompts
