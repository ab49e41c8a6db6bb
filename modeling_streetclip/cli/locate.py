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

from ..app import EXIT_OK, EXIT_SOME_FAILED, UsageError, arguments
from ..app.loading import graph_file_for, load_on_every_process, model_fingerprint, quantization_config_for
from ..decisions import check_country_restriction


if TYPE_CHECKING:
    from accelerate import Accelerator

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
    add = locate.add_argument
    add(
        "inputs",
        nargs="*",
        metavar="INPUTS",
        help="image files, folders or glob patterns ('photos/*.jpg'); '-' reads paths from standard input. A named "
        "path that does not exist stops the run; a missing one read from standard input gets an error record",
    )
    add(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="the images of a dataset instead: a Hub id, a save_to_disk or an image folder (needs streetclip[eval])",
    )
    add("--split", default="train", help="the --dataset split (its only one if it has one)")
    add("--image_column", help="the --dataset image column (default: image, img, photo or jpg)")
    add(
        "--id_column",
        help="the --dataset column naming records (default: img_id, image_id, id, key, file_name or filename; else "
        'file names, else row numbers, under "id"; row numbers with --streaming)',
    )
    add("--streaming", action="store_true", help="read the --dataset as it goes, not downloaded first")
    add(
        "--model",
        default="geolocal/StreetCLIP",
        help="Hub repo or local folder, a CLIP or StreetCLIPForGeolocation checkpoint (default: %(default)s)",
    )
    add("--top_k", type=arguments.int_at_least(1), default=1, help="answers per input (default: %(default)s)")
    arguments.add_decision_arguments(locate)
    arguments.add_batch_arguments(locate)
    arguments.add_placement_arguments(locate)
    arguments.add_backend_arguments(locate)
    add(
        "--output",
        type=Path,
        metavar="FILE",
        help="FILE.jsonl, FILE.csv or FILE.parquet, resumed when it exists (default: JSON Lines on standard output)",
    )
    add("--overwrite", action="store_true", help="empty --output and start afresh instead of resuming")
    add("--countries", type=Path, metavar="FILE", help="restrict answers to the countries a file lists, one per line")
    add("--recursive", action="store_true", help="descend into subfolders; '**' in a glob pattern matches any depth")
    add(
        "--group_by",
        metavar="REGEX",
        help="answer the views of one place once: paths with the same capture group 1 of REGEX (e.g. "
        r"'(pano_\d+)_heading') pool their embeddings; an unmatched path is a group of its own",
    )
    arguments.add_verbose_argument(locate)
    locate.set_defaults(run=locate_command)


def answer_options(args: argparse.Namespace, countries: list[str] | None) -> dict[str, Any]:
    """The options that shape the answers, recorded beside --output so that a rerun with others stops instead of
    mixing answers (None: not recorded, as in older files); a local model adds its files' fingerprint."""
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


@dataclass
class _Plan:
    """What the main process found to do, for every process: the field naming records, the pending (key, members)
    pairs (member paths, or a dataset's row number), and the counts for the summary."""

    key_field: str
    pending: list[tuple[str, list]]
    total: int = 0  # inputs (or groups) named, pending or not; a stream counts as it goes
    failed_before: int = 0  # of those recorded by an earlier run, the ones that failed


def _plan(
    args: argparse.Namespace, countries: list[str] | None, source: DatasetSource | None, stack: ExitStack
) -> tuple[_Plan, RecordWriter | ParquetRecordWriter]:
    """On the main process: the inputs, the output opened (locked, checked, resumed; kept by `stack`), what is left."""
    from ..app.inputs import expand_inputs, group_pattern, group_views
    from ..app.records import open_records

    grouped = args.group_by is not None
    key_field = source.key_field if source is not None else "group" if grouped else "path"
    if source is not None:
        groups = [] if args.streaming else [(key, [row]) for row, key in enumerate(source.keys())]
    elif not (paths := expand_inputs(args.inputs, args.recursive, sys.stdin)):
        raise UsageError(f"no inputs: {args.inputs} name no image file.")
    else:
        groups = group_views(paths, group_pattern(args.group_by)) if grouped else [(path, [path]) for path in paths]
    options = None
    if args.output is not None:  # (standard output resumes nothing: no options to record, no weights to hash)
        options = answer_options(args, countries)
        if source is not None and source.id_column is None:  # rows named by row number with --streaming
            options["streaming"] = args.streaming or None
    writer = stack.enter_context(open_records(args.output, grouped, args.top_k, options, args.overwrite, key_field))
    pending = [(key, members) for key, members in groups if key not in writer.recorded]
    failed_before = sum(not writer.recorded[key] for key, _ in groups if key in writer.recorded)
    return _Plan(key_field, pending, len(groups), failed_before), writer


