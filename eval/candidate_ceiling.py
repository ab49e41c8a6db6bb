"""The ceiling of a candidate table: the best accuracy any model could reach when it can only answer with a city.

Prints, per file of true coordinates, the `geodesic_accuracy` of the candidate nearest each truth and the prompts the
table costs; then the candidates of two countries within the city-level threshold of each other (eval/README.md)."""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import evaluate
import numpy as np
from huggingface_hub.errors import StrictDataclassError

from modeling_streetclip import RECOMMENDED_CANDIDATE_SETTINGS, CandidatePlaces, StreetCLIPConfig, read_country_list
from modeling_streetclip.app import EXIT_USAGE, UsageError
from modeling_streetclip.app.arguments import int_at_least
from modeling_streetclip.app.benchmark_data import LATITUDE_COLUMNS, LONGITUDE_COLUMNS, read_csv_records
from modeling_streetclip.app.sources import find_column
from modeling_streetclip.configuration_streetclip import CITY_ALLOCATIONS, REGION_LEVELS
from modeling_streetclip.gallery_vote import nearest_city_rows
from modeling_streetclip.geodesy import coordinate_problem


METRIC_DIR = Path(__file__).resolve().parent / "geodesic_accuracy"
# The ISNs reference predictions name the truth gt_lat and gt_long; metadata files use the benchmark runner's names.
TRUTH_LATITUDE_COLUMNS = ("gt_lat", *LATITUDE_COLUMNS)
TRUTH_LONGITUDE_COLUMNS = ("gt_long", "gt_lon", *LONGITUDE_COLUMNS)
# Candidates of two countries closer than this are listed: the IM2GPS city-level threshold.
CROSS_BORDER_KM = 25.0
# The options named after the StreetCLIPConfig setting they give (--countries names a file).
SETTINGS = "levels city_allocation cities_per_country city_budget min_city_population city_merge_radius_km".split()


@dataclass
class Truths:
    """The true coordinates of one benchmark file, (n, 2) [lat, lon], and where reading stopped."""

    name: str
    points: np.ndarray
    stopped_at: str | None = None


def read_truths(path: Path, latitude_column: str | None = None, longitude_column: str | None = None) -> Truths:
    """The true coordinates of a CSV up to its first row whose coordinates are not numbers (the summary block of the
    ISNs reference predictions); a row that is not a point on Earth is refused, naming its line."""
    source = f"data file {str(path)!r}"
    header, records = read_csv_records(path)
    latitude_name = find_column(header, latitude_column, TRUTH_LATITUDE_COLUMNS, "latitude", source)
    longitude_name = find_column(header, longitude_column, TRUTH_LONGITUDE_COLUMNS, "longitude", source)
    positions = (header.index(latitude_name), header.index(longitude_name))
    points, stopped_at = [], None
    for line, fields in records:
        try:
            latitude, longitude = (float(fields[index]) for index in positions)
        except (ValueError, IndexError):
            stopped_at = f"line {line}"
            break
        problem = coordinate_problem(latitude, longitude)
        if problem is not None:
            described = problem.describe(latitude, longitude, repr(latitude_name), repr(longitude_name))
            raise ValueError(f"The {source}, line {line}: {described}.")
        points.append((latitude, longitude))
    if not points:
        raise ValueError(f"The {source} has no row of coordinates in {latitude_name!r} and {longitude_name!r}.")
    return Truths(path.stem, np.array(points), stopped_at)


def ceiling(places: CandidatePlaces, truths: np.ndarray, metric) -> dict:
    """The metric's result for a model that always answers with the candidate nearest to the truth."""
    rows = nearest_city_rows(places, truths[:, 0], truths[:, 1])
    nearest = np.column_stack([places.city_latitudes, places.city_longitudes])[rows]
    return metric.compute(predictions=nearest, references=truths)


def cross_border_pairs(places: CandidatePlaces, geodesic, radius_km: float = CROSS_BORDER_KM) -> list[dict]:
    """Every pair of candidate cities of different countries within `radius_km` of each other, nearest first."""
    # Sorted by latitude, each city is compared only with the cities after it whose latitude lies within the radius
    # (a great circle is at least as long as its difference in latitude): linear in the table, not quadratic.
    order = np.argsort(places.city_latitudes, kind="stable")
    columns = (places.city_latitudes, places.city_longitudes, places.city_countries)
    latitudes, longitudes, countries = (np.asarray(column)[order] for column in columns)
    ends = np.searchsorted(latitudes, latitudes + np.degrees(radius_km / geodesic.EARTH_RADIUS_KM), side="right")
    pairs = []
    for row in range(places.num_cities):
        others = np.arange(row + 1, ends[row])
        others = others[countries[others] != countries[row]]
        distances = geodesic.haversine_km(latitudes[row], longitudes[row], latitudes[others], longitudes[others])
        for other, km in zip(others[distances <= radius_km], distances[distances <= radius_km], strict=True):
            first, second = sorted((order[row], order[other]))
            pairs.append({"km": float(km), "cities": (places.city_labels[first], places.city_labels[second])})
    return sorted(pairs, key=lambda pair: (pair["km"], pair["cities"]))


