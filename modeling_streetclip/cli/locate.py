"""`streetclip locate`: its arguments, and the run. The main process plans it and writes every record; the batches
are shared by every process a launcher started (`app.distributed`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..app import EXIT_OK, EXIT_SOME_FAILED, UsageError
from ..app.arguments import (
    add_backend_arguments,
    add_batch_arguments,
    add_decision_arguments,
    add_placement_arguments,
    add_verbose_argument,
    decision_from,
    int_at_least,
)
from ..app.loading import graph_file_for, load_on_every_process, model_fingerprint, quantization_config_for


if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..app.batch import GeolocationRecord
    from ..app.records import ParquetRecordWriter, RecordWriter
    from ..app.sources import DatasetSource


# --streaming reads this many batches per process at a time on the main process, which hands them to the others.
STREAM_BLOCK_BATCHES = 16


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `locate` subcommand to the `streetclip` parser."""
    locate = commands.add_parser(
        "locate",
        help="geolocate image files, folders, glob patterns or a dataset; one record per input, resumable",
        description=(
            "Geolocate photos: the best country among the candidates, then its best city (StreetCLIP's hierarchical "
            "zero-shot probing), in batches. One record per input streams to --output: its path (or dataset id) and "
            "its top_k answers, ordered by --decision, or an `error`. On many processes, GPUs or machines: `accelerate "
            "launch -q -m modeling_streetclip.cli locate ...` or `torchrun --nproc_per_node N -m "
            "modeling_streetclip.cli locate ...`; the main process writes every record. (Without -q, a non-zero exit "
            "ends in Accelerate's traceback; --num_processes, --num_machines, --mixed_precision and --dynamo_backend, "
            "or `accelerate config default`, silence its defaults note.)"
        ),
        epilog=(
            'Output: JSON Lines ({"path": ..., "answers": [{...}, ...]} or {"path": ..., "error": ...}); CSV, a row per '
            "input with rank-suffixed answer columns (path, country_1, ..., country_2, ..., error; cells starting "
            "with = + - @ get an apostrophe); or Parquet, answers as a list of structs (datasets.load_dataset("
            "'parquet', data_files=FILE) loads it). Paths are absolute; --group_by records have \"group\" and "
            '"paths"; --dataset records the id column (or "id"). Non-UTF-8 bytes of a name are written as \\xff. '
            "Resume: the same command on the same --output skips the inputs recorded (failed ones too); a kill "
            "leaves only complete records. FILE.options.json records the options that shape answers; a rerun with "
            "others stops, naming them (--overwrite starts afresh). One run at a time holds FILE.lock. Parquet is "
            "written in parts (FILE.parts/) merged at the end. Exit status, of every process: 0 all geolocated, 1 some "
            "failed, 2 usage error (an unusable model, file, input, option or output, a failed write: complete records "
            "are kept), 130 interrupted, 141 standard output closed."
        ),
    )
    locate.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUTS",
        help="image files, folders or glob patterns ('photos/*.jpg'); '-' reads paths from standard input. A named "
        "path that does not exist stops the run; a missing one read from standard input gets an error record",
    )
    locate.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="the images of a dataset instead: a Hub id, a save_to_disk or an image folder (needs streetclip[eval])",
    )
    locate.add_argument("--split", default="train", help="the --dataset split (its only one if it has one)")
    locate.add_argument("--image_column", help="the --dataset image column (default: image, img, photo or jpg)")
    locate.add_argument(
        "--id_column",
        help="the --dataset column naming records (default: img_id, image_id, id, key, file_name or filename; else "
        'file names, else row numbers, under "id"; row numbers with --streaming)',
    )
    locate.add_argument("--streaming", action="store_true", help="read the --dataset as it goes, not downloaded first")
    locate.add_argument(
        "--model",
        default="geolocal/StreetCLIP",
        help="Hub repo or local folder, a CLIP or StreetCLIPForGeolocation checkpoint (default: %(default)s)",
    )
    locate.add_argument("--top_k", type=int_at_least(1), default=1, help="answers per input (default: %(default)s)")
    add_decision_arguments(locate)
    add_batch_arguments(locate)
    add_placement_arguments(locate)
    add_backend_arguments(locate)
    locate.add_argument(
        "--output",
        type=Path,
        metavar="FILE",
        help="FILE.jsonl, FILE.csv or FILE.parquet, resumed when it exists (default: JSON Lines on standard output)",
    )
    locate.add_argument("--overwrite", action="store_true", help="empty --output and start afresh instead of resuming")
    locate.add_argument(
        "--countries", type=Path, metavar="FILE", help="restrict answers to the countries a file lists, one per line"
    )
    locate.add_argument(
        "--recursive", action="store_true", help="descend into subfolders; '**' in a glob pattern matches any depth"
    )
    locate.add_argument(
        "--group_by",
        metavar="REGEX",
        help="answer the views of one place once: paths with the same capture group 1 of REGEX (e.g. "
        r"'(pano_\d+)_heading') pool their embeddings; an unmatched path is a group of its own",
    )
    add_verbose_argument(locate)
    locate.set_defaults(run=locate_command)


