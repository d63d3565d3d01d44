"""kandinsky5: a fast, tested implementation of the Kandinsky 5.0 video and image models.

Heavy modules (torch and friends) load on first use, so ``kandinsky5 --help`` stays instant.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "DiTConfig": "kandinsky5.config",
    "NablaConfig": "kandinsky5.config",
    "SamplingDefaults": "kandinsky5.config",
    "get_variant": "kandinsky5.variants",
    "list_variants": "kandinsky5.variants",
    "load_transformer": "kandinsky5.api",
    "load": "kandinsky5.api",
    "Kandinsky5VideoLite": "kandinsky5.api",
    "Kandinsky5VideoPro": "kandinsky5.api",
    "Kandinsky5ImageLite": "kandinsky5.api",
    "Kandinsky5Nano": "kandinsky5.api",
    "Video": "kandinsky5.media",
    "Image": "kandinsky5.media",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kandinsky5' has no attribute {name!r}")