def _blocks(
    args: argparse.Namespace, accelerator: Accelerator, plan: _Plan, source: DatasetSource | None, writer: Any
) -> Iterator[tuple[list[tuple[str, list]], Sequence]]:
    """The pending (groups, their views), on every process: a streamed dataset's in blocks of the rows its `writer`
    has not recorded, read by the main process, which counts them in `plan`."""
    from ..app.distributed import on_main_process

    if not args.streaming:
        if plan.pending and source is not None:
            yield plan.pending, source.images([row for _, (row,) in plan.pending])
        elif plan.pending:
            yield plan.pending, [path for _, members in plan.pending for path in members]
        return

    def unrecorded() -> Iterator[tuple[str, Any]]:
        for key, image in source.stream():
            plan.total += 1
            plan.failed_before += key in writer.recorded and not writer.recorded[key]
            if key not in writer.recorded:
                yield key, image

    rows = unrecorded() if accelerator.is_main_process else None
    block_size = args.batch_size * accelerator.num_processes * STREAM_BLOCK_BATCHES
    while block := on_main_process(accelerator, lambda: list(islice(rows, block_size))):
        yield [(key, [row]) for row, (key, _) in enumerate(block)], [image for _, image in block]


def _record(
    args: argparse.Namespace, key_field: str, key: str, members: list, views: list, loaded: tuple
) -> dict[str, Any]:
    """The output record of one input, or with --group_by of one place from all its views."""
    record = {key_field: key} if args.group_by is None else {"group": key, "paths": members}
    if errors := [view.error for view in views if view.error is not None]:
        return record | {"error": "; ".join(errors)}
    if args.group_by is None:
        return record | {"answers": views[0].answers}
    import torch

    from ..app.batch import pooled_answers

    model, _, gallery = loaded
    embeds = torch.stack([view.image_embeds for view in views])
    return record | {"answers": pooled_answers(model, embeds, args.top_k, args.decision, gallery)}


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
    args.decision = arguments.decision_from(args)
    if args.countries is not None:
        try:
            check_country_restriction(args.decision, "--countries")
        except ValueError as error:
            raise UsageError(str(error)) from None


def locate_command(args: argparse.Namespace) -> int:
    """`streetclip locate`: geolocate every input not yet recorded in --output, on one process or on all of a launch."""
    from ..app.distributed import make_accelerator, quiet_unless_main

    quantization = quantization_config_for(args.quantize, args.device, args.dtype, args.backend)
    accelerator = make_accelerator(args.device, cpu_only=quantization is not None or args.backend != "torch")
    return quiet_unless_main(accelerator, lambda: _locate(args, accelerator, quantization))


def _locate(args: argparse.Namespace, accelerator: Accelerator, quantization: Any) -> int:
    from tqdm import tqdm

    from ..app.batch import geolocate_images
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
    grouped = args.group_by is not None
    with ExitStack() as stack:
        writer = None

        def plan_on_main() -> _Plan:
            nonlocal writer
            plan, writer = _plan(args, countries, source, stack)
            return plan

        # Planned before the model loads, so that an output this run cannot use stops it at once.
        plan = on_main_process(accelerator, plan_on_main)
        failed = processed = 0
        loaded = None
        for pending, views in _blocks(args, accelerator, plan, source, writer):
            if loaded is None:  # (nothing pending: no model to load, no bar to show)
                graph = graph_file_for(args.backend, args.quantize)
                loaded = load_on_every_process(
                    accelerator, args.model, args.dtype, args.gallery, countries, quantization, graph
                )
                total = None if args.streaming else len(views)  # a stream's length is unknown
                bar = tqdm(total=total, unit="img", desc="streetclip locate", file=sys.stderr, disable=writer is None)
                progress = stack.enter_context(bar)
            model, image_processor, gallery = loaded
            records = geolocate_images(
                model,
                image_processor,
                views,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                decision=args.decision,
                top_k=1 if grouped else args.top_k,  # pooled groups are ranked from their embeddings instead
                gallery=gallery,
                return_embeddings=grouped,
                accelerator=accelerator,
            )
            with closing(records):  # on a failed write too, so that its DataLoader workers stop with the run
                for key, members in pending:
                    views_done = [next(records) for _ in members]  # records come in input order
                    if writer is not None:  # the main process records the batches of every process
                        writer.write(record := _record(args, plan.key_field, key, members, views_done, loaded))
                        failed += "error" in record
                        progress.update(len(members))
            processed += len(pending)

        def finish() -> int:
            stack.close()  # the output's last records, and for Parquet the merge, before the summary counts them
            failed_all, noun = plan.failed_before + failed, "groups" if grouped else "inputs"
            summary = f"streetclip locate: {plan.total - failed_all} of {plan.total} {noun} geolocated"
            if failed_all:
                summary += f", {failed_all} failed (see the error field)"
            if plan.total > processed:
                summary += f"; {plan.total - processed} were recorded by an earlier run"
            print(summary, file=sys.stderr)
            return EXIT_SOME_FAILED if failed_all else EXIT_OK

        return on_main_process(accelerator, finish)
