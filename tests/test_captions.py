"""Training caption synthesis: the paper's template by default, coarser templates mixed in by probability, and
draws that depend only on the seed and the row id."""

import datasets
import pytest

from modeling_streetclip import StreetCLIPConfig
from modeling_streetclip.captions import CaptionMix, template_fields


PAPER = StreetCLIPConfig().caption_template
REGION = "A Street View photo in the region of {region} in {country}."
COUNTRY = "A Street View photo in {country}."
PARIS = {"city": ["Paris"], "region": ["Île-de-France"], "country": ["France"]}


def test_paper_template_is_the_default_caption():
    captions = CaptionMix((PAPER,), (1.0,)).captions(PARIS, [0])
    assert captions == ["A Street View photo close to the town of Paris in the region of Île-de-France in France."]


def test_template_fields_lists_the_place_names_a_template_needs():
    assert template_fields(PAPER) == {"city", "region", "country"}
    assert template_fields(COUNTRY) == {"country"}


def test_draws_depend_only_on_seed_and_row_id_not_on_batching():
    mix = CaptionMix((PAPER, REGION, COUNTRY), (0.5, 0.25, 0.25), seed=7)
    row_ids = list(range(1000))
    whole = mix.template_indices(row_ids)
    in_pieces = mix.template_indices(row_ids[:300]) + mix.template_indices(row_ids[300:])
    shuffled = dict(zip(row_ids[::-1], mix.template_indices(row_ids[::-1]), strict=True))
    assert whole == in_pieces == [shuffled[row] for row in row_ids]
    assert whole == CaptionMix((PAPER, REGION, COUNTRY), (0.5, 0.25, 0.25), seed=7).template_indices(row_ids)
    assert whole != CaptionMix((PAPER, REGION, COUNTRY), (0.5, 0.25, 0.25), seed=8).template_indices(row_ids)


def test_templates_are_drawn_with_the_configured_probabilities():
    indices = CaptionMix((PAPER, REGION, COUNTRY), (0.6, 0.3, 0.1)).template_indices(range(20_000))
    shares = [indices.count(template) / len(indices) for template in range(3)]
    assert shares == pytest.approx([0.6, 0.3, 0.1], abs=0.015)


def test_a_row_missing_a_field_falls_back_to_the_first_template_it_fits():
    mix = CaptionMix((PAPER, REGION, COUNTRY), (1.0, 0.0, 0.0))
    places = {"city": ["Paris", "", None], "region": ["", "Kanto", None], "country": ["France", "Japan", "Kenya"]}
    assert mix.captions(places, [0, 1, 2]) == [
        "A Street View photo in France.",
        "A Street View photo in the region of Kanto in Japan.",
        "A Street View photo in Kenya.",
    ]


def test_a_row_that_no_template_fits_gets_no_caption():
    mix = CaptionMix((PAPER,), (1.0,))
    assert mix.captions({"city": ["Paris"], "region": [""], "country": ["France"]}, [0]) == [None]


@pytest.mark.parametrize(
    ("templates", "probabilities", "message"),
    [
        ((), (), "at least one template"),
        ((PAPER, COUNTRY), (1.0,), "2 caption templates but 1 probabilities"),
        ((PAPER, COUNTRY), (0.5, 0.6), "sum to 1"),
        ((PAPER, COUNTRY), (1.5, -0.5), "non-negative"),
        (("A Street View photo.",), (1.0,), "name no place field"),
    ],
)
def test_an_invalid_mix_is_rejected_naming_the_problem(templates, probabilities, message):
    with pytest.raises(ValueError, match=message):
        CaptionMix(templates, probabilities)


def test_a_template_field_without_a_column_names_the_available_columns():
    mix = CaptionMix(("A Street View photo in {state}.",), (1.0,))
    with pytest.raises(ValueError, match=r"use \['state'\].*only \['city', 'country', 'region'\]"):
        mix.captions(PARIS, [0])


def test_caption_mix_runs_as_a_batched_datasets_map():
    rows = datasets.Dataset.from_dict({"city": ["Paris", "Lyon"], "region": ["", ""], "country": ["France"] * 2})
    mix = CaptionMix((PAPER, COUNTRY), (0.5, 0.5), seed=1)

    def add_captions(batch, row_ids):
        return {"caption": mix.captions(batch, row_ids)}

    captioned = rows.map(add_captions, batched=True, batch_size=1, with_indices=True)
    assert captioned["caption"] == ["A Street View photo in France."] * 2
