"""Detectors that read a shapes-world video back: background, and each object's colour, shape and motion.

They grade what the nano model generates: ``grade(frames, expected)`` says, attribute by attribute,
whether the video shows what the caption asked for. numpy only, a few milliseconds per 64×64×17 clip.

How a clip is read:

1. Background: the median of the border pixels (objects never touch the border).
2. Segmentation: pixels farther than ``threshold`` (RGB distance) from the background, split into
   4-connected components in every frame; components too small to be an object are dropped.
3. Tracking: the ``num_objects`` largest components per frame, linked from frame to frame by the
   nearest centroid. Frames where objects merge or vanish are skipped.
4. Colour: the median of each object's most saturated pixels (its core, away from blurred edges),
   named by the nearest colour of the palette.
5. Coverage: each pixel's fraction of object colour, from its position between the background and
   object colours. Area, centroid and silhouette come from it, so they do not depend on ``threshold``.
6. Shape: in every frame, the silhouette inside its bounding box, resampled to a 16×16 grid and
   compared with the same picture of every shape, drawn sharp and blurred; the shape with the least
   error, averaged over frames weighted by area, wins. Shapes in the world are upright, so the
   box-normalised silhouette is a direct, blur-tolerant feature: it carries the fill ratio (circle
   0.79, square 1, triangle and diamond 0.5, cross 0.62, star 0.43) and where the mass sits (a
   triangle's at the bottom, a diamond's in the middle).
7. Motion: straight lines fitted to the centroid and log-size over time. Size changing by 1.25× or
   more is grow/shrink; otherwise a displacement of 10 % of the shorter side or more is left, right,
   up or down along its larger axis; anything less is still.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .world import BACKGROUNDS, COLOURS, SHAPES, Clip, Scene, parse_caption, shape_coverage

__all__ = [
    "DetectedObject",
    "Detection",
    "classify_motion",
    "degrade",
    "detect",
    "estimate_background",
    "evaluate",
    "grade",
    "nearest_name",
]

GRID = 16  # side of the normalised silhouette
GROWTH_THRESHOLD = 1.25  # size ratio over the clip that counts as grow/shrink (the world uses ≥ 1.6)
TRAVEL_THRESHOLD = 0.1  # displacement, as a fraction of the shorter side, that counts as moving (world: ≥ 0.25)
BORDER = 2  # pixels of frame border used to estimate the background


@dataclass(frozen=True, eq=False)
class DetectedObject:
    """One object found in a clip."""

    colour: str
    shape: str
    motion: str
    rgb: np.ndarray  # (3,) float: median colour of the object's core
    centres: np.ndarray  # (T, 2) float: x, y of the coverage-weighted centroid; NaN where not found
    sizes: np.ndarray  # (T,) float: sqrt of the covered area in pixels; NaN where not found
    shape_errors: dict[str, float]  # mean squared silhouette difference to each shape; smallest wins


@dataclass(frozen=True, eq=False)
class Detection:
    """What :func:`detect` read from a clip; ``objects`` ordered left to right in their first frame."""

    background: str
    background_rgb: np.ndarray  # (3,) float
    objects: tuple[DetectedObject, ...]
    count: int  # the most common number of objects in a frame (``objects`` may hold fewer if asked to)


# --------------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------------


def nearest_name(rgb: Sequence[float] | np.ndarray, palette: Mapping[str, Sequence[int]] = COLOURS) -> str:
    """The palette name nearest (RGB distance) to ``rgb``."""
    names = list(palette)
    table = np.asarray([palette[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((table - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


def estimate_background(frames: np.ndarray) -> np.ndarray:
    """Median RGB (3,) of the outer ``BORDER`` pixels of every frame."""
    border = np.ones(frames.shape[1:3], dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    return np.median(frames[:, border].reshape(-1, 3), axis=0).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# Segmentation and tracking
# --------------------------------------------------------------------------------------------------


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of every frame of ``mask`` (T, H, W) bool: int labels, 0 for background.

    Each pixel starts with its own flat index + 1; labels spread to the maximum over neighbours, and
    pointer jumping (a pixel takes the label of the pixel its label names) makes it converge in a
    few dozen vectorised steps. Labels are unique across frames.
    """
    flat = np.where(mask.ravel(), np.arange(1, mask.size + 1, dtype=np.int32), 0)
    labels = flat.reshape(mask.shape)
    while True:
        grown = labels.copy()
        np.maximum(grown[:, 1:], labels[:, :-1], out=grown[:, 1:])
        np.maximum(grown[:, :-1], labels[:, 1:], out=grown[:, :-1])
        np.maximum(grown[:, :, 1:], labels[:, :, :-1], out=grown[:, :, 1:])
        np.maximum(grown[:, :, :-1], labels[:, :, 1:], out=grown[:, :, :-1])
        grown = np.where(mask, grown, 0)
        pointed = grown.ravel()
        jumped = np.where(pointed > 0, pointed[np.maximum(pointed - 1, 0)], 0)
        grown = np.maximum(pointed, jumped).reshape(mask.shape)
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _track(labels: np.ndarray, count: int | None, min_area: float) -> tuple[list[list[int | None]], int]:
    """Per object, its component label in every frame (None where the frame is skipped); and the most
    common non-zero number of components in a frame."""
    num_frames, height, width = labels.shape
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    keep = areas >= min_area
    ids, areas = ids[keep], areas[keep]
    frame_of = (ids - 1) // (height * width)
    per_frame = [ids[frame_of == t][np.argsort(-areas[frame_of == t], kind="stable")] for t in range(num_frames)]
    counts = np.bincount([len(p) for p in per_frame])
    typical = int(np.argmax(counts[1:]) + 1) if len(counts) > 1 else 0
    count = min(typical if count is None else count, len(counts) - 1)  # never more than any frame shows
    if count <= 0:
        return [], typical
    ys, xs = np.divmod(np.arange(labels.size) % (height * width), width)
    flat = labels.ravel()
    counts = np.maximum(np.bincount(flat, minlength=labels.size + 1), 1)
    sum_x, sum_y = np.bincount(flat, xs, labels.size + 1), np.bincount(flat, ys, labels.size + 1)

    def centroid(label: int) -> np.ndarray:
        return np.array([sum_x[label], sum_y[label]]) / counts[label]

    tracks: list[list[int | None]] = [[None] * num_frames for _ in range(count)]
    last: list[np.ndarray] | None = None
    for t, found in enumerate(per_frame):
        if len(found) < count:
            continue  # an object merged with another or vanished: skip the frame
        found = found[:count]
        points = [centroid(label) for label in found]
        if last is None:
            order = sorted(range(count), key=lambda i: (points[i][0], points[i][1]))
        else:
            order = min(
                itertools.permutations(range(count)),
                key=lambda perm: sum(np.hypot(*(points[j] - last[i])) for i, j in enumerate(perm)),
            )
        for i, j in enumerate(order):
            tracks[i][t] = int(found[j])
        last = [points[j] for j in order]
    return tracks, typical


