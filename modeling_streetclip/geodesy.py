"""Geometry on the Earth's sphere: great-circle distances, unit vectors, and which coordinate pairs are points on
Earth, so that every reader of coordinates drops the same rows for the same reasons."""

import math
from enum import Enum

import numpy as np
import numpy.typing as npt


# IUGG mean Earth radius, as the geodesic_accuracy metric measures with.
EARTH_RADIUS_KM = 6371.0088
# The radii of `within_km`: the geodesic_accuracy metric's DEFAULT_THRESHOLDS_KM (a test holds them equal).
CONFIDENCE_RADII_KM = (1, 25, 200, 750, 2500)
MAX_ABS_LATITUDE = 90.0
MAX_ABS_LONGITUDE = 180.0


class CoordinateProblem(Enum):
    """Why a pair is not a point on Earth; each value is a short reason to count over rows."""

    MISSING = "missing coordinates"
    LOOK_SWAPPED = "latitude out of range (latitude and longitude look swapped)"
    LATITUDE_OUT_OF_RANGE = "latitude out of range"
    LONGITUDE_OUT_OF_RANGE = "longitude out of range"

    def describe(
        self, latitude: float, longitude: float, latitude_name: str = "latitude", longitude_name: str = "longitude"
    ) -> str:
        """The reason for one pair, naming its values and where they came from (`latitude (column 'LAT')`)."""
        lat, lon = f"{latitude_name} {latitude!r}", f"{longitude_name} {longitude!r}"
        return {
            CoordinateProblem.MISSING: f"{lat} or {lon} is missing or not finite",
            CoordinateProblem.LOOK_SWAPPED: f"{lat} is outside [-90, 90] but {lon} is inside it: "
            "latitude and longitude look swapped",
            CoordinateProblem.LATITUDE_OUT_OF_RANGE: f"{lat} is outside [-90, 90]",
            CoordinateProblem.LONGITUDE_OUT_OF_RANGE: f"{lon} is outside [-180, 180]",
        }[self]


def coordinate_value(value: object) -> float:
    """A coordinate cell as a float; empty cells and text that is not a number are NaN (missing)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def coordinate_problem(latitude: float, longitude: float) -> CoordinateProblem | None:
    """Why `(latitude, longitude)` is not a point on Earth, or None; swapped columns get their own verdict."""
    if not (math.isfinite(latitude) and math.isfinite(longitude)):
        return CoordinateProblem.MISSING
    if abs(latitude) > MAX_ABS_LATITUDE:
        if abs(longitude) <= MAX_ABS_LATITUDE:
            return CoordinateProblem.LOOK_SWAPPED
        return CoordinateProblem.LATITUDE_OUT_OF_RANGE
    if abs(longitude) > MAX_ABS_LONGITUDE:
        return CoordinateProblem.LONGITUDE_OUT_OF_RANGE
    return None


def valid_coordinates(latitudes: npt.ArrayLike, longitudes: npt.ArrayLike) -> np.ndarray:
    """Mask of the pairs that are points on Earth: True where `coordinate_problem` is None."""
    latitudes = np.asarray(latitudes, dtype=np.float64)
    longitudes = np.asarray(longitudes, dtype=np.float64)
    return (np.abs(latitudes) <= MAX_ABS_LATITUDE) & (np.abs(longitudes) <= MAX_ABS_LONGITUDE)


def great_circle_km(lat1: npt.ArrayLike, lon1: npt.ArrayLike, lat2: npt.ArrayLike, lon2: npt.ArrayLike) -> np.ndarray:
    """Great-circle distance in km between points in degrees, broadcast: the geodesic_accuracy metric's haversine."""
    phi1, lam1, phi2, lam2 = (np.radians(np.asarray(x, dtype=np.float64)) for x in (lat1, lon1, lat2, lon2))
    a = np.sin((phi2 - phi1) / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin((lam2 - lam1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def unit_vectors(latitudes: npt.ArrayLike, longitudes: npt.ArrayLike) -> np.ndarray:
    """Points in degrees as 3-D unit vectors, shape `(n, 3)`: the largest dot product is the nearest point."""
    phi = np.radians(np.asarray(latitudes, dtype=np.float64))
    lam = np.radians(np.asarray(longitudes, dtype=np.float64))
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=-1)
