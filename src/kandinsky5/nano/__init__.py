"""nano: a tiny Kandinsky 5 trained on a synthetic shapes world, and the detectors that grade what it makes.

``world`` makes the clips, images and captions (numpy only); ``detect`` reads a video back and grades it
against a caption or a clip's ground truth. See docs/nano.md. The function ``detect`` is not
re-exported here, so that ``kandinsky5.nano.detect`` stays the module: use
``from kandinsky5.nano.detect import detect``.
"""

from .detect import DetectedObject, Detection, degrade, evaluate, grade
from .world import (
    Clip,
    ObjectSpec,
    ObjectTrack,
    Scene,
    dataset,
    parse_caption,
    sample_clip,
    sample_image,
    write_dataset,
)

__all__ = [
    "Clip",
    "DetectedObject",
    "Detection",
    "ObjectSpec",
    "ObjectTrack",
    "Scene",
    "dataset",
    "degrade",
    "evaluate",
    "grade",
    "parse_caption",
    "sample_clip",
    "sample_image",
    "write_dataset",
]
