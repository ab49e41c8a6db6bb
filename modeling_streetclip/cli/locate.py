"""The `streetclip` command: geolocate folders of photos, or the images of a dataset, from the shell.

`streetclip locate` runs `geolocate_images` over image files, folders, glob patterns, a list of paths on standard
input or the image column of a `datasets` dataset, and streams one record per input (or per group of views of one
place) to JSON Lines, CSV or Parquet, resuming where a killed run stopped. Under `accelerate launch` or `torchrun`
the processes share the batches (see `app.batch`) and the main process alone plans the run, holds the output and
writes every record (see `app.distributed`). This module parses arguments, expands inputs, pools grouped views and
maps outcomes to exit codes; decoding and batching live in `app.batch`, result files in `app.records`, model loading
in `app.loading`.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..app import EXIT_OK, EXIT_SOME_FAILED, UsageError
from ..app.arguments import (
    add_batch_arguments,
    add_decision_arguments,
    add_placement_arguments,
    add_verbose_argument,
    decision_from,
    int_at_least,
)
from ..app.loading import load_gallery, load_model, model_fingerprint, quantization_config_for


if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..app.batch import GeolocationRecord
    from ..app.records import ParquetRecordWriter, RecordWriter
    from ..gallery_store import GeoGallery
    from ..modeling_streetclip import StreetCLIPForGeolocation


# The standard library's logger: `transformers.utils.logging.get_logger` returns this same logger for a name outside
# transformers' own, but importing it takes transformers along, which `streetclip --help` must not wait for.
logger = logging.getLogger(__name__)

QUANTIZATION_NAMES = ("int8",)
# The split --dataset reads unless told: the only split of an image folder, and the usual one of a photo collection.
DEFAULT_SPLIT = "train"
# --streaming reads this many batches per process at a time on the main process, which hands them to the others:
# enough to keep every process busy for a while, little enough to hold in memory (encoded images).
STREAM_BLOCK_BATCHES = 16
# The record field of a dataset row whose ids do not come from a column (file names, row numbers).
DEFAULT_ID_FIELD = "id"
# A --countries file lists at most a few hundred short lines; anything far larger is not one (and /dev/zero never ends).
MAX_COUNTRIES_FILE_BYTES = 1024 * 1024


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `locate` subcommand to the `streetclip` parser."""
    locate = commands.add_parser(
        "locate",
        help="geolocate image files, folders, glob patterns or a dataset; one record per input, resumable",
        description=(
            "Geolocate photos: the best country among the candidates, then the best city of that country (StreetCLIP's "
            "hierarchical zero-shot probing). Images are decoded in DataLoader workers and the model runs in "
            "batches; a progress bar on standard error shows images/s. One record per input streams to --output as "
            "soon as it is ready: its path (or dataset id) and its top_k answers (country, country_code, city, "
            "latitude, longitude, score, country_score, joint_probability; region and region_score for a model with a "
            "region level), ordered by --decision, or an `error` field with the reason. Runs unchanged on many "
            "processes, GPUs or machines: `accelerate launch -q [--num_processes N] -m modeling_streetclip.cli locate "
            "...` or `torchrun --nproc_per_node N -m modeling_streetclip.cli locate ...`; the processes share the "
            "batches, the main process writes every record, shows one progress bar for all, and the answers are those "
            "of one process. Give accelerate launch -q (--quiet): without it, a run that exits non-zero (some input "
            "failed) ends in the launcher's traceback, which since Accelerate 1.16 repeats everything this command "
            "wrote to standard error. Accelerate's note that some values 'were not passed to `accelerate launch`' "
            "comes from the launcher before this command starts: pass --num_processes, --num_machines, "
            "--mixed_precision and --dynamo_backend (and --num_cpu_threads_per_process with --cpu), or write a "
            "default config once with `accelerate config default`."
        ),
        epilog=(
            'Output: JSON Lines ({"path": ..., "answers": [{...}, ...]} or {"path": ..., "error": ...}), or CSV with '
            "one row per input and rank-suffixed answer columns (path, country_1, country_code_1, city_1, "
            "latitude_1, longitude_1, score_1, country_score_1, joint_probability_1, with region_1 and "
            "region_score_1 empty for a model without a region level, country_2, ..., error). Paths are absolute. "
            'With --group_by, records carry "group" and its member "paths" (a JSON list in CSV) instead of "path"; '
            "with --dataset, the row's id under the id column's name (or \"id\" for file names and row numbers). "
            "Every format is valid UTF-8: a byte of a file name that is not UTF-8 is written as a backslash escape, "
            "\\xff (Python's backslashreplace), the same in JSON Lines, CSV and Parquet; resume finds the file by it. "
            "Parquet (FILE.parquet): one row per input, answers as a list of structs, null where the error is; "
            "it loads with datasets.load_dataset('parquet', data_files=FILE). CSV cells that a spreadsheet would run as a formula (starting with = + - @) start with an apostrophe. "
            "Resume: rerunning the same command with the same --output skips the inputs already recorded (failed "
            "ones included: delete their records to retry them); a run killed at any moment leaves only complete "
            "records; an incomplete last record is cut off, saying how many bytes went. The options that shape answers "
            "(--model, with a fingerprint of a model folder's weight and config files, --countries, --top_k, "
            "--decision, --gallery, --group_by, --dtype, --quantize, and --streaming for a --dataset whose records "
            "are named by file name or row number) are recorded in FILE.options.json; a rerun with others stops, "
            "naming them, and --overwrite starts afresh. One run at a time writes a FILE; a run on several processes resumes what "
            "a run on any number wrote, and a process killed at any moment stops the others with it (the launcher's "
            "doing), leaving only complete records. A Parquet FILE is written in parts, in FILE.parts/, merged into "
            "FILE when the run ends. Exit status, of every process: 0 when every input was "
            "geolocated, 1 when some failed (a summary line on standard error counts them), 2 on usage errors "
            "(unknown or broken model, a model neither in a local folder nor in the Hub cache while the Hub cannot be "
            "reached, unreadable countries file or folder, unknown country, no inputs, an input path that does not "
            "exist, an output "
            "that is not a writable file, written with other options or by another run now, a write that failed, "
            "e.g. on a full disk: the complete records are kept), 130 when interrupted, 141 when the reader of "
            "standard output goes away."
        ),
    )
    locate.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUTS",
        help="image files, folders (their files in formats Pillow reads) or glob patterns such as 'photos/*.jpg'; "
        "'-' reads paths from standard input, one per line (or --dataset instead). A path named here that does not "
        "exist stops the run at once (status 2); one read from standard input gets an error record",
    )
    locate.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="geolocate the images of a datasets dataset instead of INPUTS: a Hub id, a folder written by "
        "save_to_disk, or an image folder (needs the datasets package: pip install 'streetclip[eval]')",
    )
    locate.add_argument(
        "--split",
        default=DEFAULT_SPLIT,
        help="the --dataset split to read; a dataset with one split is read whatever this says (default: %(default)s)",
    )
    locate.add_argument(
        "--image_column", help="the --dataset column of images (default: image, img, photo or jpg, when present)"
    )
    locate.add_argument(
        "--id_column",
        help="the --dataset column whose values name each record, under the column's name (default: img_id, "
        "image_id, id, key, file_name or filename when present; else the image file names when each has its own, "
        'else the row numbers, under "id"; with --streaming, the row numbers, so that an --output written with '
        "--streaming is resumed only with it, and one written without it only without it)",
    )
    locate.add_argument(
        "--streaming",
        action="store_true",
        help="read the --dataset as it is used instead of downloading or loading it first; the main process "
        "reads it and hands each block of rows to the others",
    )
    locate.add_argument(
        "--model",
        default="geolocal/StreetCLIP",
        help="Hub repo or local folder: a plain CLIP checkpoint, or a folder saved by StreetCLIPForGeolocation "
        "(loaded without its text tower). The default is downloaded from the Hugging Face Hub on first use and read "
        "from its cache after; offline, give a local folder (default: %(default)s)",
    )
    locate.add_argument(
        "--top_k",
        type=int_at_least(1),
        default=1,
        help="answers per input, in --decision's order (default: %(default)s)",
    )
    add_decision_arguments(locate)
    add_batch_arguments(locate)
    add_placement_arguments(locate)
    locate.add_argument(
        "--quantize",
        choices=QUANTIZATION_NAMES,
        help="int8: the vision tower with int8 weights and dynamic int8 activations, heads in float32; runs on the "
        "CPU in float32 (--device auto then picks the CPU), about 2.4x as fast as float32 there; on CPUs with AMX "
        "(lscpu: amx_bf16) --dtype bfloat16 is faster still (see the README's speed table)",
    )
    locate.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="result file, FILE.jsonl (JSON Lines), FILE.csv or FILE.parquet; added to and resumed when it exists "
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
    add_verbose_argument(locate)
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

    A named file is an input whatever its extension, so that a file that is not an image gets an error record
    rather than vanishing; so is a path read from `stdin` that is missing, and a URL, kept as written, whose record
    says that URLs are not fetched. A path in `arguments` that does not exist is a usage error, found before any
    model loads (a mistyped folder). A folder contributes its files in formats Pillow reads (a folder without any gets
    a warning). Absolute paths (symlinks kept, unlike `resolve`) are the identity that resume matches records by,
    whatever the working folder.
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
            if not looks_like_url(argument):
                _check_named_path(argument)
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


