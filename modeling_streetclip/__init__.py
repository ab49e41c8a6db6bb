"""StreetCLIP for Hugging Face: zero-shot image geolocation with CLIP.

Importing this package registers the `"geolocation"` pipeline task and the `streetclip` configuration, model and
processor with the Auto classes. The public names load on first use (PEP 562), so that the `streetclip` command can
answer `--help` without importing torch, which takes seconds; its commands register before they load a model.
"""

import importlib
import os
import sys
from typing import TYPE_CHECKING


# Public name -> the module of this package that defines it.
_EXPORTS = {
    "CandidatePlaces": "gazetteer",
    "CandidatePrompts": "processing_streetclip",
    "GeolocationOutput": "modeling_streetclip",
    "GeolocationPipeline": "pipeline_geolocation",
    "GeoGallery": "gallery",
    "ImageLoadError": "images",
    "RankedPlaces": "modeling_streetclip",
    "StreetCLIPConfig": "configuration_streetclip",
    "StreetCLIPForGeolocation": "modeling_streetclip",
    "StreetCLIPProcessor": "processing_streetclip",
    "VoteSettings": "gallery",
    "format_answers": "gazetteer",
    "load_rgb_image": "images",
    "paper_countries": "gazetteer",
    "read_country_list": "gazetteer",
    "resolve_country_name": "gazetteer",
}

if TYPE_CHECKING:
    from .configuration_streetclip import StreetCLIPConfig
    from .gallery import GeoGallery, VoteSettings
    from .gazetteer import CandidatePlaces, format_answers, paper_countries, read_country_list, resolve_country_name
    from .images import ImageLoadError, load_rgb_image
    from .modeling_streetclip import GeolocationOutput, RankedPlaces, StreetCLIPForGeolocation
    from .pipeline_geolocation import GeolocationPipeline
    from .processing_streetclip import CandidatePrompts, StreetCLIPProcessor


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def register_with_transformers() -> None:
    """Register the `"geolocation"` task with `transformers.pipeline` and the config, model and processor with the
    Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoProcessor
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_streetclip import StreetCLIPConfig
    from .modeling_streetclip import StreetCLIPForGeolocation
    from .pipeline_geolocation import GeolocationPipeline
    from .processing_streetclip import StreetCLIPProcessor

    AutoConfig.register(StreetCLIPConfig.model_type, StreetCLIPConfig, exist_ok=True)
    AutoModel.register(StreetCLIPConfig, StreetCLIPForGeolocation, exist_ok=True)
    AutoProcessor.register(StreetCLIPConfig, StreetCLIPProcessor, exist_ok=True)
    PIPELINE_REGISTRY.register_pipeline(
        "geolocation", pipeline_class=GeolocationPipeline, pt_model=StreetCLIPForGeolocation, type="image"
    )


# The console script imports this package on its way to `cli`, and so does `python -m modeling_streetclip.cli` (what
# `accelerate launch -m` and `torchrun -m` run), while argv[0] is still "-m"; everyone else gets the registration on
# import.
if os.path.splitext(os.path.basename(getattr(sys, "argv", [""])[0]))[0] not in ("streetclip", "-m"):
    register_with_transformers()

__all__ = [
    "CandidatePlaces",
    "CandidatePrompts",
    "GeolocationOutput",
    "GeolocationPipeline",
    "GeoGallery",
    "ImageLoadError",
    "RankedPlaces",
    "StreetCLIPConfig",
    "StreetCLIPForGeolocation",
    "StreetCLIPProcessor",
    "VoteSettings",
    "format_answers",
    "load_rgb_image",
    "paper_countries",
    "read_country_list",
    "register_with_transformers",
    "resolve_country_name",
]
