"""The `streetclip` command: geolocation from the shell, one subcommand per task (as `transformers/cli/` is laid out).

Subcommand modules import torch and transformers only when their command runs, so `streetclip --help` answers at
once. Exit statuses are shared by every subcommand: 0 all done, 1 some inputs failed, 2 usage error.
"""

import argparse
import os
import sys

from .records import ResultFileError


EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # the shell's status for a command stopped by Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE = 141  # and for one whose reader went away, as in `| head` (128 + SIGPIPE)

# Batch inference defaults of `geolocate_images`, shared by `streetclip locate` and eval/benchmark.py; they live here,
# not in batch_geolocation, so that `--help` can show them without importing torch. StreetCLIP's vision tower
# (ViT-L/14-336, random weights, forward only) on an H200 ran 833 / 1029 / 1052 img/s at batch 8 / 32 / 64 in bfloat16
# and 94 / 109 / 114 in float32: 32 takes nearly all of the gain, and a killed run loses at most one batch.
DEFAULT_BATCH_SIZE = 32
# Decoding and resizing a photo takes milliseconds of one core: a few workers overlap it with the forward pass. More
# workers than the cores this process may use would only take time from the model (and make torch warn).
DEFAULT_NUM_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class UsageError(ValueError):
    """A command line that cannot run (bad model, countries file, inputs or options); exits with status 2."""


def int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, refused with a message that names the bad value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The `streetclip` argument parser, one subcommand per task."""
    parser = argparse.ArgumentParser(
        prog="streetclip",
        description="StreetCLIP: zero-shot image geolocation with CLIP, from the shell.",
    )
    from . import index, locate  # after the names above, which the subcommand modules import

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    locate.add_parser(commands)
    index.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `streetclip` and return its exit status (argparse itself exits on --help and on malformed options)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, ResultFileError) as error:
        print(f"streetclip {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"streetclip {args.command}: interrupted; rerun the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Standard output points nowhere now; Python's flush at exit must not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_NUM_WORKERS",
    "EXIT_OK",
    "EXIT_SOME_FAILED",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "int_at_least",
    "main",
]