def _check_named_path(argument: str) -> None:
    """Refuse a path named on the command line that does not exist; one that cannot be looked up for another reason
    (a name longer than the file system allows, a folder without search permission) stays an input, whose error
    record gives the reason."""
    try:
        os.lstat(argument)
    except FileNotFoundError:
        raise UsageError(
            f"no such file or folder: {argument!r}; give image files, folders or glob patterns, or '-' to read paths "
            "from standard input."
        ) from None
    except OSError:
        pass


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
    """The countries of a --countries file (see `countries.read_country_list`), checked before any model loads.

    Only a regular file of at most MAX_COUNTRIES_FILE_BYTES is read: a device such as /dev/zero, or a pipe, could
    hold any amount of text.
    """
    from ..countries import read_country_list

    try:
        status = os.stat(path)
        if stat.S_ISREG(status.st_mode) and status.st_size <= MAX_COUNTRIES_FILE_BYTES:
            return read_country_list(path)
    except OSError as error:
        raise UsageError(f"cannot read --countries {str(path)!r}: {error}") from None
    except ValueError as error:
        raise UsageError(f"--countries: {error}") from None
    if not stat.S_ISREG(status.st_mode):
        kind = "a folder" if stat.S_ISDIR(status.st_mode) else "not a regular file (a device, pipe or socket)"
        raise UsageError(f"--countries {str(path)!r} is {kind}; give a text file with one country per line.")
    raise UsageError(
        f"--countries {str(path)!r} holds {status.st_size:,} bytes, where a list of countries, one per line, takes a "
        f"few kB (at most {MAX_COUNTRIES_FILE_BYTES:,} bytes are read); is it the right file?"
    )


