"""Shared helpers for the model tests: a tiny DiT config and fully random weights.

The official initialisation zeroes every modulation layer and the output projection, so a freshly
built DiT ignores its visual blocks (all gates are 0) and predicts a constant. Tests that compare
two implementations or two token orders must randomise *every* tensor, or they prove nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kandinsky5.config import DiTConfig


def _tiny_config(**overrides) -> DiTConfig:
    """model_dim 32 (2 heads of 16 = 4 + 6 + 6 RoPE dims), two text and two visual blocks."""
    fields = dict(
        model_dim=32,
        ff_dim=64,
        time_dim=16,
        num_text_blocks=2,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
        patch_size=(1, 2, 2),
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=24,
        in_text_dim2=12,
        visual_cond=True,
    )
    fields.update(overrides)
    return DiTConfig(**fields)


def _random_state_dict(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the keys and shapes of ``model`` and random, non-zero fp32 values.

    Matrices get std 1/sqrt(fan_in) (activations stay O(1) through the blocks), norm weights
    1 ± 0.2, biases N(0, 0.2²). Modulation layers are included, so gates, shifts and scales are O(1).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        shape = value.shape
        if value.ndim == 2:
            tensor = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        elif key.endswith("norm.weight"):
            tensor = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            tensor = 0.2 * torch.randn(shape, generator=gen)
        out[key] = tensor
    return out


def _assert_no_zero_parameter(model: nn.Module) -> None:
    zero = [name for name, p in model.named_parameters() if not bool(p.detach().any())]
    assert not zero, f"parameters left all-zero (the test would not exercise them): {zero}"


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., DiTConfig]:
    """Factory: ``tiny_config(visual_cond=False, ...)`` → a small DiTConfig."""
    return _tiny_config


@pytest.fixture(scope="session")
def random_state_dict() -> Callable[..., dict[str, torch.Tensor]]:
    """Factory: ``random_state_dict(model, seed)`` → random weights for every key of ``model``."""
    return _random_state_dict


@pytest.fixture(scope="session")
def assert_no_zero_parameter() -> Callable[[nn.Module], None]:
    return _assert_no_zero_parameter


@pytest.fixture(autouse=True)
def single_thread():
    """Run the tiny model tests on one intra-op thread, restored afterwards.

    The tensors here are a few kB: with two OpenMP threads on a busy two-core machine the threads
    wait on each other and the files run 5× slower, with identical results.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
