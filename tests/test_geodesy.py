"""Specification of `modeling_streetclip.geodesy`: the one rule of what makes a [lat, lon] pair a point on Earth."""

import math

import numpy as np
import pytest

from modeling_streetclip.geodesy import CoordinateProblem, coordinate_problem, valid_coordinates


@pytest.mark.parametrize(
    ("latitude", "longitude", "problem"),
    [
        (48.8566, 2.3522, None),
        (-90.0, 180.0, None),
        (90.0, -180.0, None),
        (math.nan, 2.0, CoordinateProblem.MISSING),
        (2.0, math.inf, CoordinateProblem.MISSING),
        # IM2GPS's swapped files: a "latitude" beyond 90 whose "longitude" would be a valid latitude.
        (151.2093, -33.8688, CoordinateProblem.LOOK_SWAPPED),
        (-122.4, 90.0, CoordinateProblem.LOOK_SWAPPED),
        (95.0, 120.0, CoordinateProblem.LATITUDE_OUT_OF_RANGE),
        (95.0, 200.0, CoordinateProblem.LATITUDE_OUT_OF_RANGE),
        (45.0, -181.0, CoordinateProblem.LONGITUDE_OUT_OF_RANGE),
    ],
)
def test_coordinate_problem_names_the_rule_a_pair_breaks(latitude, longitude, problem):
    assert coordinate_problem(latitude, longitude) is problem


def test_valid_coordinates_agrees_with_coordinate_problem_on_every_kind_of_pair():
    values = [-200.0, -180.5, -180.0, -95.0, -90.0, -45.0, 0.0, 89.9, 90.0, 90.1, 179.9, 180.0, 181.0, math.nan]
    latitudes, longitudes = (np.array(axis).ravel() for axis in np.meshgrid(values, values))
    expected = [coordinate_problem(lat, lon) is None for lat, lon in zip(latitudes, longitudes, strict=True)]
    assert valid_coordinates(latitudes, longitudes).tolist() == expected


def test_described_problems_name_the_values_and_where_they_came_from():
    lat, lon = "latitude (column 'LAT')", "longitude (column 'LON')"
    assert CoordinateProblem.LOOK_SWAPPED.describe(151.2, -33.8, lat, lon) == (
        "latitude (column 'LAT') 151.2 is outside [-90, 90] but longitude (column 'LON') -33.8 is inside it: "
        "latitude and longitude look swapped"
    )
    assert CoordinateProblem.LATITUDE_OUT_OF_RANGE.describe(95.0, 120.0) == "latitude 95.0 is outside [-90, 90]"
    assert CoordinateProblem.LONGITUDE_OUT_OF_RANGE.describe(1.0, -181.0) == "longitude -181.0 is outside [-180, 180]"
    assert "nan" in CoordinateProblem.MISSING.describe(math.nan, 2.0)


def test_short_reasons_are_free_of_values_so_that_rows_can_be_counted_by_reason():
    reasons = [problem.value for problem in CoordinateProblem]
    assert len(set(reasons)) == len(reasons)
    assert not any(char.isdigit() for reason in reasons for char in reason)
