"""Run a geolocation model over a benchmark and write its predictions, metrics and figures (eval/README.md).
Exits 1 when no input could be scored (after writing every file), 2 on an invocation that cannot run (before loading).

    python eval/benchmark.py --model geolocal/StreetCLIP --data im2gps3k.csv --image_dir im2gps3k/ --output_dir out
    accelerate launch --num_processes 8 eval/benchmark.py --model geolocal/StreetCLIP --data ORG/DATASET ...
"""

import argparse
import csv
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import evaluate
import numpy as np
import torch
from accelerate import Accelerator
from plots import plot_error_cdf, plot_reliability, plot_world_map, run_title
from tqdm.auto import tqdm

from modeling_streetclip.app import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, UsageError, arguments
from modeling_streetclip.app.batch import geolocate_images
from modeling_streetclip.app.benchmark_data import DEFAULT_CSV_ENCODING, BenchmarkRow, ColumnNames, load_benchmark
from modeling_streetclip.app.calibration import answer_hits, radius_errors
from modeling_streetclip.app.distributed import make_accelerator, on_every_process, on_main_process, quiet_unless_main
from modeling_streetclip.app.loading import graph_file_for, load_gallery, load_model, quantization_config_for
from modeling_streetclip.app.records import spreadsheet_safe
from modeling_streetclip.geodesy import CONFIDENCE_RADII_KM


METRIC_DIR = Path(__file__).resolve().parent / "geodesic_accuracy"
# The names of the metric's default thresholds (1, 25, 200, 750, 2500 km), from IM2GPS.
LEVEL_NAMES = ("street", "city", "region", "country", "continent")
# The figures' titles quote the columns of the StreetCLIP paper's tables.
TITLE_THRESHOLDS_KM = (25, 200, 750, 2500)
OUTPUT_FILES = ("predictions.csv", "metrics.json", "error_cdf.png", "world_map.png", "reliability.png")
PREDICTION_COLUMNS = (
    "id true_latitude true_longitude predicted_latitude predicted_longitude distance_km predicted_country "
    "predicted_country_code predicted_region predicted_city score country_score joint_probability expected_distance_km "
    "within_km radius_km calibrated runner_ups error"
).split()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="StreetCLIP or plain CLIP checkpoint: a folder or Hub id")
    parser.add_argument(
        "--data",
        required=True,
        help="a metadata CSV (IMG_ID,LAT,LON) or a datasets Hub id or folder (save_to_disk, or an image folder)",
    )
    parser.add_argument("--output_dir", required=True, type=Path, help="folder for the five output files")
    parser.add_argument("--image_dir", type=Path, help="folder of the images a metadata CSV names (CSV only)")
    parser.add_argument(
        "--split",
        default="test",
        help="dataset split to read (default: %(default)s); a dataset with one split is read whatever this says",
    )
    for name, help in (
        ("id", "column of image ids (default: IMG_ID, img_id, id, ... when present)"),
        ("image", "dataset column of images (default: image, img, photo, jpg)"),
        ("latitude", "column of true latitudes (default: LAT, lat or latitude)"),
        ("longitude", "column of true longitudes (default: LON, lon, lng, longitude)"),
    ):
        parser.add_argument(f"--{name}_column", help=help)
    parser.add_argument(
        "--encoding",
        default=DEFAULT_CSV_ENCODING,
        help="text encoding of a metadata CSV, e.g. latin-1 or cp1252 (default: %(default)s, byte-order mark or not)",
    )
    parser.add_argument(
        "--allow_outside_image_dir",
        action="store_true",
        help="read CSV ids that are absolute paths or climb out of --image_dir with '..' (refused by default)",
    )
    parser.add_argument("--limit", type=arguments.int_at_least(1), help="score only the first N rows")
    parser.add_argument(
        "--top_k",
        type=arguments.int_at_least(1),
        default=1,
        help="answers per image, first scored (default: %(default)s)",
    )
    arguments.add_decision_arguments(parser)
    arguments.add_batch_arguments(parser)
    arguments.add_placement_arguments(parser)
    arguments.add_backend_arguments(parser)
    arguments.add_verbose_argument(parser)
    return parser


