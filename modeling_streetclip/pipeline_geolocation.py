"""The `"geolocation"` pipeline: photo in; country, city and coordinates out."""

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from transformers import Pipeline
from transformers.dynamic_module_utils import get_relative_import_files

from .configuration_streetclip import validate_decision
from .gallery import GALLERY_DECISIONS, GeoGallery, check_decision, format_gallery_answers, rank_gallery_places
from .gazetteer import format_answers
from .images import load_rgb_image
from .pixels import normalized_pixels, resized_pixels
from .processing_streetclip import StreetCLIPProcessor


TASK = "geolocation"


class GeolocationPipeline(Pipeline):
    """
    Geolocate photos zero-shot with StreetCLIP's hierarchical probing: the best country among the candidates, then
    (for a model with a region level) the best region of that country, then the best city of that country or region,
    whose coordinates are the answer.

    Each image gives a list of `top_k` dicts, ordered by the decision rule, each with `country`, `country_code`,
    `city`, `latitude`, `longitude`, `score` (the number the rule orders by), `country_score` (p(country)) and
    `joint_probability` (p(country) * p(city | country), times p(region | country) with a region level, where the
    dicts also carry `region` and `region_score`). `decision=` picks the rule:

    - `"greedy"` (the default, the paper's): countries by p(country), then cities by p(city | country) within a
      country (with regions: regions by p(region | country), then cities by p(city | region)); `score` is that
      p(city | ...). The first dict is exactly the paper's decision.
    - `"joint"`: by joint probability, which is `score`.
    - `"expected_distance"`: by the expected great-circle distance in km to the true place under the joint
      posterior over the most probable cities (`config.expected_distance_candidates`); `score` is that distance, so
      it grows down the list: the Bayes decision for distance-thresholded accuracy.
    - `"gallery"` and `"hybrid"`, with `gallery=` (a folder or Hub dataset repo that `streetclip index build` wrote, or
      a `GeoGallery`): the nearest gallery photos vote (a kernel vote on the sphere; `"hybrid"` restricts and weights
      it by the zero-shot country posterior; see `modeling_streetclip.gallery`). The answer is a photo's place, so it
      can be closer than any candidate city; `city` and `country` are those of the candidate city nearest it, and
      `gallery_row` and `similarity` name the photo. With a gallery, `"gallery"` is the default rule.

    Example:

    ```python
    >>> import modeling_streetclip  # registers the task
    >>> from transformers import pipeline
    >>> geolocate = pipeline("geolocation", model="geolocal/StreetCLIP")  # doctest: +SKIP
    >>> geolocate("photo.jpg", top_k=2)  # doctest: +SKIP
    [{'country': 'France', 'country_code': 'FR', 'city': 'Paris', 'latitude': 48.85341, 'longitude': 2.3488,
      'score': 0.65, 'country_score': 0.63, 'joint_probability': 0.41}, {...}]
    ```

    This pipeline is loaded from [`pipeline`] with the task identifier `"geolocation"`. It accepts an image path, a
    `PIL.Image.Image`, or a list of them (giving a list of lists), and `top_k`, `decision`, `gallery`, `batch_size`,
    `device` and `dtype`; any other keyword argument is refused. `save_pretrained` writes a folder that every loader
    accepts, with or without this package installed (a gallery is not part of it: pass `gallery=` again).
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

    def _sanitize_parameters(
        self, top_k: int | None = None, decision: str | None = None, gallery: Any = None, **unknown
    ):
        if unknown:
            # As a Python function would: a misspelt option must not answer as if it had not been given.
            raise TypeError(
                f"GeolocationPipeline got an unexpected keyword argument {next(iter(unknown))!r}; it accepts top_k, "
                "decision and gallery (and pipeline's batch_size, num_workers, device and dtype)."
            )
        forward_params = {}
        if top_k is not None:
            if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
                raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
            forward_params["top_k"] = top_k
        if decision is not None:
            forward_params["decision"] = decision if decision in GALLERY_DECISIONS else validate_decision(decision)
        if gallery is not None:
            forward_params["gallery"] = self._checked_gallery(gallery)
        return {}, forward_params, {}

    def _checked_gallery(self, gallery: "str | os.PathLike | GeoGallery") -> GeoGallery:
        """The gallery `gallery` names, loaded and checked against this pipeline's model once (a gallery embedded by
        another model is refused)."""
        # `Pipeline.__init__` calls `_sanitize_parameters` before this class's `__init__` body could set the cache.
        cache = self.__dict__.setdefault("_galleries", {})
        key = id(gallery) if isinstance(gallery, GeoGallery) else os.fspath(gallery)
        if key not in cache:
            loaded = gallery if isinstance(gallery, GeoGallery) else GeoGallery.load(gallery)
            image_processor = self.image_processor or getattr(self.processor, "image_processor", None)
            loaded.check_model(self.model, image_processor, self.model.name_or_path)
            cache[key] = loaded
        return cache[key]

    def preprocess(self, image) -> dict[str, Any]:
        # 8-bit pixels: a quarter of float32's bytes to carry from DataLoader workers to the device (see `pixels`).
        return {"pixel_values": resized_pixels(self.image_processor, load_rgb_image(image))}

    def _forward(
        self,
        model_inputs: dict[str, Any],
        top_k: int = 1,
        decision: str | None = None,
        gallery: GeoGallery | None = None,
    ) -> dict[str, Any]:
        decision = decision or ("gallery" if gallery is not None else "greedy")
        check_decision(decision, gallery)
        pixel_values = normalized_pixels(self.image_processor, model_inputs["pixel_values"], self.model.dtype)
        outputs = self.model(pixel_values=pixel_values)
        if decision in GALLERY_DECISIONS:
            return rank_gallery_places(self.model, outputs, gallery, decision, top_k)._asdict()
        return self.model.rank_places(outputs, top_k=top_k, decision=decision)._asdict()

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        # The columns of `RankedPlaces` (or `GalleryRankedPlaces`), whose names are the formatter's parameters.
        columns = {name: column[0] for name, column in model_outputs.items()}
        if "gallery_rows" in columns:
            return format_gallery_answers(self.model.candidate_places, **columns)
        return format_answers(self.model.candidate_places, **columns)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write a complete folder (see `save_shareable_folder`): with the package installed every loader runs the
        installed classes; without it, `trust_remote_code=True` runs the code saved in the folder."""
        if self.processor is None:
            raise ValueError(
                "This pipeline was built with an image_processor but no processor, so it has no tokenizer or "
                "templates to save and the folder would be incomplete; build it with "
                "processor=StreetCLIPProcessor.from_pretrained(...)."
            )
        save_shareable_folder(self.model, self.processor, save_directory, **kwargs)


