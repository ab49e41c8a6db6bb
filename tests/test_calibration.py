"""`streetclip calibrate` and the calibration error: refusals, the stored calibration through every loader, and the
error it removes on the synthetic geo world."""

import json

import numpy as np
import publish
import pytest
from builders import count_processor_loads, run_as_hub_user
from transformers import pipeline

from modeling_streetclip import CandidatePlaces, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app.benchmark_data import load_benchmark
from modeling_streetclip.app.calibration import (
    MIN_PHOTOS,
    answer_hits,
    calibration_errors,
    equal_mass_bins,
    isotonic_map,
    radius_errors,
)
from modeling_streetclip.cli import main as streetclip
from modeling_streetclip.decisions import rank_answers
from modeling_streetclip.testing_utils import (
    PLACES,
    random_photo,
    write_geo_imagefolder,
)


def test_ece_and_brier_are_the_equal_mass_bin_gap_and_the_squared_error():
    confidences = np.array([0.9, 0.1, 0.8, 0.2])
    hits = np.array([True, False, False, True])
    errors = calibration_errors(confidences, hits, num_bins=2)
    # Bins {0.1, 0.2} (mean 0.15, share hit 0.5) and {0.8, 0.9} (0.85 and 0.5), each half the photos.
    assert errors["ece"] == pytest.approx(0.5 * 0.35 + 0.5 * 0.35)
    assert errors["brier"] == pytest.approx((0.01 + 0.01 + 0.64 + 0.64) / 4)


