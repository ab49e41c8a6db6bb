"""eval/candidate_ceiling.py: the best accuracy a candidate table allows, measured with the geodesic metric."""

import sys
from pathlib import Path

import candidate_ceiling
import evaluate
import numpy as np
import pytest

from modeling_streetclip import CandidatePlaces


REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference-predictions"
IM2GPS3K = REFERENCE_DIR / "im2gps3k__ISNs_M-fstar-S3.csv"
IM2GPS = REFERENCE_DIR / "im2gps__ISNs_M-fstar-S3.csv"
needs_reference_data = pytest.mark.skipif(not IM2GPS3K.is_file(), reason=f"{REFERENCE_DIR} is not here")


@pytest.fixture(scope="module")
def metric():
    return evaluate.load(str(candidate_ceiling.METRIC_DIR))


def two_city_places() -> CandidatePlaces:
    return CandidatePlaces.from_records(
        [
            {"country": "France", "city": "Paris", "latitude": 48.8566, "longitude": 2.3522},
            {"country": "Japan", "city": "Tokyo", "latitude": 35.6762, "longitude": 139.6503},
        ]
    )


def test_ceiling_scores_the_nearest_candidate_of_every_truth(metric):
    truths = np.array(
        [
            [48.8566, 2.3522],  # Paris itself
            [48.9566, 2.3522],  # 11 km north of Paris
            [50.8503, 4.3517],  # Brussels, 264 km from Paris
            [34.6937, 135.5023],  # Osaka, 397 km from Tokyo
            [-33.8688, 151.2093],  # Sydney, 7,800 km from Tokyo
        ]
    )
    result = candidate_ceiling.ceiling(two_city_places(), truths, metric)
    assert result["n"] == 5
    assert [result[f"acc_{t}km"] for t in (1, 25, 200, 750, 2500)] == [0.2, 0.4, 0.4, 0.8, 0.8]


def test_the_ceiling_answers_each_truth_with_its_nearest_candidate(metric):
    truths = np.array([[35.0, 139.0], [48.0, 2.0]])
    result = candidate_ceiling.ceiling(two_city_places(), truths, metric)
    haversine_km = sys.modules[type(metric).__module__].haversine_km
    nearest_km = haversine_km(truths[:, 0], truths[:, 1], [35.6762, 48.8566], [139.6503, 2.3522])
    assert result["mean_km"] == pytest.approx(nearest_km.mean())


def test_truths_stop_at_the_summary_block_and_count_what_was_read(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_text(
        "img_id,gt_lat,predicted_lat,gt_long,predicted_long\n"
        "a.jpg,48.85,48.0,2.35,2.0\n"
        "b.jpg,35.68,35.0,139.65,139.0\n"
        "\n"
        "street acc (1km),city acc (25km)\n"
        "0.1,0.2\n"
    )
    truths = candidate_ceiling.read_truths(path)
    assert truths.points.tolist() == [[48.85, 2.35], [35.68, 139.65]]
    assert truths.stopped_at == "line 5"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("IMG_ID,LAT,LON\na.jpg,139.65,35.68\n", r"line 2: .*'LAT' 139.65 is outside \[-90, 90\].*look swapped"),
        ("IMG_ID,LAT,LON\n", "has no row of coordinates in 'LAT' and 'LON'"),
        ("IMG_ID,x,y\na.jpg,1,2\n", "has no latitude column under a usual name"),
    ],
)
def test_bad_truth_files_are_refused_naming_the_line_or_column(tmp_path, rows, message):
    path = tmp_path / "metadata.csv"
    path.write_text(rows)
    with pytest.raises(ValueError, match=message):
        candidate_ceiling.read_truths(path)


def test_a_configuration_the_config_refuses_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "metadata.csv"
    path.write_text("IMG_ID,LAT,LON\na.jpg,48.85,2.35\n")
    with pytest.raises(SystemExit) as stopped:
        candidate_ceiling.main(["--data", str(path), "--levels", "city", "country"])
    assert stopped.value.code == 2
    assert "levels must be ['country', 'city']" in capsys.readouterr().err


