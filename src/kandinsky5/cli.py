"""The ``kandinsky5`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``run`` to the function that executes it; ``_COMMANDS`` lists them. Heavy modules are imported inside
the ``run`` functions, so ``kandinsky5 --help`` stays instant.

A request the command cannot carry out (a bad size, an unknown model, missing weights) ends with one line
on stderr and exit status 2; ``generate`` checks everything it can before loading any weights, so such a
request fails in well under a second and leaves nothing on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kandinsky5.hub import PipelineFiles
    from kandinsky5.request import GenerationRequest
    from kandinsky5.variants import Variant

__all__ = ["DEFAULT_MODEL", "build_parser", "main"]

logger = logging.getLogger("kandinsky5.cli")

# The model `generate` runs without -m: the small bundled model, so the first command needs no download.
DEFAULT_MODEL = "nano"

_DESCRIPTION = """\
Kandinsky 5.0 video and image generation.

Every official release is a named variant (e.g. video-lite-5s-sft, image-lite) that fixes the
architecture, the Hub weights and the sampling defaults. Start with `kandinsky5 models`.
"""

_EPILOG = """\
examples:
  kandinsky5 models                              list every variant with its defaults
  kandinsky5 models --task t2i                   only text-to-image variants
  kandinsky5 generate "a red fox in the snow"    a video from the bundled model
  kandinsky5 download video-lite-5s-sft          fetch a variant's weights ahead of time
  kandinsky5 <command> --help                    options of one command
"""


class _Failure(Exception):
    """A request the command cannot carry out; ``main`` prints it as one line and exits with ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, like every other error of this command."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _message(err: BaseException) -> str:
    """One line for ``err``: OSErrors as "what: path", everything else as its text."""
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------------
# kandinsky5 models
# --------------------------------------------------------------------------------------------------


