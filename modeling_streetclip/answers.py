"""The one answer formatter: one image's ranked rows as the pipeline's plain dicts, which every entry point returns."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .geodesy import CONFIDENCE_RADII_KM


# The fields an answer lists after its place's own, in order, each from its column of `decisions.RankedPlaces`.
_ANSWER_COLUMNS = {
    "score": "scores",
    "country_score": "country_scores",
    "region_score": "region_scores",
    "joint_probability": "joint_probabilities",
    "within_km": "within_km",
    "radius_km": "radius_km",
    "calibrated": "calibrated",
    "expected_distance_km": "expected_distances_km",
    "latitude": "latitudes",
    "longitude": "longitudes",
    "gallery_row": "gallery_rows",
    "similarity": "similarities",
}


if TYPE_CHECKING:
    import torch

    from .candidates import CandidatePlaces


def format_answers(
    places: CandidatePlaces, city_rows: torch.Tensor, **columns: torch.Tensor | None
) -> list[dict[str, Any]]:
    """One image's ranked rows (`RankedPlaces`' columns, `city_rows` the first) as the pipeline's dicts, each place
    read from the table; a gallery answer's coordinates are its photo's, and padding rows (-1) are left out."""
    if unknown := columns.keys() - _ANSWER_COLUMNS.values():
        raise TypeError(f"format_answers got unknown columns {sorted(unknown)}; it takes RankedPlaces' fields.")
    if not places.has_regions:
        columns.pop("region_scores", None)
    values = {
        field: columns[name].tolist() for field, name in _ANSWER_COLUMNS.items() if columns.get(name) is not None
    }
    if "within_km" in values:
        values["within_km"] = [
            dict(zip(map(str, CONFIDENCE_RADII_KM), row, strict=True)) for row in values["within_km"]
        ]
        values["radius_km"] = [None if math.isinf(radius) else radius for radius in values["radius_km"]]
    answers = []
    for rank, row in enumerate(city_rows.tolist()):
        if row < 0:
            continue
        country = places.city_countries[row]
        answer = {"label": places.city_labels[row], "country": places.country_names[country]}
        answer["country_code"] = places.country_codes[country]
        if places.has_regions:
            answer["region"] = places.region_names[places.city_regions[row]]
        answer["city"] = places.city_names[row]
        answer |= {"latitude": places.city_latitudes[row], "longitude": places.city_longitudes[row]}
        answers.append(answer | {name: column[rank] for name, column in values.items()})
    return answers
