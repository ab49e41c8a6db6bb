# Copyright 2025 The streetclip developers.
# SPDX-License-Identifier: Apache-2.0
"""Geodesic accuracy: the share of predicted points within 1, 25, 200, 750 and 2500 km of the truth."""

import datasets
import evaluate
import numpy as np
from numpy.typing import ArrayLike


# Standalone for the Hub: `_point_problem` copies the package's rule of a point on Earth (`modeling_streetclip.geodesy`).

_DESCRIPTION = """
Geodesic accuracy scores image geolocation: the share of images whose predicted `[latitude, longitude]` lies within
a great-circle distance d <= threshold of the true one (haversine, on a sphere of 6371.0088 km, the IUGG mean Earth
radius) at the street (1 km), city (25 km), region (200 km), country (750 km) and continent (2500 km) levels of IM2GPS
(Hays & Efros, 2008), with the median and mean d and PIGEON's mean GeoGuessr score. `radius_km=` and `inclusive=`
match papers that differ (PIGEON: 6378.137 km and d < threshold; OSV-5M and PLONK: 6371 km and d < threshold).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `[float, float]`): predicted `[latitude, longitude]` pairs, in degrees.
    references (`list` of `[float, float]`): true `[latitude, longitude]` pairs, in degrees, one per prediction.
    thresholds_km (`list` of `float`, *optional*): thresholds in km that replace the default
        `[1, 25, 200, 750, 2500]`; each gives a key `acc_{t}km` (1 -> `acc_1km`, 0.5 -> `acc_0.5km`).
    radius_km (`float`, *optional*, defaults to 6371.0088): radius of the sphere the distances are measured on.
    inclusive (`bool`, *optional*, defaults to `True`): a hit is `d <= t` when True and `d < t` when False.

Returns:
    acc_1km, acc_25km, acc_200km, acc_750km, acc_2500km (`float`): share of pairs within each threshold, from 0 to 1
        (one key per entry of `thresholds_km` when it is given).
    median_km, mean_km (`float`): median and mean distance in km.
    geoscore (`float`): mean of 5000 * exp(-d / 1492.7 km), from 0 to 5000.
    n (`int`): number of pairs scored.

Examples:
    Paris predicted for a photo taken in London, and Manhattan for one taken in Greenwich Village:

    >>> import evaluate
    >>> geodesic_accuracy = evaluate.load("eval/geodesic_accuracy")
    >>> predictions = [[48.8566, 2.3522], [40.7580, -73.9855]]
    >>> references = [[51.5074, -0.1278], [40.7336, -74.0027]]
    >>> results = geodesic_accuracy.compute(predictions=predictions, references=references)
    >>> print({key: round(value, 2) for key, value in results.items()})
    {'acc_1km': 0.0, 'acc_25km': 0.5, 'acc_200km': 0.5, 'acc_750km': 1.0, 'acc_2500km': 1.0, 'median_km': 173.32, 'mean_km': 173.32, 'geoscore': 4480.87, 'n': 2}

    PIGEON's protocol, with other thresholds:

    >>> results = geodesic_accuracy.compute(
    ...     predictions=predictions, references=references, thresholds_km=[5, 500], radius_km=6378.137, inclusive=False
    ... )
    >>> print({key: round(value, 2) for key, value in results.items()})
    {'acc_5km': 0.5, 'acc_500km': 1.0, 'median_km': 173.51, 'mean_km': 173.51, 'geoscore': 4480.36, 'n': 2}
"""

_CITATION = r"""
@inproceedings{hays2008im2gps,
  title     = {IM2GPS: estimating geographic information from a single image},
  author    = {Hays, James and Efros, Alexei A.},
  booktitle = {IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2008}
}
@inproceedings{vo2017revisiting,
  title     = {Revisiting IM2GPS in the Deep Learning Era},
  author    = {Vo, Nam and Jacobs, Nathan and Hays, James},
  booktitle = {IEEE International Conference on Computer Vision (ICCV)},
  year      = {2017}
}
@inproceedings{muller2018geolocation,
  title     = {Geolocation Estimation of Photos using a Hierarchical Model and Scene Classification},
  author    = {M{\"u}ller-Budack, Eric and Pustu-Iren, Kader and Ewerth, Ralph},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2018}
}
@article{haas2023learning,
  title   = {Learning Generalized Zero-Shot Learners for Open-Domain Image Geolocalization},
  author  = {Haas, Lukas and Alberti, Silas and Skreta, Michal},
  journal = {arXiv preprint arXiv:2302.00275},
  year    = {2023}
}
"""