def answer_options(args: argparse.Namespace, countries: list[str] | None) -> dict[str, Any]:
    """The options that shape the answers, recorded beside an --output file so that a rerun with others stops instead
    of mixing answers (None: not recorded, as in files written before the option). A local model folder adds the
    fingerprint of its files, so that other weights in the same folder are noticed."""
    local_model = os.path.isdir(args.model)
    return {
        "model": os.path.abspath(args.model) if local_model else args.model,
        "model_weights": model_fingerprint(args.model) if local_model else None,
        "countries": countries,
        "top_k": args.top_k,
        "decision": None if args.decision == "greedy" else args.decision,  # what files written before it hold
        "gallery": os.path.abspath(args.gallery) if args.gallery and os.path.isdir(args.gallery) else args.gallery,
        "group_by": args.group_by,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "backend": None if args.backend == "torch" else args.backend,  # what files written before it hold
    }


def _record(
    args: argparse.Namespace,
    key_field: str,
    key: str,
    members: list,
    views: list[GeolocationRecord],
    model_and_processor: tuple,
) -> dict[str, Any]:
    """The output record of one input, or with --group_by of one place from all its views."""
    record = {key_field: key} if args.group_by is None else {"group": key, "paths": members}
    errors = [view.error for view in views if view.error is not None]
    if errors:
        return record | {"error": "; ".join(errors)}
    if args.group_by is None:
        return record | {"answers": views[0].answers}
    import torch

    from ..app.batch import pooled_answers

    model, _, gallery = model_and_processor
    embeds = torch.stack([view.image_embeds for view in views])
    return record | {"answers": pooled_answers(model, embeds, args.top_k, args.decision, gallery)}


@dataclass
class _Plan:
    """What the main process found to do, handed to every process: the field naming records, the pending (key,
    members) pairs (member paths, or a dataset's row number), and the counts for the summary."""

    key_field: str
    pending: list[tuple[str, list]]
    total: int = 0  # inputs (or groups) named, pending or not; a stream counts as it goes
    failed_before: int = 0  # of those recorded by an earlier run, the ones that failed


def _plan(
    args: argparse.Namespace, countries: list[str] | None, source: DatasetSource | None, stack: ExitStack
) -> tuple[_Plan, RecordWriter | ParquetRecordWriter]:
    """On the main process: the inputs, the output opened (locked, checked, resumed; kept open by `stack`) and what
    is left to do."""
    from ..app.inputs import expand_inputs, group_pattern, group_views
    from ..app.records import open_records

    grouped = args.group_by is not None
    if source is None:
        paths = expand_inputs(args.inputs, args.recursive, sys.stdin)
        if not paths:
            raise UsageError(f"no inputs: {args.inputs} name no image file.")
        groups = group_views(paths, group_pattern(args.group_by)) if grouped else [(path, [path]) for path in paths]
        key_field = "group" if grouped else "path"
    else:
        key_field = source.key_field
        groups = [] if args.streaming else [(key, [row]) for row, key in enumerate(source.keys())]
    options = None
    if args.output is not None:  # (standard output resumes nothing: no options to record, no weights to hash)
        options = answer_options(args, countries)
        if source is not None and source.id_column is None:  # rows named by row number with --streaming
            options["streaming"] = args.streaming or None
    writer = stack.enter_context(open_records(args.output, grouped, args.top_k, options, args.overwrite, key_field))
    pending = [(key, members) for key, members in groups if key not in writer.recorded]
    failed_before = sum(not writer.recorded[key] for key, _ in groups if key in writer.recorded)
    return _Plan(key_field, pending, len(groups), failed_before), writer


def _stream_blocks(
    source: DatasetSource, recorded: dict[str, bool], plan: _Plan, rows_per_block: int
) -> Iterator[list[tuple[str, Any]]]:
    """On the main process: the rows of a streamed dataset not yet recorded, in blocks of (key, encoded image);
    counts every row in `plan`."""

    def unrecorded() -> Iterator[tuple[str, Any]]:
        for key, image in source.stream():
            plan.total += 1
            plan.failed_before += key in recorded and not recorded[key]
            if key not in recorded:
                yield key, image

    rows = unrecorded()
    while block := list(islice(rows, rows_per_block)):
        yield block


