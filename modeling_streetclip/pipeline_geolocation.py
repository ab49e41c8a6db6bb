"""The `"geolocation"` pipeline: photo in; country, city and coordinates out."""

import os
from collections.abc import Sequence
from typing import Any

import httpx
from transformers import AutoModel, Pipeline

from .answers import format_answers
from .decisions import check_top_k, rank, validate_decision
from .gallery_store import GeoGallery
from .images import ImageLoadError, load_rgb_image
from .pixels import normalized_pixels, resized_pixels
from .processing_streetclip import StreetCLIPProcessor


class GeolocationPipeline(Pipeline):
    """Geolocate photos zero-shot with StreetCLIP's hierarchical probing (task `"geolocation"`). Each image gives
    `top_k` dicts, best first, with the place (`label`, `country`, `country_code`, `city`, `latitude`, `longitude`),
    its probabilities (`score`, `country_score`, `joint_probability`), the confidence (`within_km`, `radius_km`,
    `calibrated`; README, "Quickstart") and, with regions, `region` and `region_score`; `label` and `score` make them
    image-classification answers.

    Example:

    ```python
    import modeling_streetclip  # registers the task
    from transformers import pipeline
    geolocate = pipeline("geolocation", model="geolocal/StreetCLIP")
    geolocate("photo.jpg", top_k=2)
    ```
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is not None:
            # A plain CLIP checkpoint gives transformers' CLIPProcessor: the same parts, with this model's templates.
            self.processor = StreetCLIPProcessor.from_parts(self.processor, self.model.config)
            self.image_processor = self.image_processor or self.processor.image_processor
        if self.image_processor is None:
            raise TypeError(
                "GeolocationPipeline needs processor=StreetCLIPProcessor.from_pretrained(...) (or at least an "
                "image_processor) along with a model object; pipeline() loads it when given the model's folder or id."
            )

    def __call__(self, inputs, **kwargs):
        """Geolocate the image(s) given as inputs: for one image a list of `top_k` dicts, best first; for a list of
        images, one such list per image.

        Args:
            inputs (`str`, `bytes`, `PIL.Image.Image` or a list of them):
                An image file's path, an `http(s)://` URL, an encoded image's bytes, or a PIL image.
            top_k (`int`, *optional*, defaults to 1): Answers per image (at most the number of candidate cities).
            decision (`str`, *optional*, defaults to `"greedy"`, or `"gallery"` with a gallery):
                The rule that chooses and orders the answers (README, "Quickstart"): `"greedy"` (the paper's: country,
                region, then city), `"joint"` (joint probability), `"expected_distance"` (least expected distance
                to the true place), `"within_km"` (most probability within `config.decision_radius_km`), or
                `"gallery"` and `"hybrid"` (a kernel vote of the nearest `gallery` photos; `"hybrid"` weighs them by
                p(country), and `gallery_row` and `similarity` name the photo).
            candidate_countries (`list[str]`, *optional*): Answer only among these countries (names or ISO codes),
                for this call; not with the gallery rules.
            gallery (`str`, `os.PathLike` or `GeoGallery`, *optional*):
                A folder or Hub dataset repo that `streetclip index build` wrote, or a loaded `GeoGallery`.
            function_to_apply (`str`, *optional*): The Hub's parameter; scores are probabilities from softmaxes, so
                only `"softmax"` is accepted.
            timeout (`float`, *optional*): Seconds to wait for an image URL; None waits forever.
        """
        if isinstance(inputs, list) and not inputs:  # transformers' `Pipeline` looks at inputs[0] first
            self._sanitize_parameters(**kwargs)  # bad options are still refused
            return []
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        top_k: int | None = None,
        decision: str | None = None,
        gallery: Any = None,
        candidate_countries: Sequence[str] | None = None,
        function_to_apply: str | None = None,
        timeout: float | None = None,
        **unknown,
    ):
        # Named parameters, not **options: Hub clients and transformers' checks read the accepted names from here.
        if unknown:  # as a Python function would: a misspelt option must not answer as if it had not been given
            raise TypeError(
                f"GeolocationPipeline got an unexpected keyword argument {next(iter(unknown))!r}; it accepts top_k, "
                "decision, candidate_countries, gallery, function_to_apply and timeout (and pipeline's batch_size, "
                "num_workers, device and dtype)."
            )
        _check_function_to_apply(function_to_apply)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds (or None for none), got {timeout!r}.")
        given = {
            "top_k": (top_k, check_top_k),
            "decision": (decision, validate_decision),
            "gallery": (gallery, self._checked_gallery),
            "country_rows": (candidate_countries, self._country_rows),
        }
        forward_params = {name: check(value) for name, (value, check) in given.items() if value is not None}
        return ({} if timeout is None else {"timeout": timeout}), forward_params, {}

    def _country_rows(self, countries: Sequence[str]) -> list[int]:
        """Rows of the model's candidate countries named in `countries`, by name or ISO code."""
        if isinstance(countries, str) or not isinstance(countries, Sequence):
            raise TypeError(
                f"candidate_countries must be a list of country names or ISO codes, such as ['JP', 'Kenya'], got "
                f"{countries!r}."
            )
        if not countries:
            raise ValueError("candidate_countries is empty; give at least one of the model's candidate countries.")
        return self.model.candidate_places.country_rows(countries)

    def _checked_gallery(self, gallery: "str | os.PathLike | GeoGallery") -> GeoGallery:
        """The gallery `gallery` names, loaded and checked against this pipeline's model once."""
        # `Pipeline.__init__` calls `_sanitize_parameters` before this class's `__init__` body could set the cache.
        cache = self.__dict__.setdefault("_galleries", {})
        key = id(gallery) if isinstance(gallery, GeoGallery) else os.fspath(gallery)
        if key not in cache:
            loaded = gallery if isinstance(gallery, GeoGallery) else GeoGallery.load(gallery)
            image_processor = self.image_processor or getattr(self.processor, "image_processor", None)
            loaded.check_model(self.model, image_processor, self.model.name_or_path)
            cache[key] = loaded
        return cache[key]

    def preprocess(self, image, timeout: float | None = None) -> dict[str, Any]:
        return {"pixel_values": resized_pixels(self.image_processor, _load_image(image, timeout))}

    def _forward(self, model_inputs: dict[str, Any], **ranking) -> dict[str, Any]:
        pixel_values = normalized_pixels(self.image_processor, model_inputs["pixel_values"], self.model.dtype)
        # Ranked here, a batch at a time on the model's device; `postprocess` formats each image's rows.
        return rank(self.model, self.model(pixel_values=pixel_values), **ranking)

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return format_answers(self.model.candidate_places, **{name: rows[0] for name, rows in model_outputs.items()})

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write a folder that loads with this package, or without it with `trust_remote_code=True` (no gallery)."""
        if self.processor is None:
            raise ValueError(
                "This pipeline was built with an image_processor but no processor, so it has no tokenizer or "
                "templates to save and the folder would be incomplete; build it with "
                "processor=StreetCLIPProcessor.from_pretrained(...)."
            )
        # Saved `custom_pipelines` name the model class, which a remote load looks up on the `transformers` module:
        # AutoModel is there, and follows `auto_map`. Set here, as a pipeline from remote code was never registered.
        self._registered_impl = {"geolocation": {"impl": type(self), "pt": (AutoModel,), "type": "image"}}
        super().save_pretrained(save_directory, **kwargs)
        # `Pipeline.save_pretrained` saves the tokenizer and image processor, but not a processor with its templates.
        self.processor.save_pretrained(save_directory, **kwargs)


def _check_function_to_apply(function_to_apply: str | None) -> None:
    """Accept the Hub's `function_to_apply` where it describes the scores (`"softmax"`); refuse the others."""
    name = function_to_apply.lower() if isinstance(function_to_apply, str) else function_to_apply
    if name in ("sigmoid", "none"):
        raise ValueError(
            f"function_to_apply={function_to_apply!r} does not apply to geolocation: a photo is taken in one place, "
            "so every score is a probability from softmaxes over the candidate places (function_to_apply='softmax'). "
            "For unnormalised numbers, read the model's outputs: `logits` holds the log joint probabilities."
        )
    if name not in (None, "softmax"):
        raise ValueError(
            f"Unknown function_to_apply {function_to_apply!r}; the Hub's values are 'softmax', 'sigmoid' and 'none', "
            "of which geolocation answers with 'softmax'."
        )


def _load_image(image, timeout: float | None):
    """`load_rgb_image`'s image, a URL fetched first (with `timeout`); errors name the URL."""
    if not (isinstance(image, str) and image.startswith(("http://", "https://"))):
        return load_rgb_image(image)
    try:
        return load_rgb_image(httpx.get(image, timeout=timeout, follow_redirects=True).raise_for_status().content)
    except httpx.HTTPError as error:
        raise ImageLoadError(f"Could not fetch the image URL {image!r}: {error}") from error
    except ImageLoadError as error:
        raise ImageLoadError(f"The image at {image!r}: {error}") from error


__all__ = ["GeolocationPipeline"]