# IUGG mean Earth radius R1: the sphere that best matches the ellipsoid's average distances.
EARTH_RADIUS_KM = 6371.0088
# Street, city, region, country and continent levels of IM2GPS.
DEFAULT_THRESHOLDS_KM = (1.0, 25.0, 200.0, 750.0, 2500.0)
# GeoGuessr's score curve, as PIGEON uses it: 5000 points at 0 km, decaying with a 1492.7 km scale.
GEOSCORE_MAX, GEOSCORE_SCALE_KM = 5000.0, 1492.7
_OPTIONS = ("thresholds_km", "radius_km", "inclusive")
_PAIR_HINT = "expected a [lat, lon] pair in degrees, e.g. [48.8566, 2.3522]"


def haversine_km(
    lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike, radius_km: float = EARTH_RADIUS_KM
) -> np.ndarray:
    """Great-circle distance in km between points in degrees, vectorised over numpy arrays; the arcsine form, `a`
    clipped to [0, 1], stays accurate for nearly identical and nearly antipodal points."""
    phi1, lam1, phi2, lam2 = (np.radians(np.asarray(x, dtype=np.float64)) for x in (lat1, lon1, lat2, lon2))
    a = np.sin((phi2 - phi1) / 2) ** 2 + np.cos(phi1) * np.cos(phi2) * np.sin((lam2 - lam1) / 2) ** 2
    return 2 * radius_km * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _checked_options(thresholds_km=None, radius_km=EARTH_RADIUS_KM, inclusive=True) -> list[float]:
    """Validate the compute options and return the thresholds to use."""
    thresholds = list(DEFAULT_THRESHOLDS_KM)
    if thresholds_km is not None:
        try:
            thresholds = [float(t) for t in np.atleast_1d(np.asarray(thresholds_km, dtype=object)).ravel()]
        except (TypeError, ValueError):
            raise ValueError(f"thresholds_km must be a list of distances in km, got {thresholds_km!r}") from None
    for i, t in enumerate(thresholds):
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"thresholds_km[{i}] is {t!r}; thresholds must be finite distances >= 0 km")
    if isinstance(radius_km, bool) or not isinstance(radius_km, (int, float, np.number)):
        raise ValueError(f"radius_km must be a number of km, got {radius_km!r}")
    if not np.isfinite(radius_km) or radius_km <= 0:
        raise ValueError(f"radius_km must be a finite radius > 0 km, got {radius_km!r}")
    if not isinstance(inclusive, (bool, np.bool_)):
        raise ValueError(f"inclusive must be True (d <= t) or False (d < t), got {inclusive!r}")
    return thresholds


def _row_problem(row: object) -> str | None:
    """Why one row is not a [lat, lon] point on Earth, or None."""
    if isinstance(row, np.ndarray):
        row = row.tolist()
    if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
        return f"is {row!r}; {_PAIR_HINT}"
    if len(row) != 2:
        return f"is {row!r}, of length {len(row)}; {_PAIR_HINT}"
    coordinates = []
    for value in row:
        if isinstance(value, (bool, np.bool_)):
            return f"is {row!r}, with the boolean {value!r}, which is not a coordinate; {_PAIR_HINT}"
        try:
            coordinates.append(np.nan if value is None else float(value))  # None is missing, like NaN
        except (TypeError, ValueError):
            return f"is {row!r}, with the non-numeric value {value!r}; {_PAIR_HINT}"
    return _point_problem(row, *coordinates)


def _point_problem(row: object, lat: float, lon: float) -> str | None:
    """Why a numeric [lat, lon] pair is not a point on Earth, or None."""
    if not (np.isfinite(lat) and np.isfinite(lon)):
        return f"is {row!r}, with a missing or non-finite value; {_PAIR_HINT}"
    if abs(lat) > 90 and abs(lon) <= 90:  # the widely copied ISNs metadata files carry exactly this mistake
        swapped = "(columns may be swapped: [lat, lon] expected)"
        return f"has latitude {lat!r} outside [-90, 90]; its longitude {lon!r} would be a valid latitude {swapped}"
    if abs(lat) > 90:
        return f"has latitude {lat!r} outside [-90, 90]; {_PAIR_HINT}"
    if abs(lon) > 180:
        return f"has longitude {lon!r} outside [-180, 180]; {_PAIR_HINT}"
    return None