def answer_options(args: argparse.Namespace, countries: list[str] | None) -> dict[str, Any]:
    """The options that shape the answers, recorded beside an --output file (see `records.open_records`) so that a
    rerun with other options stops instead of mixing its answers into the file. None stands for an option not given
    and is not recorded: an option added later (a decision rule, a gallery) joins this dict with None for its
    default, and files written before it stay resumable. A local model folder is recorded by its absolute path, as
    inputs are, so that a rerun from another working folder matches, and by the fingerprint of its files, so that a
    rerun with other weights in the same folder stops instead of mixing two models' answers in one file."""
    local_model = os.path.isdir(args.model)
    return {
        "model": os.path.abspath(args.model) if local_model else args.model,
        "model_weights": model_fingerprint(args.model) if local_model else None,
        "countries": countries,
        "top_k": args.top_k,
        # The paper's rule is what files written before --decision hold.
        "decision": None if args.decision == "greedy" else args.decision,
        "gallery": os.path.abspath(args.gallery) if args.gallery and os.path.isdir(args.gallery) else args.gallery,
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
    key_field: str,
    key: str,
    members: list,
    views: list[GeolocationRecord],
    grouped: bool,
    model: StreetCLIPForGeolocation,
    top_k: int,
    decision: str,
    gallery: GeoGallery | None = None,
) -> dict[str, Any]:
    """The output record of one input (or, with `grouped`, of one place from all its views), keyed by `key_field`."""
    if not grouped:
        (view,) = views
        return (
            {key_field: key, "answers": view.answers} if view.error is None else {key_field: key, "error": view.error}
        )
    errors = [view.error for view in views if view.error is not None]
    if errors:
        return {"group": key, "paths": members, "error": "; ".join(errors)}
    import torch

    from ..app.batch import pooled_answers

    embeds = torch.stack([view.image_embeds for view in views])
    return {"group": key, "paths": members, "answers": pooled_answers(model, embeds, top_k, decision, gallery)}