def save_shareable_folder(model, processor: StreetCLIPProcessor, save_directory, **kwargs) -> None:
    """Save `model` (heads and candidates) and `processor` with the code files and config entries (`auto_map`,
    `custom_pipelines`) that let `trust_remote_code=True` load the folder without this package.

    `GeolocationPipeline.save_pretrained` writes exactly this; `model_card/publish.py` adds the model card and
    uploads it. All the code goes in or none would do: a partial copy fails only for someone without the package.
    """
    folder = Path(save_directory)
    config = model.config
    config.auto_map = {
        "AutoConfig": _class_reference(type(config)),
        "AutoModel": _class_reference(type(model)),
        # What `pipeline("image-classification", model=repo, trust_remote_code=True)` loads: the model's `logits`.
        "AutoModelForImageClassification": _class_reference(type(model)),
    }
    # Remote pipelines name their model classes on the `transformers` module; AutoModel then follows `auto_map`.
    config.custom_pipelines = {
        TASK: {"impl": _class_reference(GeolocationPipeline), "pt": ["AutoModel"], "type": "image"}
    }
    processor.auto_map = {"AutoProcessor": _class_reference(type(processor))}
    model.save_pretrained(folder, **kwargs)
    processor.save_pretrained(folder, **kwargs)
    # The files `trust_remote_code=True` imports, with what they import relatively, found as transformers finds them.
    for cls in (type(config), type(model), type(processor), GeolocationPipeline):
        module_file = sys.modules[cls.__module__].__file__
        for code_file in (module_file, *get_relative_import_files(module_file)):
            shutil.copyfile(code_file, folder / Path(code_file).name)


def _class_reference(cls: type) -> str:
    """`module.Class`, as `auto_map` and `custom_pipelines` name code inside a repository folder (flat, no package)."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


__all__ = ["GeolocationPipeline", "save_shareable_folder"]
