"""StreetCLIPProcessor: CLIP's image processor and tokenizer with StreetCLIP's templates, saved and loaded."""

import json
import shutil

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, CLIPProcessor

from modeling_streetclip import CandidatePlaces, StreetCLIPConfig, StreetCLIPProcessor
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
    ],
)
def test_a_probe_template_without_its_place_is_refused(tiny_clip_dir, templates, message):
    with pytest.raises(ValueError, match=message):
        StreetCLIPProcessor.from_pretrained(tiny_clip_dir, **templates)


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