def _geolocate(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model_and_processor: tuple,
    key_field: str,
    pending: list[tuple[str, list]],
    views: Sequence,
    writer: RecordWriter | ParquetRecordWriter | None,
    progress: Any,
) -> int:
    """Geolocate the pending groups' views across the processes; the main process (which has the `writer`) writes
    one record per group and advances `progress`. Returns how many records failed."""
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
    with closing(records):  # on a failed write too, so that its DataLoader workers stop with the run
        for key, members in pending:
            group_records = [next(records) for _ in members]  # records come in input order
            if writer is None:
                continue  # another process: it ran its share of the batches, and the main process records them
            record = _record(args, key_field, key, members, group_records, model_and_processor)
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
        if given := next((option for option in ("group_by", "recursive") if getattr(args, option)), None):
            raise UsageError(f"--{given} applies to file inputs; --dataset rows are answered one by one.")
    elif args.streaming or args.image_column or args.id_column:
        raise UsageError("--streaming, --image_column and --id_column apply to --dataset.")
    if args.overwrite and args.output is None:
        raise UsageError("--overwrite needs --output: standard output has nothing to overwrite.")
    if args.group_by is not None and args.backend != "torch":
        raise UsageError(
            "--group_by pools embeddings through the model's heads, which the ONNX graph holds inside; "
            "use --backend torch."
        )
    args.decision = decision_from(args)


def locate_command(args: argparse.Namespace) -> int:
    """`streetclip locate`: geolocate every input not yet recorded in --output, then report and set the status, on
    one process or on every process a launcher started."""
    from ..app.distributed import make_accelerator, quiet_unless_main

    quantization = quantization_config_for(args.quantize, args.device, args.dtype, args.backend)
    accelerator = make_accelerator(args.device, cpu_only=quantization is not None or args.backend != "torch")
    return quiet_unless_main(accelerator, lambda: _locate(args, accelerator, quantization))


def _locate(args: argparse.Namespace, accelerator: Accelerator, quantization: Any) -> int:
    from tqdm import tqdm

    from ..app.distributed import on_every_process, on_main_process
    from ..app.inputs import read_countries
    from ..app.sources import DatasetSource

    _check_invocation(args)
    # Read where the output is written (the other machines of a run may not have the file); shared with all.
    countries = on_main_process(accelerator, lambda: args.countries and read_countries(args.countries))
    source = None
    if args.dataset is not None:  # opened on every process, each reading its own rows
        source = on_every_process(
            accelerator,
            lambda: DatasetSource.open(args.dataset, args.split, args.streaming, args.image_column, args.id_column),
            main_process_first=True,
        )
    main = accelerator.is_main_process
    with ExitStack() as stack:
        writer = None

        def plan_on_main() -> _Plan:
            nonlocal writer
            plan, writer = _plan(args, countries, source, stack)
            return plan

        # Planned before the model loads, so that an output this run cannot use stops it at once.
        plan = on_main_process(accelerator, plan_on_main)

        def blocks() -> Iterator[tuple[list[tuple[str, list]], Sequence]]:
            """The pending (groups, their views): a streamed dataset's in blocks, read by the main process."""
            if args.streaming:
                rows_per_block = args.batch_size * accelerator.num_processes * STREAM_BLOCK_BATCHES
                stream = _stream_blocks(source, writer.recorded, plan, rows_per_block) if main else None
                while block := on_main_process(accelerator, lambda: next(stream, None)):
                    yield [(key, [row]) for row, (key, _) in enumerate(block)], [image for _, image in block]
            elif plan.pending and source is not None:
                yield plan.pending, source.images([row for _, (row,) in plan.pending])
            elif plan.pending:
                yield plan.pending, [path for _, members in plan.pending for path in members]

        failed = processed = 0
        model_and_processor = progress = None
        for pending, views in blocks():
            if model_and_processor is None:  # (nothing pending: no model to load, no bar to show)
                graph = graph_file_for(args.backend, args.quantize)
                model_and_processor = load_on_every_process(
                    accelerator, args.model, args.dtype, args.gallery, countries, quantization, graph
                )
                total = None if args.streaming else len(views)  # a stream's length is unknown
                bar = tqdm(total=total, unit="img", desc="streetclip locate", file=sys.stderr, disable=not main)
                progress = stack.enter_context(bar)
            failed += _geolocate(
                args, accelerator, model_and_processor, plan.key_field, pending, views, writer, progress
            )
            processed += len(pending)

        def finish() -> int:
            stack.close()  # the output's last records, and for Parquet the merge, before the summary counts them
            return _summarize(args, plan, processed, failed)

        return on_main_process(accelerator, finish)


def _summarize(args: argparse.Namespace, plan: _Plan, processed: int, failed_now: int) -> int:
    """Print the summary of the whole run (with the inputs recorded before) and return the exit status."""
    failed = plan.failed_before + failed_now
    noun = "groups" if args.group_by is not None else "inputs"
    summary = f"streetclip locate: {plan.total - failed} of {plan.total} {noun} geolocated"
    if failed:
        summary += f", {failed} failed (see the error field)"
    if plan.total > processed:
        summary += f"; {plan.total - processed} were recorded by an earlier run"
    print(summary, file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK
