"""The `streetclip` command: geolocate folders of photos from the shell.

`streetclip locate` runs `geolocate_images` over image files, folders, glob patterns or a list of paths on standard
input, and streams one record per input (or per group of views of one place) to JSON Lines or CSV, resuming where a
killed run stopped. This module parses arguments, expands inputs, pools grouped views and maps outcomes to exit
codes; decoding and batching live in `batch_geolocation`, result files in `records`.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from . import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS, EXIT_OK, EXIT_SOME_FAILED, UsageError, int_at_least


if TYPE_CHECKING:
    import torch

    from ..modeling_streetclip import StreetCLIPForGeolocation
    from .batch_geolocation import GeolocationRecord
    from .records import RecordWriter


# The standard library's logger: `transformers.utils.logging.get_logger` returns this same logger for a name outside
# transformers' own, but importing it takes transformers along, which `streetclip --help` must not wait for.
logger = logging.getLogger(__name__)

# Weight precisions by name; torch is imported only once a command runs.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATION_NAMES = ("int8",)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `locate` subcommand to the `streetclip` parser."""
    locate = commands.add_parser(
        "locate",
        help="geolocate image files, folders or glob patterns; one record per input, resumable",
        description=(
            "Geolocate photos: the best country among the candidates, then the best city of that country (StreetCLIP's "
            "hierarchical zero-shot probing). Images are decoded in DataLoader workers and the model runs in "
            "batches; a progress bar on standard error shows images/s. One record per input streams to --output as "
            "soon as it is ready: its path and its top_k answers (country, country_code, city, latitude, longitude, "
            "score, country_score) or an `error` field with the reason."
        ),
        epilog=(
            'Output: JSON Lines ({"path": ..., "answers": [{...}, ...]} or {"path": ..., "error": ...}), or CSV with '
            "one row per input and rank-suffixed answer columns (path, country_1, country_code_1, city_1, "
            "latitude_1, longitude_1, score_1, country_score_1, country_2, ..., error). Paths are absolute. "
            'With --group_by, records carry "group" and its member "paths" (a JSON list in CSV) instead of "path". '
            "CSV cells that a spreadsheet would run as a formula (starting with = + - @) start with an apostrophe. "
            "Resume: rerunning the same command with the same --output skips the inputs already recorded (failed "
            "ones included: delete their records to retry them); a run killed at any moment leaves only complete "
            "records. The options that shape answers (--model, --countries, --top_k, --group_by, --dtype, "
            "--quantize) are recorded in FILE.options.json; a rerun with others stops, naming them, and "
            "--overwrite starts afresh. One run at a time writes a FILE. Exit status: 0 when every input was "
            "geolocated, 1 when some failed (a summary line on standard error counts them), 2 on usage errors "
            "(unknown or broken model, unreadable countries file or folder, unknown country, no inputs, an output "
            "that is not a writable file, written with other options or by another run now, a write that failed, "
            "e.g. on a full disk: the complete records are kept), 130 when interrupted, 141 when the reader of "
            "standard output goes away."
        ),
    )
    locate.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUTS",
        help="image files, folders (their files in formats Pillow reads) or glob patterns such as 'photos/*.jpg'; "
        "'-' reads paths from standard input, one per line",
    )
    locate.add_argument(
        "--model",
        default="geolocal/StreetCLIP",
        help="Hub repo or local folder: a plain CLIP checkpoint, or a folder saved by StreetCLIPForGeolocation "
        "(loaded without its text tower) (default: %(default)s)",
    )
    locate.add_argument(
        "--top_k", type=int_at_least(1), default=1, help="answers per input, best first (default: %(default)s)"
    )
    locate.add_argument(
        "--batch_size",
        type=int_at_least(1),
        default=DEFAULT_BATCH_SIZE,
        help="images per forward pass (default: %(default)s)",
    )
    locate.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model runs; auto picks cuda when available (default: %(default)s)",
    )
    locate.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="float32", help="model weight precision (default: %(default)s)"
    )
    locate.add_argument(
        "--quantize",
        choices=QUANTIZATION_NAMES,
        help="int8: the vision tower with int8 weights and dynamic int8 activations, heads in float32; runs on the "
        "CPU in float32 (--device auto then picks the CPU), about twice as fast there as float32",
    )
    locate.add_argument(
        "--workers",
        type=int_at_least(0),
        default=DEFAULT_NUM_WORKERS,
        metavar="N",
        help="DataLoader worker processes that decode and preprocess images; 0 decodes in the main process "
        "(default: %(default)s)",
    )
    locate.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="result file, FILE.jsonl (JSON Lines) or FILE.csv; appended to and resumed when it exists "
        "(default: JSON Lines on standard output, without resume)",
    )
    locate.add_argument(
        "--overwrite",
        action="store_true",
        help="empty --output first and start afresh, instead of resuming it (needed to change its options)",
    )
    locate.add_argument(
        "--countries",
        type=Path,
        metavar="FILE",
        help="text file of candidate countries, one name or ISO code per line ('#' starts a comment); restricts "
        "the answers to them",
    )
    locate.add_argument(
        "--recursive",
        action="store_true",
        help="descend into subfolders of folder inputs, and let '**' in glob patterns match any depth",
    )
    locate.add_argument(
        "--group_by",
        metavar="REGEX",
        help="pool views of one place: inputs whose absolute path gives the same capture group 1 of "
        "re.search(REGEX, path) form a group, answered once from the mean of their image embeddings (e.g. "
        r"'(pano_\d+)_heading' for the headings of one Street View panorama). An input the REGEX does not match "
        "is a group of its own; a group with an unreadable view gets an error record",
    )
    locate.set_defaults(run=locate_command)


