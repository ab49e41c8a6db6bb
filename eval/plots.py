"""Figures of a benchmark run: the error-distance CDF, a world map of every truth and prediction, and the reliability
diagram of the answers' confidence.

Both render on a bare `Figure` with the Agg canvas, never through pyplot, so they need no display and leave no global
state. The map is the package's offline one (`modeling_streetclip.app.world_map`), which the demo Space draws too.
"""

import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, PercentFormatter

from modeling_streetclip.app.calibration import calibration_errors, equal_mass_bins
from modeling_streetclip.app.world_map import GRATICULE_STEP_DEG, draw_world


# A log axis has no zero: errors below this are drawn at it (finer than any threshold of the metric).
MIN_PLOTTED_KM = 0.1
# Just past half the Earth's circumference (about 20,015 km), the largest error there is.
MAX_PLOTTED_KM = 21_000.0
DPI = 150
# The share of a figure's width that a title line may take: the rest is margin.
TITLE_WIDTH_SHARE = 0.96
# The map's figure is taller than its 2:1 frame needs: constrained layout lets the labels of a fixed-aspect axes fall
# outside a figure of nearly the axes' own shape, so it gets room to spare (for a title of many lines too).
MAP_FIGURE_SIZE = (14, 10)
TRUTH_COLOR, PREDICTION_COLOR = "#1b7837", "#c51b7d"
# Marker area (points²) of one image on the world map; a point where k images stack gets k times the area.
MARKER_AREA = 16.0
# Translucent markers, so that neighbouring stacks that touch still show each other.
MARKER_ALPHA = 0.55
# Points equal to this many decimal places of a degree (0.01° is about 1 km) are one stack on the map.
STACK_DECIMALS = 2


def run_title(benchmark: str, model: str, n: int, accuracies: Mapping[float, float]) -> str:
    """The two-line title both figures carry, so that two runs' figures can be told apart: what was run on what,
    then n and the accuracy (a fraction) at each threshold in km."""
    scores = ", ".join(f"acc@{threshold:g} km {accuracy:.1%}" for threshold, accuracy in accuracies.items())
    return f"{benchmark}, model {model}\nn = {n}" + (f": {scores}" if scores else ": no image scored")


def plot_error_cdf(distances_km: np.ndarray, levels_km: Mapping[str, float], path: str | Path, title: str) -> Figure:
    """Save (and return) the cumulative share of images against error distance (log km), with the named thresholds
    marked: the accuracy at a threshold is where the curve crosses its line. `title` heads the figure (see
    `run_title`)."""
    distances = np.sort(np.maximum(np.asarray(distances_km, dtype=np.float64), MIN_PLOTTED_KM))
    shares = np.arange(1, distances.size + 1) / max(distances.size, 1)
    figure = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.step(np.concatenate([[MIN_PLOTTED_KM], distances]), np.concatenate([[0.0], shares]), where="post")
    for name, threshold in levels_km.items():
        axes.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
        # Above the frame, where no curve can run through the label.
        axes.text(
            threshold,
            1.01,
            f"{name}\n{threshold:g} km",
            transform=axes.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axes.set_xscale("log")
    axes.set_xlim(MIN_PLOTTED_KM, MAX_PLOTTED_KM)
    axes.set_ylim(0.0, 1.0)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes.set_xlabel("error distance (km, log scale)")
    axes.set_ylabel("share of images within distance")
    set_wrapped_suptitle(figure, title)
    axes.set_title(f"error distance, {distances.size} images", pad=30)
    axes.grid(True, which="major", alpha=0.3)
    figure.savefig(path, dpi=DPI)
    return figure


def plot_world_map(truths: np.ndarray, predictions: np.ndarray, path: str | Path, title: str) -> Figure:
    """Save (and return) an equirectangular world map with each image's true point, its predicted point and a line
    joining them; `truths` and `predictions` are (n, 2) arrays of [latitude, longitude] in degrees, row by row.

    Predictions are candidate cities, so many images share one predicted point, and benchmarks photograph the same
    places: each distinct point is drawn once with an area proportional to the images there, translucent so that
    near neighbours show through.
    """
    truths = np.asarray(truths, dtype=np.float64).reshape(-1, 2)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1, 2)
    figure = Figure(figsize=MAP_FIGURE_SIZE, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    draw_world(axes)
    axes.add_collection(
        LineCollection(
            _pair_segments(truths, predictions),
            colors="#555555",
            linewidths=0.6,
            alpha=0.5,
            label="truth to prediction",
        )
    )
    largest = 1
    for points, marker, color, label, zorder in (
        (truths, "o", TRUTH_COLOR, "truth", 3),
        (predictions, "x", PREDICTION_COLOR, "prediction", 4),
    ):
        places, counts = stacked_points(points)
        largest = max(largest, int(counts.max(initial=1)))
        axes.scatter(
            places[:, 1],
            places[:, 0],
            s=MARKER_AREA * counts,
            marker=marker,
            color=color,
            alpha=MARKER_ALPHA,
            label=label,
            zorder=zorder,
        )
    axes.set_anchor("N")  # under the title; the room to spare falls below, where saving trims it
    axes.set_xticks(np.arange(-180, 181, GRATICULE_STEP_DEG))
    axes.set_yticks(np.arange(-90, 91, GRATICULE_STEP_DEG))
    axes.set_xlabel("longitude (°)")
    axes.set_ylabel("latitude (°)")
    set_wrapped_suptitle(figure, title)
    axes.set_title(
        f"{len(truths)} images (marker area: images at one point; grey dots: GeoNames cities; dotted: tropics and "
        "polar circles)"
    )
    # The legend's markers are all drawn at one image's size; a second legend gives the scale of the stacks.
    kinds = axes.legend(loc="lower left", fontsize=9)
    for handle in kinds.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([MARKER_AREA])
    if largest > 1:
        axes.add_artist(kinds)
        scale = [
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                color="#777777",
                alpha=MARKER_ALPHA,
                markersize=np.sqrt(MARKER_AREA * count),
            )
            for count in _legend_counts(largest)
        ]
        axes.legend(
            scale,
            [f"{count} image{'s' if count > 1 else ''}" for count in _legend_counts(largest)],
            loc="lower right",
            fontsize=9,
            title="images at one point",
            title_fontsize=9,
            labelspacing=1.5,
            borderpad=1.0,
        )
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    return figure


