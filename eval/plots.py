"""Figures of a benchmark run: the error-distance CDF, a world map of every truth and prediction, and the reliability
diagram of the answers' confidence; on a bare Agg `Figure`, never through pyplot (no display, no global state)."""

import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, PercentFormatter

from modeling_streetclip.app.calibration import calibration_errors, equal_mass_bins
from modeling_streetclip.app.world_map import GRATICULE_STEP_DEG, draw_world


MIN_PLOTTED_KM = 0.1  # a log axis has no zero: smaller errors are drawn here (finer than any threshold)
MAX_PLOTTED_KM = 21_000.0  # just past half the Earth's circumference (about 20,015 km), the largest error there is
DPI = 150
TITLE_WIDTH_SHARE = 0.96  # of a figure's width, that a title line may take: the rest is margin
# Taller than the map's 2:1 frame: constrained layout lets the labels of a fixed-aspect axes fall outside a figure of
# nearly the axes' own shape, and a title may take many lines.
MAP_FIGURE_SIZE = (14, 10)
TRUTH_COLOR, PREDICTION_COLOR = "#1b7837", "#c51b7d"
# Marker area (points²) of one image on the map; k images at one point get k times the area, translucent, so that
# neighbouring stacks show through.
MARKER_AREA, MARKER_ALPHA = 16.0, 0.55
STACK_DECIMALS = 2  # points equal to this many decimals of a degree (0.01° is about 1 km) are one stack on the map


def run_title(benchmark: str, model: str, n: int, accuracies: Mapping[float, float]) -> str:
    """The two-line title of every figure, so that two runs' figures can be told apart: what ran on what, then n and
    the accuracy (a fraction) at each threshold in km."""
    scores = ", ".join(f"acc@{threshold:g} km {accuracy:.1%}" for threshold, accuracy in accuracies.items())
    return f"{benchmark}, model {model}\nn = {n}" + (f": {scores}" if scores else ": no image scored")


def _new_figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_error_cdf(distances_km: np.ndarray, levels_km: Mapping[str, float], path: str | Path, title: str) -> Figure:
    """Save (and return) the share of images within each error distance (log km), with the named thresholds marked:
    the accuracy at a threshold is where the curve crosses its line."""
    distances = np.sort(np.maximum(np.asarray(distances_km, dtype=np.float64), MIN_PLOTTED_KM))
    shares = np.arange(1, distances.size + 1) / max(distances.size, 1)
    figure, axes = _new_figure((8, 5))
    axes.step(np.concatenate([[MIN_PLOTTED_KM], distances]), np.concatenate([[0.0], shares]), where="post")
    for name, threshold in levels_km.items():
        axes.axvline(threshold, color="grey", linestyle="--", linewidth=0.8)
        # Above the frame, where no curve can run through the label.
        label = f"{name}\n{threshold:g} km"
        axes.text(threshold, 1.01, label, transform=axes.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    axes.set(xscale="log", xlim=(MIN_PLOTTED_KM, MAX_PLOTTED_KM), ylim=(0.0, 1.0))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    axes.set(xlabel="error distance (km, log scale)", ylabel="share of images within distance")
    set_wrapped_suptitle(figure, title)
    axes.set_title(f"error distance, {distances.size} images", pad=30)
    axes.grid(True, which="major", alpha=0.3)
    figure.savefig(path, dpi=DPI)
    return figure


def plot_world_map(truths: np.ndarray, predictions: np.ndarray, path: str | Path, title: str) -> Figure:
    """Save (and return) a world map with each image's true point, its predicted point and a line joining them, from
    (n, 2) arrays of [latitude, longitude] in degrees. Many images share a point (predictions are candidate cities,
    benchmarks photograph the same places): each point is drawn once, its area proportional to its images."""
    truths = np.asarray(truths, dtype=np.float64).reshape(-1, 2)
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1, 2)
    figure, axes = _new_figure(MAP_FIGURE_SIZE)
    draw_world(axes)
    segments = _pair_segments(truths, predictions)
    lines = LineCollection(segments, colors="#555555", linewidths=0.6, alpha=0.5, label="truth to prediction")
    axes.add_collection(lines)
    largest = 1
    kinds = ((truths, "o", TRUTH_COLOR, "truth"), (predictions, "x", PREDICTION_COLOR, "prediction"))
    for zorder, (points, marker, color, label) in enumerate(kinds, start=3):
        places, counts = stacked_points(points)
        largest = max(largest, int(counts.max(initial=1)))
        style = {"marker": marker, "color": color, "alpha": MARKER_ALPHA, "label": label, "zorder": zorder}
        axes.scatter(places[:, 1], places[:, 0], s=MARKER_AREA * counts, **style)
    axes.set_anchor("N")  # under the title; the room to spare falls below, where saving trims it
    axes.set(xticks=np.arange(-180, 181, GRATICULE_STEP_DEG), yticks=np.arange(-90, 91, GRATICULE_STEP_DEG))
    axes.set(xlabel="longitude (°)", ylabel="latitude (°)")
    set_wrapped_suptitle(figure, title)
    key = "marker area: images at one point; grey dots: GeoNames cities; dotted: tropics and polar circles"
    axes.set_title(f"{len(truths)} images ({key})")
    # The legend draws every marker at one image's size; a second legend gives the scale of the stacks.
    legend = axes.legend(loc="lower left", fontsize=9)
    for handle in legend.legend_handles:
        if hasattr(handle, "set_sizes"):
            handle.set_sizes([MARKER_AREA])
    if largest > 1:
        axes.add_artist(legend)
        counts = sorted({1, round(np.sqrt(largest)), largest})  # one image, the largest stack and one between
        style = {"marker": "o", "linestyle": "", "color": "#777777", "alpha": MARKER_ALPHA}
        handles = [Line2D([], [], markersize=np.sqrt(MARKER_AREA * count), **style) for count in counts]
        labels = [f"{count} image{'s' if count > 1 else ''}" for count in counts]
        fonts = {"fontsize": 9, "title_fontsize": 9}
        axes.legend(
            handles, labels, loc="lower right", title="images at one point", labelspacing=1.5, borderpad=1, **fonts
        )
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    return figure


