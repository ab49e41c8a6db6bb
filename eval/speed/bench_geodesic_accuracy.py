"""Time the geodesic_accuracy metric: `compute` on a million pairs, and its numpy core against a Python loop.

Usage, from the repository root:

    python eval/speed/bench_geodesic_accuracy.py [--pairs 1000000] [--loop-pairs 100000]

It prints figures; it asserts nothing.
"""

import argparse
import importlib.util
import math
import time
from pathlib import Path

import evaluate
import numpy as np


METRIC_DIR = Path(__file__).resolve().parents[1] / "geodesic_accuracy"


def random_points(rng: np.random.Generator, n: int) -> np.ndarray:
    """Points spread uniformly over the sphere, as (n, 2) [lat, lon] in degrees."""
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    lon = rng.uniform(-180.0, 180.0, n)
    return np.column_stack([lat, lon])


def haversine_km_loop(points_a: list, points_b: list, radius_km: float) -> list[float]:
    """The per-pair Python version that the vectorised core replaces, with the same formula."""
    distances = []
    for (lat1, lon1), (lat2, lon2) in zip(points_a, points_b, strict=True):
        phi1, phi2 = math.radians(lat1), math.radians(lat2)
        a = (
            math.sin((phi2 - phi1) / 2) ** 2
            + math.cos(phi1) * math.cos(phi2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
        )
        distances.append(2 * radius_km * math.asin(math.sqrt(min(max(a, 0.0), 1.0))))
    return distances


def seconds(function, repeat: int = 1) -> float:
    """Best wall time of `repeat` calls, so one-off warm-up costs do not count."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1_000_000, help="pairs scored through evaluate's compute")
    parser.add_argument("--loop-pairs", type=int, default=100_000, help="pairs for the numpy vs Python loop ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    metric = evaluate.load(str(METRIC_DIR))
    # The metric's own file, imported the way the benchmark runner reuses haversine_km.
    spec = importlib.util.spec_from_file_location("geodesic_accuracy", METRIC_DIR / "geodesic_accuracy.py")
    geodesic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(geodesic)

    predictions, references = random_points(rng, args.pairs), random_points(rng, args.pairs)
    as_lists = predictions.tolist(), references.tolist()
    compute_lists = seconds(lambda: metric.compute(predictions=as_lists[0], references=as_lists[1]))
    compute_arrays = seconds(lambda: metric.compute(predictions=predictions, references=references))
    core_all = seconds(
        lambda: geodesic.haversine_km(predictions[:, 0], predictions[:, 1], references[:, 0], references[:, 1]),
        repeat=5,
    )
    print(f"compute on {args.pairs:,} pairs (lists):        {compute_lists:8.3f} s")
    print(f"compute on {args.pairs:,} pairs (numpy arrays): {compute_arrays:8.3f} s")
    print(f"  of which haversine_km on all pairs:      {core_all:8.3f} s (the rest is evaluate/datasets encoding)")

    n = args.loop_pairs
    small_a, small_b = predictions[:n], references[:n]
    vectorised = seconds(
        lambda: geodesic.haversine_km(small_a[:, 0], small_a[:, 1], small_b[:, 0], small_b[:, 1]), repeat=5
    )
    loop_a, loop_b = small_a.tolist(), small_b.tolist()
    looped = seconds(lambda: haversine_km_loop(loop_a, loop_b, geodesic.EARTH_RADIUS_KM))
    agreement = np.max(
        np.abs(
            geodesic.haversine_km(small_a[:, 0], small_a[:, 1], small_b[:, 0], small_b[:, 1])
            - np.array(haversine_km_loop(loop_a, loop_b, geodesic.EARTH_RADIUS_KM))
        )
    )
    print(f"haversine_km (numpy) on {n:,} pairs:   {vectorised * 1e3:8.2f} ms = {vectorised / n * 1e9:7.1f} ns/pair")
    print(f"Python loop (math) on {n:,} pairs:     {looped * 1e3:8.2f} ms = {looped / n * 1e9:7.1f} ns/pair")
    print(f"numpy core is {looped / vectorised:.1f}x faster per pair; largest difference {agreement:.2e} km")


if __name__ == "__main__":
    main()
