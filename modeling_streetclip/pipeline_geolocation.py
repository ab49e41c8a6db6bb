"""The `"geolocation"` pipeline: photo in; country, city and coordinates out."""

from typing import Any

import torch
from transformers import Pipeline

from .gazetteer import CandidatePlaces
from .images import load_rgb_image


class GeolocationPipeline(Pipeline):
    """
    Geolocate photos zero-shot with StreetCLIP's hierarchical probing: the best country among the candidates, then
    the best city of that country, whose coordinates are the answer.

    Each image gives a list of `top_k` dicts, best first, with `country`, `country_code`, `city`, `latitude`,
    `longitude`, `score` (joint probability p(country) * p(city | country)) and `country_score` (p(country)). The
    first dict is exactly the paper's greedy decision; the others are ranked by joint probability.

    Example:

    ```python
    >>> import modeling_streetclip  # registers the task
    >>> from transformers import pipeline
    >>> geolocate = pipeline("geolocation", model="geolocal/StreetCLIP")  # doctest: +SKIP
    >>> geolocate("photo.jpg", top_k=2)  # doctest: +SKIP
    [{'country': 'France', 'country_code': 'FR', 'city': 'Paris', 'latitude': 48.85341, 'longitude': 2.3488,
      'score': 0.41, 'country_score': 0.63}, {...}]
    ```

    This pipeline is loaded from [`pipeline`] with the task identifier `"geolocation"`. It accepts an image path, a
    `PIL.Image.Image`, or a list of them (giving a list of lists), and `top_k`, `batch_size`, `device` and `dtype`.
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, top_k: int | None = None, **kwargs):
        forward_params = {}
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            forward_params["top_k"] = top_k
        return {}, forward_params, {}

    def preprocess(self, image) -> dict[str, Any]:
        inputs = self.image_processor(images=load_rgb_image(image), return_tensors="pt")
        return {"pixel_values": inputs["pixel_values"].to(self.dtype)}

    def _forward(self, model_inputs: dict[str, Any], top_k: int = 1) -> dict[str, Any]:
        outputs = self.model(pixel_values=model_inputs["pixel_values"])
        city_rows, scores, country_scores = self.model.rank_places(outputs, top_k=top_k)
        return {"city_rows": city_rows, "scores": scores, "country_scores": country_scores}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return format_answers(
            self.model.candidate_places,
            model_outputs["city_rows"][0],
            model_outputs["scores"][0],
            model_outputs["country_scores"][0],
        )


def format_answers(
    places: CandidatePlaces, city_rows: torch.Tensor, scores: torch.Tensor, country_scores: torch.Tensor
) -> list[dict[str, Any]]:
    """One image's ranked answers (from `StreetCLIPForGeolocation.rank_places`) as plain dicts, best first."""
    answers = []
    for row, score, country_score in zip(city_rows.tolist(), scores.tolist(), country_scores.tolist(), strict=True):
        country = places.city_countries[row]
        answers.append(
            {
                "country": places.country_names[country],
                "country_code": places.country_codes[country],
                "city": places.city_names[row],
                "latitude": places.city_latitudes[row],
                "longitude": places.city_longitudes[row],
                "score": score,
                "country_score": country_score,
            }
        )
    return answers