@cache
def _readable_extensions() -> frozenset[str]:
    """File extensions of the formats Pillow can open, which decide what a folder contributes."""
    from PIL import Image

    return frozenset(
        suffix for suffix, image_format in Image.registered_extensions().items() if image_format in Image.OPEN
    )


def _folder_images(folder: str, recursive: bool) -> list[str]:
    """The files of `folder` (and with `recursive` of its subfolders) in formats Pillow reads, sorted.

    A folder named as an input that cannot be read is a usage error, rather than an input that silently gives
    nothing; an unreadable subfolder, deep in a collection, is skipped with a warning.
    """

    def unreadable(error: OSError) -> None:
        if error.filename == folder:
            raise error
        logger.warning(f"streetclip locate: skipping the folder {error.filename!r}: {error.strerror}.")

    try:
        if recursive:
            walk = os.walk(folder, onerror=unreadable)
            files = [os.path.join(root, name) for root, _, names in walk for name in names]
        else:
            files = [entry.path for entry in os.scandir(folder) if entry.is_file()]
    except OSError as error:
        raise UsageError(f"cannot read the folder {folder!r}: {error.strerror or error}.") from None
    return sorted(path for path in files if os.path.splitext(path)[1].lower() in _readable_extensions())


def expand_inputs(arguments: list[str], recursive: bool, stdin: TextIO) -> list[str]:
    """Absolute paths of the images that files, folders, glob patterns and '-' (paths on `stdin`) name, each once,
    in order of first mention.

    A named file is an input whatever its extension, so that a path that is missing or not an image gets an error
    record rather than vanishing; so is a URL, kept as written, whose record says that URLs are not fetched. A folder
    contributes its files in formats Pillow reads (a folder without any gets a warning). Absolute paths (symlinks
    kept, unlike `resolve`) are the identity that resume matches records by, whatever the working folder.
    """
    from ..images import looks_like_url

    paths: dict[str, None] = {}
    for argument in arguments:
        if argument == "-":
            named = [line.rstrip("\r\n") for line in stdin if line.strip()]
        elif not os.path.lexists(argument) and not looks_like_url(argument) and any(c in argument for c in "*?["):
            named = sorted(glob.glob(argument, recursive=recursive))
            if not named:
                logger.warning(f"streetclip locate: the pattern {argument!r} matches no file.")
        else:
            named = [argument]
        for name in named:
            if os.path.isdir(name):
                images = _folder_images(name, recursive)
                if not images:
                    subfolders = "" if recursive else " (--recursive descends into subfolders)"
                    logger.warning(f"streetclip locate: the folder {name!r} holds no image file{subfolders}.")
                paths.update(dict.fromkeys(map(os.path.abspath, images)))
            elif looks_like_url(name) and not os.path.lexists(name):
                paths.setdefault(name, None)
            else:
                paths.setdefault(os.path.abspath(name), None)
    return list(paths)