def test_cross_border_pairs_list_candidates_of_two_countries_within_the_city_threshold(metric):
    places = CandidatePlaces.from_records(
        [
            {"country": "Egypt", "city": "Rafah", "latitude": 31.2800, "longitude": 34.2400},
            {"country": "Palestine", "city": "Rafah", "latitude": 31.2969, "longitude": 34.2455},
            {"country": "Egypt", "city": "Cairo", "latitude": 30.0444, "longitude": 31.2357},
            {
                "country": "Egypt",
                "city": "Giza",
                "latitude": 30.0131,
                "longitude": 31.2089,
            },  # same country: not listed
            {"country": "Mexico", "city": "Nuevo Laredo", "latitude": 27.4764, "longitude": -99.5164},
            {"country": "United States", "city": "Laredo", "latitude": 27.5064, "longitude": -99.5075},
        ]
    )
    geodesic = sys.modules[type(metric).__module__]
    pairs = candidate_ceiling.cross_border_pairs(places, geodesic)
    assert [pair["cities"] for pair in pairs] == [
        ("Rafah, Egypt", "Rafah, Palestine"),
        ("Nuevo Laredo, Mexico", "Laredo, United States"),
    ]
    assert [round(pair["km"], 1) for pair in pairs] == [2.0, 3.4]
    assert candidate_ceiling.cross_border_pairs(places, geodesic, radius_km=1.0) == []


def test_the_report_lists_the_cross_border_pairs(tmp_path, capsys):
    path = tmp_path / "metadata.csv"
    path.write_text("IMG_ID,LAT,LON\na.jpg,31.28,34.24\n")
    countries = write_countries(tmp_path, "EG\nPS\n")
    candidate_ceiling.main(["--data", str(path), "--recommended", "--countries", str(countries)])
    out = capsys.readouterr().out
    assert "pairs of candidates of different countries lie within 25 km of each other" in out
    assert "Rafaḩ, Egypt  |  Rafaḩ, Palestine" in out


def write_countries(folder, text):
    path = folder / "countries.txt"
    path.write_text(text)
    return path


def test_prompt_counts_add_up_every_level():
    places = CandidatePlaces.from_records(
        [
            {"country": "France", "region": "Île-de-France", "city": "Paris", "latitude": 48.86, "longitude": 2.35},
            {
                "country": "France",
                "region": "Île-de-France",
                "city": "Versailles",
                "latitude": 48.8,
                "longitude": 2.13,
            },
            {"country": "Japan", "region": "Tokyo", "city": "Tokyo", "latitude": 35.68, "longitude": 139.65},
        ]
    )
    assert candidate_ceiling.prompt_counts(places) == {"countries": 2, "regions": 2, "cities": 3, "prompts": 7}


@needs_reference_data
def test_paper_table_ceiling_on_im2gps(capsys):
    (row,) = candidate_ceiling.run(candidate_ceiling.build_parser().parse_args(["--data", str(IM2GPS)]))
    assert (row["n"], row["cities"]) == (
        237,
        4323,
    )  # the paper's rule, with Belize's, Malta's and Equatorial Guinea's capitals
    assert round(100 * row["acc_25km"], 1) == 54.9
    assert "| im2gps__ISNs_M-fstar-S3 | 237 | 4,323 | 4,516 |" in capsys.readouterr().out


@needs_reference_data
def test_recommended_table_reaches_the_target_ceiling_on_im2gps3k_within_6000_city_prompts():
    (row,) = candidate_ceiling.run(
        candidate_ceiling.build_parser().parse_args(["--data", str(IM2GPS3K), "--recommended"])
    )
    assert row["n"] == 2997
    assert row["cities"] <= 6000
    assert row["acc_25km"] >= 0.66 and row["acc_200km"] >= 0.925
