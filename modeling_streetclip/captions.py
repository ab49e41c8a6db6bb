"""Prompt and caption synthesis: the one place where place names become text, for the heads and for training."""

import bisect
import hashlib
import itertools
import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def render_template(template: str, **fields: str) -> str:
    """Fill `template` with place names; a missing field or an unreadable template is a `ValueError` naming it."""
    try:
        return template.format(**fields)
    except KeyError as error:
        raise ValueError(
            f"Template {template!r} uses {{{error.args[0]}}}, but only {sorted(fields)} are available."
        ) from None
    except (IndexError, ValueError, AttributeError, TypeError) as error:
        accepted = ", ".join(f"{{{name}}}" for name in sorted(fields))
        raise ValueError(
            f"Template {template!r} is not a str.format template over {accepted}: {error}. Write a literal brace "
            "as {{ or }}."
        ) from None


def template_list(template: str | Sequence[str]) -> list[str]:
    """The templates of one level as a list: a single template, or the templates of a prompt ensemble."""
    return [template] if isinstance(template, str) else list(template)


def country_prompts(template: str | Sequence[str], countries: Sequence[str]) -> list[str]:
    """One probe prompt per candidate country (`A Street View photo in France.`), one block per template."""
    return [render_template(each, country=country) for each in template_list(template) for country in countries]


def region_prompts(template: str | Sequence[str], regions: Sequence[str], countries: Sequence[str]) -> list[str]:
    """One probe prompt per candidate region with its country, one block per template."""
    return [
        render_template(each, region=region, country=country)
        for each in template_list(template)
        for region, country in zip(regions, countries, strict=True)
    ]


def city_prompts(
    template: str | Sequence[str], cities: Sequence[str], countries: Sequence[str], qualified: Sequence[bool] = ()
) -> list[str]:
    """One probe prompt per candidate city, a block per template; `qualified` cities are named with their country
    (`London, Canada`) where the template does not name `{country}`."""
    qualified = qualified or [False] * len(cities)
    return [
        render_template(
            each,
            city=f"{city}, {country}" if qualify and "country" not in template_fields(each) else city,
            country=country,
        )
        for each in template_list(template)
        for city, country, qualify in zip(cities, countries, qualified, strict=True)
    ]


def template_fields(template: str) -> set[str]:
    """Names of the place fields a template fills, e.g. `{"city", "region", "country"}` for the paper's caption."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@dataclass(frozen=True)
class CaptionMix:
    """Synthetic training captions: each row draws one of `templates` by `probabilities`, a pure function of `seed` and
    the row's id (so resumed and multi-process runs caption alike). A row lacking a field of its draw takes the first
    template it fits (list them finest first), else `None`."""

    templates: tuple[str, ...]
    probabilities: tuple[float, ...]
    seed: int = 0

    def __post_init__(self):
        if not self.templates:
            raise ValueError("A caption mix needs at least one template.")
        if len(self.probabilities) != len(self.templates):
            raise ValueError(
                f"Got {len(self.templates)} caption templates but {len(self.probabilities)} probabilities "
                f"{list(self.probabilities)}; give one probability per template."
            )
        if min(self.probabilities) < 0 or not math.isclose(sum(self.probabilities), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"Caption template probabilities {list(self.probabilities)} must be non-negative and sum to 1."
            )
        if fieldless := [template for template in self.templates if not template_fields(template)]:
            raise ValueError(f"These caption templates name no place field such as {{country}}: {fieldless}.")

    def template_indices(self, row_ids: Sequence[int]) -> list[int]:
        """The template each row draws (before falling back), from a hash of the seed and the row id."""
        cumulative = list(itertools.accumulate(self.probabilities))
        digests = (hashlib.blake2b(f"{self.seed}/{row_id}".encode(), digest_size=8).digest() for row_id in row_ids)
        uniforms = (int.from_bytes(digest, "little") / 2**64 for digest in digests)
        # min(): float rounding can leave the last cumulative probability a hair below 1.
        return [min(bisect.bisect_right(cumulative, uniform), len(self.templates) - 1) for uniform in uniforms]

    def captions(self, places: Mapping[str, Sequence[str | None]], row_ids: Sequence[int]) -> list[str | None]:
        """One caption per row from `places` (field name -> column aligned with `row_ids`); empty names are missing."""
        fields = [template_fields(template) for template in self.templates]
        needed = set().union(*fields)
        if unknown := needed - set(places):
            raise ValueError(
                f"Caption templates use {sorted(unknown)}, but the place columns are only {sorted(places)}."
            )
        captions = []
        for row, drawn in enumerate(self.template_indices(row_ids)):
            names = {field: places[field][row] for field in needed}
            present = {field for field, name in names.items() if name}
            fallbacks = (drawn, *range(len(self.templates)))
            chosen = next((index for index in fallbacks if fields[index] <= present), None)
            captions.append(None if chosen is None else render_template(self.templates[chosen], **names))
        return captions