def plot_reliability(
    within: np.ndarray, hits: np.ndarray, radii_km: list[float], path: str | Path, title: str, num_bins: int = 10
) -> Figure:
    """Save (and return) the reliability diagram of `within_km` `(n, radii)` against whether the truth lay within
    each radius (`hits`): mean confidence against the observed share in `num_bins` equal-mass bins per radius, with
    each radius' ECE in the legend."""
    figure, axes = _new_figure((7, 6.5))
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfectly calibrated")
    for column, radius in enumerate(radii_km if len(within) else []):
        bins = equal_mass_bins(within[:, column], num_bins)
        confidence = np.array([within[part, column].mean() for part in bins])
        observed = np.array([hits[part, column].mean() for part in bins])
        ece = calibration_errors(within[:, column], hits[:, column], num_bins)["ece"]
        axes.plot(confidence, observed, marker="o", label=f"within {radius:g} km (ECE {ece:.3f})")
    axes.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), aspect="equal")
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
    names can be of any length, and a line wider than the figure is cut off on both sides. Drawn as plain text: a
    name may hold `$`, which mathtext would read as maths and fail on."""
    text = figure.suptitle("", parse_math=False)
    renderer = figure.canvas.get_renderer()

    def fits(lines: list[str]) -> bool:
        text.set_text("\n".join(lines))
        return text.get_window_extent(renderer).width <= TITLE_WIDTH_SHARE * figure.bbox.width

    wrapped = []
    for line in title.splitlines():
        # The most characters per line that fit, measured as drawn: glyph widths differ too much to count them.
        width = len(line)
        while width > 1 and not fits(textwrap.wrap(line, width)):
            width -= 1
        wrapped.extend(textwrap.wrap(line, width) or [""])
    text.set_text("\n".join(wrapped))


def stacked_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct points of (n, 2) [latitude, longitude] rows, at their mean, and the number of rows at each: rows
    equal to `STACK_DECIMALS` decimal places of a degree (about 1 km) are one point."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not len(points):
        return points, np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(np.round(points, STACK_DECIMALS), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    means = np.stack([np.bincount(inverse, weights=points[:, axis]) / counts for axis in range(2)], axis=1)
    return means, counts


def _pair_segments(truths: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    """(lon, lat) segments from each truth to its prediction the short way round: a pair whose short way crosses the
    antimeridian is drawn twice, leaving each edge of the map, which the axes clip at ±180°."""
    pairs = np.stack([truths[:, ::-1], predictions[:, ::-1]], axis=1)
    # The prediction's longitude unwrapped to within 180° of the truth's, possibly beyond ±180.
    pairs[:, 1, 0] = pairs[:, 0, 0] + (pairs[:, 1, 0] - pairs[:, 0, 0] + 180) % 360 - 180
    wrapped = pairs[np.abs(pairs[:, 1, 0]) > 180]
    wrapped[..., 0] -= 360 * np.sign(wrapped[:, 1:, 0])
    return np.concatenate([pairs, wrapped])