def prompt_counts(places: CandidatePlaces) -> dict[str, int]:
    """How many prompts a table costs at each level (one template per level), and in all."""
    counts = {"countries": places.num_countries, "regions": places.num_regions, "cities": places.num_cities}
    return counts | {"prompts": sum(counts.values())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, action="append", type=Path, help="CSV of true coordinates; repeat for several"
    )
    parser.add_argument("--latitude_column", help="column of true latitudes (default: gt_lat, LAT, lat or latitude)")
    parser.add_argument("--longitude_column", help="column of true longitudes (default: gt_long, LON, lon, ...)")
    candidates = parser.add_argument_group(
        "candidates", "the StreetCLIPConfig settings of the table (defaults: the paper's, or --recommended's)"
    )
    candidates.add_argument(
        "--recommended",
        action="store_true",
        help=f"start from the recommended table {RECOMMENDED_CANDIDATE_SETTINGS}; the options below override it",
    )
    candidates.add_argument("--countries", type=Path, metavar="FILE", help="candidate countries, one per line")
    candidates.add_argument("--levels", nargs="+", choices=REGION_LEVELS, help="e.g. country region city")
    candidates.add_argument("--city_allocation", choices=CITY_ALLOCATIONS)
    candidates.add_argument("--cities_per_country", type=int_at_least(1))
    candidates.add_argument("--city_budget", type=int_at_least(1))
    candidates.add_argument("--min_city_population", type=int_at_least(0))
    candidates.add_argument("--city_merge_radius_km", type=float)
    return parser


def run(args: argparse.Namespace) -> list[dict]:
    """Build the table, score its ceiling on every data file, print a Markdown table and return its rows."""
    try:
        truths = [read_truths(path, args.latitude_column, args.longitude_column) for path in args.data]
        # --recommended's settings or the paper's, then the explicit ones.
        settings = dict(RECOMMENDED_CANDIDATE_SETTINGS) if args.recommended else {}
        settings |= {name: getattr(args, name) for name in SETTINGS if getattr(args, name) is not None}
        if args.countries is not None:
            settings["candidate_countries"] = read_country_list(args.countries)
        places = CandidatePlaces.from_config(StreetCLIPConfig(**settings))
    # A setting the configuration refuses (levels out of order, say) comes as its StrictDataclassError.
    except (OSError, ValueError, ImportError, StrictDataclassError) as error:
        raise UsageError(str(error)) from None
    metric = evaluate.load(str(METRIC_DIR))
    counts = prompt_counts(places)
    print(f"candidates: {settings or 'the paper table'}; " + ", ".join(f"{n} {level}" for level, n in counts.items()))
    print("| data | images | city prompts | prompts | ceiling at 1 / 25 / 200 / 750 / 2500 km (%) |")
    print("|---|---|---|---|---|")
    rows = []
    for truth in truths:
        result = ceiling(places, truth.points, metric)
        accuracies = " / ".join(f"{100 * result[f'acc_{km}km']:.1f}" for km in (1, 25, 200, 750, 2500))
        print(f"| {truth.name} | {len(truth.points)} | {counts['cities']:,} | {counts['prompts']:,} | {accuracies} |")
        if truth.stopped_at:
            print(f"  ({truth.name}: stopped at {truth.stopped_at}, the first row without numeric coordinates)")
        rows.append({"data": truth.name, "n": len(truth.points), **counts, **result})
    pairs = cross_border_pairs(places, sys.modules[type(metric).__module__])
    apart = f"within {CROSS_BORDER_KM:g} km of each other; only the country head tells them apart:"
    print(f"\n{len(pairs)} pairs of candidates of different countries lie {apart}")
    for pair in pairs:
        print(f"  {pair['km']:5.1f} km  {pair['cities'][0]}  |  {pair['cities'][1]}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except UsageError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


if __name__ == "__main__":
    main()
