"""Run a geolocation model over a benchmark and write its predictions, metrics and figures.

Usage, from the repository root:

    python eval/benchmark.py --model geolocal/StreetCLIP --data im2gps3k_places365.csv --image_dir im2gps3k/ \\
        --output_dir results/im2gps3k
    python eval/benchmark.py --model geolocal/StreetCLIP --data ORG/DATASET --split test --output_dir results/ds

It writes predictions.csv (one row per input: the answer or the reason it failed), metrics.json (the
geodesic_accuracy metric over the inputs that could be scored, with the run's settings and counts),
error_cdf.png and world_map.png. An input with bad coordinates or an unreadable image is recorded and left out of
the metric; the run exits with status 1 when no input at all could be scored, after writing every file.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import evaluate
import numpy as np
import torch
from benchmark_data import BenchmarkRow, ColumnNames, load_benchmark
from plots import plot_error_cdf, plot_world_map
from tqdm.auto import tqdm
from transformers import AutoImageProcessor

from modeling_streetclip import StreetCLIPForGeolocation
from modeling_streetclip.cli.batch_geolocation import geolocate_images


METRIC_DIR = Path(__file__).resolve().parent / "geodesic_accuracy"
# Names of the metric's default thresholds (1, 25, 200, 750, 2500 km), from IM2GPS.
LEVEL_NAMES = ("street", "city", "region", "country", "continent")
PREDICTION_COLUMNS = [
    "id",
    "true_latitude",
    "true_longitude",
    "predicted_latitude",
    "predicted_longitude",
    "distance_km",
    "predicted_country",
    "predicted_country_code",
    "predicted_city",
    "score",
    "country_score",
    "runner_ups",
    "error",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="StreetCLIP or plain CLIP checkpoint: a folder or Hub id")
    parser.add_argument("--data", required=True, help="a metadata CSV (IMG_ID,LAT,LON) or a datasets Hub id/folder")
    parser.add_argument("--output_dir", required=True, type=Path, help="folder for the four output files")
    parser.add_argument("--image_dir", type=Path, help="folder of the images a metadata CSV names (CSV only)")
    parser.add_argument("--split", default="test", help="dataset split to read (datasets only)")
    parser.add_argument("--id_column", help="column of image ids (default: IMG_ID, img_id, id, ... when present)")
    parser.add_argument("--image_column", help="dataset column of images (default: image, img, photo, jpg)")
    parser.add_argument("--latitude_column", help="column of true latitudes (default: LAT, lat or latitude)")
    parser.add_argument("--longitude_column", help="column of true longitudes (default: LON, lon, lng, longitude)")
    parser.add_argument("--limit", type=_positive_int, help="score only the first N rows")
    parser.add_argument("--top_k", type=_positive_int, default=1, help="answers per image; the first is scored")
    parser.add_argument("--batch_size", type=_positive_int, default=32, help="images per forward pass")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader processes decoding images (0: none)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def prediction_line(
    row: BenchmarkRow, answers: list[dict] | None = None, distance_km: float | None = None, error: str | None = None
) -> dict:
    """One row of predictions.csv: the truth, then the first answer and its distance, or the error."""
    line = {"id": row.id, "true_latitude": row.latitude, "true_longitude": row.longitude, "error": error}
    if answers:
        best, *runner_ups = answers
        line |= {
            "predicted_latitude": best["latitude"],
            "predicted_longitude": best["longitude"],
            "distance_km": distance_km,
            "predicted_country": best["country"],
            "predicted_country_code": best["country_code"],
            "predicted_city": best["city"],
            "score": best["score"],
            "country_score": best["country_score"],
            "runner_ups": json.dumps(runner_ups, ensure_ascii=False) if runner_ups else None,
        }
    return line


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    metric = evaluate.load(str(METRIC_DIR))
    # The module evaluate imported the metric from: per-row distances come from the very function that scores them.
    geodesic = sys.modules[type(metric).__module__]
    # The metric's defaults, passed explicitly so that metrics.json records the protocol the numbers were computed with.
    protocol = {
        "thresholds_km": list(geodesic.DEFAULT_THRESHOLDS_KM),
        "radius_km": geodesic.EARTH_RADIUS_KM,
        "inclusive": True,
    }

    benchmark = load_benchmark(
        args.data,
        image_dir=args.image_dir,
        split=args.split,
        columns=ColumnNames(args.id_column, args.image_column, args.latitude_column, args.longitude_column),
        limit=args.limit,
    )
    model = StreetCLIPForGeolocation.from_pretrained(args.model).to(args.device)
    image_processor = AutoImageProcessor.from_pretrained(args.model)

    start = time.perf_counter()
    positions, images = benchmark.scorable()
    answers: dict[int, list[dict]] = {}
    image_errors: dict[int, str] = {}
    records = geolocate_images(
        model, image_processor, images, top_k=args.top_k, batch_size=args.batch_size, num_workers=args.num_workers
    )
    for record in tqdm(records, total=len(positions), desc=benchmark.name, unit="image"):
        if record.error is None:
            answers[positions[record.index]] = record.answers
        else:
            image_errors[positions[record.index]] = record.error
    wall_time_s = time.perf_counter() - start

    evaluated = sorted(answers)
    truths = np.array([[benchmark.rows[i].latitude, benchmark.rows[i].longitude] for i in evaluated]).reshape(-1, 2)
    predictions = np.array([[answers[i][0]["latitude"], answers[i][0]["longitude"]] for i in evaluated]).reshape(-1, 2)
    distances = geodesic.haversine_km(
        truths[:, 0], truths[:, 1], predictions[:, 0], predictions[:, 1], protocol["radius_km"]
    )
    distance_of = dict(zip(evaluated, distances.tolist(), strict=True))

    args.output_dir.mkdir(parents=True, exist_ok=True)
    with (args.output_dir / "predictions.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=PREDICTION_COLUMNS)
        writer.writeheader()
        for position, row in enumerate(benchmark.rows):
            if position in answers:
                writer.writerow(prediction_line(row, answers[position], distance_of[position]))
            else:
                writer.writerow(prediction_line(row, error=row.error or image_errors[position]))

    results = metric.compute(predictions=predictions, references=truths, **protocol) if evaluated else {"n": 0}
    summary = {
        **results,
        "benchmark": benchmark.name,
        "model": args.model,
        "data": args.data,
        **({"split": benchmark.split} if benchmark.split else {}),
        **({"image_dir": str(args.image_dir)} if args.image_dir else {}),
        "num_inputs": len(benchmark.rows),
        "num_evaluated": len(evaluated),
        "num_failed": len(benchmark.rows) - len(evaluated),
        "num_bad_coordinates": len(benchmark.rows) - len(positions),
        "num_unreadable_images": len(image_errors),
        "wall_time_s": round(wall_time_s, 3),
        "top_k": args.top_k,
        **protocol,
        "num_candidate_countries": model.candidate_places.num_countries,
        "num_candidate_cities": model.candidate_places.num_cities,
        "device": args.device,
        "batch_size": args.batch_size,
    }
    (args.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    levels = dict(zip(LEVEL_NAMES, protocol["thresholds_km"], strict=True))
    plot_error_cdf(distances, levels, args.output_dir / "error_cdf.png", title=benchmark.name)
    plot_world_map(truths, predictions, args.output_dir / "world_map.png", title=benchmark.name)

    print(json.dumps(results, indent=2))
    print(f"{len(evaluated)} of {len(benchmark.rows)} inputs scored; outputs in {args.output_dir}")
    if not evaluated:
        raise SystemExit(
            f"No input could be scored: all {len(benchmark.rows)} failed. The reason for each is in "
            f"{args.output_dir / 'predictions.csv'}."
        )


if __name__ == "__main__":
    main()
