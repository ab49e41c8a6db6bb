"""`streetclip index build`: a geo-tagged photo collection into a retrieval gallery for `--gallery` (arguments and
outcome; building lives in `app.gallery_build`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..app import DEFAULT_SHARD_SIZE, EXIT_OK, EXIT_SOME_FAILED, UsageError
from ..app.arguments import add_batch_arguments, add_placement_arguments, add_verbose_argument, int_at_least


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `index` subcommand (with its own subcommand, `build`) to the `streetclip` parser."""
    # The gallery modules import numpy alone at first, so --help shows their defaults without waiting for torch.
    from ..gallery_index import DEFAULT_INDEX
    from ..gallery_vote import VoteSettings

    defaults = VoteSettings()
    index = commands.add_parser(
        "index",
        help="build a retrieval gallery of geo-tagged photos, for `locate --gallery` and decisions gallery/hybrid",
        description="Retrieval galleries: geo-tagged photos embedded by a model and indexed with FAISS.",
    )
    actions = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="embed a photo collection with a model into a gallery folder (resumable)",
        description=(
            "Embed every photo of DATA with the vision tower of --model into a gallery at --output: a datasets "
            "folder of L2-normalised embeddings with latitude, longitude and the source's other columns, a FAISS "
            "index (index.faiss), gallery.json naming the model, and bad_rows.jsonl listing the rows skipped "
            "(unreadable images, coordinates not on Earth, a photo or id listed again) with the reason."
        ),
        epilog=(
            "Resume: rows are written in shards of --shard_size; rerunning the same command after a kill embeds only "
            "the rows no complete shard holds (other data, columns or model stop it, naming what differs; "
            "--overwrite starts afresh), on any number of processes: under accelerate launch or torchrun each embeds "
            "its own chunks of --shard_size rows and the main one writes the gallery. Index: 'Flat' is exact, right "
            "up to about 100,000 rows; 'auto' picks the default for the size (IVF{nlist},SQ8 beyond); see README, 'Limits'. Exit status: 0 every row embedded, 1 some skipped "
            "(see bad_rows.jsonl), 2 usage error (unknown model or data, missing columns, a folder holding something "
            "else, an index FAISS cannot build), 130 interrupted."
        ),
    )
    build.add_argument(
        "data",
        metavar="DATA",
        help="geo-tagged photos: an image folder with metadata.csv (file_name,latitude,longitude,...), a save_to_disk "
        "folder, Parquet or CSV files, WebDataset tar shards (.tar files: --latitude_column json.latitude), a Hub dataset "
        "id, or a CSV file naming images in --image_dir",
    )
    build.add_argument("--model", required=True, help="Hub repo or local folder, as for `streetclip locate`")
    build.add_argument("--output", required=True, type=Path, metavar="FOLDER", help="the gallery folder to write")
    build.add_argument(
        "--index", default=DEFAULT_INDEX, metavar="FACTORY", help="FAISS factory, or 'auto' (default: %(default)s)"
    )
    for flag, text in (
        ("--nprobe", "lists an IVF index probes per search (default: 1/64 of them)"),
        ("--train_size", "rows that train an IVF or PQ index (default: 64 per list, >= 65,536)"),
    ):
        build.add_argument(flag, type=int_at_least(1), help=text)
    build.add_argument("--image_dir", type=Path, help="folder of the images that a CSV DATA names (CSV only)")
    build.add_argument("--split", default="train", help="split of DATA to read (default: %(default)s)")
    build.add_argument("--streaming", action="store_true", help="stream DATA instead of loading it")
    build.add_argument(
        "--image_column", help="column of images (default: image, img, photo or jpg; file_name for CSV)"
    )
    build.add_argument(
        "--latitude_column",
        default="latitude",
        help="column of latitudes, or COLUMN.FIELD for a field of a struct column such as a WebDataset sample's json "
        "(default: %(default)s)",
    )
    build.add_argument("--longitude_column", default="longitude", help="column of longitudes (default: %(default)s)")
    add_batch_arguments(build)
    build.add_argument(
        "--shard_size",
        type=int_at_least(1),
        default=DEFAULT_SHARD_SIZE,
        help="rows per shard written as the build goes; a kill loses at most one (default: %(default)s)",
    )
    add_placement_arguments(build)
    add_verbose_argument(build)
    build.add_argument("--overwrite", action="store_true", help="delete what --output holds and start afresh")
    vote = build.add_argument_group(
        "vote settings stored as the gallery's defaults (README, 'Geolocation by retrieval')"
    )
    count, distance = int_at_least(1), _positive_float
    hybrid = "decision hybrid: photos of this many most probable countries vote"
    for flag, kind, default, text in (
        ("--neighbors", count, defaults.num_neighbors, "photos retrieved"),
        ("--radius_km", distance, defaults.radius_km, "kernel radius: photos closer than this support each other"),
        ("--temperature", distance, defaults.temperature, "similarity weights exp((s - s_best) / T)"),
        ("--hybrid_countries", count, defaults.hybrid_countries, hybrid),
    ):
        vote.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    build.set_defaults(run=build_command)


