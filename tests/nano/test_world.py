"""The shapes world: determinism, variety, captions that say what the clip shows, geometry, held-out split."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from kandinsky5.nano import world
from kandinsky5.nano.world import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COMBINATIONS,
    MOTIONS,
    SHAPES,
    TEMPLATES,
    ObjectSpec,
    Scene,
    contrasts,
    dataset,
    parse_caption,
    sample_clip,
    sample_image,
    write_dataset,
)


@pytest.fixture(scope="module")
def clips():
    return list(dataset(300, seed=1))


@pytest.fixture(scope="module")
def heldout_clips():
    return list(dataset(100, seed=2, split="heldout"))


@pytest.fixture(scope="module")
def images():
    return list(dataset(100, seed=3, kind="image")) + list(dataset(50, seed=4, split="heldout", kind="image"))


# --------------------------------------------------------------------------------------------------
# Determinism and variety
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_clip():
    a, b = sample_clip(7), sample_clip(7)
    assert np.array_equal(a.frames, b.frames)
    assert a.caption == b.caption
    assert [o.to_dict() for o in a.objects] == [o.to_dict() for o in b.objects]
    c = sample_clip(np.random.default_rng(7))  # a Generator seeded alike gives the same draws
    assert c.caption == a.caption and np.array_equal(c.frames, a.frames)
    assert not np.array_equal(sample_clip(8).frames, a.frames)


def test_dataset_items_depend_only_on_seed_and_index():
    items = list(dataset(3, seed=5))
    again = sample_clip((5, 2))
    assert items[2].caption == again.caption and np.array_equal(items[2].frames, again.frames)
    assert len({clip.caption for clip in items}) == 3


def test_clip_format(clips, images):
    clip = clips[0]
    assert clip.frames.shape == (17, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == 8.0
    assert images[0].frames.shape == (1, 64, 64, 3)
    custom = sample_clip(0, height=48, width=96, num_frames=9, fps=4)
    assert custom.frames.shape == (9, 48, 96, 3) and custom.fps == 4.0
    assert all(obj.centres.shape == (9, 2) and obj.sizes.shape == (9,) for obj in custom.objects)


def test_every_attribute_appears(clips, images):
    objects = [obj for clip in clips for obj in clip.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.motion for o in objects} == set(MOTIONS)
    assert {clip.background for clip in clips} == set(BACKGROUNDS)
    assert {len(clip.objects) for clip in clips} == {1, 2}
    assert {clip.template for clip in clips} == set(TEMPLATES["train"]["video"] + TEMPLATES["train"]["video_pair"])
    assert len({clip.caption for clip in clips}) > 0.9 * len(clips)
    assert {o.motion for clip in images for o in clip.objects} == {"still"}
    assert len(SHAPES) >= 5 and len(COLOURS) >= 8 and len(MOTIONS) >= 6


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def test_caption_names_every_attribute(clips, heldout_clips):
    for clip in clips + heldout_clips:
        scene = parse_caption(clip.caption)
        expected = tuple(ObjectSpec(o.shape, o.colour, o.motion) for o in clip.objects)
        assert scene.objects == expected, clip.caption
        assert scene.background == (clip.background if "{bg}" in clip.template else None), clip.caption


def test_image_captions_have_no_motion(images):
    for clip in images:
        scene = parse_caption(clip.caption)
        assert scene.objects == tuple(ObjectSpec(o.shape, o.colour, None) for o in clip.objects), clip.caption


def test_two_object_captions_join_clauses(clips):
    pairs = [clip for clip in clips if len(clip.objects) == 2]
    assert pairs and all(" and " in c.caption or " while " in c.caption for c in pairs)


def test_parse_user_prompt():
    assert parse_caption("A red circle moves to the right") == Scene((ObjectSpec("circle", "red", "right"),), None)
    scene = parse_caption("on a black backdrop, a small white star drifts upward")
    assert scene == Scene((ObjectSpec("star", "white", "up"),), "black")
    scene = parse_caption("a green square moving left and a pink dot growing")
    assert scene.objects == (ObjectSpec("square", "green", "left"), ObjectSpec("circle", "pink", "grow"))


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


def test_objects_stay_inside_the_frame(clips, heldout_clips, images):
    for clip in clips + heldout_clips + images:
        _, height, width, _ = clip.frames.shape
        for obj in clip.objects:
            half = obj.sizes[:, None] / 2
            assert np.all(obj.centres - half >= 2) and np.all(obj.centres[:, 0] + half[:, 0] <= width - 2)
            assert np.all(obj.centres[:, 1] + half[:, 0] <= height - 2)
        border = np.ones((height, width), bool)
        border[2:-2, 2:-2] = False
        assert np.all(clip.frames[:, border] == BACKGROUNDS[clip.background])  # nothing drawn on the border


def test_motions_are_large_enough(clips):
    for clip in clips:
        for obj in clip.objects:
            travel = obj.centres[-1] - obj.centres[0]
            ratio = obj.sizes[-1] / obj.sizes[0]
            if obj.motion in ("left", "right", "up", "down"):
                axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[obj.motion]
                assert sign * travel[axis] >= 12 and travel[1 - axis] == 0
                assert ratio == 1
            else:
                assert np.all(travel == 0)
                if obj.motion == "grow":
                    assert ratio >= 1.5
                elif obj.motion == "shrink":
                    assert ratio <= 1 / 1.5
                else:
                    assert ratio == 1


def test_objects_contrast_and_stay_apart(clips, heldout_clips, images):
    for clip in clips + heldout_clips + images:
        assert all(contrasts(obj.colour, clip.background) for obj in clip.objects)
        if len(clip.objects) == 2:
            a, b = clip.objects
            assert a.colour != b.colour
            need = (a.sizes + b.sizes) / 2
            dx, dy = np.abs(a.centres - b.centres).T
            assert np.all((dx >= need + 4) | (dy >= need + 4))


@pytest.mark.parametrize("shape, area", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5), ("diamond", 0.5)])
def test_drawn_area_matches_the_shape(shape, area):
    grid = np.arange(64, dtype=np.float32) + 0.5
    coverage = world.shape_coverage(shape, grid[None, :], grid[:, None], np.array([32.0, 32.0]), np.array(40.0))
    assert coverage.sum() == pytest.approx(area * 40**2, rel=0.01)


# --------------------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------------------


def test_heldout_combinations_leave_every_attribute_in_training():
    train = {(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS} - HELDOUT_COMBINATIONS
    assert 0.08 < len(HELDOUT_COMBINATIONS) / (len(train) + len(HELDOUT_COMBINATIONS)) < 0.2
    for i, values in enumerate((COLOURS, SHAPES, MOTIONS)):
        assert {combo[i] for combo in train} == set(values)
        assert {combo[i] for combo in HELDOUT_COMBINATIONS} == set(values)


def test_template_sets_are_disjoint():
    train = {t for group in TEMPLATES["train"].values() for t in group}
    heldout = {t for group in TEMPLATES["heldout"].values() for t in group}
    assert train and heldout and not train & heldout
    assert TEMPLATES["train"].keys() == TEMPLATES["heldout"].keys()


def test_splits_never_overlap(clips, heldout_clips, images):
    for clip in clips + heldout_clips + images:
        kind = "video" if clip.frames.shape[0] > 1 else "image"
        group = kind if len(clip.objects) == 1 else f"{kind}_pair"
        assert clip.template in TEMPLATES[clip.split][group]
        for obj in clip.objects:
            assert ((obj.colour, obj.shape, obj.motion) in HELDOUT_COMBINATIONS) == (clip.split == "heldout")
    assert {clip.split for clip in heldout_clips} == {"heldout"}


# --------------------------------------------------------------------------------------------------
# Inputs and files
# --------------------------------------------------------------------------------------------------


def test_bad_arguments_say_what_to_change():
    with pytest.raises(ValueError, match="try 17"):
        sample_clip(0, num_frames=16)
    with pytest.raises(ValueError, match="'train' or 'heldout'"):
        sample_clip(0, split="test")
    with pytest.raises(ValueError, match="at least 32"):
        sample_image(0, height=16)
    with pytest.raises(ValueError, match="num_objects"):
        sample_clip(0, num_objects=3)


def test_write_dataset(tmp_path):
    videos = write_dataset(tmp_path / "videos", 2, seed=9)
    assert [p.name for p in videos] == ["000000.mp4", "000001.mp4"]
    clip = sample_clip((9, 1))
    assert videos[1].with_suffix(".txt").read_text() == clip.caption + "\n"
    sidecar = json.loads(videos[1].with_name("000001.mp4.json").read_text())
    assert sidecar["prompt"] == clip.caption and sidecar["objects"][0]["shape"] == clip.objects[0].shape
    with av.open(str(videos[1])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 17
    images = write_dataset(tmp_path / "images", 1, seed=9, kind="image")
    assert images[0].name == "000000.png" and images[0].with_suffix(".txt").exists()