def _as_coordinates(rows: list, name: str, indexed: bool = True) -> np.ndarray:
    """Rows of [lat, lon] as an (n, 2) float array, naming the first row that is not a point on Earth
    (`predictions[3]`, or `prediction` when not `indexed`)."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
        raise ValueError(f"{name} must be a list of [lat, lon] pairs, got {rows!r}")
    if len(rows) == 0:
        return np.empty((0, 2))
    try:
        points = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        points = np.empty((0, 0))
    # A vectorised check first, so that valid input of any size costs a few array passes (NaN fails `<=` too).
    if points.ndim == 2 and points.shape[1] == 2 and not _holds_booleans(rows) and (np.abs(points) <= (90, 180)).all():
        return points
    for i, row in enumerate(rows):
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"{name}[{i}] {problem}" if indexed else f"{name} {problem}")
    raise ValueError(f"{name} must be a list of [lat, lon] pairs; {_PAIR_HINT}")


def _holds_booleans(rows: list) -> bool:
    """Whether any value is a boolean, which numpy would score as the coordinate 1 or 0."""
    if isinstance(rows, np.ndarray) and rows.dtype != object:
        return rows.dtype == np.bool_
    return any(isinstance(value, (bool, np.bool_)) for row in rows for value in row)


def _as_point_pairs(predictions: list, references: list) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs checked and paired one to one, as (n, 2) arrays."""
    predicted = _as_coordinates(predictions, "predictions")
    true = _as_coordinates(references, "references")
    if len(predicted) != len(true):
        longer = "predictions" if len(predicted) > len(true) else "references"
        raise ValueError(
            f"predictions has {len(predicted)} rows but references has {len(true)}:"
            f" {longer}[{min(len(predicted), len(true))}] has no counterpart; expected one reference per prediction"
        )
    return predicted, true


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GeodesicAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        point = datasets.Sequence(datasets.Value("float64"), length=2)
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": point, "references": point}),
            reference_urls=[
                "http://graphics.cs.cmu.edu/projects/im2gps/",
                "https://arxiv.org/abs/1705.04838",
                "https://github.com/TIBHannover/GeoEstimation",
                "https://arxiv.org/abs/2302.00275",
            ],
        )

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Check a batch now: a bad row fails here, named by its index in this batch, not after the whole run."""
        if predictions is None or references is None:
            raise ValueError("geodesic_accuracy needs both predictions and references, one [lat, lon] pair each")
        # datasets encodes plain Python floats much faster than numpy scalars.
        predictions, references = (x.tolist() if isinstance(x, np.ndarray) else x for x in (predictions, references))
        _as_point_pairs(predictions, references)
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Check one pair now: evaluate buffers single pairs, so it would only fail later, in compute."""
        _as_coordinates([prediction], "prediction", indexed=False)
        _as_coordinates([reference], "reference", indexed=False)
        super().add(prediction=prediction, reference=reference, **kwargs)

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict | None:
        """Check the options before evaluate consumes the added batches, so that a typo does not lose them."""
        unknown = sorted(set(kwargs) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"geodesic_accuracy got unknown option(s) {unknown}; it accepts {list(_OPTIONS)}")
        _checked_options(**kwargs)
        return super().compute(predictions=predictions, references=references, **kwargs)

    def _compute(self, predictions, references, thresholds_km=None, radius_km=EARTH_RADIUS_KM, inclusive=True) -> dict:
        thresholds = _checked_options(thresholds_km, radius_km, inclusive)
        predicted, true = _as_point_pairs(predictions, references)
        if len(predicted) == 0:
            raise ValueError("predictions and references are empty; expected at least one [lat, lon] pair each")
        distances = haversine_km(predicted[:, 0], predicted[:, 1], true[:, 0], true[:, 1], radius_km=radius_km)
        is_hit = np.less_equal if inclusive else np.less
        # 1 and 1.0 both give `acc_1km`; 0.5 gives `acc_0.5km`.
        results = {f"acc_{int(t) if t.is_integer() else t!r}km": np.mean(is_hit(distances, t)) for t in thresholds}
        results |= {"median_km": np.median(distances), "mean_km": np.mean(distances)}
        results["geoscore"] = np.mean(GEOSCORE_MAX * np.exp(-distances / GEOSCORE_SCALE_KM))
        return {key: float(value) for key, value in results.items()} | {"n": int(distances.size)}
