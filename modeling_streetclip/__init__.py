"""StreetCLIP for Hugging Face: zero-shot image geolocation with CLIP. Importing it registers the `"geolocation"` task
and the `streetclip` classes with transformers once transformers is imported; names load on first use (PEP 562), so
`--help` needs no torch."""

import importlib
import importlib.abc
import importlib.metadata
import sys
from typing import TYPE_CHECKING


__version__ = importlib.metadata.version("streetclip")

# The public names of each module, loaded on first use.
_EXPORTS = {
    "answers": ["format_answers"],
    "candidates": ["CandidatePlaces"],
    "configuration_streetclip": ["RECOMMENDED_CANDIDATE_SETTINGS", "StreetCLIPConfig"],
    "countries": ["paper_countries", "read_country_list", "resolve_country_name"],
    "decisions": ["RankedPlaces"],
    "gallery_store": ["GeoGallery"],
    "gallery_vote": ["VoteSettings"],
    "images": ["ImageLoadError", "load_rgb_image"],
    "modeling_streetclip": ["GeolocationOutput", "StreetCLIPForGeolocation"],
    "pipeline_geolocation": ["GeolocationPipeline"],
    "processing_streetclip": ["CandidatePrompts", "StreetCLIPProcessor"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:  # the same names, for type checkers (`x as x`: re-exported)
    from .answers import format_answers as format_answers
    from .candidates import CandidatePlaces as CandidatePlaces
    from .configuration_streetclip import RECOMMENDED_CANDIDATE_SETTINGS as RECOMMENDED_CANDIDATE_SETTINGS
    from .configuration_streetclip import StreetCLIPConfig as StreetCLIPConfig
    from .countries import paper_countries as paper_countries
    from .countries import read_country_list as read_country_list
    from .countries import resolve_country_name as resolve_country_name
    from .decisions import RankedPlaces as RankedPlaces
    from .gallery_store import GeoGallery as GeoGallery
    from .gallery_vote import VoteSettings as VoteSettings
    from .images import ImageLoadError as ImageLoadError
    from .images import load_rgb_image as load_rgb_image
    from .modeling_streetclip import GeolocationOutput as GeolocationOutput
    from .modeling_streetclip import StreetCLIPForGeolocation as StreetCLIPForGeolocation
    from .pipeline_geolocation import GeolocationPipeline as GeolocationPipeline
    from .processing_streetclip import CandidatePrompts as CandidatePrompts
    from .processing_streetclip import StreetCLIPProcessor as StreetCLIPProcessor


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)


def register_with_transformers() -> None:
    """Register the `"geolocation"` task and the Auto classes (idempotent; importing the package does it)."""
    if _registration in sys.meta_path:
        sys.meta_path.remove(_registration)
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoProcessor
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_streetclip import StreetCLIPConfig
    from .modeling_streetclip import StreetCLIPForGeolocation
    from .pipeline_geolocation import GeolocationPipeline
    from .processing_streetclip import StreetCLIPProcessor

    AutoConfig.register(StreetCLIPConfig.model_type, StreetCLIPConfig, exist_ok=True)
    AutoModel.register(StreetCLIPConfig, StreetCLIPForGeolocation, exist_ok=True)
    AutoModelForImageClassification.register(StreetCLIPConfig, StreetCLIPForGeolocation, exist_ok=True)
    AutoProcessor.register(StreetCLIPConfig, StreetCLIPProcessor, exist_ok=True)
    PIPELINE_REGISTRY.register_pipeline(
        "geolocation", pipeline_class=GeolocationPipeline, pt_model=StreetCLIPForGeolocation, type="image"
    )


class _RegisterOnceImported(importlib.abc.MetaPathFinder):
    """Calls `register_with_transformers` once transformers is imported and no module of this package is halfway
    through its import (registering imports them all), by wrapping their loaders; registering removes it."""

    running = 0  # modules of this package being executed

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" and not fullname.startswith(f"{__name__}."):
            return None
        finders = (finder for finder in sys.meta_path if finder is not self and hasattr(finder, "find_spec"))
        spec = next(filter(None, (finder.find_spec(fullname, path, target) for finder in finders)), None)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _NotifyingLoader(spec.loader, self, counted=fullname != "transformers")
        return spec

    def module_executed(self) -> None:
        if self in sys.meta_path and not self.running and "transformers" in sys.modules:
            register_with_transformers()


class _NotifyingLoader:
    """A module's loader that tells the finder when the module has run; all else (`create_module`, `get_code`) is the
    original's."""

    def __init__(self, loader: importlib.abc.Loader, finder: _RegisterOnceImported, counted: bool):
        self.loader, self.finder, self.counted = loader, finder, counted

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def exec_module(self, module) -> None:
        module.__spec__.loader = module.__loader__ = self.loader
        self.finder.running += self.counted
        try:
            self.loader.exec_module(module)
        finally:
            self.finder.running -= self.counted
        self.finder.module_executed()


_registration = _RegisterOnceImported()
if "transformers" in sys.modules:
    register_with_transformers()
else:
    sys.meta_path.insert(0, _registration)

__all__ = ["__version__", "register_with_transformers", *_MODULE_OF]