def run(capsys, *arguments) -> tuple[int, str, str]:
    status = streetclip(["calibrate", *map(str, arguments)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_calibrate_refuses_fewer_photos_than_the_minimum_naming_it(capsys, tmp_path, small_streetclip_dir):
    photos = write_geo_imagefolder(tmp_path / "photos", photos_per_city=2, seed=0)
    status, _, err = run(capsys, "--model", small_streetclip_dir, "--data", photos, "--output", tmp_path / "out")
    assert status == 2 and f"has 24 labelled photos; calibrating needs at least {MIN_PHOTOS}" in err
    assert not (tmp_path / "out").exists()


def test_calibrate_refuses_rows_without_valid_coordinates_naming_them(capsys, tmp_path, small_streetclip_dir):
    photos = write_geo_imagefolder(tmp_path / "photos", photos_per_city=9, seed=0, bad_rows=True)
    status, _, err = run(capsys, "--model", small_streetclip_dir, "--data", photos, "--output", tmp_path / "out")
    assert status == 2 and "2 of the 111 rows have no valid coordinates" in err
    assert "'swapped.png'" in err and "look swapped" in err and "'no-coordinates.png'" in err


def test_calibrate_refuses_photos_that_cannot_be_read_naming_them(capsys, tmp_path, small_streetclip_dir):
    photos = write_geo_imagefolder(tmp_path / "photos", photos_per_city=9, seed=0)
    (photos / "broken.png").write_bytes(b"not a png")
    with open(photos / "metadata.csv", "a", encoding="utf-8") as metadata:
        metadata.write("broken.png,48.0,2.0,,,\n")
    status, _, err = run(capsys, "--model", small_streetclip_dir, "--data", photos, "--output", tmp_path / "out")
    assert status == 2 and "1 photos could not be read, among them ['broken.png']" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("holdout", ["0", "1.5"])
def test_calibrate_refuses_a_holdout_that_is_not_a_share(capsys, tmp_path, small_streetclip_dir, holdout):
    arguments = ("--model", small_streetclip_dir, "--data", tmp_path, "--output", tmp_path / "out")
    status, _, err = run(capsys, *arguments, "--holdout", holdout)
    assert status == 2 and "--holdout must be a share strictly between 0 and 1" in err


@pytest.mark.parametrize(
    ("holdout", "split"),
    [
        ("0.995", "holds out 107 of the 108 photos and fits on the other 1"),
        ("0.05", "holds out 5 of the 108 photos and fits on the other 103"),
    ],
)
def test_calibrate_refuses_a_holdout_that_leaves_too_few_photos_to_fit_or_measure_on(
    capsys, tmp_path, small_streetclip_dir, holdout, split
):
    photos = write_geo_imagefolder(tmp_path / "photos", photos_per_city=9, seed=0)
    arguments = ("--model", small_streetclip_dir, "--data", photos, "--output", tmp_path / "out", "--holdout", holdout)
    status, _, err = run(capsys, *arguments)
    assert status == 2 and f"--holdout {holdout} {split}; calibrating needs at least 30 to measure on and 70" in err
    assert not (tmp_path / "out").exists()


def test_calibrate_writes_into_a_folder_with_other_files_only_with_overwrite(capsys, tmp_path, small_streetclip_dir):
    photos = write_geo_imagefolder(tmp_path / "photos", photos_per_city=9, seed=0)
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "config.json").write_text("{}", encoding="utf-8")
    arguments = ("--model", small_streetclip_dir, "--data", photos, "--output", other)
    status, _, err = run(capsys, *arguments)
    assert status == 2 and f"--output {str(other)!r} already holds config.json; pass --overwrite" in err
    assert (other / "config.json").read_text(encoding="utf-8") == "{}"
    assert run(capsys, *arguments, "--overwrite")[0] == 0
    assert StreetCLIPForGeolocation.from_pretrained(other).config.calibration is not None


REMOTE_SCRIPT = """
import json, sys
from transformers import pipeline
geolocate = pipeline("geolocation", model=sys.argv[1], trust_remote_code=True)
print(json.dumps({"answers": geolocate(sys.argv[2], top_k=2)}))
"""


@pytest.mark.slow
def test_the_calibration_survives_every_save_path_and_vision_only_loading(
    capsys, tmp_path, small_streetclip_dir, monkeypatch
):
    photos = write_geo_imagefolder(tmp_path / "photos", photos_per_city=9, seed=0)
    loads = count_processor_loads(monkeypatch)
    status, out, _ = run(capsys, "--model", small_streetclip_dir, "--data", photos, "--output", tmp_path / "cal")
    assert status == 0 and "ECE before" in out
    assert loads == [str(small_streetclip_dir)]  # the processor it checked is the one it saves
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["num_held_out"] == 32 and set(report["held_out_after"]["ece"]) == {"1", "25", "200", "750", "2500"}
    model = StreetCLIPForGeolocation.from_pretrained(tmp_path / "cal")
    assert model.config.calibration == {"temperatures": report["temperatures"], "within_km": report["within_km"]}
    model.save_pretrained(tmp_path / "saved")
    StreetCLIPProcessor.from_pretrained(tmp_path / "cal").save_pretrained(tmp_path / "saved")
    geolocate = pipeline("geolocation", model=str(tmp_path / "cal"))
    geolocate.save_pretrained(tmp_path / "pipe")
    image = random_photo(3)
    answers = geolocate(image, top_k=2)
    assert all(answer["calibrated"] for answer in answers)
    assert publish.main([str(tmp_path / "cal"), "org/calibrated", "--dry_run", str(tmp_path / "published")]) == 0
    for folder in ("saved", "pipe", "published"):
        assert pipeline("geolocation", model=str(tmp_path / folder))(image, top_k=2) == answers
    # Without the package, the repository's own code reads the calibration from config.json.
    image.save(tmp_path / "photo.png")
    remote = run_as_hub_user(
        REMOTE_SCRIPT,
        ["someone/calibrated", str(tmp_path / "photo.png")],
        {"someone/calibrated": tmp_path / "pipe"},
        tmp_path / "user",
    )
    assert [answer["label"] for answer in remote["answers"]] == [answer["label"] for answer in answers]
    for mine, theirs in zip(remote["answers"], answers, strict=True):
        assert mine["calibrated"] and mine["within_km"] == pytest.approx(theirs["within_km"], abs=1e-6)
    vision = StreetCLIPForGeolocation.from_pretrained(tmp_path / "saved", vision_only=True)
    pixel_values = geolocate.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    for mine, theirs in zip(rank_answers(vision, vision(pixel_values), top_k=2)[0], answers, strict=True):
        assert mine["label"] == theirs["label"] and mine["calibrated"] and mine["radius_km"] == theirs["radius_km"]
        assert mine["within_km"] == pytest.approx(theirs["within_km"], abs=1e-6)


@pytest.mark.slow
def test_calibration_lowers_the_held_out_error_on_the_synthetic_world(capsys, tmp_path, trained_geo_model):
    # The candidates are the world's own cities, so that a hit within 200 km is the right city.
    trained = trained_geo_model
    places = CandidatePlaces.from_records(
        [
            {"country": c, "city": n, "latitude": la, "longitude": lo}
            for c, cities in PLACES.items()
            for n, la, lo in cities
        ]
    )
    StreetCLIPForGeolocation.from_pretrained(trained, candidates=places).save_pretrained(tmp_path / "model")
    StreetCLIPProcessor.from_pretrained(trained).save_pretrained(tmp_path / "model")
    fit = write_geo_imagefolder(tmp_path / "fit", photos_per_city=15, seed=11)
    held_out = load_benchmark(str(write_geo_imagefolder(tmp_path / "held-out", photos_per_city=25, seed=12)))
    assert run(capsys, "--model", tmp_path / "model", "--data", fit, "--output", tmp_path / "cal")[0] == 0

    def errors(folder) -> dict:
        geolocate = pipeline("geolocation", model=str(folder))
        answers = [answers[0] for answers in geolocate(list(held_out.images), batch_size=32)]
        truths = np.array([[row.latitude, row.longitude] for row in held_out.rows])
        return radius_errors(*answer_hits(answers, truths))["ece"]

    before, after = errors(tmp_path / "model"), errors(tmp_path / "cal")
    print(json.dumps({"before": before, "after": after}))
    for radius in ("200", "750"):
        assert after[radius] <= 0.05 and after[radius] < before[radius]


def test_equal_confidences_share_a_bin_so_that_ties_are_not_ordered_by_their_outcome():
    # A model that says 50% for every photo, right on half of them: calibrated, whatever order the photos come in.
    confidences = np.full(100, 0.5) + np.random.default_rng(0).normal(0, 1e-9, 100)
    hits = np.arange(100) < 50
    assert calibration_errors(confidences, hits)["ece"] == pytest.approx(0.0, abs=1e-8)
    assert [len(part) for part in equal_mass_bins(np.arange(20) / 20)] == [2] * 10


def test_the_monotone_map_is_the_least_squares_non_decreasing_fit_of_the_hits():
    confidences = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6])
    hits = np.array([0, 1, 0, 0, 1, 1, 0])
    knots = isotonic_map(confidences, hits)
    fitted = np.interp(confidences, knots["x"], knots["y"])
    # Pooling adjacent violators: 0.2-0.4 pool to 1/3, and the two photos at 0.6 to 1/2 before 0.5's 1 pools them.
    np.testing.assert_allclose(fitted, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert np.all(np.diff(knots["y"]) >= 0) and np.all(np.diff(knots["x"]) >= 0)