@dataclass
class _Plan:
    """What the main process found to do, handed to every process: the field naming records, the pending work as
    (key, members) pairs (member paths, or for a dataset the row number), and the counts for the summary."""

    key_field: str
    pending: list[tuple[str, list]]
    total: int = 0  # inputs (or groups) named, pending or not; a stream counts as it goes
    failed_before: int = 0  # of those recorded by an earlier run, the ones that failed


@dataclass
class _DatasetSource:
    """A --dataset as every process opens it: its images still encoded, and the columns to read."""

    dataset: Any  # datasets.Dataset, or an IterableDataset with --streaming
    image_column: str
    id_column: str | None
    name: str


def _open_dataset_source(args: argparse.Namespace) -> _DatasetSource:
    """Open --dataset (on every process: each reads its own rows of a memory-mapped dataset) and find its columns."""
    from ..app.sources import ID_COLUMNS, find_column, find_image_column, open_dataset

    try:
        dataset, split = open_dataset(args.dataset, args.split, streaming=args.streaming)
        name = f"--dataset {args.dataset!r}" + (f" (split {split!r})" if split else "")
        image_column = find_image_column(dataset, args.image_column, name)
        columns = dataset.column_names or []
        id_column = find_column(columns, args.id_column, ID_COLUMNS, "id", name, required=False)
    except (OSError, ValueError, ImportError) as error:
        raise UsageError(f"cannot read --dataset {args.dataset!r}: {error}") from None
    key_field = id_column or DEFAULT_ID_FIELD
    if key_field in ("answers", "error"):
        raise UsageError(
            f"the id column {key_field!r} of {name} has the name of a record field; rename it, or name another "
            "column with --id_column."
        )
    return _DatasetSource(dataset, image_column, id_column, name)


def _dataset_keys(source: _DatasetSource, args: argparse.Namespace) -> list[str]:
    """The record key of every row of a (map-style) dataset, each once (see `app.sources.row_ids`)."""
    from ..app.sources import EncodedImages, row_ids

    ids, _ = row_ids(
        source.dataset, EncodedImages(source.dataset, source.image_column), source.id_column, args.dataset, source.name
    )
    first_row: dict[str, int] = {}
    for row, key in enumerate(ids):
        if first_row.setdefault(key, row) != row:
            raise UsageError(
                f"{source.name} has the id {key!r} on rows {first_row[key]} and {row}; records are resumed by id, so "
                "each must be unique. Name a unique column with --id_column."
            )
    return ids


def _plan(
    args: argparse.Namespace,
    countries: list[str] | None,
    source: _DatasetSource | None,
    stack: ExitStack,
) -> tuple[_Plan, RecordWriter | ParquetRecordWriter]:
    """On the main process: the inputs, the output opened (locked, checked against the options that wrote it,
    resumed; kept open by `stack`) and what is left to do."""
    from ..app.records import open_records

    grouped = args.group_by is not None
    if source is None:
        paths = expand_inputs(args.inputs, args.recursive, sys.stdin)
        if not paths:
            raise UsageError(f"no inputs: {args.inputs} name no image file.")
        groups = group_views(paths, _group_pattern(args.group_by)) if grouped else [(path, [path]) for path in paths]
        key_field = "group" if grouped else "path"
    else:
        key_field = source.id_column or DEFAULT_ID_FIELD
        groups = [] if args.streaming else [(key, [row]) for row, key in enumerate(_dataset_keys(source, args))]
    options = None
    if args.output is not None:  # (standard output resumes nothing: no options to record, no weights to hash)
        options = answer_options(args, countries)
        if source is not None and source.id_column is None:
            # Rows are named by file name or row number without --streaming and by row number with it: a file
            # written one way is resumed only the same way.
            options["streaming"] = args.streaming or None
    writer = stack.enter_context(open_records(args.output, grouped, args.top_k, options, args.overwrite, key_field))
    pending = [(key, members) for key, members in groups if key not in writer.recorded]
    failed_before = sum(not writer.recorded[key] for key, _ in groups if key in writer.recorded)
    return _Plan(key_field, pending, len(groups), failed_before), writer