def group_views(paths: list[str], pattern: re.Pattern) -> list[tuple[str, list[str]]]:
    """`(key, member paths)` per place, in order of first appearance: the key is capture group 1 of `pattern`
    searched in the path; a path it does not match is a group of its own, keyed by the path."""
    groups: dict[str, list[str]] = {}
    unmatched = []
    for path in paths:
        match = pattern.search(path)
        key = match.group(1) if match else None
        if key is None:
            unmatched.append(path)
            key = path
        groups.setdefault(key, []).append(path)
    if unmatched:
        logger.warning(
            f"streetclip locate: --group_by {pattern.pattern!r} does not match {len(unmatched)} of {len(paths)} "
            f"inputs (e.g. {unmatched[0]!r}); each of them is a group of its own."
        )
    return list(groups.items())


def _group_pattern(regex: str) -> re.Pattern:
    try:
        pattern = re.compile(regex)
    except re.error as error:
        raise UsageError(f"--group_by {regex!r} is not a valid regular expression: {error}.") from None
    if pattern.groups < 1:
        raise UsageError(f"--group_by {regex!r} has no capture group; put the part naming the place in (...).")
    return pattern


def read_countries(path: Path) -> list[str]:
    """The countries of a --countries file (see `gazetteer.read_country_list`), checked before any model loads."""
    from ..gazetteer import read_country_list

    try:
        return read_country_list(path)
    except OSError as error:
        raise UsageError(f"cannot read --countries {str(path)!r}: {error}") from None
    except ValueError as error:
        raise UsageError(f"--countries: {error}") from None


def quantization_config_for(quantize: str | None, device: str, dtype: str) -> Any:
    """The quantization config that `--quantize` names (None without it), after checking that `--device` and
    `--dtype` allow it."""
    if quantize is None:
        return None
    if device == "cuda":
        raise UsageError(f"--quantize {quantize} runs on the CPU; drop --device cuda, or use --dtype bfloat16 there.")
    if dtype != "float32":
        raise UsageError(f"--quantize {quantize} computes in float32; drop --dtype {dtype}.")
    from ..quantization import Int8DynamicConfig

    return Int8DynamicConfig()


