"""Specification of the benchmark runner `eval/benchmark.py`, its data loading and its figures."""

import contextlib
import csv
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import benchmark
import datasets
import evaluate
import matplotlib.legend
import numpy as np
import plots
import pytest
import torch
from builders import save_random_photos
from PIL import Image

from modeling_streetclip.app import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS, benchmark_data
from modeling_streetclip.geodesy import CONFIDENCE_RADII_KM
from modeling_streetclip.testing_utils import SMALL_COUNTRIES


REPO_ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = REPO_ROOT / "eval"


METRIC_DIR = EVAL_DIR / "geodesic_accuracy"
OUTPUT_FILES = ("predictions.csv", "metrics.json", "error_cdf.png", "world_map.png", "reliability.png")
# Good images at places on every continent, one of them next to the antimeridian.
GOOD_ROWS = [
    ("paris.jpg", "48.8566", "2.3522"),
    ("tokyo.png", "35.6762", "139.6503"),
    ("rio.jpg", "-22.9068", "-43.1729"),
    ("nairobi.jpg", "-1.2921", "36.8219"),
    ("sydney.jpg", "-33.8688", "151.2093"),
    ("toronto.jpg", "43.6532", "-79.3832"),
    ("suva.jpg", "-18.1416", "178.4419"),
    ("reykjavik.jpg", "64.1466", "-21.9426"),
]
CORRUPT_ROW = ("corrupt.jpg", "51.5074", "-0.1278")
# The two rows below name image files that do not exist: an error about a missing file would show they were run.
BAD_COORDINATE_ROW = ("unmeasured.jpg", "north", "2.35")
SWAPPED_ROW = ("swapped.jpg", "151.2093", "-33.8688")
ROWS = [*GOOD_ROWS[:3], CORRUPT_ROW, *GOOD_ROWS[3:5], BAD_COORDINATE_ROW, GOOD_ROWS[5], SWAPPED_ROW, *GOOD_ROWS[6:]]


def _write_image_folder(folder: Path) -> Path:
    """Photos for the good rows and a JPEG-named file of garbage; returns the folder."""
    folder.mkdir(parents=True)
    save_random_photos(folder, [name for name, _, _ in GOOD_ROWS])
    (folder / CORRUPT_ROW[0]).write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    return folder


def _write_metadata_csv(path: Path, rows, header=("IMG_ID", "LAT", "LON")) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _read_predictions(output_dir: Path) -> list[dict[str, str]]:
    with (output_dir / "predictions.csv").open(newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def _read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(METRIC_DIR))


@pytest.fixture(scope="module")
def haversine_km(metric):
    """The metric module's distance function, from the module evaluate loaded, as the runner takes it."""
    return sys.modules[type(metric).__module__].haversine_km


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return _write_image_folder(tmp_path_factory.mktemp("benchmark") / "images")


@pytest.fixture(scope="module")
def metadata_csv(image_folder) -> Path:
    return _write_metadata_csv(image_folder.parent / "tiny_im2gps.csv", ROWS)


@pytest.fixture(scope="module")
def script_run(small_streetclip_dir, image_folder, metadata_csv):
    """One run of the runner's `main`, as the command line calls it; returns the output folder and what it printed
    (the command line itself runs in `test_missing_csv_gives_one_line_and_exit_status_2_from_the_command_line`)."""
    output_dir = image_folder.parent / "results"
    arguments = ["--model", str(small_streetclip_dir), "--data", str(metadata_csv), "--image_dir", str(image_folder)]
    arguments += ["--output_dir", str(output_dir), "--batch_size", "3", "--num_workers", "1", "--device", "cpu"]
    stdout, stderr = io.StringIO(), io.StringIO()
    warnings = logging.StreamHandler(stderr)  # where a command's warnings go: pytest's log capture takes them here
    logging.getLogger().addHandler(warnings)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            benchmark.main(arguments)
    finally:
        logging.getLogger().removeHandler(warnings)
    return output_dir, SimpleNamespace(stdout=stdout.getvalue(), stderr=stderr.getvalue())


# The runner end to end


def test_script_writes_every_output_file(script_run):
    output_dir, _ = script_run
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(OUTPUT_FILES)


def test_predictions_have_one_row_per_input_in_input_order(script_run):
    rows = _read_predictions(script_run[0])
    assert [row["id"] for row in rows] == [name for name, _, _ in ROWS]
    assert list(rows[0]) == benchmark.PREDICTION_COLUMNS


def test_scored_rows_hold_a_candidate_city_and_the_metric_modules_distance(script_run, haversine_km):
    rows = {row["id"]: row for row in _read_predictions(script_run[0])}
    for name, latitude, longitude in GOOD_ROWS:
        row = rows[name]
        assert row["error"] == ""
        assert (float(row["true_latitude"]), float(row["true_longitude"])) == (float(latitude), float(longitude))
        assert row["predicted_country"] in SMALL_COUNTRIES and row["predicted_city"]
        assert 0 < float(row["joint_probability"]) <= float(row["country_score"]) <= 1
        expected = haversine_km(
            float(latitude), float(longitude), float(row["predicted_latitude"]), float(row["predicted_longitude"])
        )
        assert float(row["distance_km"]) == pytest.approx(float(expected), rel=1e-12)


def test_unreadable_image_is_recorded_with_its_image_error(script_run, image_folder):
    row = next(row for row in _read_predictions(script_run[0]) if row["id"] == CORRUPT_ROW[0])
    assert f"Image file {str(image_folder / CORRUPT_ROW[0])!r} is truncated or corrupt" in row["error"]
    assert row["predicted_latitude"] == row["distance_km"] == ""


