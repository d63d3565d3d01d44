"""The shapes world: the synthetic clips and captions the nano model learns from.

A clip shows one or two flat shapes on a plain background, each doing one motion (left, right, up,
down, grow, shrink, still), with a caption drawn from many templates and synonyms. Everything is
numpy: shapes are drawn from signed distance functions with one pixel of analytic anti-aliasing, so
thousands of 64×64×17 clips are made per minute on one core. A seed fully determines a clip.

A held-out split keeps some (colour, shape, motion) combinations and some caption templates away from
training, so an evaluation can ask whether the model composes attributes it has seen separately.
The list orders below define that split: reordering ``COLOURS``, ``SHAPES`` or ``MOTIONS`` changes it.

Coordinates are in pixels, x to the right and y down, (0, 0) the top-left corner of the frame; the
centre of pixel (row i, column j) is (j + 0.5, i + 0.5). An object's ``size`` is the side of the
square its shape fills.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from ..media import Image, Video

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELDOUT_COMBINATIONS",
    "MIN_CONTRAST",
    "MOTIONS",
    "SHAPES",
    "TEMPLATES",
    "Clip",
    "ObjectSpec",
    "ObjectTrack",
    "Scene",
    "combination_split",
    "contrasts",
    "dataset",
    "parse_caption",
    "render",
    "sample_clip",
    "sample_image",
    "shape_coverage",
    "write_dataset",
]

logger = logging.getLogger(__name__)

Split = Literal["train", "heldout"]
Kind = Literal["video", "image"]
SeedLike = int | Sequence[int] | np.random.Generator
PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------

# Saturated colours at least ~100 apart in RGB, so the nearest name survives a lossy VAE.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 40),
    "orange": (250, 135, 15),
    "yellow": (245, 230, 50),
    "green": (40, 165, 60),
    "cyan": (40, 205, 225),
    "blue": (35, 70, 215),
    "purple": (135, 50, 190),
    "pink": (245, 130, 195),
    "white": (255, 255, 255),
    "black": (25, 25, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (128, 128, 128),
    "light blue": (170, 210, 245),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
MOTIONS = ("left", "right", "up", "down", "grow", "shrink", "still")
MIN_CONTRAST = 110.0  # RGB distance an object keeps from its background (rules out e.g. white on light blue)

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine"),
    "yellow": ("yellow", "golden"),
    "green": ("green", "emerald"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "blue": ("blue", "cobalt"),
    "purple": ("purple", "violet"),
    "pink": ("pink", "rose"),
    "white": ("white", "snow-white"),
    "black": ("black", "jet-black"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus", "lozenge"),
}
MOTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("moves to the left", "slides leftwards", "drifts left", "travels to the left", "glides left"),
    "right": ("moves to the right", "slides rightwards", "drifts right", "travels to the right", "glides right"),
    "up": ("moves up", "rises", "drifts upward", "floats upwards", "climbs", "travels up"),
    "down": ("moves down", "falls", "sinks", "drifts downward", "drops", "travels down"),
    "grow": ("grows", "gets bigger", "expands", "swells", "grows larger", "enlarges"),
    "shrink": ("shrinks", "gets smaller", "contracts", "dwindles", "becomes smaller"),
    "still": ("stays still", "does not move", "rests in place", "sits motionless", "stays put"),
}
BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "white": ("white", "plain white"),
    "black": ("black", "dark"),
    "grey": ("grey", "gray", "neutral grey"),
    "light blue": ("light blue", "pale blue", "sky-blue"),
}
BACKGROUND_NOUNS = ("background", "backdrop")
SMALL_WORDS = ("small", "little", "tiny")
LARGE_WORDS = ("big", "large")

# Caption templates. Slots: {obj}/{obj2} noun phrases ("a small crimson disc"), {motion}/{motion2}
# verb phrases ("slides rightwards"), {bg} ("a white backdrop"). The "heldout" templates are never
# used for training data.
TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "video": (
            "{obj} {motion}",
            "{obj} {motion} on {bg}",
            "on {bg}, {obj} {motion}",
            "{obj} {motion} against {bg}",
            "a video of {obj} that {motion}",
            "a clip of {obj} that {motion} on {bg}",
            "{bg} with {obj} that {motion}",
            "{obj} {motion} in front of {bg}",
        ),
        "video_pair": (
            "{obj} {motion} and {obj2} {motion2}",
            "{obj} {motion} while {obj2} {motion2}",
            "on {bg}, {obj} {motion} and {obj2} {motion2}",
            "{obj} {motion} while {obj2} {motion2}, on {bg}",
        ),
        "image": (
            "{obj}",
            "{obj} on {bg}",
            "on {bg}, {obj}",
            "a picture of {obj} against {bg}",
            "{bg} with {obj}",
        ),
        "image_pair": (
            "{obj} and {obj2}",
            "{obj} and {obj2} on {bg}",
            "on {bg}, {obj} and {obj2}",
        ),
    },
    "heldout": {
        "video": (
            "watch as {obj} {motion} over {bg}",
            "in this scene {obj} {motion}",
            "{bg} where {obj} {motion}",
        ),
        "video_pair": (
            "{obj} {motion}; meanwhile {obj2} {motion2}",
            "over {bg}, {obj} {motion} as {obj2} {motion2}",
        ),
        "image": (
            "an image showing {obj} over {bg}",
            "there is {obj} in this picture",
        ),
        "image_pair": (
            "{obj} beside {obj2}, over {bg}",
            "a picture with {obj} next to {obj2}",
        ),
    },
}


def combination_split(colour: str, shape: str, motion: str) -> Split:
    """Which split owns a (colour, shape, motion) combination.

    One in eight combinations is held out, by a fixed arithmetic rule on the list positions, chosen
    so that every (colour, shape) pair keeps all but at most one motion in training and every colour,
    shape and motion still appears in training.
    """
    c, s, m = list(COLOURS).index(colour), SHAPES.index(shape), MOTIONS.index(motion)
    return "heldout" if (c + 3 * s + 5 * m) % 8 == 0 else "train"


HELDOUT_COMBINATIONS: frozenset[tuple[str, str, str]] = frozenset(
    (c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS if combination_split(c, s, m) == "heldout"
)


def contrasts(colour: str, background: str) -> bool:
    """True if an object of ``colour`` stands out from ``background`` (RGB distance ≥ MIN_CONTRAST)."""
    diff = np.subtract(COLOURS[colour], BACKGROUNDS[background], dtype=np.float64)
    return float(np.sqrt((diff**2).sum())) >= MIN_CONTRAST


@functools.cache
def _allowed(split: Split, background: str, still_only: bool) -> tuple[tuple[str, str, str], ...]:
    motions = ("still",) if still_only else MOTIONS
    return tuple(
        (c, s, m)
        for c in COLOURS
        for s in SHAPES
        for m in motions
        if combination_split(c, s, m) == split and contrasts(c, background)
    )


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object; ``motion`` is None where the caption gives none."""

    shape: str
    colour: str
    motion: str | None


