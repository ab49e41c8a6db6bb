"""The benchmark's figures keep every label and title inside what is saved, whatever the names in the title."""

import numpy as np
import plots
import pytest
from PIL import Image


LEVELS_KM = {"street": 1, "city": 25, "region": 200, "country": 750, "continent": 2500}
ACCURACIES = {1: 0.101, 25: 0.283, 200: 0.451, 750: 0.747, 2500: 0.882}
TITLES = {
    "usual": plots.run_title("im2gps3k", "geolocal/StreetCLIP", 2997, ACCURACIES),
    # An 80-character model and data name, one of them without a space to break at.
    "80-character names": plots.run_title(
        "/data/benchmarks/" + "street-level-photos-" * 3 + "test", "W" * 80, 2997, ACCURACIES
    ),
    # Names that mathtext would read as maths, and fail on.
    "names with $": plots.run_title("bench/cost$_$.csv", "runs/$\\alpha$", 2997, ACCURACIES),
}


def figures(tmp_path, title: str) -> dict:
    rng = np.random.default_rng(0)
    truths = rng.uniform([-60, -180], [70, 180], (40, 2))
    predictions = rng.uniform([-60, -180], [70, 180], (40, 2))
    return {
        "error_cdf": plots.plot_error_cdf(rng.uniform(0, 5000, 40), LEVELS_KM, tmp_path / "error_cdf.png", title),
        "world_map": plots.plot_world_map(truths, predictions, tmp_path / "world_map.png", title),
    }


def assert_inside(artist, figure) -> None:
    extent = artist.get_window_extent(figure.canvas.get_renderer())
    inside = (extent.min >= figure.bbox.min).all() and (extent.max <= figure.bbox.max).all()
    assert extent.width > 0 and inside, (artist.get_text(), extent, figure.bbox)


@pytest.mark.parametrize("title", list(TITLES))
def test_axis_labels_and_titles_lie_inside_the_figure(tmp_path, title):
    for figure in figures(tmp_path, TITLES[title]).values():
        axes = figure.axes[0]
        for artist in (axes.xaxis.label, axes.yaxis.label, axes.title, figure._suptitle):
            assert_inside(artist, figure)
        # Wrapped, not shortened: every character of the title is shown.
        assert "".join(figure.get_suptitle().split()) == "".join(TITLES[title].split())


@pytest.mark.parametrize("title", list(TITLES))
def test_nothing_drawn_touches_the_saved_image_s_edges(tmp_path, title):
    """A label or title cut off by the image's edge leaves its pixels in the outermost rows or columns."""
    figures(tmp_path, TITLES[title])
    for name in ("error_cdf", "world_map"):
        pixels = np.asarray(Image.open(tmp_path / f"{name}.png").convert("L"))
        edges = np.concatenate(
            [pixels[:2].ravel(), pixels[-2:].ravel(), pixels[:, :2].ravel(), pixels[:, -2:].ravel()]
        )
        assert edges.min() == 255, name
