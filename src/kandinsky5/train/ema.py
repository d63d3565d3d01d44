"""An exponential moving average of the trainable weights: ``ema ← decay·ema + (1 − decay)·weight``.

The average is kept in fp32 beside the model, one tensor per trainable parameter, keyed by parameter
name. Under FSDP the parameters are sharded DTensors and so are their averages: every rank averages its
own shard, and the distributed checkpoint saves and reshards them like the weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Moving averages of ``model``'s trainable parameters (taken at construction, by name).

    ``update()`` after each optimizer step; ``applied()`` puts the averages into the model for a
    block of code (validation, export) and restores the trained weights after it.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}; typical values are 0.999 to 0.9999")
        self.decay = decay
        self._params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().float().clone() for name, p in self._params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self._params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (the live tensors: loading into them restores the EMA)."""
        return self.shadow

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; the trained ones come back after."""
        with torch.no_grad():
            saved = {name: p.detach().clone() for name, p in self._params.items()}
            for name, p in self._params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self._params.items():
                    p.copy_(saved[name])