@dataclass(frozen=True)
class Scene:
    """What a caption says: its objects in order of mention and the background, if named."""

    objects: tuple[ObjectSpec, ...]
    background: str | None


@dataclass(frozen=True, eq=False)
class ObjectTrack:
    """Ground truth for one object: its attributes and where it is in every frame."""

    shape: str
    colour: str
    motion: str
    centres: np.ndarray  # (T, 2) float: x, y in pixels
    sizes: np.ndarray  # (T,) float: side of the square the shape fills, in pixels

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "motion": self.motion,
            "centres": np.round(self.centres, 2).tolist(),
            "sizes": np.round(self.sizes, 2).tolist(),
        }


@dataclass(frozen=True, eq=False)
class Clip:
    """One sample of the world: uint8 ``frames`` (T, H, W, 3), its caption and its ground truth.

    Images (``sample_image``) are clips with T = 1 whose objects are "still".
    """

    frames: np.ndarray
    caption: str
    objects: tuple[ObjectTrack, ...]
    background: str
    fps: float
    split: Split
    template: str

    def metadata(self) -> dict:
        """JSON-serialisable ground truth, stored in the sidecar of a saved clip."""
        return {
            "prompt": self.caption,
            "background": self.background,
            "split": self.split,
            "template": self.template,
            "objects": [obj.to_dict() for obj in self.objects],
        }

    def to_video(self) -> Video:
        """A :class:`kandinsky5.media.Video` with the ground truth as metadata."""
        from ..media import Video

        return Video(self.frames, self.fps, self.metadata())

    def to_image(self) -> Image:
        """The first frame as a :class:`kandinsky5.media.Image` with the ground truth as metadata."""
        from ..media import Image

        return Image(self.frames[0], self.metadata())


