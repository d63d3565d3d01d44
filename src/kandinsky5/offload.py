"""Where each pipeline component lives: all on the accelerator, or each only while it runs.

Model offload keeps every component in host memory and moves one at a time to the accelerator
(text encoder → DiT → VAE), so peak accelerator memory is the largest component, not their sum.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

__all__ = ["Movable", "Placement"]

logger = logging.getLogger(__name__)

HOST = torch.device("cpu")


class Movable(Protocol):
    def to(self, device: torch.device) -> object: ...


class Placement:
    """Moves components to ``device`` for their turn when ``offload`` is on; otherwise keeps them there."""

    def __init__(self, device: torch.device, offload: bool = False):
        self.device = device
        self.offload = offload

    def place(self, component: Movable) -> None:
        """Initial placement: the accelerator, or host memory when offloading."""
        component.to(HOST if self.offload else self.device)

    @contextmanager
    def use(self, component: Movable) -> Iterator[None]:
        """Run a block with ``component`` on the accelerator; with offload, move it back afterwards."""
        if not self.offload:
            yield
            return
        component.to(self.device)
        try:
            yield
        finally:
            component.to(HOST)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
