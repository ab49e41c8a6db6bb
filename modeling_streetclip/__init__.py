"""StreetCLIP for Hugging Face: zero-shot image geolocation with CLIP.

Importing this package registers the `"geolocation"` pipeline task and the `streetclip` configuration and model with
the Auto classes. The public names load on first use (PEP 562), so that the `streetclip` command can answer `--help`
without importing torch, which takes seconds; its commands register before they load a model.
"""

import importlib
import os
import sys
from typing import TYPE_CHECKING


# Public name -> the module of this package that defines it.
_EXPORTS = {
    "CandidatePlaces": "gazetteer",
    "GeolocationOutput": "modeling_streetclip",
    "GeolocationPipeline": "pipeline_geolocation",
    "ImageLoadError": "images",
    "StreetCLIPConfig": "configuration_streetclip",
    "StreetCLIPForGeolocation": "modeling_streetclip",
    "load_rgb_image": "images",
    "paper_countries": "gazetteer",
}

if TYPE_CHECKING:
    from .configuration_streetclip import StreetCLIPConfig
    from .gazetteer import CandidatePlaces, paper_countries
    from .images import ImageLoadError, load_rgb_image
    from .modeling_streetclip import GeolocationOutput, StreetCLIPForGeolocation
    from .pipeline_geolocation import GeolocationPipeline


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def register_with_transformers() -> None:
    """Register the `"geolocation"` task with `transformers.pipeline` and the config and model with the Auto classes
    (idempotent)."""
    from transformers import AutoConfig, AutoModel
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_streetclip import StreetCLIPConfig
    from .modeling_streetclip import StreetCLIPForGeolocation
    from .pipeline_geolocation import GeolocationPipeline

    AutoConfig.register(StreetCLIPConfig.model_type, StreetCLIPConfig, exist_ok=True)
    AutoModel.register(StreetCLIPConfig, StreetCLIPForGeolocation, exist_ok=True)
    PIPELINE_REGISTRY.register_pipeline(
        "geolocation", pipeline_class=GeolocationPipeline, pt_model=StreetCLIPForGeolocation, type="image"
    )


# The console script imports this package on its way to `cli`; everyone else gets the registration on import.
if os.path.splitext(os.path.basename(getattr(sys, "argv", [""])[0]))[0] != "streetclip":
    register_with_transformers()

__all__ = [
    "CandidatePlaces",
    "GeolocationOutput",
    "GeolocationPipeline",
    "ImageLoadError",
    "StreetCLIPConfig",
    "StreetCLIPForGeolocation",
    "load_rgb_image",
    "paper_countries",
    "register_with_transformers",
]