# --------------------------------------------------------------------------------------------------
# Drawing: signed distances in unit coordinates (the shape fills [-1, 1]²), one pixel of anti-aliasing
# --------------------------------------------------------------------------------------------------


def _fit_unit_box(points: list[tuple[float, float]]) -> np.ndarray:
    """Scale and centre a polygon so its bounding box's longer side spans [-1, 1]."""
    p = np.asarray(points, dtype=np.float64)
    lo, hi = p.min(axis=0), p.max(axis=0)
    return ((p - (lo + hi) / 2) * (2 / (hi - lo).max())).astype(np.float32)


def _star(points: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points  # first point straight up
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)  # chunky, so the arms survive a VAE
    return list(zip(radii * np.cos(angles), radii * np.sin(angles), strict=True))


def _cross(arm: float = 0.38) -> list[tuple[float, float]]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


_POLYGONS: dict[str, np.ndarray] = {
    "triangle": _fit_unit_box([(0, -1), (1, 1), (-1, 1)]),  # upright, apex at the top
    "star": _fit_unit_box(_star()),
    "cross": _fit_unit_box(_cross()),
    "diamond": _fit_unit_box([(0, -1), (1, 0), (0, 1), (-1, 0)]),
}


def _polygon_distance(vertices: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) from points (u, v) to a closed polygon (E, 2)."""
    a, b = vertices, np.roll(vertices, -1, axis=0)
    e = b - a  # (E, 2)
    pu, pv = u[..., None], v[..., None]  # (..., 1)
    wu, wv = pu - a[:, 0], pv - a[:, 1]  # (..., E)
    t = np.clip((wu * e[:, 0] + wv * e[:, 1]) / (e**2).sum(axis=1), 0.0, 1.0)
    dist2 = (wu - e[:, 0] * t) ** 2 + (wv - e[:, 1] * t) ** 2
    # even-odd rule: count edges crossed by a ray from the point towards +u
    straddles = (a[:, 1] > pv) != (b[:, 1] > pv)
    slope = e[:, 0] / np.where(e[:, 1] == 0, 1.0, e[:, 1])
    crosses = straddles & (pu < a[:, 0] + slope * (pv - a[:, 1]))
    inside = np.count_nonzero(crosses, axis=-1) % 2 == 1
    dist = np.sqrt(dist2.min(axis=-1))
    return np.where(inside, -dist, dist)


def _unit_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return np.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        qu, qv = np.abs(u) - 1.0, np.abs(v) - 1.0
        outside = np.sqrt(np.maximum(qu, 0.0) ** 2 + np.maximum(qv, 0.0) ** 2)
        return outside + np.minimum(np.maximum(qu, qv), 0.0)
    if shape in _POLYGONS:
        return _polygon_distance(_POLYGONS[shape], u, v)
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def shape_coverage(shape: str, xs: np.ndarray, ys: np.ndarray, centre: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Fraction of each pixel the shape covers, in [0, 1].

    ``xs`` and ``ys`` are pixel-centre coordinates broadcastable against each other, ``centre`` (..., 2)
    and ``size`` (...) broadcast against them after adding two trailing axes (one per frame, say).
    """
    half = np.asarray(size, dtype=np.float32)[..., None, None] / 2
    centre = np.asarray(centre, dtype=np.float32)
    u = (xs - centre[..., 0, None, None]) / half
    v = (ys - centre[..., 1, None, None]) / half
    u, v = np.broadcast_arrays(u, v)
    signed = _unit_distance(shape, u, v) * half  # pixels; the scale is uniform, so distances scale too
    return np.clip(0.5 - signed, 0.0, 1.0)


