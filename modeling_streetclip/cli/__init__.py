"""The `streetclip` command, one subcommand per task (as in `transformers/cli/`): argument parsing and the commands
only; what they run lives in `app/`, and torch is imported only when one runs, so that `--help` answers at once."""

import argparse
import os
import sys
from contextlib import nullcontext

from ..app import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE
from ..app.arguments import verbosity
from ..app.distributed import COMMAND_ERRORS
from . import calibrate, export, index, locate


def build_parser() -> argparse.ArgumentParser:
    """The `streetclip` argument parser, one subcommand per task."""
    parser = argparse.ArgumentParser(
        prog="streetclip", description="StreetCLIP: zero-shot image geolocation with CLIP, from the shell."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (locate, index, export, calibrate):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `streetclip` and return its exit status (argparse itself exits on --help and on malformed options)."""
    args = build_parser().parse_args(argv)
    try:
        with verbosity(args.verbose) if hasattr(args, "verbose") else nullcontext():
            return args.run(args)
    except COMMAND_ERRORS as error:
        print(f"streetclip {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"streetclip {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Standard output points nowhere now; Python's flush at exit must not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


__all__ = ["build_parser", "main"]
