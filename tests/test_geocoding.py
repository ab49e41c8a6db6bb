"""Offline reverse geocoding: the nearest GeoNames place by great-circle distance, for whole columns at once."""

import doctest
import math
import re
import sys

import geocoding
import numpy as np
import pytest
from geocoding import ReverseGeocoder, reverse_geocoder

from modeling_streetclip.geodesy import valid_coordinates


@pytest.fixture(scope="module")
def geocoder():
    return reverse_geocoder()


def test_known_cities_resolve_to_city_region_and_country(geocoder):
    labels = geocoder.lookup([48.8566, -33.8688, 35.6895], [2.3522, 151.2093, 139.6917])
    assert labels.city[:2] == ["Paris", "Sydney"]
    assert labels.region == ["Île-de-France", "New South Wales", "Tokyo"]
    assert labels.country == ["France", "Australia", "Japan"]
    assert labels.country_code == ["FR", "AU", "JP"]


def test_the_docstring_example_runs():
    results = doctest.testmod(geocoding)
    assert results.attempted and not results.failed


def test_points_on_either_side_of_the_antimeridian_find_the_same_place(geocoder):
    # Fiji's Taveuni straddles 180 degrees: a search in raw degrees would send the western point to the far side.
    labels = geocoder.lookup([-16.8, -16.8], [179.999, -179.999])
    assert labels.country == ["Fiji", "Fiji"]
    assert labels.city[0] == labels.city[1]


def test_nearest_place_matches_a_brute_force_great_circle_search(geocoder):
    rng = np.random.default_rng(0)
    latitudes = np.degrees(np.arcsin(rng.uniform(-1, 1, 200)))
    longitudes = rng.uniform(-180, 180, 200)
    labels = geocoder.lookup(latitudes, longitudes)
    table = geocoder._tree.data
    for latitude, longitude, city in zip(latitudes, longitudes, labels.city, strict=True):
        point = np.array(
            [
                math.cos(math.radians(latitude)) * math.cos(math.radians(longitude)),
                math.cos(math.radians(latitude)) * math.sin(math.radians(longitude)),
                math.sin(math.radians(latitude)),
            ]
        )
        # The largest dot product is the smallest central angle.
        assert geocoder._city[np.argmax(table @ point)] == city


def test_country_names_are_the_current_geonames_names(geocoder):
    labels = geocoder.lookup([50.0755, 35.6892], [14.4378, 51.3890])
    assert labels.country == ["Czechia", "Iran"]


def test_invalid_coordinates_are_rejected_naming_the_first_bad_point(geocoder):
    with pytest.raises(ValueError, match=r"2 point\(s\).*position 1: \(95.0, 10.0\)"):
        geocoder.lookup([10.0, 95.0, math.nan], [10.0, 10.0, 10.0])


def test_mismatched_coordinate_columns_are_rejected(geocoder):
    with pytest.raises(ValueError, match="equal length"):
        geocoder.lookup([1.0, 2.0], [1.0])


def test_valid_coordinates_rejects_missing_and_out_of_range_points():
    latitudes = np.array([0.0, 90.0, -90.5, math.nan, 10.0])
    longitudes = np.array([0.0, -180.0, 0.0, 0.0, 180.5])
    assert valid_coordinates(latitudes, longitudes).tolist() == [True, True, False, False, False]


def test_an_empty_batch_gives_empty_columns(geocoder):
    labels = geocoder.lookup([], [])
    assert labels.city == labels.region == labels.country == labels.country_code == []


@pytest.mark.parametrize("missing", ["reverse_geocode", "scipy.spatial"])
def test_a_missing_geocoding_package_names_the_train_extra(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    with pytest.raises(ImportError, match=re.escape('the [train] extra installs: pip install "streetclip[train]"')):
        ReverseGeocoder()