def test_bad_coordinates_are_recorded_and_never_run_through_the_model(script_run):
    rows = {row["id"]: row for row in _read_predictions(script_run[0])}
    assert "'north' is not a number" in rows[BAD_COORDINATE_ROW[0]]["error"]
    assert "latitude and longitude look swapped" in rows[SWAPPED_ROW[0]]["error"]
    for name in (BAD_COORDINATE_ROW[0], SWAPPED_ROW[0]):
        assert "not found" not in rows[name]["error"]
        assert rows[name]["predicted_latitude"] == ""


def test_metrics_equal_the_metric_on_the_scored_rows_only(script_run, metric):
    rows = [row for row in _read_predictions(script_run[0]) if not row["error"]]
    expected = metric.compute(
        predictions=[[float(row["predicted_latitude"]), float(row["predicted_longitude"])] for row in rows],
        references=[[float(row["true_latitude"]), float(row["true_longitude"])] for row in rows],
    )
    metrics = _read_metrics(script_run[0])
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, rel=1e-12)
    assert metrics["n"] == len(GOOD_ROWS)


def test_metrics_json_counts_failures_and_records_the_run(
    script_run, small_streetclip_dir, metadata_csv, image_folder
):
    metrics = _read_metrics(script_run[0])
    assert metrics["benchmark"] == "tiny_im2gps"
    assert metrics["model"] == str(small_streetclip_dir)
    assert metrics["data"] == str(metadata_csv)
    assert metrics["image_dir"] == str(image_folder)
    assert "split" not in metrics
    assert (metrics["num_inputs"], metrics["num_evaluated"], metrics["num_failed"]) == (len(ROWS), len(GOOD_ROWS), 3)
    assert (metrics["num_bad_coordinates"], metrics["num_unreadable_images"]) == (2, 1)
    assert metrics["wall_time_s"] > 0 and metrics["top_k"] == 1
    assert metrics["thresholds_km"] == [1, 25, 200, 750, 2500]
    assert (metrics["radius_km"], metrics["inclusive"]) == (6371.0088, True)
    assert (metrics["num_candidate_countries"], metrics["num_candidate_cities"]) == (len(SMALL_COUNTRIES), 30)


def test_figures_are_valid_images_of_real_size(script_run):
    for name, (min_width, min_height) in (("error_cdf.png", (1000, 600)), ("world_map.png", (1800, 1000))):
        with Image.open(script_run[0] / name) as image:
            image.verify()
        with Image.open(script_run[0] / name) as image:
            assert image.format == "PNG" and image.width >= min_width and image.height >= min_height
            # Curves, markers, text and the city silhouette give far more than a blank canvas's few colours.
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_script_reports_progress_swapped_columns_and_scores(script_run):
    _, process = script_run
    assert f"{len(GOOD_ROWS) + 1}/{len(GOOD_ROWS) + 1}" in process.stderr
    assert "columns look swapped" in process.stderr
    assert f"{len(GOOD_ROWS)} of {len(ROWS)} inputs scored" in process.stdout
    assert '"acc_2500km"' in process.stdout


# The runner's options, through main(argv)


def test_limit_takes_the_first_rows_and_top_k_adds_runner_ups(
    small_streetclip_dir, image_folder, metadata_csv, tmp_path
):
    benchmark.main(
        ["--model", str(small_streetclip_dir), "--data", str(metadata_csv), "--image_dir", str(image_folder)]
        + ["--output_dir", str(tmp_path), "--limit", "4", "--top_k", "3", "--num_workers", "0", "--device", "cpu"]
    )
    rows = _read_predictions(tmp_path)
    assert [row["id"] for row in rows] == [name for name, _, _ in ROWS[:4]]
    for row in rows[:3]:
        runner_ups = json.loads(row["runner_ups"])
        assert len(runner_ups) == 2 and float(row["score"]) >= runner_ups[0]["score"] >= runner_ups[1]["score"]
    metrics = _read_metrics(tmp_path)
    assert (metrics["num_inputs"], metrics["num_evaluated"], metrics["top_k"]) == (4, 3, 3)


def test_expected_distance_writes_the_distance_it_orders_by(
    small_streetclip_dir, image_folder, metadata_csv, tmp_path, script_run
):
    """predictions.csv lacked expected_distance_km, so that rule's order could not be checked from the file."""
    benchmark.main(
        ["--model", str(small_streetclip_dir), "--data", str(metadata_csv), "--image_dir", str(image_folder)]
        + ["--output_dir", str(tmp_path), "--limit", "4", "--top_k", "3", "--decision", "expected_distance"]
        + ["--num_workers", "0", "--device", "cpu"]
    )
    for row in _read_predictions(tmp_path)[:3]:  # the fourth is the corrupt image
        distances = [float(row["expected_distance_km"])]
        distances += [answer["expected_distance_km"] for answer in json.loads(row["runner_ups"])]
        assert distances == sorted(distances) and distances[0] > 0
    assert {row["expected_distance_km"] for row in _read_predictions(script_run[0])} == {""}  # greedy: none


