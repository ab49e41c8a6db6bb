"""The `streetclip` command: geolocation from the shell, one subcommand per task (as `transformers/cli/` is laid out).

Subcommand modules import torch and transformers only when their command runs, so `streetclip --help` answers at
once. Exit statuses are shared by every subcommand: 0 all done, 1 some inputs failed, 2 usage error.
"""

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

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


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """--verbose, alike in every command that loads a model or a dataset (see `verbosity`)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' loading bars (transformers' weights, datasets' files and splits) and this "
        "package's notes on how inputs were read; without it, only the command's own progress bar, warnings and "
        "errors are shown (and Hub downloads, with their bars)",
    )


@contextmanager
def verbosity(verbose: bool) -> Iterator[None]:
    """Hide the loading bars of transformers and datasets and this package's info messages unless `verbose`, for
    the duration of a command; the previous settings come back afterwards (commands also run in-process).

    Hub downloads keep their bars either way: a download of a large model is long, and its bar is the only sign of
    progress. A command's own progress bar and summary are not library output and always show.
    """
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    try:
        import datasets
    except ImportError:  # inference without the [eval] or [train] extra: no datasets bars to hide
        datasets = None

    def show_bars(transformers_bars: bool, datasets_bars: bool, hub_bars: bool) -> None:
        (
            transformers_logging.enable_progress_bar
            if transformers_bars
            else transformers_logging.disable_progress_bar
        )()
        if datasets is not None:
            (datasets.enable_progress_bars if datasets_bars else datasets.disable_progress_bars)()
        # Last: transformers switches the Hub's bars along with its own.
        (hub_utils.enable_progress_bars if hub_bars else hub_utils.disable_progress_bars)()

    saved = (
        transformers_logging.is_progress_bar_enabled(),
        datasets is not None and datasets.is_progress_bar_enabled(),
        not hub_utils.are_progress_bars_disabled(),
    )
    package_logger = logging.getLogger(__package__.rpartition(".")[0])
    saved_level = package_logger.level
    # The package's loggers have no handler of their own, and the root's last resort shows warnings only.
    handler = logging.StreamHandler(sys.stderr) if verbose else None
    if handler is not None:
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
    show_bars(verbose, verbose, saved[2])
    try:
        yield
    finally:
        show_bars(*saved)
        if handler is not None:
            package_logger.removeHandler(handler)
            package_logger.setLevel(saved_level)


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
        with verbosity(args.verbose) if hasattr(args, "verbose") else nullcontext():
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
    "add_verbose_argument",
    "build_parser",
    "int_at_least",
    "main",
    "verbosity",
]
