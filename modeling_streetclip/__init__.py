"""StreetCLIP for Hugging Face: zero-shot image geolocation with CLIP.

Importing this package registers the `"geolocation"` pipeline task and the `streetclip` configuration and model with
the Auto classes.
"""

from transformers import AutoConfig, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_streetclip import StreetCLIPConfig
from .gazetteer import CandidatePlaces, paper_countries
from .images import ImageLoadError, load_rgb_image
from .modeling_streetclip import GeolocationOutput, StreetCLIPForGeolocation
from .pipeline_geolocation import GeolocationPipeline


AutoConfig.register(StreetCLIPConfig.model_type, StreetCLIPConfig, exist_ok=True)
AutoModel.register(StreetCLIPConfig, StreetCLIPForGeolocation, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(
    "geolocation", pipeline_class=GeolocationPipeline, pt_model=StreetCLIPForGeolocation, type="image"
)

__all__ = [
    "CandidatePlaces",
    "GeolocationOutput",
    "GeolocationPipeline",
    "ImageLoadError",
    "StreetCLIPConfig",
    "StreetCLIPForGeolocation",
    "load_rgb_image",
    "paper_countries",
]
