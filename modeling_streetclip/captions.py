"""Prompt and caption synthesis: the one place where place names become text.

Both the inference heads (country and city prompts) and training (synthetic captions) render their text here, so a
template change reaches both.
"""

from collections.abc import Sequence


def render_template(template: str, **fields: str) -> str:
    """Fill `template` with place names; a field the template needs but was not given is a clear error."""
    try:
        return template.format(**fields)
    except KeyError as error:
        raise ValueError(
            f"Template {template!r} uses {{{error.args[0]}}}, but only {sorted(fields)} are available."
        ) from None


def country_prompts(template: str, countries: Sequence[str]) -> list[str]:
    """One probe prompt per candidate country, e.g. `A Street View photo in France.`"""
    return [render_template(template, country=country) for country in countries]


def city_prompts(template: str, cities: Sequence[str], countries: Sequence[str]) -> list[str]:
    """One probe prompt per candidate city; the country is available to templates that want to disambiguate."""
    return [
        render_template(template, city=city, country=country) for city, country in zip(cities, countries, strict=True)
    ]
