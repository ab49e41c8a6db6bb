"""StreetCLIPProcessor: CLIP's image processor and tokenizer with StreetCLIP's templates, saved and loaded."""

import json
import shutil

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoProcessor, AutoTokenizer, CLIPProcessor

from modeling_streetclip import CandidatePlaces, StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.configuration_streetclip import PROMPT_SETTINGS
from modeling_streetclip.testing_utils import random_photo


CUSTOM_TEMPLATES = {
    "country_prompt_template": "A photo taken somewhere in {country}.",
    "city_prompt_template": "A photo taken in {city}, {country}.",
    "caption_template": "A photo near {city} in {country}.",
}


def test_plain_clip_folder_yields_a_processor_with_the_configurations_default_templates(tiny_clip_dir):
    processor = StreetCLIPProcessor.from_pretrained(tiny_clip_dir)
    defaults = StreetCLIPConfig()
    assert processor.country_prompt_template == defaults.country_prompt_template
    assert processor.city_prompt_template == defaults.city_prompt_template
    assert processor.caption_template == defaults.caption_template


def test_called_like_clips_processor_it_gives_the_same_tensors(tiny_clip_dir):
    images, texts = [random_photo(0), random_photo(1)], ["A Street View photo in Japan.", "A photo."]
    ours = StreetCLIPProcessor.from_pretrained(tiny_clip_dir)(
        images=images, text=texts, padding=True, return_tensors="pt"
    )
    clips = CLIPProcessor.from_pretrained(tiny_clip_dir)(images=images, text=texts, padding=True, return_tensors="pt")
    assert ours.keys() == clips.keys()
    for key in clips:
        assert torch.equal(ours[key], clips[key]), key


def test_save_and_load_round_trip_the_templates_and_auto_processor_finds_the_class(
    tiny_clip_dir, small_streetclip_dir, tmp_path
):
    folder = shutil.copytree(small_streetclip_dir, tmp_path / "model")
    StreetCLIPProcessor.from_pretrained(tiny_clip_dir, **CUSTOM_TEMPLATES).save_pretrained(folder)
    saved = json.loads((folder / "processor_config.json").read_text())
    assert {name: saved[name] for name in CUSTOM_TEMPLATES} == CUSTOM_TEMPLATES
    assert saved["processor_class"] == "StreetCLIPProcessor"
    for loaded in (StreetCLIPProcessor.from_pretrained(folder), AutoProcessor.from_pretrained(folder)):
        assert type(loaded) is StreetCLIPProcessor
        assert {name: getattr(loaded, name) for name in CUSTOM_TEMPLATES} == CUSTOM_TEMPLATES


def test_template_keyword_arguments_replace_the_saved_ones(small_streetclip_dir):
    processor = StreetCLIPProcessor.from_pretrained(small_streetclip_dir, country_prompt_template="In {country}.")
    assert processor.render_country_prompts(["Japan"]) == ["In Japan."]


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        ({"country_prompt_template": "A photo."}, "country_prompt_template='A photo.' must contain {country}"),
        ({"city_prompt_template": "A photo in {country}."}, "must contain {city}"),
        ({"city_prompt_template": ["From {city}.", None]}, "city_prompt_template=None is not a string"),
    ],
)
def test_a_probe_template_without_its_place_is_refused(tiny_clip_dir, templates, message):
    with pytest.raises(ValueError, match=message):
        StreetCLIPProcessor.from_pretrained(tiny_clip_dir, **templates)


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        # Doubled braces are a literal: every country would get the prompt "In {country}.".
        ({"country_prompt_template": "In {{country}}."}, r"must contain \{country\} .*renders 'In \{country\}.' for"),
        (
            {"city_prompt_template": "From {{city}}, {country}."},
            r"city_prompt_template=.*renders 'From \{city\}, France.'",
        ),
        ({"country_prompt_template": "{country} {"}, r"country_prompt_template: Template '\{country\} \{' is not a"),
        ({"country_prompt_template": "{0}{country}"}, r"country_prompt_template: Template '\{0\}\{country\}' is not"),
        (
            {"region_prompt_template": "{region} in {state}"},
            r"region_prompt_template: .*uses \{state\}.*'country', 'region'",
        ),
    ],
)
def test_templates_are_checked_by_rendering_them_and_errors_name_the_option(templates, message):
    with pytest.raises(StrictDataclassError, match=message):  # the configuration's validator wraps the ValueError
        StreetCLIPConfig(**templates)
    with pytest.raises(ValueError, match=message):
        StreetCLIPProcessor(**templates)


