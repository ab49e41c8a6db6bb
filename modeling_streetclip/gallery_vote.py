"""How the nearest gallery photos vote under the decisions `"gallery"` and `"hybrid"`, as numpy functions.

`"gallery"`: neighbour i weighs w_i = exp((s_i - s_best) / temperature) (s: cosine similarity); neighbour j's support
S_j = sum_i w_i K(d_ij), K(d) = max(0, 1 - (d / radius_km)^2) (Epanechnikov, d: great-circle km). The answer is the
neighbour of most support (ties to the more similar) scored S_j / sum_i w_i; further answers are the next best at least
radius_km from every earlier one. `"hybrid"`: only neighbours in the `hybrid_countries` most probable zero-shot
countries vote, each weight times its country's probability (all vote so when none lies there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from .geodesy import great_circle_km, unit_vectors


if TYPE_CHECKING:
    from .candidates import CandidatePlaces


def is_count(value: Any, minimum: int = 1) -> bool:
    """Whether `value` is an integer (not a bool) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class VoteSettings:
    """How the nearest gallery photos vote (see the module docstring); the defaults are reasoned, not tuned."""

    # Enough neighbours for a group of agreeing matches to outvote one stray match.
    num_neighbors: int = 16
    # The spread (4.5 km) of the Gaussian kernel Vo et al. found best for kNN on IM2GPS (ICCV 2017): a district pools.
    radius_km: float = 10.0
    # A neighbour 0.05 less similar weighs e times less; CLIP's own 0.01 would let the best match decide alone.
    temperature: float = 0.05
    # Three countries cover the neighbouring-country confusions zero-shot makes most often.
    hybrid_countries: int = 3

    def __post_init__(self):
        for name in ("num_neighbors", "hybrid_countries"):
            if not is_count(getattr(self, name)):
                raise ValueError(f"VoteSettings.{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        for name in ("radius_km", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"VoteSettings.{name} must be a finite number > 0, got {value!r}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VoteSettings:
        """Settings as `gallery.json` stores them; unknown names are refused, naming the known ones."""
        known = {field.name for field in fields(cls)}
        if set(values) - known:
            raise ValueError(f"Unknown vote settings {sorted(set(values) - known)}; known: {sorted(known)}.")
        return cls(**values)


class Vote(NamedTuple):
    """A vote's answers `(position, score)`, best first, each neighbour's weight (0: not voting) and their pairwise km."""

    answers: list[tuple[int, float]]
    weights: np.ndarray
    distances_km: np.ndarray


def neighbor_vote(
    similarities: npt.ArrayLike,
    latitudes: npt.ArrayLike,
    longitudes: npt.ArrayLike,
    settings: VoteSettings,
    top_k: int = 1,
    scale: npt.ArrayLike | None = None,
) -> Vote:
    """The `"gallery"` vote among one image's neighbours, up to `top_k` answers. `scale` multiplies each neighbour's
    weight (the hybrid's country probabilities; 0 leaves one out); a -inf similarity marks one the index did not return.
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    latitudes, longitudes = (np.asarray(values, dtype=np.float64)[:, None] for values in (latitudes, longitudes))
    weights = np.ones_like(similarities) if scale is None else np.asarray(scale, dtype=np.float64).copy()
    voters = np.isfinite(similarities) & (weights > 0)
    if voters.any():
        weights[voters] *= np.exp((similarities[voters] - similarities[voters].max()) / settings.temperature)
    weights[~voters] = 0.0
    distances = great_circle_km(latitudes, longitudes, latitudes.T, longitudes.T)
    voters = weights > 0
    if not voters.any():
        return Vote([], weights, distances)
    kernel = np.clip(1.0 - (distances / settings.radius_km) ** 2, 0.0, None)
    # Clipped against rounding: clients read the share as a probability.
    support = np.clip(kernel @ weights / weights.sum(), 0.0, 1.0)
    answers: list[int] = []
    for position in np.lexsort((-similarities, -support)):
        if voters[position] and all(distances[position, earlier] >= settings.radius_km for earlier in answers):
            answers.append(position)
            if len(answers) == top_k:
                break
    return Vote([(int(position), float(support[position])) for position in answers], weights, distances)


def hybrid_scale(
    neighbor_countries: npt.ArrayLike, country_probabilities: npt.ArrayLike, hybrid_countries: int
) -> np.ndarray:
    """The `"hybrid"` weights of one image's neighbours (given as country rows): p(country) in the `hybrid_countries`
    most probable countries, 0 elsewhere; p(country) for all when none lies in those countries."""
    neighbor_countries = np.asarray(neighbor_countries, dtype=np.int64)
    probabilities = np.asarray(country_probabilities, dtype=np.float64)
    top = np.argsort(-probabilities, kind="stable")[:hybrid_countries]  # stable: ties keep the table's order
    scale = probabilities[neighbor_countries]
    restricted = np.where(np.isin(neighbor_countries, top), scale, 0.0)
    return restricted if restricted.any() else scale


def nearest_city_rows(places: CandidatePlaces, latitudes: npt.ArrayLike, longitudes: npt.ArrayLike) -> np.ndarray:
    """Row of the candidate city nearest to each point: answers take city and country from coordinates, not names."""
    cities = unit_vectors(places.city_latitudes, places.city_longitudes)
    return (unit_vectors(latitudes, longitudes) @ cities.T).argmax(axis=-1)


__all__ = ["Vote", "VoteSettings", "hybrid_scale", "is_count", "nearest_city_rows", "neighbor_vote"]