def _stream_blocks(
    source: _DatasetSource, recorded: dict[str, bool], plan: _Plan, rows_per_block: int
) -> Iterator[list[tuple[str, Any]]]:
    """On the main process: the rows of a streamed dataset not yet recorded, as blocks of (key, encoded image);
    counts every row in `plan`. A key met twice is refused, since records are resumed by key."""
    import datasets

    from ..app.sources import encoded_image

    stream = source.dataset.cast_column(source.image_column, datasets.Image(decode=False))
    seen: set[str] = set()
    block: list[tuple[str, Any]] = []
    for row, example in enumerate(stream):
        key = str(example[source.id_column]) if source.id_column else str(row)
        if key in seen:
            raise UsageError(
                f"{source.name} has the id {key!r} twice (again on row {row}); records are resumed by id, so each "
                "must be unique. Name a unique column with --id_column."
            )
        seen.add(key)
        plan.total += 1
        if key in recorded:
            plan.failed_before += not recorded[key]
            continue
        block.append((key, encoded_image(example[source.image_column])))
        if len(block) == rows_per_block:
            yield block
            block = []
    if block:
        yield block


def _load_on_every_process(
    args: argparse.Namespace, accelerator: Accelerator, countries: list[str] | None, quantization: Any
) -> tuple[StreetCLIPForGeolocation, Any, GeoGallery | None]:
    """The model, its image processor and the --gallery (None without one) on this process's device; the main
    process loads first, so that a model or gallery from the Hub is downloaded once, and one that fails to load
    anywhere stops every process."""
    import torch

    from ..app.distributed import on_every_process

    device = "cpu" if quantization is not None else accelerator.device
    if not accelerator.is_main_process:
        # One set of loading bars is enough; the main process shows it.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

    def load() -> tuple[StreetCLIPForGeolocation, Any, GeoGallery | None]:
        model, image_processor = load_model(args.model, device, getattr(torch, args.dtype), countries, quantization)
        gallery = None if args.gallery is None else load_gallery(args.gallery, model, image_processor, args.model)
        return model, image_processor, gallery

    return on_every_process(accelerator, load, main_process_first=True)


def _geolocate(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model_and_processor: tuple[StreetCLIPForGeolocation, Any, GeoGallery | None],
    key_field: str,
    pending: list[tuple[str, list]],
    views: Sequence,
    writer: RecordWriter | ParquetRecordWriter | None,
    progress: Any,
) -> int:
    """Geolocate the pending groups' views across the processes; the main process (which has the `writer`) writes
    one record per group and advances the `progress` bar by its views. Returns how many records failed."""
    from ..app.batch import geolocate_images

    model, image_processor, gallery = model_and_processor
    grouped = args.group_by is not None
    records = geolocate_images(
        model,
        image_processor,
        views,
        top_k=1 if grouped else args.top_k,  # pooled groups are ranked from their embeddings instead
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        return_embeddings=grouped,
        accelerator=accelerator,
        decision=args.decision,
        gallery=gallery,
    )
    failed = 0
    # Closed on a failed write too: its DataLoader workers, forked while the output was open, share the file's lock
    # and must stop before a rerun can take it.
    with closing(records):
        for key, members, group_records in _views_by_group(records, pending):
            if writer is None:
                continue  # another process: it ran its share of the batches, and the main process records them
            record = _record(
                key_field, key, members, group_records, grouped, model, args.top_k, args.decision, gallery
            )
            writer.write(record)
            failed += "error" in record
            progress.update(len(members))
    return failed


def _check_invocation(args: argparse.Namespace) -> None:
    """Refuse combinations of inputs and options that cannot run, before anything is read."""
    if args.dataset is None and not args.inputs:
        raise UsageError("no inputs: give image files, folders or patterns, or --dataset NAME_OR_PATH.")
    if args.dataset is not None:
        if args.inputs:
            raise UsageError(f"give either INPUTS ({args.inputs}) or --dataset {args.dataset!r}, not both.")
        for option in ("group_by", "recursive"):
            if getattr(args, option):
                raise UsageError(f"--{option} applies to file inputs; --dataset rows are answered one by one.")
    elif args.streaming or args.image_column or args.id_column:
        raise UsageError("--streaming, --image_column and --id_column apply to --dataset.")
    if args.overwrite and args.output is None:
        raise UsageError("--overwrite needs --output: standard output has nothing to overwrite.")
    args.decision = decision_from(args)