def load_model(
    name: str, device: str, dtype: torch.dtype, countries: list[str] | None, quantization_config: Any = None
) -> tuple[StreetCLIPForGeolocation, Any]:
    """The model and its image processor, on `device`, restricted to `countries` when given, quantized as
    `quantization_config` says when given."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    from ..modeling_streetclip import StreetCLIPForGeolocation
    from ..processing_streetclip import StreetCLIPProcessor

    try:
        image_processor = StreetCLIPProcessor.from_pretrained(name).image_processor
        model = StreetCLIPForGeolocation.from_pretrained(
            name, dtype=dtype, vision_only="auto", quantization_config=quantization_config
        )
    # A broken folder fails in many ways: unreadable JSON or weights (OSError, ValueError, SafetensorError), a
    # malformed candidate table (StrictDataclassError, TypeError, KeyError), heads whose sizes do not match it
    # (RuntimeError). ImportError: the quantization route is unavailable.
    except (
        OSError,
        ValueError,
        ImportError,
        TypeError,
        KeyError,
        RuntimeError,
        SafetensorError,
        StrictDataclassError,
    ) as error:
        raise UsageError(f"cannot load --model {name!r}: {error}") from None
    if countries is not None:
        try:
            model.restrict_countries(countries)
        except ValueError as error:
            raise UsageError(f"--countries: {error}") from None
    return model.to(device), image_processor


def answer_options(args: argparse.Namespace, countries: list[str] | None) -> dict[str, Any]:
    """The options that shape the answers, recorded beside an --output file (see `records.open_records`) so that a
    rerun with other options stops instead of mixing its answers into the file. None stands for an option not given
    and is not recorded: an option added later (a decision rule, a gallery) joins this dict with None for its
    default, and files written before it stay resumable. A local model folder is recorded by its absolute path, as
    inputs are, so that a rerun from another working folder matches."""
    return {
        "model": os.path.abspath(args.model) if os.path.isdir(args.model) else args.model,
        "countries": countries,
        "top_k": args.top_k,
        "group_by": args.group_by,
        "dtype": args.dtype,
        "quantize": args.quantize,
    }


def _views_by_group(
    records: Iterator[GeolocationRecord], groups: list[tuple[str, list[str]]]
) -> Iterator[tuple[str, list[str], list[GeolocationRecord]]]:
    """Each group with the records of its views, as soon as its last view is done (records come in input order)."""
    for key, members in groups:
        yield key, members, [next(records) for _ in members]


def _record(
    key: str,
    members: list[str],
    views: list[GeolocationRecord],
    grouped: bool,
    model: StreetCLIPForGeolocation,
    top_k: int,
) -> dict[str, Any]:
    """The output record of one input (or, with `grouped`, of one place from all its views)."""
    if not grouped:
        (view,) = views
        return {"path": key, "answers": view.answers} if view.error is None else {"path": key, "error": view.error}
    errors = [view.error for view in views if view.error is not None]
    if errors:
        return {"group": key, "paths": members, "error": "; ".join(errors)}
    import torch

    from .batch_geolocation import pooled_answers

    embeds = torch.stack([view.image_embeds for view in views])
    return {"group": key, "paths": members, "answers": pooled_answers(model, embeds, top_k)}


def _locate_pending(
    args: argparse.Namespace,
    pending: list[tuple[str, list[str]]],
    grouped: bool,
    countries: list[str] | None,
    writer: RecordWriter,
) -> int:
    """Load the model, geolocate the pending groups' views and write one record per group; the number that failed."""
    import torch
    from tqdm import tqdm

    from .batch_geolocation import geolocate_images

    quantization = quantization_config_for(args.quantize, args.device, args.dtype)
    # A quantized model runs on the CPU (checked above), so auto picks it then.
    use_cuda = torch.cuda.is_available() and quantization is None
    device = args.device if args.device != "auto" else ("cuda" if use_cuda else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device; use --device cpu or auto.")
    model, image_processor = load_model(args.model, device, getattr(torch, args.dtype), countries, quantization)
    views = [path for _, members in pending for path in members]
    records = geolocate_images(
        model,
        image_processor,
        views,
        top_k=1 if grouped else args.top_k,  # pooled groups are ranked from their embeddings instead
        batch_size=args.batch_size,
        num_workers=args.workers,
        return_embeddings=grouped,
    )
    failed = 0
    with tqdm(total=len(views), unit="img", desc="streetclip locate", file=sys.stderr) as progress:
        for key, members, group_records in _views_by_group(records, pending):
            record = _record(key, members, group_records, grouped, model, args.top_k)
            writer.write(record)
            failed += "error" in record
            progress.update(len(members))
    return failed


def locate_command(args: argparse.Namespace) -> int:
    """`streetclip locate`: geolocate every input not yet recorded in --output, then report and set the status."""
    # Imported here, not at the top, so that `streetclip --help` answers without loading torch.
    from .. import register_with_transformers
    from .records import open_records

    register_with_transformers()
    grouped = args.group_by is not None
    pattern = _group_pattern(args.group_by) if grouped else None
    countries = read_countries(args.countries) if args.countries is not None else None
    paths = expand_inputs(args.inputs, args.recursive, sys.stdin)
    if not paths:
        raise UsageError(f"no inputs: {args.inputs} name no image file.")
    groups = group_views(paths, pattern) if grouped else [(path, [path]) for path in paths]
    if args.overwrite and args.output is None:
        raise UsageError("--overwrite needs --output: standard output has nothing to overwrite.")
    # Opened (locked, checked against the options that wrote it, resumed) before the model loads, so that an output
    # this run cannot use stops it at once.
    with open_records(args.output, grouped, args.top_k, answer_options(args, countries), args.overwrite) as writer:
        pending = [(key, members) for key, members in groups if key not in writer.recorded]
        failed = sum(not writer.recorded[key] for key, _ in groups if key in writer.recorded)
        if pending:
            failed += _locate_pending(args, pending, grouped, countries, writer)

    noun = "groups" if grouped else "inputs"
    summary = f"streetclip locate: {len(groups) - failed} of {len(groups)} {noun} geolocated"
    if failed:
        summary += f", {failed} failed (see the error field)"
    if len(groups) > len(pending):
        summary += f"; {len(groups) - len(pending)} were recorded by an earlier run"
    print(summary, file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


__all__ = ["add_parser", "expand_inputs", "group_views", "locate_command", "read_countries"]
