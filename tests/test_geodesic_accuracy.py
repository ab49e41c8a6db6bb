"""Specification of the `eval/geodesic_accuracy` evaluate metric module."""

import ast
import csv
import doctest
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import evaluate
import numpy as np
import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = REPO_ROOT / "eval" / "geodesic_accuracy"
METRIC_FILE = METRIC_DIR / "geodesic_accuracy.py"
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference-predictions"
R = 6371.0088
DEFAULT_KEYS = ["acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km", "mean_km", "geoscore", "n"]
LONDON, PARIS = [51.5074, -0.1278], [48.8566, 2.3522]


def _load_module_file():
    """Import the metric's file directly, the way the benchmark runner reuses `haversine_km`."""
    spec = importlib.util.spec_from_file_location("geodesic_accuracy_under_test", METRIC_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


geodesic = _load_module_file()


@pytest.fixture
def metric():
    return evaluate.load(str(METRIC_DIR))


def _error(metric, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        metric.compute(**kwargs)
    return str(info.value)


# Loading and layout


def test_loads_by_path_relative_to_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    results = evaluate.load("eval/geodesic_accuracy").compute(predictions=[PARIS], references=[LONDON])
    assert list(results) == DEFAULT_KEYS


def test_module_imports_only_numpy_datasets_evaluate():
    tree = ast.parse(METRIC_FILE.read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"numpy", "datasets", "evaluate"}


# Run as a Space runs it: `python app.py` in a copy of the folder named otherwise, with evaluate's widget stubbed
# (it needs the Gradio 3 that the card's `sdk_version` pins). It prints the loaded module's answer and any module of
# the host project that loading imported.
SPACE_RUN = """
import json, runpy, sys
import evaluate.utils
launched = []
evaluate.utils.launch_gradio_widget = launched.append
runpy.run_path("app.py", run_name="__main__")
results = launched[0].compute(predictions=[[48.8566, 2.3522]], references=[[51.5074, -0.1278]])
host = sorted(name for name in sys.modules if name.split(".")[0] in {"modeling_streetclip", "benchmark", "plots"})
print(json.dumps({"name": launched[0].name, "results": results, "host_modules": host}))
"""


@pytest.mark.slow
def test_the_folder_runs_as_an_evaluate_space_from_its_own_folder(tmp_path):
    space = tmp_path / "app"  # where a Space's files are, whatever the metric's name
    shutil.copytree(METRIC_DIR, space, ignore=shutil.ignore_patterns("__pycache__"))
    assert {"app.py", "README.md", "requirements.txt", "geodesic_accuracy.py"} <= {p.name for p in space.iterdir()}
    requirements = (space / "requirements.txt").read_text().split()
    assert [line.split(">")[0] for line in requirements] == ["evaluate", "numpy"]
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}

    run = subprocess.run(
        [sys.executable, "-c", SPACE_RUN], cwd=space, env=environment, capture_output=True, text=True, timeout=300
    )

    assert run.returncode == 0, run.stderr[-3000:]
    output = json.loads(run.stdout.splitlines()[-1])
    assert output["name"] == "geodesic_accuracy" and output["host_modules"] == []
    assert output["results"]["acc_750km"] == 1.0 and output["results"]["n"] == 1


def test_docstring_examples_show_real_output(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    test = doctest.DocTestParser().get_doctest(geodesic._KWARGS_DESCRIPTION, {}, "_KWARGS_DESCRIPTION", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.failures == 0 and runner.tries >= 4


# Distances


def test_same_point_is_zero_km():
    assert geodesic.haversine_km(12.3, 45.6, 12.3, 45.6) == 0.0


def test_one_degree_of_latitude_is_111_19_km():
    assert geodesic.haversine_km(0.0, 0.0, 1.0, 0.0) == pytest.approx(111.19, abs=0.01)
    assert geodesic.haversine_km(0.0, 0.0, 1.0, 0.0) == pytest.approx(math.pi * R / 180)


def test_antimeridian_distance_is_short():
    assert geodesic.haversine_km(0.0, 179.5, 0.0, -179.5) == pytest.approx(111.19, abs=0.01)


def test_pole_to_pole_is_half_the_circumference():
    assert geodesic.haversine_km(90.0, 0.0, -90.0, 0.0) == pytest.approx(math.pi * R)


def test_north_pole_with_different_longitudes_is_zero():
    assert geodesic.haversine_km(90.0, 10.0, 90.0, -100.0) == pytest.approx(0.0, abs=1e-6)


def test_london_paris_is_343_5_km():
    assert geodesic.haversine_km(*LONDON, *PARIS) == pytest.approx(343.5, abs=1.0)


def test_haversine_km_takes_and_returns_arrays():
    distances = geodesic.haversine_km(np.zeros(3), np.zeros(3), np.array([0.0, 1.0, 2.0]), np.zeros(3))
    assert distances.shape == (3,)
    np.testing.assert_allclose(distances, [0.0, math.pi * R / 180, 2 * math.pi * R / 180])


# Results


def test_default_results_are_fractions_distances_and_count(metric):
    predictions = [PARIS, LONDON, [0.0, 0.0]]
    references = [LONDON, LONDON, [0.0, 100.0]]
    results = metric.compute(predictions=predictions, references=references)
    assert list(results) == DEFAULT_KEYS
    assert results["acc_1km"] == pytest.approx(1 / 3)
    assert results["acc_750km"] == pytest.approx(2 / 3)
    assert results["acc_2500km"] == pytest.approx(2 / 3)
    assert results["median_km"] == pytest.approx(343.5, abs=1.0)
    assert results["mean_km"] == pytest.approx((343.56 + 100 * math.pi * R / 180) / 3, abs=0.01)
    assert results["n"] == 3 and isinstance(results["n"], int)


def test_geoscore_is_5000_at_zero_km(metric):
    assert metric.compute(predictions=[PARIS], references=[PARIS])["geoscore"] == 5000.0


def test_geoscore_decays_with_a_1492_7_km_scale(metric):
    results = metric.compute(predictions=[[0.0, 0.0]], references=[[0.0, 10.0]])
    assert results["geoscore"] == pytest.approx(5000 * math.exp(-results["mean_km"] / 1492.7))


def test_threshold_boundary_counts_only_when_inclusive(metric):
    kwargs = {"predictions": [PARIS, PARIS], "references": [PARIS, LONDON], "thresholds_km": [0]}
    assert metric.compute(**kwargs, inclusive=True)["acc_0km"] == 0.5
    assert metric.compute(**kwargs, inclusive=False)["acc_0km"] == 0.0


def test_thresholds_km_replace_the_defaults_with_readable_keys(metric):
    results = metric.compute(predictions=[PARIS], references=[LONDON], thresholds_km=[1, 0.5, 25.0, 400])
    assert list(results) == ["acc_1km", "acc_0.5km", "acc_25km", "acc_400km", "median_km", "mean_km", "geoscore", "n"]
    assert results["acc_400km"] == 1.0 and results["acc_25km"] == 0.0


def test_radius_km_scales_distances_proportionally(metric):
    kwargs = {"predictions": [PARIS, [0.0, 0.0]], "references": [LONDON, [10.0, 10.0]]}
    earth = metric.compute(**kwargs)
    doubled = metric.compute(**kwargs, radius_km=2 * R)
    assert doubled["mean_km"] == pytest.approx(2 * earth["mean_km"])
    assert doubled["median_km"] == pytest.approx(2 * earth["median_km"])
    assert geodesic.haversine_km(*LONDON, *PARIS, radius_km=6378.137) == pytest.approx(
        geodesic.haversine_km(*LONDON, *PARIS) * 6378.137 / R
    )


def test_add_batch_streaming_equals_one_shot_compute(metric):
    rng = np.random.default_rng(0)
    predictions = np.column_stack([rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)]).tolist()
    references = np.column_stack([rng.uniform(-90, 90, 50), rng.uniform(-180, 180, 50)]).tolist()
    options = {"thresholds_km": [1000, 5000], "radius_km": 6378.137, "inclusive": False}
    one_shot = metric.compute(predictions=predictions, references=references, **options)
    for start in range(0, 50, 16):
        metric.add_batch(predictions=predictions[start : start + 16], references=references[start : start + 16])
    assert metric.compute(**options) == pytest.approx(one_shot)


def test_add_one_pair_at_a_time_equals_one_shot_compute(metric):
    predictions, references = [PARIS, [1.0, 2.0]], [LONDON, [3.0, 4.0]]
    for prediction, reference in zip(predictions, references, strict=True):
        metric.add(prediction=prediction, reference=reference)
    assert metric.compute() == metric.compute(predictions=predictions, references=references)


def _score_shard(process_id: int, experiment_id: str, cache_dir: str, predictions: list, references: list):
    """One worker of evaluate's own num_process/process_id scheme, scoring every other pair."""
    metric = evaluate.load(
        str(METRIC_DIR), num_process=2, process_id=process_id, experiment_id=experiment_id, cache_dir=cache_dir
    )
    metric.add_batch(predictions=predictions[process_id::2], references=references[process_id::2])
    return metric.compute(thresholds_km=[100])


@pytest.mark.slow
def test_distributed_evaluation_gathers_all_shards_on_process_zero(metric, tmp_path):
    predictions, references = (
        [PARIS, [0.0, 0.0], [1.0, 2.0], [10.0, 10.0]],
        [LONDON, [0.0, 1.0], [1.0, 2.0], [1.0, 1.0]],
    )
    experiment_id = uuid.uuid4().hex
    shards = [(process_id, experiment_id, str(tmp_path), predictions, references) for process_id in (0, 1)]
    # spawn, not fork: forking a process that already runs arrow and torch threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        main, other = pool.starmap(_score_shard, shards)
    assert other is None
    assert main == metric.compute(predictions=predictions, references=references, thresholds_km=[100])


def test_a_bad_batch_fails_at_add_batch_and_keeps_earlier_batches(metric):
    metric.add_batch(predictions=[PARIS, PARIS], references=[LONDON, LONDON])
    with pytest.raises(ValueError, match=r"^references\[1\] has longitude 200.0 outside \[-180, 180\]"):
        metric.add_batch(predictions=[PARIS, PARIS], references=[LONDON, [0.0, 200.0]])
    assert metric.compute()["n"] == 2


def test_add_checks_the_pair_range(metric):
    with pytest.raises(ValueError, match=r"^prediction has latitude 123.4 outside \[-90, 90\]; its longitude"):
        metric.add(prediction=[123.4, 45.0], reference=LONDON)


def test_numpy_arrays_are_accepted(metric):
    from_arrays = metric.compute(predictions=np.array([PARIS]), references=np.array([LONDON]))
    assert from_arrays == metric.compute(predictions=[PARIS], references=[LONDON])


# Bad input: the message a user calling compute sees


@pytest.mark.parametrize(
    "references, expected",
    [
        (
            [LONDON, LONDON, LONDON, [123.4, 45.0]],
            "references[3] has latitude 123.4 outside [-90, 90]; its longitude 45.0 would be a valid latitude"
            " (columns may be swapped: [lat, lon] expected)",
        ),
        ([LONDON, [-100.0, 120.0], LONDON, LONDON], "references[1] has latitude -100.0 outside [-90, 90]; expected"),
        ([LONDON, LONDON, [10.0, 180.5], LONDON], "references[2] has longitude 180.5 outside [-180, 180]"),
        ([LONDON, [float("nan"), 1.0], LONDON, LONDON], "references[1] is [nan, 1.0], with a missing or non-finite"),
        ([LONDON, LONDON, LONDON, [1.0, float("inf")]], "references[3] is [1.0, inf], with a missing or non-finite"),
        ([[1.0, None], LONDON, LONDON, LONDON], "references[0] is [1.0, None], with a missing or non-finite"),
        ([LONDON, LONDON, None, LONDON], "references[2] is None; expected a [lat, lon] pair in degrees"),
        (
            [LONDON, [1.0, 2.0, 3.0], LONDON, LONDON],
            "references[1] is [1.0, 2.0, 3.0], of length 3; expected a [lat, lon]",
        ),
        ([LONDON, LONDON, [1.0], LONDON], "references[2] is [1.0], of length 1; expected a [lat, lon] pair"),
        (
            [LONDON, LONDON, LONDON, [1.0, "north"]],
            "references[3] is [1.0, 'north'], with the non-numeric value 'north'",
        ),
    ],
)
def test_bad_reference_rows_are_named_with_index_and_value(metric, references, expected):
    assert expected in _error(metric, predictions=[PARIS] * 4, references=references)


def test_bad_prediction_rows_are_named_as_predictions(metric):
    message = _error(metric, predictions=[PARIS, [45.0, 123.4], [95.0, 10.0]], references=[LONDON] * 3)
    assert message.startswith("predictions[2] has latitude 95.0 outside [-90, 90]")
    assert "swapped" in message


def test_the_metrics_standalone_point_check_agrees_with_the_packages_rule():
    # The metric keeps its own copy of `modeling_streetclip.geodesy`'s coordinate rule to stay publishable on its own; the two
    # must accept the same pairs and call the same pairs swapped.
    from modeling_streetclip.geodesy import CoordinateProblem, coordinate_problem

    values = [-200.0, -180.5, -180.0, -95.0, -90.0, -45.0, 0.0, 89.9, 90.0, 90.1, 179.9, 180.0, 181.0, math.nan]
    for lat in values:
        for lon in values:
            problem = coordinate_problem(lat, lon)
            message = geodesic._point_problem([lat, lon], lat, lon)
            assert (message is None) == (problem is None), (lat, lon, message, problem)
            assert ("swapped" in (message or "")) == (problem is CoordinateProblem.LOOK_SWAPPED), (lat, lon)


def test_a_bare_pair_instead_of_a_list_of_pairs_is_explained(metric):
    message = _error(metric, predictions=PARIS, references=LONDON)
    assert message.startswith("predictions[0] is 48.8566; expected a [lat, lon] pair")


def test_length_mismatch_names_the_first_unmatched_row(metric):
    message = _error(metric, predictions=[PARIS, PARIS, PARIS], references=[LONDON, LONDON])
    assert message.startswith("predictions has 3 rows but references has 2: predictions[2] has no counterpart")


def test_empty_input_is_rejected(metric):
    assert "predictions and references are empty" in _error(metric, predictions=[], references=[])


@pytest.mark.parametrize(
    "references, expected",
    [
        ([LONDON, [True, False]], "references[1] is [True, False], with the boolean True, which is not a coordinate"),
        ([[10.0, np.False_], LONDON], "references[0] is [10.0, np.False_], with the boolean np.False_"),
        (np.array([[True, False], [False, True]]), "references[0] is [True, False], with the boolean True"),
    ],
    ids=["python", "numpy-scalar", "numpy-array"],
)
def test_booleans_are_refused_naming_the_row_instead_of_scored_as_1_or_0(metric, references, expected):
    assert expected in _error(metric, predictions=[PARIS, PARIS], references=references)
    with pytest.raises(ValueError, match=r"^prediction is \[True, 2.0\], with the boolean True"):
        metric.add(prediction=[True, 2.0], reference=LONDON)


def test_add_names_the_bad_pair(metric):
    with pytest.raises(ValueError, match=r"^reference is \[1, 2, 3\], of length 3; expected a \[lat, lon\] pair"):
        metric.add(prediction=PARIS, reference=[1, 2, 3])


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"thresholds_km": [25, -1]}, "thresholds_km[1] is -1.0; thresholds must be finite distances >= 0 km"),
        ({"thresholds_km": [float("nan")]}, "thresholds_km[0] is nan"),
        ({"thresholds_km": ["far"]}, "thresholds_km must be a list of distances in km, got ['far']"),
        ({"radius_km": 0}, "radius_km must be a finite radius > 0 km, got 0"),
        ({"inclusive": "no"}, "inclusive must be True (d <= t) or False (d < t), got 'no'"),
    ],
)
def test_bad_options_are_rejected(metric, options, expected):
    assert expected in _error(metric, predictions=[PARIS], references=[LONDON], **options)


