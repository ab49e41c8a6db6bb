"""Candidate places from GeoNames: the paper's 193 countries, their cities, and custom tables."""

import pytest

from modeling_streetclip import StreetCLIPConfig
from modeling_streetclip.gazetteer import (
    CandidatePlaces,
    paper_countries,
    read_country_list,
    resolve_country_code,
    resolve_country_name,
)


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


def test_selecting_countries_keeps_each_city_with_its_country_and_reports_the_old_rows():
    places = CandidatePlaces.from_geonames(["France", "Japan", "Brazil"], cities_per_country=3)
    japan_only, old_rows, old_regions = places.select([places.country_index("JP")])
    assert japan_only.country_names == ["Japan"]
    assert japan_only.city_names == ["Tokyo", "Yokohama", "Osaka"]
    assert japan_only.city_countries == [0, 0, 0]
    assert old_rows == [3, 4, 5]
    assert old_regions == [] and not japan_only.has_regions


def test_candidate_country_is_found_by_name_code_or_another_spelling_and_an_unknown_one_lists_close_matches():
    places = CandidatePlaces.from_geonames(["Czech Republic", "Japan"], cities_per_country=1)
    assert [places.country_index(name) for name in ("Japan", "jp", "Czechia", "CZ")] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match=r"'Japn' is not one of the 2 candidate countries of this model.*'Japan'"):
        places.country_index("Japn")
    with pytest.raises(ValueError, match="'France' is not one of the 2 candidate countries"):
        places.country_index("France")


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


# One resolution of country names, and the country-list files that use it


@pytest.mark.parametrize(
    ("given", "papers_name"),
    [
        ("JP", "Japan"),
        ("jp", "Japan"),
        ("Japan", "Japan"),
        ("Czechia", "Czech Republic"),
        ("CZ", "Czech Republic"),
        ("Ivory Coast", "Côte d'Ivoire"),
        ("Eswatini", "Swaziland"),
        (" Kenya ", "Kenya"),
        ("XK", "Kosovo"),  # outside the paper's list: GeoNames' name
    ],
)
def test_country_names_and_iso_codes_resolve_to_the_papers_names(given, papers_name):
    assert resolve_country_name(given) == papers_name


def test_every_paper_country_resolves_to_itself():
    assert [resolve_country_name(name) for name in paper_countries()] == paper_countries()


def test_unknown_country_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"Unknown country 'Frnace'.*Did you mean 'France'"):
        resolve_country_name("Frnace")


def test_geonames_tables_built_from_codes_hold_the_papers_names():
    places = CandidatePlaces.from_geonames(["JP", "Czechia"], cities_per_country=1)
    assert places.country_names == ["Japan", "Czech Republic"]
    assert places.country_codes == ["JP", "CZ"]


def test_a_table_from_a_config_follows_its_candidate_settings():
    config = StreetCLIPConfig(candidate_countries=["Kenya", "Japan"], cities_per_country=2)
    assert CandidatePlaces.from_config(config) == CandidatePlaces.from_geonames(["Kenya", "Japan"], 2)


def test_country_list_file_skips_comments_and_blanks_and_resolves_codes(tmp_path):
    path = tmp_path / "countries.txt"
    path.write_text("# where our photos come from\nJP\n\nFrance  # mainland\nczechia\n", encoding="utf-8")
    assert read_country_list(path) == ["Japan", "France", "Czech Republic"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Japan\nFrnace\n", r"countries.txt', line 2: Unknown country 'Frnace'.*Did you mean 'France'"),
        ("JP\n# again\nJapan\n", r"line 3: 'Japan' names Japan again \(line 1\)"),
        ("# nothing yet\n\n", "lists no country; write one country name or ISO code per line"),
        (b"Espa\xf1a\n", "is not UTF-8 text"),
    ],
)
def test_bad_country_list_files_are_refused_naming_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "countries.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message) as raised:
        read_country_list(path)
    assert str(path) in str(raised.value)


def test_missing_country_list_file_is_an_os_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_country_list(tmp_path / "missing.txt")


def test_checksum_changes_when_the_table_is_reordered_and_survives_a_round_trip():
    places = CandidatePlaces.from_geonames(["Kenya", "Japan"], cities_per_country=2)
    reordered = places.select([1, 0])[0]
    assert reordered.checksum() != places.checksum()
    assert CandidatePlaces.from_dict(places.to_dict()).checksum() == places.checksum()
