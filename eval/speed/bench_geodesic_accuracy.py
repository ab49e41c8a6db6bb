"""Time the geodesic_accuracy metric: `compute` on a million pairs, and its numpy core against a Python loop."""

import math
import sys
from pathlib import Path

import evaluate
import numpy as np
from timing import random_points, seconds, speed_parser, timed


METRIC_DIR = Path(__file__).resolve().parents[1] / "geodesic_accuracy"


def haversine_km_loop(points_a: list, points_b: list, radius_km: float) -> list[float]:
    """The per-pair Python version that the vectorised core replaces, with the same formula."""
    distances = []
    for (lat1, lon1), (lat2, lon2) in zip(points_a, points_b, strict=True):
        phi1, phi2, lambda_difference = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
        a = math.sin((phi2 - phi1) / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(lambda_difference / 2) ** 2
        distances.append(2 * radius_km * math.asin(math.sqrt(min(max(a, 0.0), 1.0))))
    return distances


def best_of(repeat: int, function) -> float:
    """The best wall time of `repeat` calls, so that one-off warm-up costs do not count."""
    return min(seconds(function) for _ in range(repeat))


def main() -> None:
    parser = speed_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=1_000_000, help="pairs scored through evaluate's compute")
    parser.add_argument("--loop-pairs", type=int, default=100_000, help="pairs for the numpy vs Python loop ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    metric = evaluate.load(str(METRIC_DIR))
    geodesic = sys.modules[type(metric).__module__]  # the module evaluate loaded, as the benchmark runner takes it
    predictions, references = random_points(rng, args.pairs), random_points(rng, args.pairs)
    lists = predictions.tolist(), references.tolist()
    lists_s = seconds(lambda: metric.compute(predictions=lists[0], references=lists[1]))
    print(f"compute on {args.pairs:,} pairs (lists):        {lists_s:8.3f} s")
    arrays_s = seconds(lambda: metric.compute(predictions=predictions, references=references))
    print(f"compute on {args.pairs:,} pairs (numpy arrays): {arrays_s:8.3f} s")
    core_s = best_of(5, lambda: geodesic.haversine_km(*predictions.T, *references.T))
    print(f"  of which haversine_km on all pairs:      {core_s:8.3f} s (the rest is evaluate/datasets encoding)")
    n = args.loop_pairs
    small_a, small_b = predictions[:n], references[:n]
    vectorised = best_of(5, lambda: geodesic.haversine_km(*small_a.T, *small_b.T))
    loop_a, loop_b = small_a.tolist(), small_b.tolist()
    loop_km, looped = timed(lambda: haversine_km_loop(loop_a, loop_b, geodesic.EARTH_RADIUS_KM))
    difference = np.max(np.abs(geodesic.haversine_km(*small_a.T, *small_b.T) - loop_km))
    print(f"haversine_km (numpy) on {n:,} pairs:   {vectorised * 1e3:8.2f} ms = {vectorised / n * 1e9:7.1f} ns/pair")
    print(f"Python loop (math) on {n:,} pairs:     {looped * 1e3:8.2f} ms = {looped / n * 1e9:7.1f} ns/pair")
    print(f"numpy core is {looped / vectorised:.1f}x faster per pair; largest difference {difference:.2e} km")


if __name__ == "__main__":
    main()
