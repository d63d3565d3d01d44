"""Training of the Kandinsky 5 DiT with flow matching on cached latents (docs/training.md).

One concern per module: ``config`` (TrainConfig, load_config), ``loss`` (timesteps and the velocity
loss), ``data`` (latent cache, dataset, bucket sampler), ``encode`` (media folder → cache),
``checkpointing`` (atomic, pickle-free checkpoints) and ``trainer`` (the loop, ``train``).
"""

from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config
from .data import BucketSampler, CacheError, DataItem, EncodedVideo, LatentDataset, build_cache
from .loss import flow_matching_loss, sample_timesteps
from .trainer import TrainResult, main_train, train

__all__ = [
    "BucketSampler",
    "CacheError",
    "ConfigError",
    "DataItem",
    "EncodedVideo",
    "LatentDataset",
    "TrainConfig",
    "TrainResult",
    "build_cache",
    "flow_matching_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "main_train",
    "sample_timesteps",
    "save_checkpoint",
    "train",
]