def prediction_line(
    row: BenchmarkRow, answers: list[dict] | None = None, distance_km: float | None = None, error: str | None = None
) -> dict:
    """One row of predictions.csv: the truth, then the first answer and its distance, or the error; cells that a
    spreadsheet would evaluate (an id such as `=HYPERLINK(...)`) are written as text."""
    line = {"id": row.id, "true_latitude": row.latitude, "true_longitude": row.longitude, "error": error}
    if answers:
        best, *runner_ups = answers
        # `region` only from a model with a region level.
        places = ("latitude", "longitude", "country", "country_code", "region", "city")
        line |= {f"predicted_{key}": best.get(key) for key in places}
        line |= {key: best[key] for key in ("score", "country_score", "joint_probability", "radius_km", "calibrated")}
        line["expected_distance_km"] = best.get("expected_distance_km")  # only under the rule that orders by it
        line |= {"distance_km": distance_km, "within_km": json.dumps(best["within_km"])}
        line["runner_ups"] = json.dumps(runner_ups, ensure_ascii=False) if runner_ups else None
    return {column: spreadsheet_safe(value) for column, value in line.items()}


def prepare_output_dir(output_dir: Path) -> None:
    """Create `output_dir` and check that every output file can be written there before the model loads, not at the
    end of the run."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {str(output_dir)!r} is a file; give a folder for {', '.join(OUTPUT_FILES)}.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=output_dir).close()
        for path in (output_dir / name for name in OUTPUT_FILES if (output_dir / name).exists()):
            if not path.is_file():
                raise UsageError(f"--output_dir holds {str(path)!r}, which is not a file; move it out of the way.")
            path.open("ab").close()  # appending writes nothing: only whether it could be written
    except OSError as error:
        raise UsageError(f"cannot write the results to --output_dir {str(output_dir)!r}: {error}") from None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with arguments.verbosity(args.verbose):
            quantization = quantization_config_for(args.quantize, args.device, args.dtype, args.backend)
            accelerator = make_accelerator(args.device, cpu_only=quantization is not None or args.backend != "torch")
            status = quiet_unless_main(accelerator, lambda: run(args, accelerator, quantization))
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    if status:
        raise SystemExit(status)


def run(args: argparse.Namespace, accelerator: Accelerator, quantization: object = None) -> int:
    """Check the outputs and data, geolocate every scorable input across the processes and, on the main process,
    score the answers and write the output files; the exit status (the same on every process)."""
    args.decision = arguments.decision_from(args)
    on_main_process(accelerator, lambda: prepare_output_dir(args.output_dir))
    columns = ColumnNames(args.id_column, args.image_column, args.latitude_column, args.longitude_column)
    options = ("image_dir", "split", "limit", "encoding", "allow_outside_image_dir")

    def read_benchmark():
        try:
            return load_benchmark(args.data, columns=columns, **{name: getattr(args, name) for name in options})
        except (OSError, ValueError, ImportError) as error:  # each names the file or dataset at fault
            raise UsageError(str(error)) from None

    # Every process loads; the main process first, so that a Hub download happens once.
    on_each = partial(on_every_process, accelerator, main_process_first=True)
    benchmark = on_each(read_benchmark)
    # As `streetclip locate` loads it: a saved folder with heads without its text tower, its processor checked.
    graph, dtype = graph_file_for(args.backend, args.quantize), getattr(torch, args.dtype)
    model, processor = on_each(lambda: load_model(args.model, accelerator.device, dtype, None, quantization, graph))
    image_processor = processor.image_processor
    gallery = None
    if args.gallery is not None:
        gallery = on_each(lambda: load_gallery(args.gallery, model, image_processor, args.model))

    start = time.perf_counter()
    positions, images = benchmark.scorable()
    answers, image_errors = {}, {}  # by the row's position: the answers, or why the image could not be read
    settings = {name: getattr(args, name) for name in ("top_k", "batch_size", "num_workers", "decision")}
    records = geolocate_images(model, image_processor, images, accelerator=accelerator, gallery=gallery, **settings)
    main = accelerator.is_main_process
    for record in tqdm(records, total=len(positions), desc=benchmark.name, unit="image", disable=not main):
        if record.error is None:
            answers[positions[record.index]] = record.answers
        else:
            image_errors[positions[record.index]] = record.error
    wall_time_s = time.perf_counter() - start
    if not main:
        # Every process holds every record (gathered); the main process alone scores them and writes the files.
        return EXIT_SOME_FAILED if not answers else EXIT_OK

    metric = evaluate.load(str(METRIC_DIR))
    # The module evaluate loaded: per-row distances come from the very function that scores them.
    geodesic = sys.modules[type(metric).__module__]
    # The metric's defaults, passed explicitly so that metrics.json records the protocol of its numbers.
    protocol = dict(
        thresholds_km=list(geodesic.DEFAULT_THRESHOLDS_KM), radius_km=geodesic.EARTH_RADIUS_KM, inclusive=True
    )

    evaluated = sorted(answers)
    truths = np.array([[benchmark.rows[i].latitude, benchmark.rows[i].longitude] for i in evaluated]).reshape(-1, 2)
    predictions = np.array([[answers[i][0]["latitude"], answers[i][0]["longitude"]] for i in evaluated]).reshape(-1, 2)
    distances = geodesic.haversine_km(*truths.T, *predictions.T, protocol["radius_km"])
    distance_of = dict(zip(evaluated, distances.tolist(), strict=True))
    with (args.output_dir / "predictions.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        writer.writerows(
            prediction_line(row, answers.get(i), distance_of.get(i), row.error or image_errors.get(i))
            for i, row in enumerate(benchmark.rows)
        )
    results = metric.compute(predictions=predictions, references=truths, **protocol) if evaluated else {"n": 0}
    # The first answers' confidence against the truth: calibration error per radius, and its reliability diagram.
    within, hits = np.zeros((0, len(CONFIDENCE_RADII_KM))), np.zeros((0, len(CONFIDENCE_RADII_KM)), dtype=bool)
    if evaluated:
        within, hits = answer_hits([answers[i][0] for i in evaluated], truths)
        results["calibration"] = radius_errors(within, hits) | {"calibrated": answers[evaluated[0]][0]["calibrated"]}
    places = model.candidate_places
    image_dir = str(args.image_dir) if args.image_dir else None
    optional = {"split": benchmark.split, "image_dir": image_dir, "gallery": args.gallery, "quantize": args.quantize}
    summary = {
        **results,
        "benchmark": benchmark.name,
        "model": args.model,
        "data": args.data,
        **{name: value for name, value in optional.items() if value},
        "num_inputs": len(benchmark.rows),
        "num_evaluated": len(evaluated),
        "num_failed": len(benchmark.rows) - len(evaluated),
        "num_bad_coordinates": len(benchmark.rows) - len(positions),
        "num_unreadable_images": len(image_errors),
        "wall_time_s": round(wall_time_s, 3),
        **{name: getattr(args, name) for name in ("top_k", "decision", "dtype", "backend", "batch_size")},
        **protocol,
        "levels": list(model.config.levels),
        **{f"num_candidate_{level}": getattr(places, f"num_{level}") for level in ("countries", "regions", "cities")},
        "device": accelerator.device.type,
        "num_processes": accelerator.num_processes,
    }
    (args.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    levels_km = dict(zip(LEVEL_NAMES, protocol["thresholds_km"], strict=True))
    accuracies = {threshold: results[f"acc_{threshold}km"] for threshold in TITLE_THRESHOLDS_KM if evaluated}
    title = run_title(benchmark.name, args.model, len(evaluated), accuracies)
    plot_error_cdf(distances, levels_km, args.output_dir / "error_cdf.png", title=title)
    plot_world_map(truths, predictions, args.output_dir / "world_map.png", title=title)
    plot_reliability(within, hits, list(CONFIDENCE_RADII_KM), args.output_dir / "reliability.png", title=title)

    print(json.dumps(results, indent=2))
    print(f"{len(evaluated)} of {len(benchmark.rows)} inputs scored; outputs in {args.output_dir}")
    if evaluated:
        return EXIT_OK
    where = f"The reason for each is in {args.output_dir / 'predictions.csv'}."
    print(f"No input could be scored: all {len(benchmark.rows)} failed. {where}", file=sys.stderr)
    return EXIT_SOME_FAILED


if __name__ == "__main__":
    main()
