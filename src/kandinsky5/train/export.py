"""The result of a finished run, in the forms the rest of the package (and diffusers) load.

``output_dir/final/`` holds, for a LoRA run::

    lora.safetensors                        diffusers Kandinsky 5 LoRA format: generate(lora=...), --lora,
                                            Kandinsky5T2VPipeline.load_lora_weights

and for a full fine-tune, the DiT in both layouts ``load_transformer`` reads (docs/loading.md)::

    official/model.safetensors              official key names; load_transformer(path, variant=...)
    diffusers/transformer/config.json       diffusers layout with its config: load_transformer(folder)
    diffusers/transformer/diffusion_pytorch_model*.safetensors   needs no variant

Every file is written atomically; exporting again replaces the files.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from ..checkpoint import save_dit
from ..lora import save_lora
from .config import TrainConfig

__all__ = ["FINAL", "export_final", "final_files"]

logger = logging.getLogger(__name__)

FINAL = "final"  # sub-folder of output_dir


def final_files(config: TrainConfig) -> list[Path]:
    """The files ``export_final`` writes for ``config`` (the weight files and the diffusers config)."""
    root = Path(config.output_dir) / FINAL
    if config.lora_rank:
        return [root / "lora.safetensors"]
    return [root / "official" / "model.safetensors", root / "diffusers" / "transformer" / "config.json"]


def export_final(model: nn.Module, config: TrainConfig) -> Path:
    """Write the trained LoRA or the full DiT (in the dtype it trained in) under ``output_dir/final``.

    ``model`` is the whole DiT in one process (gathered first under FSDP). Returns the folder.
    """
    root = Path(config.output_dir) / FINAL
    if config.lora_rank:
        description = {
            "rank": config.lora_rank,
            "alpha": config.resolved_lora_alpha,
            "alpha_folded_into_lora_B": True,
            "targets": list(config.lora_targets),
            "base": config.model if isinstance(config.model, str) else "custom",
        }
        save_lora(model, root / "lora.safetensors", description)
    else:
        save_dit(model, root / "official" / "model.safetensors", layout="official")
        save_dit(model, root / "diffusers", layout="diffusers")
    logger.info("exported the trained %s to %s", "LoRA" if config.lora_rank else "DiT", root)
    return root