def test_onnx_runtime_backend_scores_the_graph_as_the_pytorch_model(
    script_run, small_streetclip_dir, image_folder, metadata_csv, tmp_path
):
    pytest.importorskip(
        "onnxruntime", reason='the ONNX backend needs the [onnx] extra: pip install "streetclip[onnx]"'
    )
    from modeling_streetclip.cli import main as streetclip

    assert streetclip(["export", str(small_streetclip_dir), "--output", str(tmp_path / "export")]) == 0
    benchmark.main(
        ["--model", str(tmp_path / "export"), "--data", str(metadata_csv), "--image_dir", str(image_folder)]
        + ["--output_dir", str(tmp_path / "results"), "--num_workers", "0", "--backend", "onnxruntime"]
    )
    metrics, expected = _read_metrics(tmp_path / "results"), _read_metrics(script_run[0])
    assert (metrics["backend"], expected["backend"]) == ("onnxruntime", "torch")
    assert metrics["num_evaluated"] == expected["num_evaluated"] == len(GOOD_ROWS)
    assert metrics["median_km"] == pytest.approx(expected["median_km"])
    predictions = _read_predictions(tmp_path / "results")
    assert [row["predicted_city"] for row in predictions] == [
        row["predicted_city"] for row in _read_predictions(script_run[0])
    ]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_quantize_int8_scores_the_int8_model_of_either_backend(
    small_streetclip_dir, image_folder, metadata_csv, tmp_path, backend
):
    pytest.importorskip("onnxruntime", reason='the int8 graph needs the [onnx] extra: pip install "streetclip[onnx]"')
    from modeling_streetclip.cli import main as streetclip

    model = small_streetclip_dir
    if backend == "onnxruntime":
        model = tmp_path / "export"
        assert streetclip(["export", str(small_streetclip_dir), "--output", str(model)]) == 0
    benchmark.main(
        ["--model", str(model), "--data", str(metadata_csv), "--image_dir", str(image_folder), "--quantize", "int8"]
        + ["--output_dir", str(tmp_path / "results"), "--num_workers", "0", "--backend", backend]
    )
    metrics = _read_metrics(tmp_path / "results")
    assert (metrics["backend"], metrics["quantize"], metrics["device"]) == (backend, "int8", "cpu")
    assert metrics["num_evaluated"] == len(GOOD_ROWS)


def test_dataset_saved_to_disk_with_custom_column_names(small_streetclip_dir, image_folder, tmp_path):
    names = [name for name, _, _ in GOOD_ROWS[:3]] + [CORRUPT_ROW[0]]
    test_split = datasets.Dataset.from_dict(
        {
            "photo": [str(image_folder / name) for name in names],
            "gt_lat": [48.8566, 35.6762, None, 51.5074],
            "gt_lon": [2.3522, 139.6503, -43.1729, -0.1278],
            "key": ["a", "b", "c", "d"],
        }
    ).cast_column("photo", datasets.Image())
    datasets.DatasetDict({"test": test_split}).save_to_disk(tmp_path / "dataset")
    output_dir = tmp_path / "results"
    benchmark.main(
        ["--model", str(small_streetclip_dir), "--data", str(tmp_path / "dataset"), "--split", "test"]
        + ["--image_column", "photo", "--latitude_column", "gt_lat", "--longitude_column", "gt_lon"]
        + ["--id_column", "key", "--output_dir", str(output_dir), "--num_workers", "0", "--device", "cpu"]
    )
    rows = _read_predictions(output_dir)
    assert [row["id"] for row in rows] == ["a", "b", "c", "d"]
    assert [bool(row["error"]) for row in rows] == [False, False, True, True]
    assert "(column 'gt_lat') is missing" in rows[2]["error"]
    assert "Image file of 22 bytes is truncated or corrupt" in rows[3]["error"]
    metrics = _read_metrics(output_dir)
    assert (metrics["benchmark"], metrics["split"], metrics["num_evaluated"], metrics["num_failed"]) == (
        "dataset",
        "test",
        2,
        2,
    )
    assert "image_dir" not in metrics


def test_a_dataset_row_without_an_image_is_one_error_row(small_streetclip_dir, image_folder, tmp_path):
    photos = [str(image_folder / name) for name, _, _ in GOOD_ROWS[:2]]
    test_split = datasets.Dataset.from_dict(
        {"image": [photos[0], None, photos[1]], "lat": [48.8566, 1.0, 35.6762], "lon": [2.3522, 2.0, 139.6503]}
    ).cast_column("image", datasets.Image())
    test_split.save_to_disk(tmp_path / "dataset")
    output_dir = tmp_path / "results"

    benchmark.main(
        ["--model", str(small_streetclip_dir), "--data", str(tmp_path / "dataset"), "--output_dir", str(output_dir)]
        + ["--num_workers", "0", "--device", "cpu"]
    )

    rows = _read_predictions(output_dir)
    assert [row["error"] for row in rows] == ["", "no image: the row's image is empty (None).", ""]
    assert (_read_metrics(output_dir)["num_evaluated"], _read_metrics(output_dir)["num_unreadable_images"]) == (2, 1)


def test_an_image_processor_config_without_usable_sizes_is_a_usage_error(
    capsys, small_streetclip_dir, image_folder, metadata_csv, tmp_path
):
    model = tmp_path / "model"
    shutil.copytree(small_streetclip_dir, model)
    config_file = model / "preprocessor_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"size": {"shortest_edge": -5}}))

    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(
            ["--model", str(model), "--data", str(metadata_csv), "--image_dir", str(image_folder)]
            + ["--output_dir", str(tmp_path / "results"), "--num_workers", "0", "--device", "cpu"]
        )

    assert exit_info.value.code == 2
    assert f"{str(config_file)!r} has size.shortest_edge = -5" in capsys.readouterr().err


