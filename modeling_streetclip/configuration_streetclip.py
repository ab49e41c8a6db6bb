"""Configuration of StreetCLIP: CLIP's configuration plus every geolocation setting."""

import math
import reprlib
from collections.abc import Sequence
from dataclasses import field
from itertools import pairwise

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, PretrainedConfig

from .captions import render_template, template_list
from .geodesy import CONFIDENCE_RADII_KM


# Hub arguments that every file of a checkpoint (configuration, weights, processor) is resolved with.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# Settings that choose the candidate places, or the prompts the heads encode: changing one rebuilds the heads.
TABLE_SETTINGS = (
    "cities_per_country",
    "min_city_population",
    "city_allocation",
    "city_budget",
    "city_merge_radius_km",
)
CANDIDATE_SETTINGS = frozenset({*TABLE_SETTINGS, "candidate_countries", "levels"})
PROMPT_SETTINGS = frozenset(
    {"country_prompt_template", "region_prompt_template", "city_prompt_template", "qualify_ambiguous_cities"}
)
TEXT_SETTINGS = PROMPT_SETTINGS | {"caption_template"}
DECISION_SETTINGS = {"expected_distance_candidates", "decision_radius_km", "confidence_level", "calibration"}
GEOLOCATION_SETTINGS = CANDIDATE_SETTINGS | TEXT_SETTINGS | DECISION_SETTINGS

# The paper's hierarchy, and the one with GeoNames' first-level regions (states, provinces) in the middle.
PAPER_LEVELS = ("country", "city")
REGION_LEVELS = ("country", "region", "city")
# How the city slots of a GeoNames table are shared among its countries (see `CandidatePlaces.from_geonames`).
CITY_ALLOCATIONS = ("per_country", "sqrt_population")

# Two places of each level, which a template must render apart.
_SAMPLE_PLACES = (
    {"country": "France", "region": "Bavaria", "city": "Lyon"},
    {"country": "Japan", "region": "Kansai", "city": "Osaka"},
)


def validate_prompt_templates(
    country_prompt_template: str | Sequence[str],
    city_prompt_template: str | Sequence[str],
    region_prompt_template: str | Sequence[str] | None = None,
) -> None:
    """Refuse empty ensembles and templates that `str.format` cannot fill or that render two places of their level
    alike (which also catches a literal `{{country}}`)."""
    levels = [("country_prompt_template", country_prompt_template, "country", ("country",))]
    if region_prompt_template is not None:
        levels.append(("region_prompt_template", region_prompt_template, "region", ("region", "country")))
    levels.append(("city_prompt_template", city_prompt_template, "city", ("city", "country")))
    for name, templates, place, fields in levels:  # each level may use its own place and those above it
        if not template_list(templates):
            raise ValueError(f"{name} is an empty list; give a template or a list of templates with {{{place}}}.")
        first = {field: _SAMPLE_PLACES[0][field] for field in fields}
        second = {**first, place: _SAMPLE_PLACES[1][place]}
        for template in template_list(templates):
            if not isinstance(template, str):
                raise ValueError(f"{name}={template!r} is not a string; give a template with {{{place}}}.")
            try:
                prompts = {render_template(template, **first), render_template(template, **second)}
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
            if len(prompts) == 1:
                raise ValueError(
                    f"{name}={template!r} must contain {{{place}}} as a format field: it renders {prompts.pop()!r} "
                    f"for every {place}. Fields it may use: {', '.join(f'{{{field}}}' for field in fields)}."
                )


def _non_decreasing_shares(values) -> bool:
    """Whether `values` is a list of numbers within [0, 1] that never falls (NaN is neither)."""
    numbers = isinstance(values, list) and all(
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1 for value in values
    )
    return numbers and all(low <= high for low, high in pairwise(values))