def render(objects: Sequence[ObjectTrack], background: str, height: int, width: int) -> np.ndarray:
    """Draw the objects over a plain background: uint8 frames (T, H, W, 3).

    Each object is rasterised only in a window around it, the same size in every frame, so one
    vectorised call draws it in all frames.
    """
    num_frames = len(objects[0].sizes)
    canvas = np.empty((num_frames, height, width, 3), dtype=np.float32)
    canvas[:] = BACKGROUNDS[background]
    for obj in objects:
        n = min(int(math.ceil(obj.sizes.max())) + 3, height, width)
        x0 = np.clip(np.floor(obj.centres[:, 0] - n / 2), 0, width - n).astype(int)  # (T,)
        y0 = np.clip(np.floor(obj.centres[:, 1] - n / 2), 0, height - n).astype(int)
        grid = np.arange(n, dtype=np.float32) + 0.5
        xs = (x0[:, None] + grid)[:, None, :]  # (T, 1, n)
        ys = (y0[:, None] + grid)[:, :, None]  # (T, n, 1)
        alpha = shape_coverage(obj.shape, xs, ys, obj.centres, obj.sizes)[..., None]  # (T, n, n, 1)
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        for t in range(num_frames):
            window = canvas[t, y0[t] : y0[t] + n, x0[t] : x0[t] + n]
            window += alpha[t] * (colour - window)
    return np.rint(canvas).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _generator(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, Sequence)):
        raise ValueError(f"seed must be an int, a sequence of ints or a numpy Generator, got {type(seed).__name__}")
    return np.random.default_rng(seed)


def _check_size(height: int, width: int, num_frames: int, video: bool) -> None:
    if height < 32 or width < 32:
        raise ValueError(f"height and width must be at least 32, got {height}x{width}; the default is 64x64")
    if video and (num_frames < 5 or num_frames % 4 != 1):
        k = max(1, round((num_frames - 1) / 4))
        raise ValueError(f"num_frames must be 4k+1 (k ≥ 1) for the causal video VAE, got {num_frames}; try {4 * k + 1}")


