"""Processor of StreetCLIP: CLIP's image processor and tokenizer, plus the templates that turn places into text."""

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import ProcessorMixin
from transformers.utils import cached_file

from .candidates import CandidatePlaces
from .captions import city_prompts, country_prompts, region_prompts, template_list
from .configuration_streetclip import HUB_KWARGS, PROMPT_SETTINGS, StreetCLIPConfig, validate_prompt_templates


# Files that hold an image processor or a tokenizer; a folder with none of them has only a model.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json")


@dataclass
class CandidatePrompts:
    """The tokenised probe prompts of one candidate table, with the templates they were rendered from: `countries`, and
    `cities[i]` and `regions[i]` (empty without regions) of country `i`; an ensemble has a block per template."""

    country_prompt_template: str | list[str]
    city_prompt_template: str | list[str]
    countries: dict
    cities: list[dict]
    region_prompt_template: str | list[str] | None = None
    regions: list[dict] = field(default_factory=list)
    qualify_ambiguous_cities: bool = False

    def num_templates(self, level: str) -> int:
        """How many templates render each place of `level` (`"country"`, `"region"` or `"city"`)."""
        return len(template_list(getattr(self, f"{level}_prompt_template")))

    def check_matches(self, places: CandidatePlaces) -> None:
        """Refuse prompts tokenised for another table, whose rows would land on the wrong places."""
        got = (
            len(self.countries["input_ids"]),
            [len(tokens["input_ids"]) for tokens in self.cities],
            [len(tokens["input_ids"]) for tokens in self.regions],
        )
        expected = (
            places.num_countries * self.num_templates("country"),
            [len(rows) * self.num_templates("city") for rows in places.cities_by_country],
            [len(rows) * self.num_templates("region") for rows in places.regions_by_country]
            if places.has_regions
            else [],
        )
        if got != expected:
            raise ValueError(
                f"These prompts were tokenised for {got[0]} country rows with {got[1]} city rows and {got[2]} region "
                f"rows, but the candidate table and templates need {expected[0]}, {expected[1]} and {expected[2]}; "
                "tokenise them from this table with `processor.candidate_prompts(places)`."
            )


class StreetCLIPProcessor(ProcessorMixin):
    r"""Joins CLIP's image processor and tokenizer with StreetCLIP's templates; called like [`CLIPProcessor`], it also
    renders and tokenises a candidate table's prompts. A plain CLIP folder loads with the default templates.

    Args:
        image_processor, tokenizer ([`CLIPImageProcessor`], [`CLIPTokenizer`]): CLIP's.
        country_prompt_template, region_prompt_template, city_prompt_template, qualify_ambiguous_cities,
        caption_template: As [`StreetCLIPConfig`] documents them, with its defaults.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        country_prompt_template: str | list[str] = StreetCLIPConfig.country_prompt_template,
        city_prompt_template: str | list[str] = StreetCLIPConfig.city_prompt_template,
        caption_template: str = StreetCLIPConfig.caption_template,
        region_prompt_template: str | list[str] = StreetCLIPConfig.region_prompt_template,
        qualify_ambiguous_cities: bool = StreetCLIPConfig.qualify_ambiguous_cities,
        **kwargs,
    ):
        validate_prompt_templates(country_prompt_template, city_prompt_template, region_prompt_template)
        if not isinstance(qualify_ambiguous_cities, bool):
            raise ValueError(f"qualify_ambiguous_cities must be True or False, got {qualify_ambiguous_cities!r}.")
        self.country_prompt_template, self.region_prompt_template = country_prompt_template, region_prompt_template
        self.city_prompt_template, self.caption_template = city_prompt_template, caption_template
        self.qualify_ambiguous_cities = qualify_ambiguous_cities
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "StreetCLIPProcessor":
        """Load from a StreetCLIP or plain CLIP folder; a folder without processor files is refused with the fix."""
        hub_kwargs = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
        hub_kwargs |= {
            "_raise_exceptions_for_missing_entries": False,
            "_raise_exceptions_for_connection_errors": False,
        }
        if not any(cached_file(pretrained_model_name_or_path, name, **hub_kwargs) for name in _PROCESSOR_FILES):
            raise OSError(
                f"{str(pretrained_model_name_or_path)!r} holds no image processor or tokenizer files "
                f"({', '.join(_PROCESSOR_FILES)}). A folder written by `model.save_pretrained` needs the processor "
                "saved next to it: `StreetCLIPProcessor.from_pretrained(CHECKPOINT_IT_CAME_FROM).save_pretrained("
                f"{str(pretrained_model_name_or_path)!r})`, with `geolocal/StreetCLIP` for the published model."
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_parts(cls, processor, config: StreetCLIPConfig) -> "StreetCLIPProcessor":
        """This processor from a `CLIPProcessor`'s parts and `config`'s templates (or `processor` itself)."""
        if isinstance(processor, cls):
            return processor
        return cls(processor.image_processor, processor.tokenizer, **config.text_settings())

    def render_country_prompts(self, countries: Sequence[str]) -> list[str]:
        """One country probe prompt per country name (one block per template of an ensemble)."""
        return country_prompts(self.country_prompt_template, countries)

    def render_region_prompts(self, regions: Sequence[str], countries: Sequence[str]) -> list[str]:
        """One region probe prompt per region, with its country (one block per template of an ensemble)."""
        return region_prompts(self.region_prompt_template, regions, countries)

    def render_city_prompts(self, cities: Sequence[str], countries: Sequence[str], ambiguous=()) -> list[str]:
        """One city probe prompt per city (a block per template); `ambiguous` ones named with their country, if set."""
        qualified = ambiguous if self.qualify_ambiguous_cities else ()
        return city_prompts(self.city_prompt_template, cities, countries, qualified)

    def save_pretrained(self, save_directory, **kwargs) -> list[str]:
        saved = super().save_pretrained(save_directory, **kwargs)
        # Saving a registered processor sets `auto_map`, which loading drops: off again, so it equals the one reloaded.
        self.__dict__.pop("auto_map", None)
        return saved

    def tokenize(self, texts: Sequence[str], **kwargs) -> dict:
        """Tokenise texts for the text tower: padded, truncated, as PyTorch tensors unless `kwargs` say otherwise."""
        return self.tokenizer(list(texts), **{"padding": True, "truncation": True, "return_tensors": "pt", **kwargs})

    def candidate_prompts(self, places: CandidatePlaces) -> CandidatePrompts:
        """The tokenised prompts of every candidate country, and of each country's cities (and regions)."""
        countries = dict(self.tokenize(self.render_country_prompts(places.country_names)))
        cities, regions = [], []
        for country, name in enumerate(places.country_names):
            rows = places.cities_by_country[country]
            names, ambiguous = [places.city_names[r] for r in rows], [places.ambiguous_city_rows[r] for r in rows]
            cities.append(dict(self.tokenize(self.render_city_prompts(names, [name] * len(rows), ambiguous))))
            if places.has_regions:
                rows = places.regions_by_country[country]
                prompts = self.render_region_prompts([places.region_names[r] for r in rows], [name] * len(rows))
                regions.append(dict(self.tokenize(prompts)))
        templates = {name: getattr(self, name) for name in PROMPT_SETTINGS}
        return CandidatePrompts(countries=countries, cities=cities, regions=regions, **templates)


# `save_pretrained` writes `auto_map` and copies the code, for `trust_remote_code=True` without this package.
StreetCLIPProcessor.register_for_auto_class()

__all__ = ["CandidatePrompts", "StreetCLIPProcessor"]
