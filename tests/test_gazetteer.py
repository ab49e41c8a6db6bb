"""Candidate places from GeoNames: the paper's 193 countries, their cities, and custom tables."""

import pytest

from modeling_streetclip.gazetteer import CandidatePlaces, paper_countries, resolve_country_code


@pytest.fixture(scope="module")
def paper_places() -> CandidatePlaces:
    return CandidatePlaces.from_geonames()


def test_paper_list_has_193_countries():
    countries = paper_countries()
    assert len(countries) == 193
    assert len(set(countries)) == 193


def test_every_paper_country_resolves_to_at_least_one_city(paper_places):
    assert paper_places.num_countries == 193
    cityless = [
        name for name, rows in zip(paper_places.country_names, paper_places.cities_by_country, strict=True) if not rows
    ]
    assert cityless == []
    assert all(len(rows) <= 30 for rows in paper_places.cities_by_country)


@pytest.mark.parametrize(
    ("paper_name", "code"),
    [
        ("Swaziland", "SZ"),
        ("East Timor", "TL"),
        ("Palestine", "PS"),
        ("Micronesia", "FM"),
        ("Czech Republic", "CZ"),
        ("Côte d'Ivoire", "CI"),
        ("Cabo Verde", "CV"),
        ("North Macedonia", "MK"),
        ("Republic of the Congo", "CG"),
        ("Democratic Republic of the Congo", "CD"),
        ("Netherlands", "NL"),
    ],
)
def test_paper_names_that_geonames_spells_differently_resolve(paper_name, code):
    assert resolve_country_code(paper_name) == code


def test_cities_are_the_most_populous_of_their_country(paper_places):
    france = paper_places.cities_by_country[paper_places.country_index("France")]
    assert [paper_places.city_names[row] for row in france[:3]] == ["Paris", "Marseille", "Lyon"]
    assert len(france) == 30


def test_micro_states_fall_back_to_places_below_the_population_floor(paper_places):
    liechtenstein = paper_places.cities_by_country[paper_places.country_index("Liechtenstein")]
    assert [paper_places.city_names[row] for row in liechtenstein] == ["Vaduz"]


def test_same_city_name_in_two_countries_keeps_each_country_and_coordinates():
    places = CandidatePlaces.from_geonames(["United States", "Costa Rica"], cities_per_country=30)
    rows = [row for row, name in enumerate(places.city_names) if name == "San Francisco"]
    latitudes = {places.country_names[places.city_countries[row]]: places.city_latitudes[row] for row in rows}
    assert latitudes == {"United States": pytest.approx(37.77, abs=0.1), "Costa Rica": pytest.approx(9.99, abs=0.1)}


def test_cities_per_country_and_population_floor_are_respected():
    places = CandidatePlaces.from_geonames(["Japan", "Germany"], cities_per_country=4, min_city_population=1000000)
    assert [len(rows) for rows in places.cities_by_country] == [4, 4]
    assert "Munich" in places.city_names


def test_unknown_country_names_close_matches():
    with pytest.raises(ValueError, match=r"Unknown country 'Frnace'.*'France'"):
        CandidatePlaces.from_geonames(["Frnace"])


def test_restricting_keeps_cities_with_their_country():
    places = CandidatePlaces.from_geonames(["France", "Japan", "Brazil"], cities_per_country=3)
    japan_only = places.restrict_to(["JP"])
    assert japan_only.country_names == ["Japan"]
    assert japan_only.city_names == ["Tokyo", "Yokohama", "Osaka"]
    assert japan_only.city_countries == [0, 0, 0]
    with pytest.raises(ValueError, match=r"'Japn' is not a candidate country.*'Japan'"):
        places.restrict_to(["Japn"])


def test_table_round_trips_through_a_dict():
    places = CandidatePlaces.from_geonames(["Kenya"], cities_per_country=2)
    assert CandidatePlaces.from_dict(places.to_dict()) == places


def test_custom_records_build_a_table_per_country():
    places = CandidatePlaces.from_records(
        [
            {"country": "Atlantis", "city": "Poseidonia", "latitude": 31.0, "longitude": -24.0},
            {"country": "Lemuria", "city": "Mu", "latitude": -10.0, "longitude": 80.0, "country_code": "LM"},
            {"country": "Atlantis", "city": "Tritonis", "latitude": 32.0, "longitude": -25.0},
        ]
    )
    assert places.country_names == ["Atlantis", "Lemuria"]
    assert places.country_codes == ["", "LM"]
    assert places.cities_by_country == [[0, 2], [1]]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"country": "A", "city": "B", "latitude": 91.0, "longitude": 0.0}, r"City 0 \('B'\) has coordinates \(91.0"),
        ({"country": "A", "city": "B", "latitude": 0.0}, r"Candidate record 0 lacks \['longitude'\]"),
    ],
)
def test_bad_custom_records_are_refused_with_the_row(record, message):
    with pytest.raises(ValueError, match=message):
        CandidatePlaces.from_records([record])
