"""The command-line options that `streetclip locate`, `streetclip index build` and eval/benchmark.py share, declared
once: `--batch_size`, `--num_workers`, `--device`, `--dtype`, `--decision` with `--gallery`, and `--verbose` (with
what it does, `verbosity`).

Nothing here imports torch or transformers before a command runs, so that `--help` answers at once.
"""

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from ..decisions import DECISIONS, check_decision, default_decision
from . import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS, UsageError


# Weight precisions by name; torch is imported only once a command runs.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


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


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """--batch_size and --num_workers, alike in every command that runs images through the model."""
    parser.add_argument(
        "--batch_size",
        type=int_at_least(1),
        default=DEFAULT_BATCH_SIZE,
        help="images per forward pass (default: %(default)s)",
    )
    parser.add_argument(
        "--num_workers",
        type=int_at_least(0),
        default=DEFAULT_NUM_WORKERS,
        metavar="N",
        help="DataLoader worker processes that decode and preprocess images; 0 decodes in the main process "
        "(default: %(default)s, at most the cores this process may use)",
    )


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, alike in every command that runs the model."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs; auto picks cuda when available (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32", help="model weight precision (default: %(default)s)"
    )


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """--decision and --gallery, alike in every command that answers (see `decision_from`)."""
    parser.add_argument(
        "--decision",
        choices=DECISIONS,
        help="how answers are chosen and ordered: greedy (the paper's: countries by p(country), then cities by "
        "p(city | country), score = p(city | country)), joint (by joint probability, the score), "
        "expected_distance (by expected_distance_km, the expected distance to the true place under the joint "
        "posterior, smallest first; score = joint probability), or with --gallery: gallery (a vote of the nearest "
        "gallery photos; the answer is a photo's place) or hybrid (that vote restricted to the most probable "
        "zero-shot countries and weighted by them) (default: greedy, and gallery with --gallery)",
    )
    parser.add_argument(
        "--gallery",
        metavar="FOLDER_OR_REPO",
        help="a retrieval gallery built with --model by `streetclip index build` (a folder or a Hub dataset repo) "
        "for --decision gallery or hybrid; answers then add gallery_row and similarity. Each process loads it",
    )


def decision_from(args: argparse.Namespace) -> str:
    """The rule that --decision names, or the default one (`decisions.default_decision`); a gallery rule without
    --gallery is a usage error, found before anything loads."""
    decision = args.decision or default_decision(args.gallery)
    try:
        check_decision(decision, args.gallery)
    except ValueError:
        raise UsageError(
            f"--decision {decision} votes among the photos of a gallery; give it with --gallery."
        ) from None
    return decision


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


__all__ = [
    "DTYPE_NAMES",
    "add_batch_arguments",
    "add_decision_arguments",
    "add_placement_arguments",
    "add_verbose_argument",
    "decision_from",
    "int_at_least",
    "verbosity",
]
