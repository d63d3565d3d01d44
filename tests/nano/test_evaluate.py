"""What ``kandinsky5 eval`` holds a generation to (the grading itself is tested in test_detect.py)."""

import pytest

from kandinsky5.nano.evaluate import expectation
from kandinsky5.nano.world import ObjectSpec, dataset


@pytest.mark.parametrize(("task", "kind"), [("t2v", "video"), ("t2i", "image")])
def test_text_prompts_are_graded_on_what_they_name(task, kind):
    samples = list(dataset(60, seed=3, split="heldout", kind=kind))
    assert {"{bg}" in s.template for s in samples} == {True, False}
    for sample in samples:
        scene = expectation(sample, task)
        asked = tuple(ObjectSpec(o.shape, o.colour, o.motion if kind == "video" else None) for o in sample.objects)
        assert scene.objects == asked
        assert scene.background == (sample.background if "{bg}" in sample.template else None)


def test_image_to_video_is_graded_on_the_whole_clip():
    clip = next(iter(dataset(1, seed=3, split="heldout")))
    assert expectation(clip, "i2v") is clip