@strict
class StreetCLIPConfig(CLIPConfig):
    r"""Configuration of [`StreetCLIPForGeolocation`]: a [`CLIPConfig`] plus the prompts and candidate places of
    hierarchical zero-shot geolocation (Haas & Alberti, 2023); a plain CLIP one converts with `from_clip_config`.

    Args:
        country_prompt_template, region_prompt_template, city_prompt_template (`str` or `list[str]`):
            Each level's probe prompt (the region's for `levels` with `"region"`); a list is an ensemble, whose head
            rows are the normalised means.
        qualify_ambiguous_cities (`bool`): Name a city with its country (`"London, Canada"`) when another candidate
            country has a namesake.
        caption_template (`str`): The paper's synthetic training caption over `{city}`, `{region}` and `{country}`.
        levels (`list[str]`): The paper's `["country", "city"]`, or `["country", "region", "city"]`.
        candidate_countries (`list[str]`, *optional*): Candidate country names; `None` is the paper's 193.
        city_allocation (`str`): `"per_country"` (the paper's: `cities_per_country` each) or `"sqrt_population"`
            (`city_budget` shared by root urban population).
        min_city_population (`int`): GeoNames population floor; capitals always count.
        city_merge_radius_km (`float`): Merge a city within this radius of a more populous one of its country; 25
            is recommended, 0 the paper's.
        expected_distance_candidates (`int`): The most probable cities `"expected_distance"` and `"within_km"` rank.
        decision_radius_km (`float`): The radius whose accuracy `"within_km"` maximises (IM2GPS's city level).
        confidence_level (`float`): The probability that an answer's `radius_km` holds.
        calibration (`dict`, *optional*): Per-level `"temperatures"` and per-radius `"within_km"` monotone maps,
            written by `streetclip calibrate`.
        candidate_places (`dict`, *optional*): The candidate table ([`CandidatePlaces`]), written with the heads.

    Example:

    ```python
    >>> from modeling_streetclip import StreetCLIPConfig
    >>> config = StreetCLIPConfig(candidate_countries=["France", "Japan"], cities_per_country=10)
    >>> config.country_prompt_template.format(country="Japan")
    'A Street View photo in Japan.'

    ```
    """

    model_type = "streetclip"

    country_prompt_template: str | list[str] = "A Street View photo in {country}."
    region_prompt_template: str | list[str] = "A Street View photo in {region}, {country}."
    city_prompt_template: str | list[str] = "A Street View photo from {city}."
    qualify_ambiguous_cities: bool = False
    caption_template: str = "A Street View photo close to the town of {city} in the region of {region} in {country}."
    levels: list[str] = field(default_factory=lambda: list(PAPER_LEVELS))
    candidate_countries: list[str] | None = None
    city_allocation: str = "per_country"
    cities_per_country: int = 30
    city_budget: int = 6000
    min_city_population: int = 15000
    city_merge_radius_km: int | float = 0
    expected_distance_candidates: int = 50
    decision_radius_km: int | float = 25
    confidence_level: float = 0.9
    calibration: dict | None = None
    candidate_places: dict | None = None

    def validate_geolocation(self):
        """Reject settings that would only fail later, deep inside head building."""
        validate_prompt_templates(self.country_prompt_template, self.city_prompt_template, self.region_prompt_template)
        if self.candidate_countries is not None and not self.candidate_countries:
            raise ValueError(
                "StreetCLIPConfig.candidate_countries is an empty list; give at least one country name or ISO code, "
                "or None for the paper's 193 countries."
            )
        if tuple(self.levels) not in (PAPER_LEVELS, REGION_LEVELS):
            raise ValueError(
                f"StreetCLIPConfig.levels must be {list(PAPER_LEVELS)} (the paper's) or {list(REGION_LEVELS)}, got "
                f"{self.levels}."
            )
        if self.city_allocation not in CITY_ALLOCATIONS:
            raise ValueError(
                f"StreetCLIPConfig.city_allocation must be one of {', '.join(CITY_ALLOCATIONS)}, got "
                f"{self.city_allocation!r}."
            )
        minimums = {"cities_per_country": 1, "city_budget": 1, "expected_distance_candidates": 1}
        for name, minimum in (minimums | {"min_city_population": 0, "city_merge_radius_km": 0}).items():
            if not getattr(self, name) >= minimum:  # `not >=` also refuses NaN
                raise ValueError(f"StreetCLIPConfig.{name} must be >= {minimum}, got {getattr(self, name)}.")
        if not (0 < self.decision_radius_km < math.inf and 0 < self.confidence_level < 1):
            raise ValueError(
                "StreetCLIPConfig.decision_radius_km must be a finite number of km > 0 and confidence_level a "
                f"probability strictly between 0 and 1, got {self.decision_radius_km} and {self.confidence_level}."
            )
        if self.calibration is not None:
            temperatures = self.calibration.get("temperatures")
            if not isinstance(temperatures, dict) or set(temperatures) != set(self.levels):
                raise ValueError(
                    f"StreetCLIPConfig.calibration must hold 'temperatures' for the levels {list(self.levels)}, got "
                    f"{self.calibration!r}; write it with `streetclip calibrate`."
                )
            radii = [str(radius) for radius in CONFIDENCE_RADII_KM]
            maps = self.calibration.get("within_km") or {}
            for radius, knots in maps.items() if isinstance(maps, dict) else [("", maps)]:
                if radius not in radii or not (
                    isinstance(knots, dict)
                    and len(knots.get("x", ())) == len(knots.get("y", ())) > 0
                    and all(_non_decreasing_shares(knots[axis]) for axis in ("x", "y"))
                ):
                    raise ValueError(
                        f"StreetCLIPConfig.calibration['within_km'][{radius!r}] must be the knots {{'x': [...], 'y': "
                        f"[...]}} of a radius of {radii} km: lists of equal, non-zero length of non-decreasing numbers "
                        f"within [0, 1], got {reprlib.repr(knots)}; write it with `streetclip calibrate`."
                    )
            if not all(isinstance(value, (int, float)) and 0 < value < math.inf for value in temperatures.values()):
                raise ValueError(
                    f"StreetCLIPConfig.calibration temperatures must be > 0 and finite, got {temperatures}."
                )

    @property
    def uses_regions(self) -> bool:
        """Whether the hierarchy has the region level between countries and cities."""
        return "region" in self.levels

    @property
    def custom_pipelines(self) -> dict:
        """The saved `custom_pipelines` less this process's tasks, which `pipeline()` refuses without remote code."""
        from transformers.pipelines import PIPELINE_REGISTRY

        declared = self.__dict__.get("custom_pipelines") or {}
        return {task: entry for task, entry in declared.items() if task not in PIPELINE_REGISTRY.supported_tasks}

    @custom_pipelines.setter
    def custom_pipelines(self, value: dict) -> None:
        self.__dict__["custom_pipelines"] = value  # so that `to_dict` (a copy of `__dict__`) saves it as set

    @classmethod
    def from_clip_config(cls, clip_config: CLIPConfig, **geolocation_settings) -> "StreetCLIPConfig":
        """Wrap a plain CLIP configuration unchanged, adding the geolocation settings (defaults unless given)."""
        values = clip_config.to_dict()
        values.pop("model_type", None)
        if values.get("dtype") == "auto":
            values.pop("dtype")  # a loading instruction that `pipeline` leaves on the config, not a dtype
        return cls.from_dict(values | geolocation_settings)

    @classmethod
    def from_checkpoint(cls, pretrained_model_name_or_path, config: PretrainedConfig) -> "StreetCLIPConfig":
        """A checkpoint's configuration as StreetCLIP's: its own, or a plain CLIP one converted; others are refused."""
        if isinstance(config, StreetCLIPConfig):
            return config
        if not isinstance(config, CLIPConfig):
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {type(config).__name__} (model_type "
                f"{config.model_type!r}); StreetCLIPForGeolocation loads CLIP or StreetCLIP checkpoints only."
            )
        return cls.from_clip_config(config)

    def with_geolocation_settings(self, **settings) -> tuple["StreetCLIPConfig", set[str]]:
        """A validated copy with `settings` applied, and the names of those that changed a value (and so the heads)."""
        changed = {name for name, value in settings.items() if getattr(self, name) != value}
        return (type(self).from_dict({**self.to_dict(), **settings}) if changed else self), changed

    def text_settings(self) -> dict:
        """The templates this configuration records, as a processor takes them."""
        return {name: getattr(self, name) for name in TEXT_SETTINGS}


# The candidate table recommended over the paper's (README, "Protocols you can see and change").
RECOMMENDED_CANDIDATE_SETTINGS = dict(city_allocation="sqrt_population", city_budget=6000, city_merge_radius_km=25)

# `save_pretrained` writes `auto_map` and copies the code, for `trust_remote_code=True` without this package.
StreetCLIPConfig.register_for_auto_class()

__all__ = ["RECOMMENDED_CANDIDATE_SETTINGS", "StreetCLIPConfig"]
