"""Does nano's DiT read each word of the prompt? Its denoising error with one word swapped, over the true one.

Generated clips only say that an attribute came out wrong; this says which words the DiT ignores.
Held-out clips with one moving object are encoded and noised to t; the DiT predicts the clean latent
once from the true caption ("a red circle moves to the right") and once from a caption with one word
swapped: the colour, the shape, the axis of the motion (right → down) or only its direction (right →
left, grow → shrink). The ratio of the two errors is 1.00 for a word the DiT does not read, and larger
the more it relies on it. A DiT that reads a motion's axis but not its direction draws the object moving
along the right line, backwards half the time (docs/nano.md has the shipped weights' table).

:func:`binding` asks the same of two-object clips, where every word can be read and still be bound to
the wrong object: "a red circle moves up and a blue square moves down" against the same caption with the
two colours (shapes, motions) exchanged. The words are the same, so a DiT that reads the caption as a bag
of words scores 1.00; only one that ties each colour to its own object scores more.
"""

from __future__ import annotations

import numpy as np
import torch

from ..media import vae_input_from_frames
from ..pipeline import Conditioning, PromptEmbeddings, dit_velocity
from .world import COLOUR_WORDS, COLOURS, MOTION_PHRASES, SHAPE_WORDS, SHAPES, Clip, dataset

__all__ = ["EXCHANGES", "PROBE_TIMESTEPS", "SWAPS", "binding", "word_use"]

PROBE_TIMESTEPS = (0.7, 0.8, 0.9)  # where the layout is still open, and what the caption says decides it
SWAPS = ("colour", "shape", "motion axis", "motion direction")
EXCHANGES = ("colours", "shapes", "motions")  # between the two objects of a clip
_REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}
_COLOUR_ORDER = tuple(COLOURS)
_OTHER_AXIS = {"left": "up", "right": "down", "up": "left", "down": "right", "grow": "left", "shrink": "right"}


def _caption(clip: Clip, swap: str | None) -> str:
    obj = clip.objects[0]
    colour, shape, motion = obj.colour, obj.shape, obj.motion
    if swap == "colour":
        colour = _COLOUR_ORDER[(_COLOUR_ORDER.index(colour) + 3) % len(_COLOUR_ORDER)]
    elif swap == "shape":
        shape = SHAPES[(SHAPES.index(shape) + 2) % len(SHAPES)]
    elif swap == "motion axis":
        motion = _OTHER_AXIS[motion]
    elif swap == "motion direction":
        motion = _REVERSED[motion]
    return _phrase(colour, shape, motion)


def _pair_caption(clip: Clip, exchange: str | None) -> str:
    """Both objects' phrases joined by "and", with one attribute (:data:`EXCHANGES`) traded between them."""
    first, second = ([o.colour, o.shape, o.motion] for o in clip.objects)
    if exchange is not None:
        k = EXCHANGES.index(exchange)
        first[k], second[k] = second[k], first[k]
    return f"{_phrase(*first)} and {_phrase(*second)}"


def _phrase(colour: str, shape: str, motion: str) -> str:
    return f"a {COLOUR_WORDS[colour][0]} {SHAPE_WORDS[shape][0]} {MOTION_PHRASES[motion][0]}"


def _moves(clip: Clip) -> bool:
    return len(clip.objects) == 1 and clip.objects[0].motion in _REVERSED


def _differ(clip: Clip) -> bool:
    """Two objects that differ in colour, shape and motion, so that every exchange changes the caption."""
    return len(clip.objects) == 2 and all(
        getattr(clip.objects[0], a) != getattr(clip.objects[1], a) for a in ("colour", "shape", "motion")
    )


def _held_out_clips(count: int, seed: int, keep) -> list[Clip]:
    """The first ``count`` held-out clips for which ``keep(clip)`` is true."""
    clips: list[Clip] = []
    for clip in dataset(20 * count + 100, seed=seed, split="heldout"):
        if keep(clip):
            clips.append(clip)
            if len(clips) == count:
                return clips
    raise RuntimeError(f"the held-out split gave fewer than {count} clips for {keep.__name__}")


@torch.no_grad()
def word_use(
    model, clips: int = 48, timesteps: tuple[float, ...] = PROBE_TIMESTEPS, seed: int = 0, batch: int = 16
) -> dict[str, dict[str, float]]:
    """task ("t2v", "i2v") → swap (:data:`SWAPS`) → error with the word swapped / error with the true caption.

    ``model``: a loaded nano (any task). Errors are the mean squared error of the predicted clean latent
    over the latent frames after the first (I2V is given the first), summed over ``timesteps``; one
    noise draw per clip, from ``seed``.
    """
    samples = _held_out_clips(clips, seed, _moves)
    captions = {swap: [_caption(c, swap) for c in samples] for swap in (None, *SWAPS)}
    return _error_ratios(model, samples, captions, timesteps, seed, batch)


@torch.no_grad()
def binding(
    model, clips: int = 48, timesteps: tuple[float, ...] = PROBE_TIMESTEPS, seed: int = 0, batch: int = 16
) -> dict[str, dict[str, float]]:
    """task ("t2v", "i2v") → exchange (:data:`EXCHANGES`) → error with the exchange / error with the true caption.

    As :func:`word_use`, on held-out two-object clips whose objects differ in colour, shape and motion.
    """
    samples = _held_out_clips(clips, seed, _differ)
    captions = {x: [_pair_caption(c, x) for c in samples] for x in (None, *EXCHANGES)}
    return _error_ratios(model, samples, captions, timesteps, seed, batch)


def _error_ratios(model, samples, captions, timesteps, seed, batch) -> dict[str, dict[str, float]]:
    """task → caption variant → x0 error with that variant over the error with the true captions (key None)."""
    dit, vae, rope_scale = model.dit, model.vae, model.variant.sampling.rope_scale
    pixels = vae_input_from_frames(np.stack([c.frames for c in samples]))
    encoded = [vae.encode(p, sample=False, tiling=False) for p in pixels.split(batch)]  # on the VAE's device
    latents = torch.cat(encoded).float().cpu()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    prompts = {name: model.text_encoder.encode(texts) for name, texts in captions.items()}
    errors = {task: dict.fromkeys(prompts, 0.0) for task in ("t2v", "i2v")}
    for t in timesteps:
        noised = (1.0 - t) * latents + t * noise
        for task in errors:
            conditioning = Conditioning(first_frame=latents[:, 0]) if task == "i2v" else Conditioning()
            x = conditioning.splice_first_frame(noised)
            for name, prompt in prompts.items():
                errors[task][name] += _x0_error(dit, x, latents, t, prompt, conditioning, rope_scale, batch)
    return {task: {name: e[name] / e[None] for name in captions if name is not None} for task, e in errors.items()}


def _x0_error(dit, x, latents, t, prompt, conditioning, rope_scale, batch) -> float:
    """Mean squared error of the DiT's clean-latent prediction ``x − t·v`` over latent frames 1..T-1."""
    total, device, first = 0.0, next(dit.parameters()).device, conditioning.first_frame
    for start in range(0, x.shape[0], batch):
        rows = slice(start, start + batch)
        part = Conditioning(first_frame=None if first is None else first[rows].to(device))
        embeddings = PromptEmbeddings(*(e[rows].to(device) for e in (prompt.tokens, prompt.mask, prompt.pooled)))
        noisy = x[rows].to(device)
        velocity = dit_velocity(dit, embeddings, part, rope_scale)(noisy, torch.tensor(t))
        clean = (noisy - t * velocity).cpu()
        total += float(((clean - latents[rows])[:, 1:] ** 2).sum())
    return total / latents[:, 1:].numel()
