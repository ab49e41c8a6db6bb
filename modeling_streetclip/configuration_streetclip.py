"""Configuration of StreetCLIP: CLIP's configuration plus every geolocation setting."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig


@strict
class StreetCLIPConfig(CLIPConfig):
    r"""
    Configuration of [`StreetCLIPForGeolocation`]: a [`CLIPConfig`] plus the prompts and candidate places of
    hierarchical zero-shot geolocation (Haas & Alberti, 2023).

    A plain CLIP configuration (`model_type: "clip"`, the layout of `geolocal/StreetCLIP`) converts to this one with
    [`StreetCLIPConfig.from_clip_config`], which keeps every CLIP value and adds the defaults below.

    Args:
        country_prompt_template (`str`, *optional*, defaults to `"A Street View photo in {country}."`):
            The paper's country probe prompt; `{country}` is replaced by each candidate country name.
        city_prompt_template (`str`, *optional*, defaults to `"A Street View photo from {city}."`):
            The paper's city probe prompt, scored among the chosen country's cities.
        caption_template (`str`, *optional*):
            The synthetic training caption, `"A Street View photo close to the town of {city} in the region of
            {region} in {country}."` in the paper. It differs from both inference prompts on purpose.
        candidate_countries (`list[str]`, *optional*):
            Names of the candidate countries; `None` means the paper's 193 (appendix B.3.1).
        cities_per_country (`int`, *optional*, defaults to 30):
            The paper probes the 30 most populous cities of the chosen country.
        min_city_population (`int`, *optional*, defaults to 15000):
            GeoNames population floor for candidate cities (its `cities15000` table); a country with no city above it
            falls back to its most populous smaller places so that every country has at least one.
        candidate_places (`dict`, *optional*):
            The resolved candidate table (see [`CandidatePlaces`]), written when heads are built so that a saved
            model infers without the gazetteer package; `None` until then.

    Example:

    ```python
    >>> from modeling_streetclip import StreetCLIPConfig
    >>> config = StreetCLIPConfig(candidate_countries=["France", "Japan"], cities_per_country=10)
    >>> config.country_prompt_template.format(country="Japan")
    'A Street View photo in Japan.'
    ```"""

    model_type = "streetclip"

    country_prompt_template: str = "A Street View photo in {country}."
    city_prompt_template: str = "A Street View photo from {city}."
    caption_template: str = "A Street View photo close to the town of {city} in the region of {region} in {country}."
    candidate_countries: list[str] | None = None
    cities_per_country: int = 30
    min_city_population: int = 15000
    candidate_places: dict | None = None

    def validate_geolocation(self):
        """Reject settings that would only fail later, deep inside head building."""
        for name, field in (
            ("country_prompt_template", "{country}"),
            ("city_prompt_template", "{city}"),
        ):
            if field not in getattr(self, name):
                raise ValueError(f"StreetCLIPConfig.{name}={getattr(self, name)!r} must contain {field}.")
        if self.cities_per_country < 1:
            raise ValueError(f"StreetCLIPConfig.cities_per_country must be >= 1, got {self.cities_per_country}.")
        if self.min_city_population < 0:
            raise ValueError(f"StreetCLIPConfig.min_city_population must be >= 0, got {self.min_city_population}.")

    @classmethod
    def from_clip_config(cls, clip_config: CLIPConfig, **geolocation_settings) -> "StreetCLIPConfig":
        """Wrap a plain CLIP configuration unchanged, adding the geolocation settings (defaults unless given)."""
        values = clip_config.to_dict()
        values.pop("model_type", None)
        if values.get("dtype") == "auto":
            values.pop("dtype")  # a loading instruction that `pipeline` leaves on the config, not a dtype
        values.update(geolocation_settings)
        return cls.from_dict(values)


__all__ = ["StreetCLIPConfig"]