def _check_split(split: str) -> None:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def _sample_track(
    rng: np.random.Generator, motion: str, height: int, width: int, num_frames: int, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (T, 2) and sizes (T,) for one object that stays inside the frame with a margin.

    Moving objects travel at least a quarter of the shorter side over the clip (16 px at 64×64);
    growing and shrinking ones change size by 1.6-2× about a fixed centre.
    """
    side = min(height, width)
    margin = max(2.0, 0.04 * side)
    if motion in ("grow", "shrink"):
        small = rng.uniform(0.2, 0.26) * side * scale
        big = small * rng.uniform(1.6, 2.0)
        first, last = (small, big) if motion == "grow" else (big, small)
        extent = big
    else:
        first = last = extent = rng.uniform(0.24, 0.38) * side * scale
    low = margin + extent / 2
    start = np.array([rng.uniform(low, width - low), rng.uniform(low, height - low)])
    end = start.copy()
    if motion in ("left", "right", "up", "down"):
        axis = 0 if motion in ("left", "right") else 1
        room = (width, height)[axis] - 2 * low
        travel = rng.uniform(0.25 * side, min(0.6 * side, room))
        begin = rng.uniform(low, low + room - travel)
        start[axis], end[axis] = begin, begin + travel
        if motion in ("left", "up"):
            start[axis], end[axis] = end[axis], start[axis]
    steps = np.linspace(0.0, 1.0, num_frames)[:, None]
    centres = start + (end - start) * steps  # (T, 2)
    sizes = first + (last - first) * steps[:, 0]  # (T,)
    return centres, sizes


def _apart(a: ObjectTrack, b: ObjectTrack, gap: float) -> bool:
    """True if the objects' boxes stay at least ``gap`` pixels apart in every frame."""
    need = (a.sizes + b.sizes) / 2 + gap
    dx, dy = np.abs(a.centres - b.centres).T
    return bool(np.all((dx >= need) | (dy >= need)))


def _sample_objects(
    rng: np.random.Generator,
    split: Split,
    background: str,
    count: int,
    height: int,
    width: int,
    num_frames: int,
) -> tuple[ObjectTrack, ...]:
    allowed = _allowed(split, background, num_frames == 1)
    gap = max(4.0, 0.08 * min(height, width))
    scale = 1.0 if count == 1 else 0.85  # two objects need room to stay apart
    while True:
        objects: list[ObjectTrack] = []
        for _ in range(count):
            used = {obj.colour for obj in objects}  # distinct colours keep two-object captions unambiguous
            choices = [combo for combo in allowed if combo[0] not in used]
            colour, shape, motion = choices[rng.integers(len(choices))]
            for _attempt in range(50):
                centres, sizes = _sample_track(rng, motion, height, width, num_frames, scale)
                track = ObjectTrack(shape, colour, motion, centres, sizes)
                if all(_apart(track, other, gap) for other in objects):
                    objects.append(track)
                    break
            else:
                break  # no room left for this one: draw the whole scene again
        if len(objects) == count:
            return tuple(objects)


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    return words[rng.integers(len(words))]


def _noun_phrase(rng: np.random.Generator, obj: ObjectTrack, side: int) -> str:
    words = []
    if obj.motion not in ("grow", "shrink") and rng.random() < 0.3:
        if obj.sizes[0] < 0.26 * side:
            words.append(_pick(rng, SMALL_WORDS))
        elif obj.sizes[0] > 0.34 * side:
            words.append(_pick(rng, LARGE_WORDS))
    words += [_pick(rng, COLOUR_WORDS[obj.colour]), _pick(rng, SHAPE_WORDS[obj.shape])]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _caption(
    rng: np.random.Generator, split: Split, kind: Kind, objects: Sequence[ObjectTrack], background: str, side: int
) -> tuple[str, str]:
    """(caption, template) for a scene."""
    group = kind if len(objects) == 1 else f"{kind}_pair"
    template = _pick(rng, TEMPLATES[split][group])
    slots = {"bg": f"a {_pick(rng, BACKGROUND_WORDS[background])} {_pick(rng, BACKGROUND_NOUNS)}"}
    for i, obj in enumerate(objects):
        suffix = "" if i == 0 else str(i + 1)
        slots[f"obj{suffix}"] = _noun_phrase(rng, obj, side)
        slots[f"motion{suffix}"] = _pick(rng, MOTION_PHRASES[obj.motion])
    return template.format(**slots), template


def _sample(
    seed: SeedLike, split: Split, kind: Kind, height: int, width: int, num_frames: int, fps: float, num_objects
) -> Clip:
    _check_split(split)
    _check_size(height, width, num_frames, video=kind == "video")
    if num_objects not in (None, 1, 2):
        raise ValueError(f"num_objects must be 1, 2 or None (one or two at random), got {num_objects!r}")
    rng = _generator(seed)
    background = _pick(rng, tuple(BACKGROUNDS))
    count = num_objects or (2 if rng.random() < 0.3 else 1)
    objects = _sample_objects(rng, split, background, count, height, width, num_frames)
    caption, template = _caption(rng, split, kind, objects, background, min(height, width))
    frames = render(objects, background, height, width)
    return Clip(frames, caption, objects, background, float(fps), split, template)


def sample_clip(
    seed: SeedLike,
    *,
    split: Split = "train",
    height: int = 64,
    width: int = 64,
    num_frames: int = 17,
    fps: float = 8.0,
    num_objects: int | None = None,
) -> Clip:
    """One video clip of the world, fully determined by ``seed`` (an int, ints, or a numpy Generator).

    ``num_objects`` None picks one object (70 %) or two (30 %). In ``split="heldout"`` every object
    is a held-out (colour, shape, motion) combination and the caption uses a held-out template.
    """
    return _sample(seed, split, "video", height, width, num_frames, fps, num_objects)


def sample_image(
    seed: SeedLike,
    *,
    split: Split = "train",
    height: int = 64,
    width: int = 64,
    num_objects: int | None = None,
) -> Clip:
    """One still image of the world (a clip with T = 1), captioned without motion words."""
    return _sample(seed, split, "image", height, width, 1, 1.0, num_objects)


def dataset(n: int, seed: int = 0, split: Split = "train", kind: Kind = "video", **kwargs) -> Iterator[Clip]:
    """Yield ``n`` clips (or images with ``kind="image"``); clip i depends only on (seed, i).

    Extra keyword arguments go to :func:`sample_clip` / :func:`sample_image`.
    """
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    sample = sample_clip if kind == "video" else sample_image
    for i in range(n):
        yield sample((seed, i), split=split, **kwargs)


def write_dataset(
    folder: PathLike, n: int, seed: int = 0, split: Split = "train", kind: Kind = "video", **kwargs
) -> list[Path]:
    """Write ``n`` samples as ``000000.mp4`` (or ``.png``) + ``000000.txt`` caption pairs; return the media paths.

    Every media file also gets a JSON sidecar holding the ground truth (see :meth:`Clip.metadata`).
    All files are written atomically.
    """
    from ..atomic import atomic_write

    root = Path(folder).expanduser()
    suffix = ".mp4" if kind == "video" else ".png"
    written = []
    for i, clip in enumerate(dataset(n, seed, split, kind, **kwargs)):
        media = root / f"{i:06d}{suffix}"
        (clip.to_video() if kind == "video" else clip.to_image()).save(media)
        atomic_write(media.with_suffix(".txt"), lambda tmp, text=clip.caption: tmp.write_text(text + "\n"))
        written.append(media)
    logger.info("wrote %d %s samples (%s split) to %s", n, kind, split, root)
    return written


# --------------------------------------------------------------------------------------------------
# Reading captions back
# --------------------------------------------------------------------------------------------------


def _alternation(table: dict[str, tuple[str, ...]]) -> tuple[re.Pattern, dict[str, str]]:
    lookup = {word: name for name, words in table.items() for word in words}
    words = sorted(lookup, key=len, reverse=True)  # longest first: "grows larger" before "grows"
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b"), lookup


_BACKGROUND_RE, _BACKGROUND_LOOKUP = _alternation(BACKGROUND_WORDS)
_BACKGROUND_PHRASE = re.compile(_BACKGROUND_RE.pattern + r"\s+(?:" + "|".join(BACKGROUND_NOUNS) + r")\b")
_COLOUR_RE, _COLOUR_LOOKUP = _alternation(COLOUR_WORDS)
_SHAPE_RE, _SHAPE_LOOKUP = _alternation(SHAPE_WORDS)
# Single words users write ("a red circle moving left"); our own phrases are longer, so they match first.
_MOTION_KEYWORDS = {
    "left": ("left", "leftward", "leftwards"),
    "right": ("right", "rightward", "rightwards"),
    "up": ("up", "upward", "upwards", "rising"),
    "down": ("down", "downward", "downwards", "falling"),
    "grow": ("growing", "bigger", "larger", "expanding"),
    "shrink": ("shrinking", "smaller"),
    "still": ("still", "static", "motionless", "not moving"),
}
_MOTION_RE, _MOTION_LOOKUP = _alternation({m: MOTION_PHRASES[m] + _MOTION_KEYWORDS[m] for m in MOTIONS})


def parse_caption(caption: str) -> Scene:
    """Read the objects (colour, shape, motion) and background back from a caption in this world's words.

    The background phrase ("a white backdrop") is read first and removed, then colours, shapes and
    motions are paired in order of mention. Words the world does not know are ignored, so this reads
    our captions exactly and simple user prompts ("a red circle moves to the right") too.
    """
    text = caption.lower()
    background = None
    match = _BACKGROUND_PHRASE.search(text)
    if match:
        background = _BACKGROUND_LOOKUP[match.group(1)]
        text = text[: match.start()] + " " * (match.end() - match.start()) + text[match.end() :]
    colours = [_COLOUR_LOOKUP[m.group(1)] for m in _COLOUR_RE.finditer(text)]
    shapes = [_SHAPE_LOOKUP[m.group(1)] for m in _SHAPE_RE.finditer(text)]
    motions = [_MOTION_LOOKUP[m.group(1)] for m in _MOTION_RE.finditer(text)]
    count = min(len(colours), len(shapes))
    objects = tuple(ObjectSpec(shapes[i], colours[i], motions[i] if i < len(motions) else None) for i in range(count))
    return Scene(objects, background)