def locate_command(args: argparse.Namespace) -> int:
    """`streetclip locate`: geolocate every input not yet recorded in --output, then report and set the status, on
    one process or on every process a launcher started."""
    # Imported here, not at the top, so that `streetclip --help` answers without loading torch. (The package registers
    # itself with transformers once transformers is imported; registering again would warn on every run.)
    from ..app.distributed import make_accelerator, quiet_unless_main

    quantization = quantization_config_for(args.quantize, args.device, args.dtype)
    accelerator = make_accelerator(args.device, cpu_only=quantization is not None)
    return quiet_unless_main(accelerator, lambda: _locate(args, accelerator, quantization))


def _locate(args: argparse.Namespace, accelerator: Accelerator, quantization: Any) -> int:
    from tqdm import tqdm

    from ..app.distributed import on_every_process, on_main_process

    _check_invocation(args)
    # Read where the output is written (the other machines of a run may not have the file); shared with all.
    countries = on_main_process(
        accelerator, lambda: read_countries(args.countries) if args.countries is not None else None
    )
    source = None
    if args.dataset is not None:
        source = on_every_process(accelerator, lambda: _open_dataset_source(args), main_process_first=True)
    main = accelerator.is_main_process
    with ExitStack() as stack:
        writer = None

        def plan_on_main() -> _Plan:
            nonlocal writer
            plan, writer = _plan(args, countries, source, stack)
            return plan

        # Planned (output opened, locked, checked, resumed) before the model loads, so that an output this run cannot
        # use stops it at once.
        plan = on_main_process(accelerator, plan_on_main)

        def progress_bar(total: int | None) -> tqdm:
            """One bar, on the main process, counting the images of every process."""
            return stack.enter_context(
                tqdm(total=total, unit="img", desc="streetclip locate", file=sys.stderr, disable=not main)
            )

        failed = processed = 0
        if args.streaming:
            rows_per_block = args.batch_size * accelerator.num_processes * STREAM_BLOCK_BATCHES
            blocks = _stream_blocks(source, writer.recorded, plan, rows_per_block) if main else None
            block = on_main_process(accelerator, lambda: next(blocks, None))
            if block:  # (else everything was recorded before: no model to load, no bar to show)
                model = _load_on_every_process(args, accelerator, countries, quantization)
                progress = progress_bar(None)  # a stream's length is unknown
            while block:
                pending = [(key, [row]) for row, (key, _) in enumerate(block)]
                views = [image for _, image in block]
                failed += _geolocate(args, accelerator, model, plan.key_field, pending, views, writer, progress)
                processed += len(block)
                block = on_main_process(accelerator, lambda: next(blocks, None))
        elif plan.pending:
            model = _load_on_every_process(args, accelerator, countries, quantization)
            if source is None:
                views = [path for _, members in plan.pending for path in members]
            else:
                from ..app.sources import EncodedImages

                views = EncodedImages(source.dataset, source.image_column).select([row for _, (row,) in plan.pending])
            progress = progress_bar(len(views))
            failed = _geolocate(args, accelerator, model, plan.key_field, plan.pending, views, writer, progress)
            processed = len(plan.pending)

        def finish() -> int:
            stack.close()  # the output's last records, and for Parquet the merge, before the summary counts them
            return _summarize(args, plan, processed, failed)

        return on_main_process(accelerator, finish)


def _summarize(args: argparse.Namespace, plan: _Plan, processed: int, failed_now: int) -> int:
    """Print the summary of the whole run (every process's inputs, and those recorded before) and return the exit
    status."""
    failed = plan.failed_before + failed_now
    noun = "groups" if args.group_by is not None else "inputs"
    summary = f"streetclip locate: {plan.total - failed} of {plan.total} {noun} geolocated"
    if failed:
        summary += f", {failed} failed (see the error field)"
    if plan.total > processed:
        summary += f"; {plan.total - processed} were recorded by an earlier run"
    print(summary, file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


__all__ = ["add_parser", "expand_inputs", "group_views", "locate_command", "read_countries"]