def test_unknown_option_is_a_type_error(metric):
    with pytest.raises(TypeError, match="unknown option"):
        metric.compute(predictions=[PARIS], references=[LONDON], threshold_km=[5])


def test_bad_option_does_not_lose_streamed_batches(metric):
    metric.add_batch(predictions=[PARIS], references=[LONDON])
    with pytest.raises(ValueError):
        metric.compute(thresholds_km=[-5])
    assert metric.compute()["n"] == 1


# Published numbers, from the ISNs authors' per-image predictions


def _read_reference_predictions(path: Path) -> tuple[list, list, list[float]]:
    """Per-image rows up to the first non-numeric row, and the authors' summary values after it."""
    predictions, references, summary = [], [], []
    with path.open(newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            try:
                _, gt_lat, predicted_lat, gt_lon, predicted_lon, _ = row
                point = [float(gt_lat), float(predicted_lat), float(gt_lon), float(predicted_lon)]
            except ValueError:
                break
            references.append([point[0], point[2]])
            predictions.append([point[1], point[3]])
        for row in rows:
            try:
                summary = [float(value) for value in row]
            except ValueError:
                continue
    return predictions, references, summary


def _reference_file(name: str) -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference predictions not found at {REFERENCE_DIR}")
    return REFERENCE_DIR / name


@pytest.mark.parametrize(
    "name, published",
    [
        ("im2gps__ISNs_M-fstar-S3.csv", [16.9, 43.0, 51.9, 66.7, 80.2]),
        ("im2gps3k__ISNs_M-fstar-S3.csv", [10.5, 28.0, 36.6, 49.7, 66.0]),
    ],
)
def test_reproduces_published_isns_table(metric, name, published):
    predictions, references, _ = _read_reference_predictions(_reference_file(name))
    results = metric.compute(predictions=predictions, references=references)
    assert results["n"] == {"im2gps": 237, "im2gps3k": 2997}[name.split("__")[0]]
    ours = [100 * results[f"acc_{t}km"] for t in (1, 25, 200, 750, 2500)]
    assert ours == pytest.approx(published, abs=0.05)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in REFERENCE_DIR.glob("*.csv")) if REFERENCE_DIR.is_dir() else ["(absent)"]
)
def test_matches_summary_block_of_each_reference_file(metric, name):
    predictions, references, summary = _read_reference_predictions(_reference_file(name))
    results = metric.compute(predictions=predictions, references=references)
    ours = [results[f"acc_{t}km"] for t in (1, 25, 200, 750, 2500)]
    assert ours == pytest.approx(summary[:5], abs=1e-6)
    assert results["mean_km"] == pytest.approx(summary[5], abs=0.02)
