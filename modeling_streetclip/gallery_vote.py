"""How the nearest gallery photos vote: the rules of the decisions `"gallery"` and `"hybrid"` (see `decisions`), as
pure functions of the neighbours (numpy only), and the settings a gallery stores as its defaults.

The rules (`decision=` in the pipeline, `--decision` of the commands):

- `"gallery"`, a kernel vote on the sphere. The `k = num_neighbors` nearest photos i, with cosine similarity s_i to
  the query, weigh w_i = exp((s_i - s_1) / temperature), s_1 being the best similarity. Each neighbour j gathers the
  support S_j = sum_i w_i K(d_ij), where d_ij is the great-circle distance and K the Epanechnikov kernel
  K(d) = 1 - (d / radius_km)^2 for d < radius_km, 0 beyond. The answer is the neighbour with the largest support
  (ties to the more similar); its `score` is S_j / sum_i w_i, the share of the neighbours' weight that supports it
  (a probability in [0, 1], as image-classification clients read `score`).
  A lone best match is thus outvoted by a group of nearly as good matches that agree on a place, and within that
  group the photo nearest its middle wins. Further answers are the next best neighbours at least `radius_km` from
  every answer before them, so that `top_k` answers are distinct places (fewer come back when the k neighbours hold
  fewer, and never more than k).
- `"hybrid"`, the vote restricted and weighted by the zero-shot country posterior p(country): only neighbours in the
  `hybrid_countries` most probable countries vote, each weight multiplied by its country's probability. A
  neighbour's country is that of its nearest candidate city. When no neighbour lies in those countries, all vote,
  still weighted by p(country), so that the answer still comes from the gallery.

Every answer has the pipeline's fields; its `latitude` and `longitude` are the chosen photo's, `city` and `country`
those of the candidate city nearest to it (never looked up by name), and `gallery_row` and `similarity` name the
photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .geodesy import great_circle_km, unit_vectors


if TYPE_CHECKING:
    from .candidates import CandidatePlaces


@dataclass(frozen=True)
class VoteSettings:
    """How the nearest gallery photos vote (see the module docstring for the rule). The defaults are reasoned, not
    tuned on a benchmark: tune them on held-out photos of your gallery's kind."""

    # Photos retrieved per image: enough that a group of agreeing matches can outvote one stray match, few enough
    # that weak matches from elsewhere carry little weight (and the vote costs microseconds).
    num_neighbors: int = 16
    # Photos closer than this support each other. The Epanechnikov kernel of radius 10 km has a standard deviation of
    # 10 / sqrt(5) = 4.5 km, close to the Gaussian kernel of sigma 4 km that Vo et al. found best for kNN on IM2GPS
    # ("Revisiting IM2GPS in the Deep Learning Era", ICCV 2017): photos of one district pool, those of a city's far
    # ends do not, and answers stay on a photo's spot.
    radius_km: float = 10.0
    # Similarity weights exp((s - s_best) / temperature): a neighbour 0.05 less similar weighs e times less. CLIP's
    # own 0.01 would let the single best match decide alone.
    temperature: float = 0.05
    # `"hybrid"`: the photos of this many most probable zero-shot countries vote. Three covers the confusions of
    # neighbouring countries that zero-shot makes most often.
    hybrid_countries: int = 3

    def __post_init__(self):
        for name in ("num_neighbors", "hybrid_countries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VoteSettings.{name} must be an integer >= 1, got {value!r}.")
        for name in ("radius_km", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"VoteSettings.{name} must be a finite number > 0, got {value!r}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VoteSettings:
        """Settings from a dict (as `gallery.json` stores them); unknown names are refused, naming the known ones."""
        known = {field.name for field in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown vote settings {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**values)


def kernel_vote(
    similarities: npt.ArrayLike,
    latitudes: npt.ArrayLike,
    longitudes: npt.ArrayLike,
    settings: VoteSettings,
    top_k: int = 1,
    scale: npt.ArrayLike | None = None,
) -> list[tuple[int, float]]:
    """The `"gallery"` vote among one image's neighbours: `(position, score)` of up to `top_k` answers, best first.

    `similarities`, `latitudes` and `longitudes` describe the neighbours (any order); `scale` multiplies each
    neighbour's weight (the hybrid's country probabilities; 0 leaves a neighbour out). Positions index the inputs.
    See the module docstring for the rule.
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    latitudes = np.asarray(latitudes, dtype=np.float64)
    longitudes = np.asarray(longitudes, dtype=np.float64)
    weights = np.ones_like(similarities) if scale is None else np.asarray(scale, dtype=np.float64).copy()
    voters = np.isfinite(similarities) & (weights > 0)
    if not voters.any():
        return []
    weights[voters] *= np.exp((similarities[voters] - similarities[voters].max()) / settings.temperature)
    weights[~voters] = 0.0
    distances = great_circle_km(latitudes[:, None], longitudes[:, None], latitudes[None, :], longitudes[None, :])
    kernel = np.clip(1.0 - (distances / settings.radius_km) ** 2, 0.0, None)
    # A share of the weight, so in [0, 1]; clipped against rounding, since clients read it as a probability.
    support = np.clip(kernel @ weights / weights.sum(), 0.0, 1.0)
    # Most support first, then most similar; neighbours that do not vote are not answers either.
    order = [position for position in np.lexsort((-similarities, -support)) if voters[position]]
    answers: list[int] = []
    for position in order:
        if all(distances[position, earlier] >= settings.radius_km for earlier in answers):
            answers.append(position)
            if len(answers) == top_k:
                break
    return [(int(position), float(support[position])) for position in answers]


def hybrid_scale(
    neighbor_countries: npt.ArrayLike, country_probabilities: npt.ArrayLike, hybrid_countries: int
) -> np.ndarray:
    """The `"hybrid"` weights of one image's neighbours: p(country) for neighbours in the `hybrid_countries` most
    probable countries, 0 for the others; p(country) for every neighbour when none lies in those countries.

    `neighbor_countries` holds each neighbour's country row, `country_probabilities` the zero-shot posterior over the
    candidate countries.
    """
    neighbor_countries = np.asarray(neighbor_countries, dtype=np.int64)
    probabilities = np.asarray(country_probabilities, dtype=np.float64)
    # Stable on ties, so that equal probabilities keep the table's order.
    top = np.argsort(-probabilities, kind="stable")[:hybrid_countries]
    scale = probabilities[neighbor_countries]
    restricted = np.where(np.isin(neighbor_countries, top), scale, 0.0)
    return restricted if restricted.any() else scale


def nearest_city_rows(places: CandidatePlaces, latitudes: npt.ArrayLike, longitudes: npt.ArrayLike) -> np.ndarray:
    """Row of the candidate city nearest (by great-circle distance) to each point: how answers and neighbours get a
    city and a country from their coordinates, never from a name."""
    cities = unit_vectors(places.city_latitudes, places.city_longitudes)
    return (unit_vectors(latitudes, longitudes) @ cities.T).argmax(axis=-1)


__all__ = ["VoteSettings", "hybrid_scale", "kernel_vote", "nearest_city_rows"]