def _add_models(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the registered variants and their defaults",
        description="List every registered variant with its task, DiT size (billions of parameters)\n"
        "and sampling defaults: size, frames, steps, guidance, shift and attention.\n"
        "Pass a name from the first column to the other commands.",
        epilog="example:\n  kandinsky5 models --task t2v",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--task",
        choices=("t2v", "i2v", "t2i", "i2i"),
        help="show only variants for this task",
    )
    parser.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from kandinsky5.variants import list_variants

    variants = [v for v in list_variants() if args.task is None or v.task == args.task]
    header = ("name", "task", "DiT", "size (HxW)", "frames", "steps", "guidance", "shift", "attention")
    rows = [header]
    for v in variants:
        s = v.sampling
        attention = v.attention if v.nabla is None else f"nabla P={v.nabla.P:g}"
        rows.append(
            (
                v.name,
                v.task,
                f"{v.num_parameters / 1e9:.2f}B" if v.num_parameters >= 1e8 else f"{v.num_parameters / 1e6:.1f}M",
                f"{s.height}x{s.width}",
                str(s.num_frames),
                str(s.num_inference_steps),
                f"{s.guidance_scale:g}",
                f"{s.shift:g}",
                attention,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=sys.stdout,
        )
    return 0


# --------------------------------------------------------------------------------------------------
# Choosing the model: -m MODEL [--variant NAME], shared by generate and download
# --------------------------------------------------------------------------------------------------


def _pick_variant(model: str | None, variant: str | None) -> tuple[str, Variant]:
    """The source to load and the variant it holds, from -m and --variant, without touching any weights.

    The variant is decided here and passed to the loader, so what was validated is what runs.
    """
    import difflib

    from kandinsky5.variants import ALIASES, VARIANTS, get_variant, resolve_model_name, variant_for_folder

    if model is None:
        if DEFAULT_MODEL not in VARIANTS:
            raise ValueError(
                f"the default model {DEFAULT_MODEL!r} is not available in this version; "
                "pass -m MODEL (a variant name, Hub repo id or folder; see `kandinsky5 models`)"
            )
        model = DEFAULT_MODEL
    path = Path(model).expanduser()
    if variant is not None:
        return model, get_variant(variant)  # unknown names raise with close matches
    if path.is_dir():
        found = variant_for_folder(path)
        if found is None:
            raise ValueError(f"cannot tell which variant {model} holds; pass --variant NAME (see `kandinsky5 models`)")
        return model, found
    if path.is_file():
        raise ValueError(f"{model} is a file; -m takes a folder with every component, a variant name or a Hub repo id")
    if model.startswith((".", "/", "~")) or model.endswith("/") or (os.sep != "/" and os.sep in model):
        raise ValueError(f"no such folder: {model}")  # no Hub repo id looks like this
    try:
        return model, resolve_model_name(model)
    except ValueError:
        close = difflib.get_close_matches(model, [*VARIANTS, *ALIASES], n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        other = "; for another Hub repo pass --variant NAME" if "/" in model else ""
        raise ValueError(
            f"unknown model {model!r}: not a variant name, a known Hub repo id or an existing folder{other}.{hint} "
            "Run `kandinsky5 models` to list the variants."
        ) from None


# --------------------------------------------------------------------------------------------------
# kandinsky5 generate
# --------------------------------------------------------------------------------------------------

_GENERATE_EPILOG = f"""\
examples:
  kandinsky5 generate "a red fox runs through fresh snow"
      the bundled {DEFAULT_MODEL} model; writes a-red-fox-runs-through-fresh-snow.mp4 here
  kandinsky5 generate "a mountain lake at dawn, mist over the water" \\
      -m kandinskylab/Kandinsky-5.0-T2V-Lite --offload --seconds 5 --seed 42 -o lake.mp4
      Video Lite (2B), 121 frames at 24 fps; --offload keeps the parts in host memory until they run
  kandinsky5 generate "the cat slowly turns its head" -m video-lite-i2v-5s --image cat.jpg --offload
      image to video: the picture is the first frame; the size follows its aspect ratio
  kandinsky5 generate "a bowl of cherries on a marble table" -m image-lite --size 1024x1024 -o cherries.png
      an image variant writes one picture (.png, .jpg or .webp)
  kandinsky5 generate "a fox" -m ./weights --variant video-lite-5s-sft --steps 30 --device cuda:1
  kandinsky5 generate "a fox in watercolour" -m video-lite-5s-sft --lora runs/fox/final/lora.safetensors:0.8
      with a LoRA (diffusers Kandinsky 5 format) at strength 0.8; repeat --lora to stack several

Defaults (size, frames, steps, guidance, shift) are the variant's; `kandinsky5 models` lists them.
Without -o the file is named after the prompt in the current folder, followed by -2, -3, ... when
that name is taken. An existing -o file is replaced only with --overwrite.
"""


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate a video or an image from a prompt",
        description="Generate a video (or, with an image variant, a picture) from PROMPT and save it.\n"
        "A progress bar per denoising step goes to stderr; the last line on stdout says where\n"
        "the file is.",
        epilog=_GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", metavar="PROMPT", help="what to show")
    parser.add_argument(
        "-m",
        "--model",
        metavar="MODEL",
        help="a variant name, a Hub repo id (official, -Diffusers or a family name such as "
        f"kandinskylab/Kandinsky-5.0-T2V-Lite) or a local folder (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--variant", metavar="NAME", help="the variant MODEL holds, when its name does not tell")
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where to save: .mp4, .webm, .gif or a folder of PNG frames for video; .png, .jpg or "
        ".webp for images (default: named after the prompt, in the current folder)",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, metavar="N", help="number of video frames, 1 to the variant's maximum")
    length.add_argument("--seconds", type=float, metavar="S", help="video length: S x fps + 1 frames (5 → 121)")
    parser.add_argument("--size", metavar="WxH", help="width x height in pixels, e.g. 768x512")
    parser.add_argument("--steps", type=int, metavar="N", help="denoising steps")
    parser.add_argument("--guidance", type=float, metavar="G", help="classifier-free guidance scale (1 turns it off)")
    parser.add_argument("--shift", type=float, metavar="S", help="timestep shift of the sampling schedule")
    parser.add_argument("--seed", type=int, metavar="N", help="random seed; the same seed gives the same result")
    parser.add_argument("--negative", metavar="TEXT", help="negative prompt (default: the variant's)")
    parser.add_argument("--image", metavar="PATH", help="first frame (image-to-video) or picture to edit")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA .safetensors file (diffusers Kandinsky 5 format), at strength SCALE (default 1); repeatable",
    )
    parser.add_argument("--offload", action="store_true", help="keep the parts in host memory until each one runs")
    parser.add_argument("--device", metavar="D", help="cpu, cuda, cuda:1 or mps (default: the best one present)")
    parser.add_argument("--dtype", metavar="D", help="bf16, fp16 or fp32 (default: bf16 on accelerators, fp32 on CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(run=_run_generate)


@dataclass(frozen=True)
class _Request:
    """A checked ``generate`` request: what to load, the planned generation, and where it goes."""

    source: str
    variant: Variant
    output: Path
    generation: GenerationRequest
    loras: tuple[tuple[Path, float], ...] = ()  # --lora: (file, strength), checked against the variant's DiT


def _plan(args: argparse.Namespace) -> _Request:
    """Check every part of the request that needs no weights; raises ValueError or OSError."""
    from kandinsky5.request import plan_generation

    source, variant = _pick_variant(args.model, args.variant)
    variant = _nano_task(variant, args.image, args.output)
    num_frames = _num_frames(variant, args.frames, args.seconds)
    height, width = _size(args.size)
    image = args.image
    if image is not None and not Path(image).expanduser().exists():
        raise ValueError(f"--image {image}: file not found")
    generation = plan_generation(
        variant, args.prompt, args.negative, num_frames, height, width, args.steps, args.guidance,
        args.seed, None if image is None else Path(image).expanduser(), args.shift,
    )  # fmt: skip
    output = _output_path(args.output, variant, args.prompt, args.overwrite)
    loras = tuple(_lora(text, variant) for text in args.lora)
    return _Request(source, variant, output, generation, loras)


def _lora(text: str, variant: Variant) -> tuple[Path, float]:
    """(file, strength) from --lora PATH[:SCALE], the file checked against the variant's DiT (header only)."""
    from kandinsky5.lora import read_lora

    path, scale = text, 1.0
    head, colon, tail = text.rpartition(":")
    if colon and not Path(text).expanduser().exists():
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # a colon inside the path (C:\\...); the file check below reports it if it does not exist
    if not math.isfinite(scale):
        raise ValueError(f"--lora {text}: SCALE must be a finite number")
    weights = read_lora(path, variant.dit, load=False)
    return weights.path, scale


def _nano_task(variant: Variant, image: str | None, output: str | None) -> Variant:
    """nano's one set of weights does T2V, I2V and T2I: --image picks I2V, an image file for -o picks T2I."""
    from kandinsky5.media import IMAGE_SUFFIXES
    from kandinsky5.variants import nano_variant

    if variant.name != "nano":
        return variant
    if image is not None:
        return nano_variant("i2v")
    if output is not None and Path(output).suffix.lower() in IMAGE_SUFFIXES:
        return nano_variant("t2i")
    return variant


def _num_frames(variant: Variant, frames: int | None, seconds: float | None) -> int | None:
    """Frames from --frames or --seconds (S x fps + 1: the first frame is at time 0)."""
    if seconds is None:
        return frames
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--seconds must be > 0, got {seconds:g}")
    return round(seconds * variant.sampling.fps) + 1


_SIZE = re.compile(r"(\d+)[xX×](\d+)")


def _size(text: str | None) -> tuple[int | None, int | None]:
    """(height, width) from --size WxH; the variant's granularity is checked by ``plan_generation``."""
    if text is None:
        return None, None
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 768x512; got {text!r}")
    return int(match[2]), int(match[1])


def _slug(prompt: str, limit: int = 40) -> str:
    """A file name stem from the prompt's first words: lower case, joined by '-', at most ``limit`` chars.

    Letters of any script are kept (a Russian prompt gives a Russian name); everything else separates words.
    """
    words = re.findall(r"[^\W_]+", unicodedata.normalize("NFKC", prompt).lower())
    slug = ""
    for word in words:
        longer = f"{slug}-{word}" if slug else word
        if len(longer) > limit:
            break
        slug = longer
    return slug or (words[0][:limit] if words else "kandinsky5")


def _output_path(output: str | None, variant: Variant, prompt: str, overwrite: bool) -> Path:
    """The path to save to, checked (suffix, writable folder, no clash) before any work is done.

    With no -o the name comes from the prompt; if that file exists, the first free ``<name>-2``,
    ``<name>-3``, ... is used instead (or the file is replaced with --overwrite). An existing -o file is
    never replaced without --overwrite.
    """
    from kandinsky5.media import FRAMES, check_output_path

    kind = "video" if variant.is_video else "image"
    if output is None:
        stem, suffix = _slug(prompt), ".mp4" if variant.is_video else ".png"
        path, n = Path(stem + suffix), 2
        while not overwrite and (path.exists() or path.with_name(path.name + ".json").exists()):
            path, n = Path(f"{stem}-{n}{suffix}"), n + 1
    else:
        path = Path(output).expanduser()
    fmt = check_output_path(path, kind, overwrite=overwrite)
    if fmt != FRAMES and path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or choose another -o")
    return path


def _run_generate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        request = _plan(args)
    except (ValueError, OSError) as err:
        raise _Failure(_message(err)) from None

    from kandinsky5.api import load

    try:
        model = load(request.source, variant=request.variant.name, device=args.device, dtype=args.dtype)
    except (ValueError, OSError) as err:  # MissingWeightsError is a ValueError: it says how to get the files
        raise _Failure(_message(err)) from None
    if args.offload:
        model.enable_model_cpu_offload()
    g = request.generation
    logger.info("generating with %s, seed %d", request.variant.name, g.seed)
    try:
        result = model.generate(
            g.prompt, negative_prompt=g.negative_prompt, num_frames=g.num_frames, height=g.height, width=g.width,
            num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale, seed=g.seed, image=g.image,
            shift=g.shift, progress=True, lora=[path for path, _ in request.loras] or None,
            lora_scale=[scale for _, scale in request.loras],
        )  # fmt: skip
    except ValueError as err:  # the API's own input checks; ours above should have caught them first
        raise _Failure(_message(err)) from None
    try:
        if request.variant.is_video:
            path = result.save(request.output, overwrite=args.overwrite)
            detail = f"{result.num_frames} frames, {result.width}x{result.height}, {result.fps:g} fps"
        else:
            path = result.save(request.output)
            detail = f"{result.width}x{result.height}"
    except OSError as err:
        raise _Failure(f"cannot save {request.output}: {_message(err)}", code=1) from None
    print(f"saved {path} ({detail}) in {time.perf_counter() - started:.1f} s", file=sys.stdout)
    return 0


# --------------------------------------------------------------------------------------------------
# kandinsky5 download
# --------------------------------------------------------------------------------------------------

_DOWNLOAD_EPILOG = """\
examples:
  kandinsky5 download video-lite-5s-sft
      every file into the Hugging Face cache (HF_HOME or HF_HUB_CACHE choose where)
  kandinsky5 download kandinskylab/Kandinsky-5.0-T2V-Lite --to weights/lite
      a folder to carry to a machine without network access; there:
      kandinsky5 generate "a red fox" -m weights/lite
  kandinsky5 download kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers --to weights/lite-diffusers
      the diffusers layout; generate from it with --variant video-lite-5s-sft

With --to, files are hard-linked from the cache where both share a file system, else copied; the
folder has the official layout (model/ vae/ text_encoder/ text_encoder2/, flux/vae/ for images), or
the diffusers one (transformer/ vae/ text_encoder/ tokenizer/ ...) for a -Diffusers repo.
"""


def _add_download(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "download",
        help="fetch every file a variant needs (DiT, VAE, text encoders)",
        description="Download the DiT weights, the VAE and both text encoders of a variant through\n"
        "huggingface_hub (files already in its cache are not fetched again) and print where they are.",
        epilog=_DOWNLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", metavar="MODEL", help="a variant name or a Hub repo id (official, -Diffusers or a family name)"
    )
    parser.add_argument("--variant", metavar="NAME", help="the variant MODEL holds, when its name does not tell")
    parser.add_argument("--to", metavar="DIR", help="also place the files in DIR, ready for `generate -m DIR`")
    parser.set_defaults(run=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from kandinsky5.variants import ALIASES, VARIANTS

    try:
        model, variant = _pick_variant(args.model, args.variant)
        if Path(model).expanduser().exists():
            raise ValueError(f"{model} is already on this machine; download takes a variant name or a Hub repo id")
        if variant.hub is None:
            raise ValueError(f"{variant.name} ships inside the kandinsky5 package; nothing to download")
        # Variant and family names stand for the variant's official repo; a repo id is fetched as given.
        is_name = model in VARIANTS or model.strip().strip("/").lower() in ALIASES
        repo = variant.hub.repo_id if is_name else model
        if args.to is not None:
            target = Path(args.to).expanduser()
            if target.exists() and not target.is_dir():
                raise NotADirectoryError(f"--to {args.to} is a file; give a folder")
    except (ValueError, OSError) as err:
        raise _Failure(_message(err)) from None

    from kandinsky5 import hub

    try:
        files = hub.resolve_pipeline_files(repo, variant)
    except (ValueError, OSError) as err:  # MissingWeightsError, no access to a gated repo, ...
        raise _Failure(_message(err)) from None
    if args.to is None:
        for name, path in _components(files).items():
            print(f"  {name:<15} {path}", file=sys.stdout)
        print(f"{variant.name}: every file is in the Hugging Face cache; run it with -m {args.model}", file=sys.stdout)
        return 0
    try:
        _place(files, variant, target)
        hub.resolve_pipeline_files(target, variant)  # the same check `generate -m DIR` makes
    except (ValueError, OSError) as err:
        raise _Failure(f"cannot place the files in {target}: {_message(err)}", code=1) from None
    tell = "" if files.dit.layout == "official" else f" --variant {variant.name}"
    print(f"{variant.name}: every file is in {target}; run it with -m {target}{tell}", file=sys.stdout)
    return 0


def _components(files: PipelineFiles) -> dict[str, Path]:
    dit = files.dit.files[0] if len(files.dit.files) == 1 else files.dit.files[0].parent
    return {
        "transformer": dit,
        "vae": files.vae,
        "text_encoder": files.text_encoder,
        "tokenizer": files.tokenizer,
        "text_encoder_2": files.text_encoder_2,
        "tokenizer_2": files.tokenizer_2,
    }


def _place(files: PipelineFiles, variant: Variant, root: Path) -> None:
    """Put every component under ``root`` in the layout its DiT came in (see ``hub.resolve_pipeline_files``)."""
    from kandinsky5.hub import DIFFUSERS_FOLDERS
    from kandinsky5.safetensors_file import PICKLE_SUFFIXES

    if files.dit.layout == "diffusers":
        folders = {"transformer": files.dit.files[0].parent}
        folders |= {name: getattr(files, key) for key, name in DIFFUSERS_FOLDERS.items()}
    else:
        dit = files.dit.files[0]
        _link_or_copy(dit, root / "model" / dit.name)
        vae = "flux/vae" if variant.vae == "flux" else "vae"
        folders = {vae: files.vae, "text_encoder": files.text_encoder, "text_encoder2": files.text_encoder_2}
    for name, folder in folders.items():
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix.lower() not in PICKLE_SUFFIXES:  # never carry pickles along
                _link_or_copy(file, root / name / file.name)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` (through the cache's symlinks) to ``target``, or copy it; atomic either way."""
    from kandinsky5.atomic import temp_beside

    real = source.resolve()
    if target.exists() and target.samefile(real):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        try:
            os.link(real, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(real, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------------------

# Add a subcommand by writing an _add_<name> function like _add_models and listing it here.
# --------------------------------------------------------------------------------------------------
# kandinsky5 train
# --------------------------------------------------------------------------------------------------


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune or train a model from a TOML/YAML config",
        description="Train with flow matching from a config file (every field is documented in docs/training.md).\n"
        "A run resumes automatically from the newest checkpoint in its output_dir.",
        epilog="example:\n  kandinsky5 train my_run.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="a .toml (or .yaml) training config")
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from kandinsky5.train import main_train

    if not Path(args.config).is_file():
        raise _Failure(f"config not found: {args.config}")
    try:
        return main_train(args.config)
    except ValueError as err:  # config and cache errors carry a message meant for the user
        raise _Failure(_message(err)) from None


# --------------------------------------------------------------------------------------------------
# kandinsky5 eval
# --------------------------------------------------------------------------------------------------


_EVAL_EPILOG = """\
examples:
  kandinsky5 eval                                   the bundled nano: 100 T2V, 50 I2V, 50 T2I prompts
  kandinsky5 eval --videos 20 --i2v 10 --images 10  quicker
  kandinsky5 eval runs/nano/nano --json eval.json   a nano folder written by python -m kandinsky5.nano.recipe
"""


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="grade nano on held-out prompts (colour, shape, motion) and its VAE (PSNR)",
        description="Generate from prompts of the shapes world's held-out split (combinations and phrasings "
        "training never saw), read colour, shape and motion back from the frames with the detectors of "
        "kandinsky5.nano.detect, and print the accuracy per attribute and task (again split by one- and "
        "two-object prompts), the VAE's reconstruction PSNR, which words the DiT reads and whether it ties them "
        "to the right one of two objects (docs/nano.md). "
        "Exit status 0 when every target is met, 1 when not.",
        epilog=_EVAL_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", nargs="?", default="nano", help="nano (default) or a nano folder")
    parser.add_argument("--videos", type=int, default=100, metavar="N", help="text-to-video prompts (default 100)")
    parser.add_argument("--i2v", type=int, default=50, metavar="N", help="image-to-video prompts (default 50)")
    parser.add_argument("--images", type=int, default=50, metavar="N", help="text-to-image prompts (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed SEED + i (default 0)")
    parser.add_argument(
        "--probe-clips",
        type=int,
        default=48,
        metavar="N",
        help="held-out clips for each table of which words the DiT reads and binds (default 48; 0 skips both)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from kandinsky5.atomic import atomic_write, write_json_durable

    counts = {"--videos": args.videos, "--i2v": args.i2v, "--images": args.images}
    for flag, count in {**counts, "--probe-clips": args.probe_clips}.items():
        if count < 0:
            raise _Failure(f"{flag} must be >= 0, got {count}")
    if not any(counts.values()):
        raise _Failure("nothing to evaluate: every count is 0")
    try:
        source, variant = _pick_variant(args.model, "nano" if Path(args.model).expanduser().is_dir() else None)
        if not variant.name.startswith("nano"):
            raise ValueError(f"eval grades nano models of the shapes world, not {variant.name}")
    except (ValueError, OSError) as err:
        raise _Failure(_message(err)) from None

    from kandinsky5.api import Kandinsky5Nano
    from kandinsky5.nano.evaluate import evaluate_nano, format_table

    try:
        model = Kandinsky5Nano.from_pretrained(source, variant="nano")
    except (ValueError, OSError) as err:
        raise _Failure(_message(err)) from None
    report = evaluate_nano(
        model, videos=args.videos, images=args.images, i2v=args.i2v, seed=args.seed, probe_clips=args.probe_clips
    )
    print(format_table(report), file=sys.stdout)
    if args.json:
        atomic_write(Path(args.json), lambda tmp: write_json_durable(tmp, report.to_json()))
    return 0 if report.passed else 1


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_models,
    _add_generate,
    _add_download,
    _add_train,
    _add_eval,
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``kandinsky5`` parser with every subcommand in ``_COMMANDS``."""
    parser = _Parser(
        prog="kandinsky5",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


@contextlib.contextmanager
def _logging_to_stderr() -> Iterator[None]:
    """INFO from this package and warnings from everything else, as short lines on stderr.

    Set up here, for the length of one command, and never on import: the library only logs.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root, package = logging.getLogger(), logging.getLogger("kandinsky5")
    level = package.level
    root.addHandler(handler)  # the root logger's own level (WARNING by default) still filters other libraries
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.setLevel(level)
        root.removeHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:  # no subcommand given
        parser.print_help(sys.stderr)
        return 2
    try:
        with _logging_to_stderr():
            return run(args)
    except _Failure as err:
        print(f"kandinsky5: error: {_message(err)}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:  # saves are atomic, so an interrupted run leaves nothing behind
        print("kandinsky5: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `kandinsky5 models | head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
