"""``kandinsky5 eval nano``: does nano draw what held-out prompts ask for, and how well does its VAE reconstruct?

Prompts come from the world's held-out split (attribute combinations and phrasings training never saw).
Each is generated with its own seed and read back by :mod:`kandinsky5.nano.detect`, whose accuracy on the
world's own clips is ≥ 99 % per attribute (docs/nano.md), so a miss here is the model's, not the reader's.
A text prompt is graded on what it asks for: a background it does not name is the model's to choose.
The same grades are also split by how many objects the prompt names: one-object and two-object prompts
fail for different reasons (drawing an attribute, or binding two sets of attributes to two objects).
The VAE is scored separately, on held-out clips: PSNR of encode → decode. The last tables say which words
of a prompt the DiT reads at all, and whether it ties the words of a two-object prompt to the right
object (:mod:`kandinsky5.nano.probe`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .detect import grade
from .probe import EXCHANGES, SWAPS, binding, word_use
from .world import Clip, Scene, dataset, parse_caption

__all__ = ["PSNR_TARGET", "TARGETS", "NanoEvaluation", "evaluate_nano", "expectation", "format_table"]

TARGETS = {"colour": 0.95, "shape": 0.90, "motion": 0.90}  # on held-out video prompts
PSNR_TARGET = 32.0  # dB, VAE reconstruction of held-out clips
_ORDER = ("count", "background", "colour", "shape", "motion")


@dataclasses.dataclass(frozen=True)
class NanoEvaluation:
    """Fractions correct per attribute for text-to-video, image-to-video and text-to-image, plus VAE PSNR."""

    model: str
    seed: int
    counts: dict[str, int]  # prompts per task
    accuracy: dict[str, dict[str, float]]  # task -> attribute -> fraction correct
    psnr: float  # dB, held-out clips
    psnr_image: float  # dB, held-out images
    settings: dict[str, Any]  # steps, guidance, shift, size of the generations
    seconds: float
    word_use: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # kandinsky5.nano.probe
    binding: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # probe.binding
    # task -> objects in the prompt ("1", "2") -> {"prompts": n, "accuracy": attribute -> fraction correct}
    by_objects: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        video = self.accuracy.get("t2v", {})
        return self.psnr >= PSNR_TARGET and all(video.get(k, 0.0) >= t for k, t in TARGETS.items())

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


def _mean(grades: list[dict[str, bool]]) -> dict[str, float]:
    keys = [k for k in _ORDER if any(k in g for g in grades)]
    return {k: float(np.mean([g[k] for g in grades if k in g])) for k in keys}


def expectation(sample: Clip, task: str) -> Clip | Scene:
    """What a generation for ``sample``'s prompt is graded against.

    T2V and T2I see only the caption, so they are held to what it says (:func:`parse_caption` reads our
    captions exactly); I2V also sees the first frame, which fixes the background, so the whole clip counts.
    """
    return sample if task == "i2v" else parse_caption(sample.caption)


def evaluate_nano(
    model,
    videos: int = 100,
    images: int = 50,
    i2v: int = 50,
    seed: int = 0,
    vae_clips: int = 32,
    probe_clips: int = 48,
    progress: bool = True,
) -> NanoEvaluation:
    """Grade ``model`` (a loaded nano, any of its tasks) on held-out prompts; see the module docstring.

    Prompt i of a task is generated with seed ``seed + i``. I2V animates the first frame of the held-out
    clip and is graded on the whole clip's caption (the first frame fixes colour and shape; motion must
    come from the prompt). ``probe_clips`` held-out clips measure which words the DiT reads (0: skip).
    """
    from PIL import Image as PILImage

    from .vae_training import evaluate_vae

    started = time.perf_counter()
    jobs = [("t2v", "video", videos), ("i2v", "video", i2v), ("t2i", "image", images)]
    accuracy: dict[str, dict[str, float]] = {}
    by_objects: dict[str, dict[str, dict[str, Any]]] = {}
    bar = tqdm(total=videos + images + i2v, desc="eval nano", unit="sample", disable=not progress)
    for task, kind, count in jobs:
        if count == 0:
            continue
        runner = model.for_task(task)
        grades, objects = [], []
        for i, sample in enumerate(dataset(count, seed=seed, split="heldout", kind=kind)):
            first = PILImage.fromarray(sample.frames[0]) if task == "i2v" else None
            result = runner.generate(sample.caption, seed=seed + i, image=first, progress=False)
            frames = result.frames if kind == "video" else result.pixels[None]
            grades.append(grade(frames, expectation(sample, task)))
            objects.append(len(sample.objects))
            bar.update(1)
        accuracy[task] = _mean(grades)
        by_objects[task] = {}
        for n in sorted(set(objects)):
            split = [g for g, m in zip(grades, objects, strict=True) if m == n]
            by_objects[task][str(n)] = {"prompts": len(split), "accuracy": _mean(split)}
    bar.close()
    vae = evaluate_vae(model.vae.vae, vae_clips, vae_clips, seed)
    words = word_use(model, probe_clips, seed=seed) if probe_clips else {}
    bound = binding(model, probe_clips, seed=seed) if probe_clips else {}
    d = model.variant.sampling
    settings = {
        "steps": d.num_inference_steps,
        "guidance_scale": d.guidance_scale,
        "shift": d.shift,
        "size": f"{d.width}x{d.height}",
    }
    return NanoEvaluation(
        model=model.variant.name,
        seed=seed,
        counts={"t2v": videos, "i2v": i2v, "t2i": images, "vae_clips": vae_clips, "probe_clips": probe_clips},
        accuracy=accuracy,
        psnr=vae["psnr"],
        psnr_image=vae["psnr_image"],
        settings=settings,
        seconds=time.perf_counter() - started,
        word_use=words,
        binding=bound,
        by_objects=by_objects,
    )


def format_table(e: NanoEvaluation) -> str:
    """The report as a Markdown table (it reads well in a terminal and pastes into notes)."""
    tasks = [t for t in ("t2v", "i2v", "t2i") if t in e.accuracy]
    s = e.settings
    lines = [
        f"nano on held-out prompts ({', '.join(f'{e.counts[t]} {t}' for t in tasks)}; seeds {e.seed}+i; "
        f"{s['size']}, {s['steps']} steps, guidance {s['guidance_scale']:g}, shift {s['shift']:g})",
        "",
        "| attribute | " + " | ".join(tasks) + " | target (t2v) |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for key, cells in _attribute_rows([e.accuracy[t] for t in tasks]):
        target = TARGETS.get(key)
        verdict = ""
        if target is not None and "t2v" in e.accuracy:
            verdict = f"≥ {100 * target:.0f} % " + ("pass" if e.accuracy["t2v"].get(key, 0) >= target else "FAIL")
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {verdict} |")
    lines += _by_objects_table(e)
    psnr_ok = "pass" if e.psnr >= PSNR_TARGET else "FAIL"
    lines += [
        "",
        f"VAE reconstruction PSNR on {e.counts['vae_clips']} held-out clips: {e.psnr:.2f} dB "
        f"(target ≥ {PSNR_TARGET:.0f} dB: {psnr_ok}); on as many images: {e.psnr_image:.2f} dB",
    ]
    clips = e.counts.get("probe_clips", 0)
    lines += _ratio_table(
        "Which words the DiT reads: its error with one word swapped over the error with the true caption, "
        f"{clips} held-out one-object moving clips (1.00: the word is ignored)",
        "word swapped",
        e.word_use,
        SWAPS,
    )
    lines += _ratio_table(
        "Whether it ties words to the right object: its error with an attribute exchanged between the two "
        f"objects over the error with the true caption, {clips} held-out two-object clips (1.00: the caption "
        "is read as a bag of words)",
        "exchanged",
        e.binding,
        EXCHANGES,
    )
    lines += ["", f"{'all targets met' if e.passed else 'targets not met'} ({e.seconds:.0f} s)"]
    return "\n".join(lines)


def _ratio_table(title: str, header: str, ratios: dict[str, dict[str, float]], rows: tuple[str, ...]) -> list[str]:
    """A probe's error ratios (task → row → ratio) as a Markdown table under ``title``; nothing when not run."""
    if not ratios:
        return []
    tasks = list(ratios)
    lines = ["", title, "", f"| {header} | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    return lines + [f"| {row} | " + " | ".join(f"×{ratios[t][row]:.2f}" for t in tasks) + " |" for row in rows]


def _attribute_rows(columns: list[dict[str, float]]) -> list[tuple[str, list[str]]]:
    """(attribute, one percentage cell per column) for each attribute that some column graded, in order."""
    return [(key, [_percent(c, key) for c in columns]) for key in _ORDER if any(key in c for c in columns)]


def _percent(fractions: dict[str, float], key: str) -> str:
    return f"{100 * fractions[key]:.1f} %" if key in fractions else "–"


def _by_objects_table(e: NanoEvaluation) -> list[str]:
    """The accuracy table again, one column per task and number of objects the prompt names."""
    columns = [(t, n, split) for t, splits in e.by_objects.items() for n, split in splits.items()]
    if not columns:
        return []
    noun = {"1": "object"}
    lines = [
        "",
        "By the number of objects the prompt names (prompts in brackets):",
        "",
        "| attribute | "
        + " | ".join(f"{t}, {n} {noun.get(n, 'objects')} ({split['prompts']})" for t, n, split in columns)
        + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    rows = _attribute_rows([split["accuracy"] for _, _, split in columns])
    return lines + [f"| {key} | " + " | ".join(cells) + " |" for key, cells in rows]
