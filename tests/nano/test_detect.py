"""The detectors read the world's own clips back: near-perfect on ground truth, robust to VAE-like damage."""

from __future__ import annotations

import numpy as np
import pytest

from kandinsky5.nano.detect import classify_motion, degrade, detect, estimate_background, evaluate, grade
from kandinsky5.nano.world import BACKGROUNDS, dataset, sample_clip, sample_image


@pytest.fixture(scope="module")
def single():
    return list(dataset(120, seed=11, num_objects=1)) + list(dataset(40, seed=12, split="heldout", num_objects=1))


@pytest.fixture(scope="module")
def pairs():
    return list(dataset(60, seed=13, num_objects=2)) + list(dataset(20, seed=14, split="heldout", num_objects=2))


def _vae_like(frames: np.ndarray, index: int) -> np.ndarray:
    return degrade(frames, seed=index)


def _assert_at_least(scores: dict[str, float], bound: float) -> None:
    assert set(scores) == {"count", "background", "colour", "shape", "motion"}
    assert all(value >= bound for value in scores.values()), scores


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


def test_ground_truth_single_object(single):
    _assert_at_least(evaluate(single), 0.99)


def test_ground_truth_two_objects(pairs):
    _assert_at_least(evaluate(pairs), 0.99)


def test_ground_truth_images():
    images = list(dataset(60, seed=15, kind="image"))
    scores = evaluate(images)
    assert set(scores) == {"count", "background", "colour", "shape"}  # no motion in a still image
    assert all(value >= 0.99 for value in scores.values()), scores


def test_degraded_single_object(single):
    _assert_at_least(evaluate(single, _vae_like), 0.95)


def test_degraded_two_objects(pairs):
    _assert_at_least(evaluate(pairs, _vae_like), 0.95)


# --------------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------------


def test_grade_from_caption():
    clip = sample_clip(21, num_objects=1)
    assert all(grade(clip.frames, clip.caption).values())


def test_grade_catches_wrong_attributes():
    clip = sample_clip(22, num_objects=1)
    obj = clip.objects[0]
    colour = "blue" if obj.colour != "blue" else "red"
    shape = "star" if obj.shape != "star" else "circle"
    motion = "up" if obj.motion != "up" else "down"
    background = "grey" if clip.background != "grey" else "white"
    result = grade(
        clip.frames, f"a {colour} {shape} {dict(up='rises', down='falls')[motion]} on a {background} background"
    )
    assert result == {"count": True, "background": False, "colour": False, "shape": False, "motion": False}


def test_grade_counts_missing_objects():
    clip = sample_clip(23, num_objects=1)
    obj = clip.objects[0]
    result = grade(clip.frames, f"a {obj.colour} {obj.shape} and a tiny black dot")
    assert not result["count"] and not result["colour"]
    pair = sample_clip(24, num_objects=2)
    first = pair.objects[0]
    assert not grade(pair.frames, f"a {first.colour} {first.shape}")["count"]  # one object too many
    empty = np.full((17, 64, 64, 3), 255, np.uint8)
    assert grade(empty, "a red circle moves to the right") == {
        "count": False,
        "colour": False,
        "shape": False,
        "motion": False,
    }


def test_grade_needs_an_object():
    with pytest.raises(ValueError, match="names no object"):
        grade(sample_clip(0).frames, "something happens")


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------


def test_detect_reports_tracks():
    clip = sample_clip(31, num_objects=2)
    found = detect(clip.frames)
    assert found.background == clip.background
    assert len(found.objects) == 2
    for obj in clip.objects:  # each object's centroid follows its ground-truth centre to within a pixel or two
        nearest = min(found.objects, key=lambda d: np.abs(d.centres - obj.centres).mean())
        assert nearest.colour == obj.colour
        if obj.shape in ("circle", "square", "cross", "diamond"):  # symmetric: centroid = box centre
            assert np.abs(nearest.centres - obj.centres).max() < 1.0


def test_detect_an_image():
    clip = sample_image(32, num_objects=1)
    found = detect(clip.frames[0])
    assert [(o.colour, o.shape, o.motion) for o in found.objects] == [
        (clip.objects[0].colour, clip.objects[0].shape, "still")
    ]


def test_detect_with_a_named_background():
    clip = sample_clip(33, num_objects=1)
    assert detect(clip.frames, background=clip.background).objects[0].colour == clip.objects[0].colour


def test_estimate_background():
    for name, rgb in BACKGROUNDS.items():
        frames = np.broadcast_to(np.array(rgb, np.uint8), (3, 40, 40, 3)).copy()
        frames[:, 10:30, 10:30] = (255, 0, 0)
        assert np.array_equal(estimate_background(frames), rgb), name


@pytest.mark.parametrize(
    "dx, dy, growth, motion",
    [(10, 0, 1, "right"), (-10, 1, 1, "left"), (1, -10, 1, "up"), (0, 10, 1, "down"), (0, 0, 1.6, "grow"),
     (3, 0, 0.6, "shrink"), (3, -3, 1.1, "still")],
)  # fmt: skip
def test_classify_motion(dx, dy, growth, motion):
    t = np.linspace(0, 1, 17)
    centres = np.stack([30 + dx * t, 30 + dy * t], axis=1)
    sizes = 15 * growth**t
    centres[5] = np.nan  # a frame where the object was not found
    assert classify_motion(centres, sizes, 64) == motion


def test_bad_frames():
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((17, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        detect(np.zeros((17, 64, 64), np.uint8))