# --------------------------------------------------------------------------------------------------
# Shape
# --------------------------------------------------------------------------------------------------


def _box(solid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last True index along the last axis of (F, n) ``solid``."""
    n = solid.shape[1]
    return np.argmax(solid, axis=1), n - 1 - np.argmax(solid[:, ::-1], axis=1)


def _silhouettes(coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's coverage inside the bounding box of its ≥ 0.5 part, resampled bilinearly to a grid.

    ``coverage`` (F, h, w) → silhouettes (F, GRID, GRID) and which frames had any ≥ 0.5 pixel (F,).
    """
    solid = coverage >= 0.5
    rows, cols = solid.any(axis=2), solid.any(axis=1)  # (F, h), (F, w)
    found = rows.any(axis=1)

    def samples(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        extent = (hi - lo + 1)[:, None]  # (F, 1)
        pos = np.clip((np.arange(GRID) + 0.5) * extent / GRID - 0.5, 0, extent - 1)  # (F, GRID) in the box
        low = np.floor(pos).astype(int)
        return lo[:, None] + low, lo[:, None] + np.minimum(low + 1, extent - 1), pos - low

    y0, y1, wy = samples(*_box(rows))
    x0, x1, wx = samples(*_box(cols))
    f = np.arange(len(coverage))[:, None, None]
    wy, wx = wy[:, :, None], wx[:, None, :]
    top = coverage[f, y0[:, :, None], x0[:, None, :]] * (1 - wx) + coverage[f, y0[:, :, None], x1[:, None, :]] * wx
    bottom = coverage[f, y1[:, :, None], x0[:, None, :]] * (1 - wx) + coverage[f, y1[:, :, None], x1[:, None, :]] * wx
    return top * (1 - wy) + bottom * wy, found


def _gaussian_blur(x: np.ndarray, sigma: float, axes: tuple[int, ...]) -> np.ndarray:
    """Separable Gaussian blur of float ``x`` along ``axes``, edges repeated, as one matrix product per axis."""
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    taps /= taps.sum()
    for axis in axes:
        n = x.shape[axis]
        kernel = np.zeros((n, n), dtype=np.float32)  # kernel[i, j]: weight of input j in output i
        rows = np.repeat(np.arange(n), len(offsets))
        np.add.at(kernel, (rows, np.clip(rows + np.tile(offsets, n), 0, n - 1)), np.tile(taps, n))
        x = np.moveaxis(np.moveaxis(x, axis, -1) @ kernel.T, -1, axis)
    return x


@functools.cache
def _shape_templates() -> tuple[tuple[str, ...], np.ndarray]:
    """(shape of each template, silhouettes (N, GRID, GRID)), drawn by the world's own rasteriser.

    Each shape is drawn 32 px wide and blurred by 0-16 % of its size: a small object seen through a
    lossy decoder loses its corners and thin arms, and should still match its own shape best.
    """
    grid = np.arange(64, dtype=np.float32) + 0.5
    names, silhouettes = [], []
    for shape in SHAPES:
        sharp = shape_coverage(shape, grid[None, :], grid[:, None], np.array([32.0, 32.0]), np.array(32.0))
        for ratio in (0.0, 0.04, 0.08, 0.12, 0.16):
            coverage = _gaussian_blur(sharp, 32 * ratio, (0, 1)) if ratio else sharp
            names.append(shape)
            silhouettes.append(_silhouettes(coverage[None])[0][0])
    return tuple(names), np.stack(silhouettes)


def _classify_shape(frames: np.ndarray, weights: np.ndarray) -> tuple[str, dict[str, float]]:
    """Average over frames (weighted) of each shape's best template error; the smallest wins.

    ``frames`` are silhouettes (F, GRID, GRID), ``weights`` (F,).
    """
    names, templates = _shape_templates()
    errors = ((frames[:, None] - templates[None]) ** 2).mean(axis=(2, 3))  # (F, N)
    per_shape = np.stack([errors[:, [i for i, n in enumerate(names) if n == s]].min(axis=1) for s in SHAPES], 1)
    total = np.average(per_shape, axis=0, weights=weights)  # (S,)
    scores = {s: float(e) for s, e in zip(SHAPES, total, strict=True)}
    return min(scores, key=scores.get), scores


# --------------------------------------------------------------------------------------------------
# Motion
# --------------------------------------------------------------------------------------------------


def classify_motion(centres: np.ndarray, sizes: np.ndarray, frame_side: float) -> str:
    """left/right/up/down/grow/shrink/still from centroids (T, 2) and sizes (T,); NaN entries skipped."""
    found = np.isfinite(sizes) & np.isfinite(centres).all(axis=1) & (sizes > 0)
    if found.sum() < 2:
        return "still"
    t = np.flatnonzero(found).astype(np.float64)
    span = len(sizes) - 1

    def change(values: np.ndarray) -> float:  # fitted change over the whole clip
        return float(np.polyfit(t, values, 1)[0] * span)

    growth = np.exp(change(np.log(sizes[found])))
    if growth >= GROWTH_THRESHOLD:
        return "grow"
    if growth <= 1 / GROWTH_THRESHOLD:
        return "shrink"
    dx, dy = change(centres[found, 0]), change(centres[found, 1])
    if max(abs(dx), abs(dy)) < TRAVEL_THRESHOLD * frame_side:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------


def _measure(
    masks: np.ndarray, pixels: np.ndarray, offset: np.ndarray, distance: np.ndarray, bg: np.ndarray, side: int
) -> DetectedObject | None:
    """Colour, shape and motion of one tracked object, given its pixels in every frame (T, h, w)."""
    if not masks.any():
        return None
    dist = distance[masks]
    core = dist >= 0.8 * np.percentile(dist, 95)  # away from blurred edges
    rgb = np.median(pixels[masks][core], axis=0).astype(np.float64)
    direction = (rgb - bg) / max(float(((rgb - bg) ** 2).sum()), 1e-6)
    coverage = np.clip(offset @ direction.astype(np.float32), 0.0, 1.0) * masks  # (T, h, w)
    area = coverage.sum(axis=(1, 2))  # (T,)
    found = area > 0
    if not found.any():
        return None
    ys, xs = np.arange(masks.shape[1]) + 0.5, np.arange(masks.shape[2]) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        centres = np.stack([coverage.sum(axis=1) @ xs, coverage.sum(axis=2) @ ys], axis=1) / area[:, None]  # (T, 2)
    centres[~found] = np.nan
    sizes = np.where(found, np.sqrt(area), np.nan)
    silhouettes, solid = _silhouettes(coverage)
    if not solid.any():
        return None
    shape, errors = _classify_shape(silhouettes[solid], area[solid])
    motion = classify_motion(centres, sizes, side) if len(masks) > 1 else "still"
    return DetectedObject(nearest_name(rgb), shape, motion, rgb, centres, sizes, errors)


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim == 3:
        frames = frames[None]  # one image (H, W, 3)
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape[1:3]) <= 2 * BORDER:
        raise ValueError(f"frames must have shape (T, H, W, 3) or (H, W, 3), got {frames.shape}")
    return frames


def detect(
    frames: np.ndarray,
    *,
    num_objects: int | None = None,
    background: str | Sequence[float] | None = None,
    threshold: float = 40.0,
) -> Detection:
    """Find the objects in uint8 ``frames`` (T, H, W, 3) or one image (H, W, 3).

    Args:
        num_objects: how many objects to look for; None takes the most common count over frames.
        background: a name from ``BACKGROUNDS`` or an RGB triple; None estimates it from the border.
        threshold: RGB distance from the background above which a pixel may belong to an object. The
            world keeps objects at least ``MIN_CONTRAST`` (110) away from their background.
    """
    frames = _check_frames(frames)
    num_frames, height, width, _ = frames.shape
    if isinstance(background, str):
        if background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; choose from {', '.join(BACKGROUNDS)}")
        bg = np.asarray(BACKGROUNDS[background], dtype=np.float64)
    else:
        bg = estimate_background(frames) if background is None else np.asarray(background, dtype=np.float64)
    pixels = frames.astype(np.float32)
    offset = pixels - bg.astype(np.float32)  # (T, H, W, 3)
    distance = np.sqrt((offset**2).sum(axis=-1))  # (T, H, W)
    mask = distance > threshold
    rows, cols = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    objects, count = [], 0
    if rows.size:  # work inside the box that holds every object in every frame
        top, left = rows[0], cols[0]
        window = np.s_[:, top : rows[-1] + 1, left : cols[-1] + 1]
        labels = _components(mask[window])
        tracks, count = _track(labels, num_objects, min_area=max(4.0, 0.002 * height * width))
        for track in tracks:
            masks = np.stack([labels[t] == (label or -1) for t, label in enumerate(track)])  # -1: not found
            found = _measure(masks, pixels[window], offset[window], distance[window], bg, min(height, width))
            if found is not None:
                found.centres[:] += (left, top)
                objects.append(found)
    return Detection(nearest_name(bg, BACKGROUNDS), bg, tuple(objects), count)


# --------------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------------

ATTRIBUTES = ("colour", "shape", "motion")


def grade(frames: np.ndarray, expected: Clip | Scene | str, *, detection: Detection | None = None) -> dict[str, bool]:
    """Check a generated video against what was asked, attribute by attribute.

    ``expected`` is a world :class:`Clip` (its ground truth), a :class:`Scene`, or a caption, read with
    :func:`parse_caption`. Returns ``count`` (as many objects seen as asked for), ``background`` (only
    when the expectation names one), ``colour``, ``shape`` and ``motion`` (only for videos whose
    expectation gives motions); an attribute is correct when every object has it right, with detected
    objects matched to expected ones in the way that agrees best.
    """
    if isinstance(expected, str):
        expected = parse_caption(expected)
    wanted = expected.objects
    if not wanted:
        raise ValueError("the expectation names no object; a caption needs a colour and a shape, e.g. 'a red circle'")
    if detection is None:
        detection = detect(frames, num_objects=len(wanted))
    found = list(detection.objects)
    grade_motion = _check_frames(frames).shape[0] > 1 and all(obj.motion is not None for obj in wanted)
    attributes = ATTRIBUTES if grade_motion else ATTRIBUTES[:2]

    def agreement(pairs: Iterable[tuple[object, DetectedObject | None]]) -> list[dict[str, bool]]:
        return [{a: d is not None and getattr(d, a) == getattr(w, a) for a in attributes} for w, d in pairs]

    slots: list[DetectedObject | None] = found + [None] * max(0, len(wanted) - len(found))
    best = max(
        (agreement(zip(wanted, perm, strict=False)) for perm in itertools.permutations(slots, len(wanted))),
        key=lambda rows: (sum(r["colour"] for r in rows), sum(sum(r.values()) for r in rows)),
    )
    result = {"count": detection.count == len(wanted)}
    if expected.background is not None:
        result["background"] = detection.background == expected.background
    for a in attributes:
        result[a] = all(row[a] for row in best)
    return result


def evaluate(
    clips: Iterable[Clip], transform: Callable[[np.ndarray, int], np.ndarray] | None = None
) -> dict[str, float]:
    """Mean of :func:`grade` over world clips (the fraction correct per attribute).

    ``transform(frames, index)`` may alter each clip first, e.g. ``lambda f, i: degrade(f, seed=i)``.
    """
    totals: dict[str, list[bool]] = {}
    for i, clip in enumerate(clips):
        frames = clip.frames if transform is None else transform(clip.frames, i)
        for key, ok in grade(frames, clip).items():
            totals.setdefault(key, []).append(ok)
    return {key: float(np.mean(oks)) for key, oks in totals.items()}


def degrade(
    frames: np.ndarray,
    seed: int | np.random.Generator = 0,
    *,
    blur: float = 1.0,
    noise: float = 6.0,
    colour_shift: float = 15.0,
) -> np.ndarray:
    """Roughly what a small lossy VAE does to a clip: Gaussian blur, colour shift and noise.

    ``blur`` is the blur's standard deviation in pixels, ``noise`` the per-channel noise's standard
    deviation, ``colour_shift`` the largest per-channel offset (one random offset and a gain within
    ±8 % per channel for the whole clip). Returns new uint8 frames of the same shape.
    """
    rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
    x = frames.astype(np.float32)
    if blur > 0:
        x = _gaussian_blur(x, blur, (1, 2))
    x *= rng.uniform(0.92, 1.08, size=3).astype(np.float32)  # gain per channel
    x += rng.uniform(-colour_shift, colour_shift, size=3).astype(np.float32)  # offset per channel
    x += noise * rng.standard_normal(size=x.shape, dtype=np.float32)
    np.clip(x, 0, 255, out=x)
    return np.rint(x, out=x).astype(np.uint8)
