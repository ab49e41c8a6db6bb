"""Configuration of StreetCLIP: CLIP's configuration plus every geolocation setting."""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPConfig


# Hub arguments that every file of a checkpoint (configuration, weights, processor) is resolved with.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# Settings that decide which candidate places the heads hold, and which prompts they encode: changing either means
# rebuilding the heads from the text tower.
CANDIDATE_SETTINGS = frozenset({"candidate_countries", "cities_per_country", "min_city_population"})
PROMPT_SETTINGS = frozenset({"country_prompt_template", "city_prompt_template"})
# The settings `StreetCLIPForGeolocation.from_pretrained` accepts as keyword arguments. The candidate table itself is
# not among them: it is given as `candidates=`, which also rebuilds the heads for it.
GEOLOCATION_SETTINGS = CANDIDATE_SETTINGS | PROMPT_SETTINGS | {"caption_template"}


def validate_prompt_templates(country_prompt_template: str, city_prompt_template: str) -> None:
    """Refuse probe templates that would render the same prompt for every candidate (and so a useless head)."""
    for name, template, field in (
        ("country_prompt_template", country_prompt_template, "{country}"),
        ("city_prompt_template", city_prompt_template, "{city}"),
    ):
        if field not in template:
            raise ValueError(f"{name}={template!r} must contain {field}.")


@strict
class StreetCLIPConfig(CLIPConfig):
    r"""
    Configuration of [`StreetCLIPForGeolocation`]: a [`CLIPConfig`] plus the prompts and candidate places of
    hierarchical zero-shot geolocation (Haas & Alberti, 2023).

    A plain CLIP configuration (`model_type: "clip"`, the layout of `geolocal/StreetCLIP`) converts to this one with
    [`StreetCLIPConfig.from_clip_config`], which keeps every CLIP value and adds the defaults below.

    The defaults written here are the only copy of them: [`StreetCLIPProcessor`] takes its templates from them and
    [`CandidatePlaces.from_geonames`] its table sizes. Text is rendered and tokenised by the processor; the prompt
    templates kept here record what a saved model's heads encode, so that its folder describes itself.

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
        validate_prompt_templates(self.country_prompt_template, self.city_prompt_template)
        if self.cities_per_country < 1:
            raise ValueError(f"StreetCLIPConfig.cities_per_country must be >= 1, got {self.cities_per_country}.")
        if self.min_city_population < 0:
            raise ValueError(f"StreetCLIPConfig.min_city_population must be >= 0, got {self.min_city_population}.")

    @property
    def custom_pipelines(self) -> dict:
        """The pipelines a published folder declares for `trust_remote_code=True`, less the tasks that an installed
        package has registered with transformers.

        transformers refuses any task a config lists here unless `trust_remote_code` or `pipeline_class` is given;
        hiding the tasks it already knows lets `pipeline("geolocation", model=repo)` run the installed classes. The
        entry itself is kept, and saved unchanged, for users without the package.
        """
        from transformers.pipelines import PIPELINE_REGISTRY

        declared = self.__dict__.get("custom_pipelines") or {}
        return {task: entry for task, entry in declared.items() if task not in PIPELINE_REGISTRY.supported_tasks}

    @custom_pipelines.setter
    def custom_pipelines(self, value: dict) -> None:
        # Stored under its own name, so that `to_dict` (a copy of `__dict__`) writes it to config.json as set.
        self.__dict__["custom_pipelines"] = value

    @classmethod
    def from_clip_config(cls, clip_config: CLIPConfig, **geolocation_settings) -> "StreetCLIPConfig":
        """Wrap a plain CLIP configuration unchanged, adding the geolocation settings (defaults unless given)."""
        values = clip_config.to_dict()
        values.pop("model_type", None)
        if values.get("dtype") == "auto":
            values.pop("dtype")  # a loading instruction that `pipeline` leaves on the config, not a dtype
        values.update(geolocation_settings)
        return cls.from_dict(values)

    @classmethod
    def from_checkpoint(
        cls, pretrained_model_name_or_path, config: CLIPConfig | None = None, **hub_kwargs
    ) -> "StreetCLIPConfig":
        """The configuration of a StreetCLIP checkpoint, or of a plain CLIP one converted; `config` replaces the
        checkpoint's own. Anything else is refused with the model type it holds."""
        if config is None:
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if isinstance(config, StreetCLIPConfig):
            return config
        if not isinstance(config, CLIPConfig):
            raise ValueError(
                f"{str(pretrained_model_name_or_path)!r} holds a {type(config).__name__} (model_type "
                f"{config.model_type!r}); StreetCLIPForGeolocation loads CLIP or StreetCLIP checkpoints only."
            )
        return cls.from_clip_config(config)

    def with_geolocation_settings(self, **settings) -> tuple["StreetCLIPConfig", set[str]]:
        """A copy with `settings` (names in `GEOLOCATION_SETTINGS`) applied and validated, and the names of those that
        changed a value.

        The saved candidate table is kept; callers compare the changed names with `CANDIDATE_SETTINGS` and
        `PROMPT_SETTINGS` to decide whether the heads must be rebuilt.
        """
        changed = {name for name, value in settings.items() if getattr(self, name) != value}
        if not changed:
            return self, changed
        return type(self).from_dict({**self.to_dict(), **settings}), changed


__all__ = [
    "CANDIDATE_SETTINGS",
    "GEOLOCATION_SETTINGS",
    "HUB_KWARGS",
    "PROMPT_SETTINGS",
    "StreetCLIPConfig",
    "validate_prompt_templates",
]