def test_run_where_every_input_fails_writes_its_outputs_and_exits_one(
    capsys, small_streetclip_dir, image_folder, tmp_path
):
    data = _write_metadata_csv(tmp_path / "broken.csv", [CORRUPT_ROW, BAD_COORDINATE_ROW])
    output_dir = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(
            ["--model", str(small_streetclip_dir), "--data", str(data), "--image_dir", str(image_folder)]
            + ["--output_dir", str(output_dir), "--num_workers", "0", "--device", "cpu"]
        )
    assert exit_info.value.code == 1
    assert "No input could be scored: all 2 failed" in capsys.readouterr().err
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(OUTPUT_FILES)
    metrics = _read_metrics(output_dir)
    assert (metrics["n"], metrics["num_evaluated"], metrics["num_failed"]) == (0, 0, 2)
    assert "acc_25km" not in metrics


def test_ids_that_spreadsheets_would_evaluate_are_written_as_text(small_streetclip_dir, image_folder, tmp_path):
    formulas = ['=HYPERLINK("http://example.com","x").jpg', "+1.jpg", "-2.jpg", "@3.jpg"]
    data = _write_metadata_csv(tmp_path / "meta.csv", [GOOD_ROWS[2], *[(name, "1.0", "2.0") for name in formulas]])
    output_dir = tmp_path / "results"
    benchmark.main(
        ["--model", str(small_streetclip_dir), "--data", str(data), "--image_dir", str(image_folder)]
        + ["--output_dir", str(output_dir), "--num_workers", "0", "--device", "cpu"]
    )
    rows = _read_predictions(output_dir)
    assert [row["id"] for row in rows] == ["rio.jpg", *[f"'{name}" for name in formulas]]
    # Numbers stay numbers: Rio's negative coordinates are not taken for formulas.
    assert (rows[0]["true_latitude"], rows[0]["true_longitude"]) == ("-22.9068", "-43.1729")
    assert rows[0]["error"] == "" and all(
        not rows[0][column].startswith("'") for column in ("predicted_latitude", "predicted_longitude", "distance_km")
    )
    assert all("not found" in row["error"] for row in rows[1:])


def test_batch_size_and_workers_default_to_the_commands_shared_defaults():
    args = benchmark.build_parser().parse_args(["--model", "m", "--data", "d.csv", "--output_dir", "o"])
    assert (args.batch_size, args.num_workers) == (DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS)


# Invocation errors: one line naming the input, exit status 2, before any model loads


def _usage_error(capsys, argv: list[str]) -> str:
    """The message of a run that must stop as a usage error: exit status 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("benchmark.py: error: ") and "\n" not in message, message
    return message


@pytest.fixture
def no_model_loading(monkeypatch):
    """Make loading the model fail loudly: the checks under test must come first."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the invocation was checked")

    monkeypatch.setattr(benchmark, "load_model", load_model)


@pytest.mark.slow
def test_missing_csv_gives_one_line_and_exit_status_2_from_the_command_line(tmp_path):
    command = [sys.executable, str(EVAL_DIR / "benchmark.py"), "--model", "unused", "--data", "missing.csv"]
    command += ["--image_dir", str(tmp_path), "--output_dir", str(tmp_path / "results")]
    process = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert process.returncode == 2
    assert process.stderr.strip().splitlines()[-1] == ("benchmark.py: error: Metadata CSV not found: 'missing.csv'.")
    assert "Traceback" not in process.stderr


def test_invocation_errors_are_one_line_usage_errors(capsys, no_model_loading, image_folder, metadata_csv, tmp_path):
    two_splits = _two_split_dataset(tmp_path)
    capsys.readouterr()
    base = ["--model", "unused", "--output_dir", str(tmp_path / "results"), "--device", "cpu"]
    csv_args = ["--data", str(metadata_csv), "--image_dir", str(image_folder)]
    assert "Metadata CSV not found: " in _usage_error(capsys, base + ["--data", "x.csv", "--image_dir", "."])
    assert "Image folder not found: 'nowhere'" in _usage_error(
        capsys, base + ["--data", str(metadata_csv), "--image_dir", "nowhere"]
    )
    assert "Unknown text encoding 'klingon'" in _usage_error(capsys, base + csv_args + ["--encoding", "klingon"])
    assert "no split 'test'" in _usage_error(capsys, base + ["--data", str(two_splits)])
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(base + csv_args + ["--limit", "0"])
    assert exit_info.value.code == 2 and "--limit: must be an integer >= 1, got '0'" in capsys.readouterr().err


def _two_split_dataset(tmp_path: Path) -> Path:
    table = datasets.Dataset.from_dict({"image": ["a.jpg"], "lat": [1.0], "lon": [2.0]})
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(tmp_path / "two_splits")
    return tmp_path / "two_splits"


def test_unknown_model_is_a_usage_error(capsys, image_folder, metadata_csv, tmp_path):
    message = _usage_error(
        capsys,
        ["--model", str(tmp_path / "no-model"), "--data", str(metadata_csv), "--image_dir", str(image_folder)]
        + ["--output_dir", str(tmp_path / "results"), "--device", "cpu"],
    )
    assert f"cannot load --model {str(tmp_path / 'no-model')!r}" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_usage_error(capsys, no_model_loading, image_folder, metadata_csv, tmp_path):
    message = _usage_error(
        capsys,
        ["--model", "unused", "--data", str(metadata_csv), "--image_dir", str(image_folder)]
        + ["--output_dir", str(tmp_path / "results"), "--device", "cuda"],
    )
    assert "--device cuda, but torch sees no CUDA device" in message