def plot_reliability(
    within: np.ndarray, hits: np.ndarray, radii_km: list[float], path: str | Path, title: str, num_bins: int = 10
) -> Figure:
    """Save (and return) the reliability diagram of `within_km` `(n, radii)` against whether the truth lay within
    each radius `hits`: mean confidence against the observed share in `num_bins` equal-mass bins per radius. Points
    below the diagonal are over-confident; the legend gives each radius' ECE."""
    figure = Figure(figsize=(7, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfectly calibrated")
    for column, radius in enumerate(radii_km if len(within) else []):
        bins = equal_mass_bins(within[:, column], num_bins)
        confidence = np.array([within[part, column].mean() for part in bins])
        observed = np.array([hits[part, column].mean() for part in bins])
        ece = calibration_errors(within[:, column], hits[:, column], num_bins)["ece"]
        axes.plot(confidence, observed, marker="o", label=f"within {radius:g} km (ECE {ece:.3f})")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_aspect("equal")
    axes.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes.set_xlabel("stated confidence: within_km of the first answer (bin mean)")
    axes.set_ylabel("observed share of true places within the radius")
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(True, alpha=0.3)
    set_wrapped_suptitle(figure, title)
    axes.set_title(f"reliability, {len(within)} images, {num_bins} equal-mass bins: below the line is over-confident")
    figure.savefig(path, dpi=DPI)
    return figure


def set_wrapped_suptitle(figure: Figure, title: str) -> None:
    """Head `figure` with `title`, each line wrapped to the figure's width (a name longer than a line is broken):
    model and data names can be of any length, and a line wider than the figure is cut off on both sides."""
    text = figure.suptitle("")
    renderer = figure.canvas.get_renderer()
    room = TITLE_WIDTH_SHARE * figure.bbox.width

    def fits(lines: list[str]) -> bool:
        text.set_text("\n".join(lines))
        return text.get_window_extent(renderer).width <= room

    wrapped = []
    for line in title.splitlines():
        # The most characters per line that fit, measured as drawn: glyph widths differ too much to count them.
        width = len(line)
        while width > 1 and not fits(textwrap.wrap(line, width)):
            width -= 1
        wrapped.extend(textwrap.wrap(line, width) or [""])
    text.set_text("\n".join(wrapped))


def stacked_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct points of an (n, 2) array of [latitude, longitude], each with the number of rows there: points
    closer than `STACK_DECIMALS` decimal places of a degree (about 1 km) count as one, drawn at their mean."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not len(points):
        return points, np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(np.round(points, STACK_DECIMALS), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    means = np.stack([np.bincount(inverse, weights=points[:, axis]) / counts for axis in range(2)], axis=1)
    return means, counts


def _legend_counts(largest: int) -> list[int]:
    """Counts for the marker-scale legend: one image, the largest stack, and one between when they are far apart."""
    middle = round(np.sqrt(largest))
    return sorted({1, middle, largest})


def _pair_segments(truths: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """Segments from each truth to its prediction the short way round in longitude: a pair whose short way crosses
    the antimeridian gets two pieces, one leaving each edge of the map, which the axes clip at ±180°."""
    latitudes, longitudes = truths[:, 0], truths[:, 1]
    predicted_latitudes, predicted_longitudes = predictions[:, 0], predictions[:, 1]
    # The prediction's longitude unwrapped to within 180° of the truth's, possibly beyond ±180.
    ends = longitudes + (predicted_longitudes - longitudes + 180) % 360 - 180
    pieces = [
        np.stack([np.column_stack([longitudes, latitudes]), np.column_stack([ends, predicted_latitudes])], axis=1)
    ]
    crossing = np.abs(ends) > 180
    shift = predicted_longitudes[crossing] - ends[crossing]
    starts = np.column_stack([longitudes[crossing] + shift, latitudes[crossing]])
    pieces.append(np.stack([starts, predictions[crossing][:, ::-1]], axis=1))
    return np.concatenate(pieces)