def test_country_qualified_city_prompts_change_only_the_names_shared_by_two_countries(tiny_clip_dir):
    places = CandidatePlaces.from_records(
        [
            {"country": "United Kingdom", "city": "London", "latitude": 51.51, "longitude": -0.13},
            {"country": "United Kingdom", "city": "Leeds", "latitude": 53.80, "longitude": -1.55},
            {"country": "Canada", "city": "London", "latitude": 42.98, "longitude": -81.23},
            {"country": "Canada", "city": "Toronto", "latitude": 43.65, "longitude": -79.38},
            {"country": "Australia", "city": "perth", "latitude": -31.95, "longitude": 115.86},
            {"country": "United Kingdom", "city": "Perth", "latitude": 56.40, "longitude": -3.43},
        ]
    )
    assert places.ambiguous_city_rows == [True, False, True, False, True, True]
    paper = StreetCLIPProcessor.from_pretrained(tiny_clip_dir)
    qualified = StreetCLIPProcessor.from_pretrained(tiny_clip_dir, qualify_ambiguous_cities=True)
    assert not paper.qualify_ambiguous_cities, "off by default: the paper's prompts"

    def city_prompts(processor):
        return {
            country: processor.render_city_prompts(
                [places.city_names[row] for row in rows],
                [country] * len(rows),
                [places.ambiguous_city_rows[row] for row in rows],
            )
            for country, rows in zip(places.country_names, places.cities_by_country, strict=True)
        }

    assert city_prompts(paper)["Canada"] == ["A Street View photo from London.", "A Street View photo from Toronto."]
    assert city_prompts(qualified) == {
        "United Kingdom": [
            "A Street View photo from London, United Kingdom.",
            "A Street View photo from Leeds.",
            "A Street View photo from Perth, United Kingdom.",
        ],
        "Canada": ["A Street View photo from London, Canada.", "A Street View photo from Toronto."],
        "Australia": ["A Street View photo from perth, Australia."],
    }
    changed = [
        before != after
        for country in places.country_names
        for before, after in zip(city_prompts(paper)[country], city_prompts(qualified)[country], strict=True)
    ]
    assert sum(changed) == sum(places.ambiguous_city_rows) == 4
    # The tokenised prompts that build the heads follow the option, and record it.
    prompts = qualified.candidate_prompts(places)
    assert prompts.qualify_ambiguous_cities
    assert torch.equal(
        prompts.cities[1]["input_ids"],
        qualified.tokenize(["A Street View photo from London, Canada.", "A Street View photo from Toronto."])[
            "input_ids"
        ],
    )
    # A template that names the country already is left as it is.
    with_country = StreetCLIPProcessor.from_pretrained(
        tiny_clip_dir, city_prompt_template="A photo in {city}, {country}.", qualify_ambiguous_cities=True
    )
    assert with_country.render_city_prompts(["London"], ["Canada"], [True]) == ["A photo in London, Canada."]


def test_qualified_prompts_are_a_prompt_setting_saved_with_the_processor(tiny_clip_dir, tmp_path):
    assert "qualify_ambiguous_cities" in PROMPT_SETTINGS, "changing it rebuilds the heads"
    StreetCLIPProcessor.from_pretrained(tiny_clip_dir, qualify_ambiguous_cities=True).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["qualify_ambiguous_cities"] is True
    assert StreetCLIPProcessor.from_pretrained(tmp_path).qualify_ambiguous_cities is True
    config = StreetCLIPConfig(qualify_ambiguous_cities=True)
    assert StreetCLIPProcessor.from_parts(
        CLIPProcessor.from_pretrained(tiny_clip_dir), config
    ).qualify_ambiguous_cities
    with pytest.raises(ValueError, match="qualify_ambiguous_cities must be True or False, got 'yes'"):
        StreetCLIPProcessor.from_pretrained(tiny_clip_dir, qualify_ambiguous_cities="yes")


def test_candidate_prompts_are_the_rendered_prompts_tokenised_country_by_country(tiny_clip_dir):
    processor = StreetCLIPProcessor.from_pretrained(tiny_clip_dir, **CUSTOM_TEMPLATES)
    places = CandidatePlaces.from_geonames(["Japan", "Kenya"], cities_per_country=2)
    prompts = processor.candidate_prompts(places)
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)

    def tokens(texts):
        return tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]

    assert torch.equal(
        prompts.countries["input_ids"],
        tokens(["A photo taken somewhere in Japan.", "A photo taken somewhere in Kenya."]),
    )
    japan = [places.city_names[row] for row in places.cities_by_country[0]]
    assert torch.equal(prompts.cities[0]["input_ids"], tokens([f"A photo taken in {city}, Japan." for city in japan]))
    assert (prompts.country_prompt_template, prompts.city_prompt_template) == (
        CUSTOM_TEMPLATES["country_prompt_template"],
        CUSTOM_TEMPLATES["city_prompt_template"],
    )


def test_folder_without_processor_files_is_refused_with_its_name_and_the_fix(small_streetclip_dir, tmp_path):
    folder = tmp_path / "model-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(small_streetclip_dir / name, folder / name)
    with pytest.raises(OSError, match="holds no image processor or tokenizer files") as raised:
        StreetCLIPProcessor.from_pretrained(folder)
    assert f"save_pretrained({str(folder)!r})" in str(raised.value)


def test_loading_with_qualified_prompts_gives_each_shared_name_its_own_head_row(tiny_clip_dir, tmp_path):
    places = CandidatePlaces.from_records(
        [
            {"country": "United Kingdom", "city": "London", "latitude": 51.51, "longitude": -0.13},
            {"country": "United Kingdom", "city": "Leeds", "latitude": 53.80, "longitude": -1.55},
            {"country": "Canada", "city": "London", "latitude": 42.98, "longitude": -81.23},
            {"country": "Canada", "city": "Leeds", "latitude": 45.63, "longitude": -71.33},
        ]
    )

    def city_rows(qualify):
        model = StreetCLIPForGeolocation.from_pretrained(
            tiny_clip_dir, candidates=places, qualify_ambiguous_cities=qualify
        )
        model.save_pretrained(tmp_path / str(qualify))  # builds every city head
        assert model.config.qualify_ambiguous_cities is qualify
        return model.city_head.weight[: places.num_cities].detach()

    paper, qualified = city_rows(False), city_rows(True)
    # The paper's prompts encode "London" alike in both countries; qualified, each country has its own.
    assert torch.equal(paper[0], paper[2])
    assert not torch.allclose(qualified[0], qualified[2])