def _open_data(args: argparse.Namespace):
    """The dataset DATA names: a CSV file with --image_dir, else any `open_dataset` source."""
    from ..app.sources import open_csv_with_images

    is_csv = Path(args.data).suffix.lower() == ".csv"
    if is_csv != (args.image_dir is not None):
        raise UsageError(
            "a CSV DATA names image files: give the folder that holds them with --image_dir"
            if is_csv
            else f"--image_dir goes with a CSV file only; {args.data!r} holds its images itself."
        )
    if not is_csv:
        return args.data
    try:
        return open_csv_with_images(args.data, args.image_dir, args.image_column)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None


def build_command(args: argparse.Namespace) -> int:
    """`streetclip index build`: embed DATA into a gallery at --output, report, and return the status, on one process
    or on every process a launcher started."""
    from ..app.distributed import make_accelerator, on_every_process, quiet_unless_main
    from ..app.gallery_build import build_gallery
    from ..app.loading import load_on_every_process
    from ..gallery_vote import VoteSettings

    accelerator = make_accelerator(args.device)

    def build() -> int:
        data = on_every_process(accelerator, lambda: _open_data(args))
        model, image_processor, _ = load_on_every_process(accelerator, args.model, args.dtype)
        passed = ("index", "nprobe", "train_size", "split", "streaming", "latitude_column", "longitude_column")
        passed += ("batch_size", "num_workers", "shard_size", "overwrite")
        options = {name: getattr(args, name) for name in passed} | {
            "model_name": args.model,
            "accelerator": accelerator,
        }
        options["image_column"] = None if Path(args.data).suffix.lower() == ".csv" else args.image_column
        options["settings"] = VoteSettings(args.neighbors, args.radius_km, args.temperature, args.hybrid_countries)
        try:
            result = build_gallery(model, image_processor, data, args.output, **options)
        except (OSError, ValueError, ImportError) as error:  # GalleryModelError is a ValueError
            raise UsageError(str(error)) from None
        if not accelerator.is_main_process:
            return EXIT_OK  # the launcher reports the main process's status
        summary = f"streetclip index build: {len(result.gallery):,} photos in the gallery {str(args.output)!r}"
        if result.resumed_rows:
            summary += f" ({result.resumed_rows:,} source rows done by an earlier run, {result.embedded_rows:,} now)"
        if result.bad_rows:
            summary += f"; {len(result.bad_rows):,} rows skipped (see {str(args.output / 'bad_rows.jsonl')!r})"
        print(summary, file=sys.stderr)
        return EXIT_SOME_FAILED if result.bad_rows else EXIT_OK

    return quiet_unless_main(accelerator, build)


__all__ = ["add_parser", "build_command"]