def test_outputs_are_checked_before_the_data_and_the_model_load(capsys, no_model_loading, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("an earlier result\n")
    base = ["--model", "unused", "--data", "x.csv", "--image_dir", ".", "--device", "cpu"]
    assert f"--output_dir {str(taken)!r} is a file" in _usage_error(capsys, base + ["--output_dir", str(taken)])
    assert taken.read_text() == "an earlier result\n"
    assert "cannot write the results to --output_dir" in _usage_error(
        capsys, base + ["--output_dir", str(taken / "results")]
    )
    blocked = tmp_path / "blocked"
    (blocked / "world_map.png").mkdir(parents=True)
    message = _usage_error(capsys, base + ["--output_dir", str(blocked)])
    assert f"holds {str(blocked / 'world_map.png')!r}, which is not a file" in message


# Loading benchmark rows


@pytest.mark.parametrize(
    "header",
    [("IMG_ID", "LAT", "LON"), ("img_id", "lat", "lon"), ("image_id", "latitude", "longitude"), ("id", "Lat", "Lng")],
)
def test_csv_columns_are_found_by_their_usual_names(header, image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", GOOD_ROWS[:2], header=header)
    loaded = benchmark_data.load_benchmark(str(data), image_dir=image_folder)
    assert [(row.id, row.latitude, row.longitude, row.error) for row in loaded.rows] == [
        ("paris.jpg", 48.8566, 2.3522, None),
        ("tokyo.png", 35.6762, 139.6503, None),
    ]
    assert list(loaded.images) == [image_folder / "paris.jpg", image_folder / "tokyo.png"]


def test_csv_with_a_byte_order_mark_keeps_its_first_column_name(image_folder, tmp_path):
    data = tmp_path / "excel.csv"
    data.write_text("IMG_ID,LAT,LON\nparis.jpg,48.8566,2.3522\n", encoding="utf-8-sig")
    assert benchmark_data.load_benchmark(str(data), image_dir=image_folder).rows[0].id == "paris.jpg"


def test_missing_column_error_names_the_file_and_its_columns(image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", GOOD_ROWS[:1], header=("IMG_ID", "LAT", "east"))
    with pytest.raises(ValueError, match=r"no longitude column .*\['IMG_ID', 'LAT', 'east'\]"):
        benchmark_data.load_benchmark(str(data), image_dir=image_folder)
    with pytest.raises(ValueError, match="no latitude column 'lat'"):
        benchmark_data.load_benchmark(
            str(data), image_dir=image_folder, columns=benchmark_data.ColumnNames(latitude="lat")
        )


def test_swapped_file_warns_once_and_reads_correctly_with_columns_named_the_other_way(image_folder, tmp_path, caplog):
    swapped = [(name, longitude, latitude) for name, latitude, longitude in GOOD_ROWS]
    data = _write_metadata_csv(tmp_path / "isns.csv", swapped)
    loaded = benchmark_data.load_benchmark(str(data), image_dir=image_folder)
    # Only the rows whose true longitude exceeds 90 degrees give the swap away; the others look like valid points.
    assert sum(row.error is not None for row in loaded.rows) == 3
    [warning] = [record.getMessage() for record in caplog.records if "look swapped" in record.getMessage()]
    assert "3 of 8 rows" in warning and "read latitude from 'LON' and longitude from 'LAT'" in warning
    columns = benchmark_data.ColumnNames(latitude="LON", longitude="LAT")
    fixed = benchmark_data.load_benchmark(str(data), image_dir=image_folder, columns=columns)
    assert [(row.latitude, row.longitude, row.error) for row in fixed.rows] == [
        (float(latitude), float(longitude), None) for _, latitude, longitude in GOOD_ROWS
    ]


@pytest.mark.parametrize(
    ("latitude", "longitude", "message"),
    [
        ("", "2.35", "latitude (column 'LAT') is missing"),
        ("48.85", None, "longitude (column 'LON') is missing"),
        ("48.85 N", "2.35", "latitude (column 'LAT') '48.85 N' is not a number"),
        # Python's float() reads digit grouping: 2_3 would be 23.
        ("48.85", "2_3", "longitude (column 'LON') '2_3' is not a number"),
        ("nan", "2.35", "latitude (column 'LAT') 'nan' is not a finite number"),
        ("95.0", "120.0", "latitude (column 'LAT') 95.0 is outside [-90, 90]"),
        ("45.0", "-181.0", "longitude (column 'LON') -181.0 is outside [-180, 180]"),
        ("-122.4", "37.8", "latitude and longitude look swapped"),
    ],
)
def test_bad_coordinates_give_an_error_naming_the_value(latitude, longitude, message):
    row = benchmark_data.checked_row("photo.jpg", latitude, longitude, "LAT", "LON")
    assert message in row.error


def test_coordinates_on_the_edges_of_their_ranges_are_valid():
    row = benchmark_data.checked_row("pole.jpg", -90, 180.0, "LAT", "LON")
    assert (row.latitude, row.longitude, row.error) == (-90.0, 180.0, None)


def test_csv_needs_an_image_folder_and_no_image_column_and_a_dataset_refuses_a_folder(image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", GOOD_ROWS[:1])
    with pytest.raises(ValueError, match="give the folder"):
        benchmark_data.load_benchmark(str(data))
    with pytest.raises(ValueError, match="names its images by file name in its id column"):
        benchmark_data.load_benchmark(str(data), image_dir=image_folder, columns=benchmark_data.ColumnNames(image="x"))
    with pytest.raises(ValueError, match="goes with a metadata CSV only"):
        benchmark_data.load_benchmark(str(tmp_path / "dataset"), image_dir=image_folder)


def test_dataset_without_the_split_or_an_image_column_is_refused(tmp_path):
    table = datasets.Dataset.from_dict({"image": ["a.jpg"], "lat": [1.0], "lon": [2.0]})
    datasets.DatasetDict({"validation": table, "train": table}).save_to_disk(tmp_path / "dataset")
    with pytest.raises(ValueError, match=r"no split 'test'; its splits are \['train', 'validation'\]"):
        benchmark_data.load_benchmark(str(tmp_path / "dataset"))
    with pytest.raises(ValueError, match="'image' of the dataset .* holds Value"):
        benchmark_data.load_benchmark(str(tmp_path / "dataset"), split="validation")


def test_dataset_images_stay_encoded_until_a_worker_decodes_them(image_folder, tmp_path):
    table = datasets.Dataset.from_dict({"image": [str(image_folder / "paris.jpg")], "lat": [1.0], "lon": [2.0]})
    table.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "dataset")
    loaded = benchmark_data.load_benchmark(str(tmp_path / "dataset"))
    assert loaded.split is None and loaded.rows[0].id == "paris.jpg"
    assert loaded.images[0] == (image_folder / "paris.jpg").read_bytes()


def test_dataset_images_sharing_a_file_name_get_row_numbers_as_ids(image_folder, tmp_path):
    paths = [str(image_folder / "paris.jpg"), str(image_folder / "paris.jpg"), str(image_folder / "rio.jpg")]
    table = datasets.Dataset.from_dict({"image": paths, "lat": [1.0, 2.0, 3.0], "lon": [2.0, 3.0, 4.0]})
    table.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "dataset")
    assert [row.id for row in benchmark_data.load_benchmark(str(tmp_path / "dataset")).rows] == ["0", "1", "2"]


def test_dataset_with_a_repeated_id_is_refused_naming_both_rows(image_folder, tmp_path):
    images = [str(image_folder / name) for name, _, _ in GOOD_ROWS[:3]]
    table = datasets.Dataset.from_dict({"image": images, "lat": [1.0] * 3, "lon": [2.0] * 3, "id": [7, 8, 7]})
    table.cast_column("image", datasets.Image()).save_to_disk(tmp_path / "dataset")
    with pytest.raises(ValueError, match="lists the image id '7' twice, on row 0 and on row 2"):
        benchmark_data.load_benchmark(str(tmp_path / "dataset"))


# Metadata CSVs that cannot be read as one benchmark are refused, naming the line


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # The quote opened on line 3 runs to the end: without a check, rio.jpg and sydney.jpg vanish into one field.
        (
            'paris.jpg,48.8566,2.3522\ntokyo.png,"35.6762,139.6503\nrio.jpg,-22.9068,-43.1729\n',
            "not valid CSV in the record starting on line 3: unexpected end of data (is a quote left open?)",
        ),
        # Closed again on the next line: two rows merged into one.
        (
            'paris.jpg,"48.8566,2.3522\ntokyo.png,35.6762",139.6503\nrio.jpg,-22.9068,-43.1729\n',
            "quoted field that runs from line 2 over a line break to line 3: is a quote left open?",
        ),
        ('paris.jpg,48.8566,2.3522\ntokyo.png,"35.6762"x,139.6503\n', "record starting on line 3: ',' expected"),
    ],
)
def test_csv_with_an_unterminated_quote_is_refused_naming_the_line(body, message, image_folder, tmp_path):
    data = tmp_path / "quoted.csv"
    data.write_text("IMG_ID,LAT,LON\n" + body)
    with pytest.raises(ValueError, match=re.escape(message)):
        benchmark_data.load_benchmark(str(data), image_dir=image_folder)


