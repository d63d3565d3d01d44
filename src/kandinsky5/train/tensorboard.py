"""TensorBoard scalars beside ``metrics.csv`` (``tensorboard = true``): one point per logged row.

Needs the ``tensorboard`` package (the config check reports its absence before training starts). On
resume the events after the checkpoint step are purged, as ``metrics.csv`` is cut back, so a redone
step never shows twice.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TENSORBOARD", "TensorBoardLog"]

TENSORBOARD = "tensorboard"  # sub-folder of output_dir


class TensorBoardLog:
    """Scalars ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/it_per_s``, ``train/samples_per_s``."""

    def __init__(self, output_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        purge = resume_step + 1 if resume_step > 0 else None
        self._writer = SummaryWriter(str(output_dir / TENSORBOARD), purge_step=purge)

    def write(
        self, step: int, loss: float, lr: float, grad_norm: float | None, it_per_s: float, samples_per_s: float
    ) -> None:
        self._writer.add_scalar("train/loss", loss, step)
        self._writer.add_scalar("train/lr", lr, step)
        if grad_norm is not None:
            self._writer.add_scalar("train/grad_norm", grad_norm, step)
        self._writer.add_scalar("train/it_per_s", it_per_s, step)
        self._writer.add_scalar("train/samples_per_s", samples_per_s, step)

    def sync(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
