"""The ``kandinsky5`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``run`` to the function that executes it; ``_COMMANDS`` lists them. Heavy modules are imported inside
the ``run`` functions, so ``kandinsky5 --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Kandinsky 5.0 video and image generation.

Every official release is a named variant (e.g. video-lite-5s-sft, image-lite) that fixes the
architecture, the Hub weights and the sampling defaults. Start with `kandinsky5 models`.
"""

_EPILOG = """\
examples:
  kandinsky5 models                 list every variant with its defaults
  kandinsky5 models --task t2i      only text-to-image variants
  kandinsky5 <command> --help       options of one command
"""


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
                f"{v.num_parameters / 1e9:.2f}B",
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
# Parser and entry point
# --------------------------------------------------------------------------------------------------

# Add a subcommand by writing an _add_<name> function like _add_models and listing it here.
_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_models,)


def build_parser() -> argparse.ArgumentParser:
    """The full ``kandinsky5`` parser with every subcommand in ``_COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="kandinsky5",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="<command>")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:  # no subcommand given
        parser.print_help(sys.stderr)
        return 2
    try:
        return run(args)
    except BrokenPipeError:  # e.g. `kandinsky5 models | head`: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