def test_csv_listing_an_image_twice_is_refused_naming_both_lines(image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", [GOOD_ROWS[0], GOOD_ROWS[1], GOOD_ROWS[0], GOOD_ROWS[1]])
    with pytest.raises(ValueError, match=r"lists the image id 'paris.jpg' twice, on line 2 and on line 4 \(1 more"):
        benchmark_data.load_benchmark(str(data), image_dir=image_folder)


@pytest.mark.parametrize("spelling", ["./paris.jpg", ".//paris.jpg", "absolute"])
def test_csv_spelling_one_image_two_ways_is_refused_naming_both_lines(spelling, image_folder, tmp_path):
    spelling = str(image_folder / "paris.jpg") if spelling == "absolute" else spelling
    data = _write_metadata_csv(tmp_path / "meta.csv", [GOOD_ROWS[0], GOOD_ROWS[1], (spelling, "1.0", "2.0")])
    message = f"lists the image id 'paris.jpg' twice, on line 2 and as {spelling!r} on line 4."
    with pytest.raises(ValueError, match=re.escape(message)):
        benchmark_data.load_benchmark(str(data), image_dir=image_folder, allow_outside_image_dir=True)


def test_csv_with_a_column_given_twice_is_refused_naming_both(image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", [(*GOOD_ROWS[0], "0.0")], header=("IMG_ID", "LAT", "LON", "LAT"))
    for columns in (benchmark_data.ColumnNames(), benchmark_data.ColumnNames(latitude="LAT")):
        with pytest.raises(
            ValueError, match=r"2 columns that could be its latitude: 'LAT' \(column 2\), 'LAT' \(column 4"
        ):
            benchmark_data.load_benchmark(str(data), image_dir=image_folder, columns=columns)


def test_csv_columns_differing_only_in_case_must_be_chosen_by_name(image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", [(*GOOD_ROWS[0], "0.0")], header=("IMG_ID", "LAT", "LON", "lat"))
    with pytest.raises(ValueError, match="'LAT' \\(column 2\\), 'lat' \\(column 4\\)"):
        benchmark_data.load_benchmark(str(data), image_dir=image_folder)
    chosen = benchmark_data.load_benchmark(
        str(data), image_dir=image_folder, columns=benchmark_data.ColumnNames(latitude="lat")
    )
    assert chosen.rows[0].latitude == 0.0


@pytest.mark.parametrize("outside", ["../secret/x.png", "/etc/hostname", "sub/../../x.png"])
def test_csv_ids_outside_the_image_folder_are_refused_unless_allowed(outside, image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", [GOOD_ROWS[0], (outside, "1.0", "2.0")])
    with pytest.raises(
        ValueError, match=f"names 1 image\\(s\\) outside the image folder .*first {re.escape(repr(outside))} on line 3"
    ):
        benchmark_data.load_benchmark(str(data), image_dir=image_folder)
    allowed = benchmark_data.load_benchmark(str(data), image_dir=image_folder, allow_outside_image_dir=True)
    assert allowed.images[1] == image_folder / outside


def test_latin1_csv_error_names_the_file_the_line_and_the_option(image_folder, tmp_path):
    data = tmp_path / "latin1.csv"
    data.write_bytes("IMG_ID,LAT,LON\nparis.jpg,48.8566,2.3522\ncafé.jpg,48.85,2.35\n".encode("latin-1"))
    with pytest.raises(ValueError) as error:
        benchmark_data.load_benchmark(str(data), image_dir=image_folder)
    assert str(data) in str(error.value)
    assert "is not utf-8 text: byte 0xe9 on line 3" in str(error.value) and "--encoding" in str(error.value)
    loaded = benchmark_data.load_benchmark(str(data), image_dir=image_folder, encoding="latin-1")
    assert [row.id for row in loaded.rows] == ["paris.jpg", "café.jpg"]


def test_csv_row_without_an_id_is_recorded_not_run(image_folder, tmp_path):
    data = _write_metadata_csv(tmp_path / "meta.csv", [GOOD_ROWS[0], ("", "1.0", "2.0"), (" ", "1.0", "2.0")])
    rows = benchmark_data.load_benchmark(str(data), image_dir=image_folder).rows
    assert [row.error for row in rows] == [None, *["the image id (column 'IMG_ID') is missing"] * 2]


# Image folders, the format training reads


@pytest.fixture(scope="module")
def geo_image_folder(image_folder) -> Path:
    """An image folder as training takes it: images, one in a subfolder, and a metadata.csv."""
    folder = image_folder.parent / "geo_eval"
    (folder / "sub").mkdir(parents=True)
    for name, target in (("paris.jpg", "paris.jpg"), ("tokyo.png", "tokyo.png"), ("rio.jpg", "sub/rio.jpg")):
        (folder / target).write_bytes((image_folder / name).read_bytes())
    (folder / "metadata.csv").write_text(
        "file_name,latitude,longitude\nparis.jpg,48.8566,2.3522\ntokyo.png,35.6762,139.6503\nsub/rio.jpg,-22.9068,-43.1729\n"
    )
    return folder


def test_image_folder_runs_from_its_only_split_with_file_names_as_ids(
    small_streetclip_dir, geo_image_folder, tmp_path, monkeypatch
):
    titles = []

    def recording(plot):
        def wrapper(*args, title):
            titles.append(title)
            return plot(*args, title=title)

        return wrapper

    monkeypatch.setattr(benchmark, "plot_error_cdf", recording(plots.plot_error_cdf))
    monkeypatch.setattr(benchmark, "plot_world_map", recording(plots.plot_world_map))
    benchmark.main(
        ["--model", str(small_streetclip_dir), "--data", str(geo_image_folder), "--output_dir", str(tmp_path)]
        + ["--num_workers", "0", "--device", "cpu"]
    )
    rows = _read_predictions(tmp_path)
    assert sorted(row["id"] for row in rows) == ["paris.jpg", "sub/rio.jpg", "tokyo.png"]
    assert all(row["error"] == "" for row in rows)
    metrics = _read_metrics(tmp_path)
    assert (metrics["benchmark"], metrics["split"], metrics["n"]) == ("geo_eval", "train", 3)
    # Both figures name the model, n and the accuracies, so that two runs' figures can be told apart.
    accuracies = ", ".join(f"acc@{km} km {metrics[f'acc_{km}km']:.1%}" for km in (25, 200, 750, 2500))
    assert titles == [f"geo_eval, model {small_streetclip_dir}\nn = 3: {accuracies}"] * 2


def test_a_default_run_hides_loading_bars_and_split_notes_that_verbose_shows(
    capsys, small_streetclip_dir, geo_image_folder, tmp_path
):
    outputs = {}
    for flags in ([], ["--verbose"]):
        data = shutil.copytree(geo_image_folder, tmp_path / f"data{len(flags)}")  # datasets prepares each once
        benchmark.main(
            ["--model", str(small_streetclip_dir), "--data", str(data), "--output_dir", str(tmp_path / "results")]
            + ["--num_workers", "0", "--device", "cpu", *flags]
        )
        outputs[bool(flags)] = capsys.readouterr().err

    for noise in ("has no split 'test'; reading its only split, 'train'", "Loading weights", "Generating train split"):
        assert noise not in outputs[False] and noise in outputs[True]
    assert "data0: 100%" in outputs[False]  # the runner's own progress bar stays


# Figures


def test_pair_across_the_antimeridian_is_drawn_the_short_way_in_two_pieces():
    segments = plots._pair_segments(np.array([[-18.0, 179.0], [10.0, 0.0]]), np.array([[-17.0, -179.0], [20.0, 30.0]]))
    assert segments.tolist() == [
        [[179.0, -18.0], [181.0, -17.0]],
        [[0.0, 10.0], [30.0, 20.0]],
        [[-181.0, -18.0], [-179.0, -17.0]],
    ]


def test_points_at_one_place_are_stacked_and_counted():
    places = np.array([[48.8566, 2.3522], [35.6762, 139.6503], [-22.9068, -43.1729]])
    # 24 images at three places, a few metres apart at most (as photos of one square are).
    points = np.repeat(places, [12, 8, 4], axis=0) + np.linspace(0, 0.001, 24)[:, None]
    stacked, counts = plots.stacked_points(points)
    assert sorted(counts.tolist()) == [4, 8, 12]
    assert stacked[np.argmax(counts)] == pytest.approx(places[0], abs=1e-3)
    assert plots.stacked_points(np.empty((0, 2)))[1].size == 0


def test_world_map_draws_each_stack_with_an_area_proportional_to_its_images(tmp_path):
    truths = np.repeat([[48.8566, 2.3522], [-33.8688, 151.2093]], [5, 1], axis=0)
    predictions = np.repeat([[35.6762, 139.6503]], 6, axis=0)
    figure = plots.plot_world_map(truths, predictions, tmp_path / "map.png", title="run title")
    truth_markers, prediction_markers = (
        collection for collection in figure.axes[0].collections if collection.get_label() in ("truth", "prediction")
    )
    assert sorted(truth_markers.get_sizes().tolist()) == [plots.MARKER_AREA, 5 * plots.MARKER_AREA]
    assert prediction_markers.get_sizes().tolist() == [6 * plots.MARKER_AREA]
    assert 0 < truth_markers.get_alpha() < 1
    assert figure.get_suptitle() == "run title"
    # A second legend gives the marker scale, up to the largest stack.
    assert "6 images" in [
        text.get_text() for legend in figure.axes[0].findobj(matplotlib.legend.Legend) for text in legend.get_texts()
    ]


def test_run_title_names_the_model_n_and_each_accuracy():
    title = plots.run_title("im2gps", "geolocal/StreetCLIP", 237, {25: 0.283, 200: 0.451, 750: 0.747, 2500: 0.882})
    assert title == (
        "im2gps, model geolocal/StreetCLIP\nn = 237: acc@25 km 28.3%, acc@200 km 45.1%, acc@750 km 74.7%, "
        "acc@2500 km 88.2%"
    )
    assert plots.run_title("im2gps", "m", 0, {}) == "im2gps, model m\nn = 0: no image scored"


def test_metrics_json_holds_ece_and_brier_per_radius_of_the_first_answers_confidence(script_run):
    rows = [row for row in _read_predictions(script_run[0]) if not row["error"]]
    within = np.array([[json.loads(row["within_km"])[str(r)] for r in CONFIDENCE_RADII_KM] for row in rows])
    hits = np.array([[float(row["distance_km"]) <= r for r in CONFIDENCE_RADII_KM] for row in rows])
    calibration = _read_metrics(script_run[0])["calibration"]
    assert calibration["calibrated"] is False and all(row["calibrated"] == "False" for row in rows)
    for column, radius in enumerate(CONFIDENCE_RADII_KM):
        # By hand: 10 equal-mass bins of the sorted confidences (fewer photos than bins: one photo a bin).
        order = np.argsort(within[:, column], kind="stable")
        parts = [part for part in np.array_split(order, 10) if len(part)]
        ece = sum(len(p) * abs(within[p, column].mean() - hits[p, column].mean()) for p in parts) / len(rows)
        assert calibration["ece"][str(radius)] == pytest.approx(ece)
        assert calibration["brier"][str(radius)] == pytest.approx(np.mean((within[:, column] - hits[:, column]) ** 2))


def test_the_reliability_diagram_labels_its_axes_and_names_the_run(tmp_path):
    within = np.array([[0.1, 0.9], [0.4, 0.8], [0.7, 0.95]])
    hits = np.array([[False, True], [True, True], [True, False]])
    figure = plots.plot_reliability(within, hits, [200, 750], tmp_path / "reliability.png", title="im2gps, model m")
    (axes,) = figure.axes
    assert "confidence" in axes.get_xlabel() and "observed share" in axes.get_ylabel()
    assert figure._suptitle.get_text() == "im2gps, model m"
    assert [text.get_text() for text in axes.get_legend().get_texts()][1:] == [
        "within 200 km (ECE 0.333)",
        "within 750 km (ECE 0.417)",  # |0.8 - 1| + |0.9 - 1| + |0.95 - 0|, over 3
    ]
    assert (tmp_path / "reliability.png").stat().st_size > 0
