"""The command-line options that `streetclip locate`, `streetclip index build` and eval/benchmark.py share, declared
once, without importing torch (so that `--help` answers at once)."""

import argparse
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from ..decisions import DECISIONS, check_decision, default_decision
from . import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS, UsageError


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, refused with a message that names the bad value."""

    def parse(text: str) -> int:
        with suppress(ValueError):
            if int(text) >= minimum:
                return int(text)
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")

    return parse


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    """--batch_size and --num_workers."""
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
        help="DataLoader processes that decode images; 0 decodes in this one (default: %(default)s, at most the cores)",
    )


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto picks cuda when available (default: %(default)s)",
    )
    parser.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32", help="weight precision (default: %(default)s)"
    )


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """--backend and --quantize."""
    parser.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="torch runs the model's weights; onnxruntime runs the graph MODEL/onnx/model.onnx that `streetclip "
        "export` writes, on the CPU (needs streetclip[onnx]) (default: %(default)s)",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        help="an int8 vision tower, on the CPU in float32 (with AMX, --dtype bfloat16 is faster: README, speed); "
        "with --backend onnxruntime, the int8 graph MODEL/onnx/model_quantized.onnx",
    )


def add_decision_arguments(parser: argparse.ArgumentParser) -> None:
    """--decision and --gallery (see `decision_from`)."""
    parser.add_argument(
        "--decision",
        choices=DECISIONS,
        help="how answers are chosen and ordered: greedy (the paper's: country, then city within it), joint (by joint "
        "probability), expected_distance (the Bayes rule for the mean error: least expected great-circle distance "
        "under the posterior), within_km (most probability within the model's decision_radius_km, 25: most accuracy "
        "at that distance), or with --gallery: gallery (a vote of the nearest gallery photos) or hybrid (that vote "
        "within the most probable countries) (default: greedy, and gallery with --gallery)",
    )
    parser.add_argument(
        "--gallery",
        metavar="FOLDER_OR_REPO",
        help="a gallery built with --model by `streetclip index build` (a folder or a Hub dataset repo); answers "
        "then add gallery_row and similarity",
    )


def decision_from(args: argparse.Namespace) -> str:
    """The rule --decision names, or `decisions.default_decision`; a gallery rule without --gallery is a usage error."""
    decision = args.decision or default_decision(args.gallery)
    try:
        check_decision(decision, args.gallery)
    except ValueError:
        raise UsageError(
            f"--decision {decision} votes among the photos of a gallery; give it with --gallery."
        ) from None
    return decision


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """--verbose (see `verbosity`)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the libraries' loading bars and this package's notes on how inputs were read",
    )


@contextmanager
def verbosity(verbose: bool) -> Iterator[None]:
    """Hide the loading bars of transformers and datasets and this package's info messages unless `verbose`, while a
    command runs (perhaps in-process); Hub downloads keep their bars, a long download's only sign of progress."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    try:
        import datasets
    except ImportError:  # no datasets bars to hide
        datasets = None

    def show_bars(transformers_bars: bool, datasets_bars: bool, hub_bars: bool) -> None:
        (hf_logging.enable_progress_bar if transformers_bars else hf_logging.disable_progress_bar)()
        if datasets is not None:
            (datasets.enable_progress_bars if datasets_bars else datasets.disable_progress_bars)()
        # Last: transformers switches the Hub's bars along with its own.
        (hub_utils.enable_progress_bars if hub_bars else hub_utils.disable_progress_bars)()

    saved = (
        hf_logging.is_progress_bar_enabled(),
        datasets is not None and datasets.is_progress_bar_enabled(),
        not hub_utils.are_progress_bars_disabled(),
    )
    package_logger = logging.getLogger(__package__.rpartition(".")[0])
    saved_level = package_logger.level
    handler = logging.StreamHandler(sys.stderr)  # the package's loggers have none, and the root shows warnings only
    if verbose:
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
    show_bars(verbose, verbose, saved[2])
    try:
        yield
    finally:
        show_bars(*saved)
        package_logger.removeHandler(handler)
        package_logger.setLevel(saved_level)
