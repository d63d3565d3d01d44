"""kandinsky5: a fast, tested implementation of the Kandinsky 5.0 video and image models."""

from .config import DiTConfig, NablaConfig, SamplingDefaults

__version__ = "0.1.0"

__all__ = ["DiTConfig", "NablaConfig", "SamplingDefaults", "__version__"]
