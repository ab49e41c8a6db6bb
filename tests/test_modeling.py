"""StreetCLIPForGeolocation: loading plain CLIP and own folders, heads, candidates, outputs."""

import json
import math
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from builders import place_in_hub_cache, run_as_hub_user, save_random_photos
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel, pipeline
from transformers.testing_utils import CaptureLogger

import modeling_streetclip.modeling_streetclip as modeling
from modeling_streetclip import (
    CandidatePlaces,
    GeolocationOutput,
    StreetCLIPConfig,
    StreetCLIPForGeolocation,
    StreetCLIPProcessor,
)
from modeling_streetclip.captions import city_prompts, country_prompts
from modeling_streetclip.decisions import rank_places
from modeling_streetclip.testing_utils import (
    SMALL_COUNTRIES,
    TINY_IMAGE_SIZE,
    save_tiny_clip_checkpoint,
)


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def prompt_embeddings(clip_dir, prompts: list[str]) -> torch.Tensor:
    """Reference head rows: CLIP's own text features of the prompts, normalised, times the logit scale."""
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokens = AutoTokenizer.from_pretrained(clip_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = clip.get_text_features(**tokens).pooler_output
    return F.normalize(features, dim=-1) * clip.logit_scale.exp()


def test_plain_clip_folder_loads_with_the_papers_candidates(tiny_clip_dir):
    assert json.loads((tiny_clip_dir / "config.json").read_text())["model_type"] == "clip"
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir)
    assert isinstance(model.config, StreetCLIPConfig)
    assert model.candidate_places.num_countries == 193
    assert model.country_head.weight.shape == (193, model.config.projection_dim)
    assert model.city_head.weight.shape == (model.candidate_places.num_cities, model.config.projection_dim)


def test_clip_weights_are_loaded_unchanged(tiny_clip_dir):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Kenya"])
    clip_state = clip.state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith(("country_head", "city_head", "candidate_checksum")):
            torch.testing.assert_close(tensor, clip_state[name], msg=name)


def test_legacy_pickle_weights_load(tmp_path, tiny_clip_dir):
    bin_dir = save_tiny_clip_checkpoint(tmp_path / "bin", pickle_weights=True)
    assert not (bin_dir / "model.safetensors").exists()
    from_bin = StreetCLIPForGeolocation.from_pretrained(bin_dir, candidate_countries=["Kenya"])
    from_safetensors = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Kenya"])
    torch.testing.assert_close(from_bin.country_head.weight, from_safetensors.country_head.weight)


def test_country_head_equals_prompt_embeddings_through_the_text_tower(tiny_clip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir)
    expected = prompt_embeddings(
        tiny_clip_dir, country_prompts(model.config.country_prompt_template, model.candidate_places.country_names)
    )
    torch.testing.assert_close(model.country_head.weight, expected, rtol=1e-4, atol=1e-5)


def test_saved_city_heads_equal_prompt_embeddings_through_the_text_tower(tiny_clip_dir, small_streetclip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    places = model.candidate_places
    countries = [places.country_names[country] for country in places.city_countries]
    expected = prompt_embeddings(
        tiny_clip_dir, city_prompts(model.config.city_prompt_template, places.city_names, countries)
    )
    torch.testing.assert_close(model.city_head.weight, expected, rtol=1e-4, atol=1e-5)


def test_a_plain_clip_checkpoint_builds_every_head_at_load_in_batched_text_tower_calls(
    tiny_clip_dir, pixel_values, monkeypatch
):
    calls = []
    real = StreetCLIPForGeolocation.get_text_features
    monkeypatch.setattr(
        StreetCLIPForGeolocation, "get_text_features", lambda self, **kw: calls.append(1) or real(self, **kw)
    )
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir)
    places = model.candidate_places
    prompts = places.num_countries + places.num_cities
    assert len(calls) == math.ceil(prompts / modeling._PROMPTS_PER_BATCH) < places.num_countries
    countries = [places.country_names[country] for country in places.city_countries]
    expected = prompt_embeddings(
        tiny_clip_dir, city_prompts(model.config.city_prompt_template, places.city_names, countries)
    )
    torch.testing.assert_close(model.city_head.weight, expected, rtol=1e-4, atol=1e-5)
    # Inference never needs the text tower again: the forward has no side effect.
    model.text_model = None
    assert model(pixel_values).logits.shape == (len(pixel_values), places.num_cities)
    assert len(calls) == math.ceil(prompts / modeling._PROMPTS_PER_BATCH)


def test_saved_folder_reloads_with_identical_outputs(tiny_clip_dir, tmp_path, pixel_values):
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=SMALL_COUNTRIES)
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["model_type"] == "streetclip"
    assert saved_config["candidate_places"]["country_names"] == SMALL_COUNTRIES
    reloaded = StreetCLIPForGeolocation.from_pretrained(tmp_path)
    before, after = model(pixel_values), reloaded(pixel_values)
    for name in ("logits", "country_logits", "city_logits", "image_embeds"):
        torch.testing.assert_close(after[name], before[name])
    assert torch.equal(after.predicted_city, before.predicted_city)


def test_vision_only_load_gives_identical_answers_without_a_text_tower(small_streetclip_dir, pixel_values):
    full = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    vision_only = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    assert vision_only.text_model is None and vision_only.text_projection is None
    assert vision_only.num_parameters() < full.num_parameters()
    assert not any(name.startswith("text_") for name, _ in vision_only.named_parameters())
    torch.testing.assert_close(vision_only(pixel_values).country_logits, full(pixel_values).country_logits)
    assert torch.equal(vision_only(pixel_values).predicted_city, full(pixel_values).predicted_city)


def test_vision_only_model_refuses_to_save_a_folder_without_its_text_tower(small_streetclip_dir, tmp_path):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    with pytest.raises(ValueError, match="loaded with vision_only=True; it cannot be saved without a text tower"):
        model.save_pretrained(tmp_path / "slim")
    assert not (tmp_path / "slim").exists()


def test_vision_only_refuses_a_checkpoint_without_heads(tiny_clip_dir):
    with pytest.raises(ValueError, match="vision_only=True leaves no text tower"):
        StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, vision_only=True)


def test_loads_by_repo_id_from_the_hub_cache_offline(tmp_path, small_streetclip_dir, tiny_clip_dir, monkeypatch):
    place_in_hub_cache(tiny_clip_dir, tmp_path, "geolocal/StreetCLIP")
    place_in_hub_cache(small_streetclip_dir, tmp_path, "someone/streetclip-small")
    # HF_HUB_OFFLINE=1 and HF_HUB_CACHE as a user sets them: huggingface_hub reads them into its constants at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    plain = StreetCLIPForGeolocation.from_pretrained("geolocal/StreetCLIP", candidate_countries=["Kenya"])
    saved = StreetCLIPForGeolocation.from_pretrained("someone/streetclip-small", vision_only=True)
    assert plain.candidate_places.country_names == ["Kenya"]
    assert saved.candidate_places.num_countries == len(SMALL_COUNTRIES)


def test_auto_classes_resolve_to_streetclip(small_streetclip_dir):
    assert isinstance(AutoConfig.from_pretrained(small_streetclip_dir), StreetCLIPConfig)
    assert isinstance(AutoModel.from_pretrained(small_streetclip_dir), StreetCLIPForGeolocation)


IMAGE_CLASSIFICATION_SCRIPT = """
import json, sys
from transformers import pipeline

answers = {}
for repo_id in ("org/saved-model", "org/saved-pipeline"):
    classify = pipeline("image-classification", model=repo_id, trust_remote_code=True)
    answers[repo_id] = {"model": type(classify.model).__module__, "answers": classify(sys.argv[1:], top_k=5)}
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    return [str(path) for path in save_random_photos(tmp_path_factory.mktemp("photos"), ["a.png", "b.jpg", "c.png"])]


def save_region_model(source: Path, folder: Path, way: str) -> Path:
    """`source` saved as a user saves it: `model.save_pretrained` + `processor.save_pretrained`, or
    `pipe.save_pretrained` (the folder that publishing uploads, with its code for `trust_remote_code`)."""
    model = StreetCLIPForGeolocation.from_pretrained(source)
    processor = StreetCLIPProcessor.from_pretrained(source)
    if way == "pipeline":
        pipeline("geolocation", model=model, processor=processor).save_pretrained(folder)
    else:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def assert_joint_answers(answers: list[list[dict]], folder: Path, photos: list[str]) -> None:
    """`answers` of the image-classification pipeline are the geolocation pipeline's under `decision="joint"`."""
    expected = pipeline("geolocation", model=str(folder))(photos, top_k=5, decision="joint")
    for image_answers, image_expected in zip(answers, expected, strict=True):
        assert [answer["label"] for answer in image_answers] == [answer["label"] for answer in image_expected]
        assert [answer["score"] for answer in image_answers] == pytest.approx(
            [answer["joint_probability"] for answer in image_expected], abs=1e-5
        )


@pytest.mark.parametrize("way", ["model_and_processor", "pipeline"])
def test_the_stock_image_classification_pipeline_answers_the_joint_top_k_with_labels(
    region_streetclip_dir, tmp_path, photos, way
):
    folder = save_region_model(region_streetclip_dir, tmp_path, way)
    classify = pipeline("image-classification", model=str(folder))
    assert type(classify.model) is StreetCLIPForGeolocation
    answers = classify(photos, top_k=5)
    assert all(len(image_answers) == 5 for image_answers in answers)
    assert_joint_answers(answers, folder, photos)
    assert answers[0][0]["label"].count(", ") == 2  # "City, Region, Country"


@pytest.mark.slow
def test_the_stock_image_classification_pipeline_answers_without_the_package(region_streetclip_dir, tmp_path, photos):
    """Both ways of saving carry the code and `auto_map` that `trust_remote_code=True` needs."""
    folders = {
        "org/saved-model": save_region_model(region_streetclip_dir, tmp_path / "model", "model_and_processor"),
        "org/saved-pipeline": save_region_model(region_streetclip_dir, tmp_path / "pipeline", "pipeline"),
    }
    remote = run_as_hub_user(IMAGE_CLASSIFICATION_SCRIPT, photos, folders, tmp_path)
    for repo_id, folder in folders.items():
        assert remote[repo_id]["model"].startswith("transformers_modules."), repo_id
        assert_joint_answers(remote[repo_id]["answers"], folder, photos)


def atlantis_places() -> CandidatePlaces:
    """A custom table of three cities in two made-up countries."""
    return CandidatePlaces.from_records(
        [
            {"country": "Atlantis", "city": "Poseidonia", "latitude": 31.0, "longitude": -24.0},
            {"country": "Atlantis", "city": "Tritonis", "latitude": 32.0, "longitude": -25.0},
            {"country": "Lemuria", "city": "Mu", "latitude": -10.0, "longitude": 80.0},
        ]
    )


def test_custom_candidates_rebuild_heads_from_the_text_tower(tiny_clip_dir, pixel_values):
    places = atlantis_places()
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidates=places)
    expected = prompt_embeddings(
        tiny_clip_dir, ["A Street View photo in Atlantis.", "A Street View photo in Lemuria."]
    )
    torch.testing.assert_close(model.country_head.weight, expected, rtol=1e-4, atol=1e-5)
    outputs = model(pixel_values)
    assert set(outputs.predicted_city.tolist()) <= {0, 1, 2}
    for country, city in zip(outputs.predicted_country.tolist(), outputs.predicted_city.tolist(), strict=True):
        assert places.city_countries[city] == country


def test_restricting_countries_equals_rebuilding_for_them(small_streetclip_dir, tiny_clip_dir, pixel_values):
    restricted = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    restricted.restrict_countries(["Japan", "Kenya"])
    rebuilt = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=["Japan", "Kenya"], cities_per_country=5
    )
    assert restricted.candidate_places == rebuilt.candidate_places
    torch.testing.assert_close(restricted.country_head.weight, rebuilt.country_head.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(restricted.city_head.weight, rebuilt.city_head.weight, rtol=1e-4, atol=1e-5)
    assert torch.equal(restricted(pixel_values).predicted_city, rebuilt(pixel_values).predicted_city)


def test_restricting_to_an_unknown_country_lists_close_matches(small_streetclip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    with pytest.raises(
        ValueError, match=r"'Kenia' is not one of the 6 candidate countries of this model. Did you mean 'Kenya'"
    ):
        model.restrict_countries(["Kenia"])
    assert model.candidate_places.num_countries == len(SMALL_COUNTRIES)


def test_forward_returns_the_greedy_hierarchical_decision(small_streetclip_dir, pixel_values):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    outputs = model(pixel_values)
    assert isinstance(outputs, GeolocationOutput)
    assert torch.equal(outputs.predicted_country, outputs.country_logits.argmax(-1))
    places = model.candidate_places
    for image, (country, city) in enumerate(
        zip(outputs.predicted_country.tolist(), outputs.predicted_city.tolist(), strict=True)
    ):
        rows = places.cities_by_country[country]
        scores = model.city_head.weight[rows] @ outputs.image_embeds[image]
        assert city == rows[int(scores.argmax())]
        assert outputs.predicted_coordinates[image].tolist() == [
            places.city_latitudes[city],
            places.city_longitudes[city],
        ]
    assert outputs.predicted_coordinates.dtype == torch.float64


def test_top_k_beyond_the_number_of_cities_returns_every_city(small_streetclip_dir, pixel_values):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    ranked = rank_places(model, model(pixel_values[:1]), top_k=1000)
    assert sorted(ranked.city_rows[0].tolist()) == list(range(model.candidate_places.num_cities))
    torch.testing.assert_close(ranked.joint_probabilities[0].sum(), torch.tensor(1.0))


def test_gradients_reach_both_towers(tiny_clip_dir, pixel_values):
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Kenya"]).train()
    tokens = AutoTokenizer.from_pretrained(tiny_clip_dir)(["a photo"] * 2, return_tensors="pt")
    image = model.get_image_features(pixel_values=pixel_values[:2]).pooler_output
    text = model.get_text_features(**tokens).pooler_output
    (image * text).sum().backward()
    assert model.vision_model.embeddings.patch_embedding.weight.grad is not None
    assert model.text_model.embeddings.token_embedding.weight.grad is not None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cities_per_country": 0}, "cities_per_country must be >= 1"),
        ({"country_prompt_template": "A photo."}, "must contain {country}"),
        ({"region_prompt_template": ["In {region}.", "In {country}."]}, "must contain {region}"),
        ({"levels": ["country", "city", "region"]}, r"levels must be \['country', 'city'\] \(the paper's\) or"),
        ({"city_allocation": "uniform"}, "city_allocation must be one of per_country, sqrt_population"),
        ({"city_budget": 0}, "city_budget must be >= 1"),
        ({"city_merge_radius_km": -1}, "city_merge_radius_km must be >= 0"),
        ({"city_merge_radius_km": float("nan")}, "city_merge_radius_km must be >= 0"),
        ({"expected_distance_candidates": 0}, "expected_distance_candidates must be >= 1"),
    ],
)
def test_bad_geolocation_settings_are_refused(settings, message):
    with pytest.raises(Exception, match=message):
        StreetCLIPConfig(**settings)


# Loading rules: countries by any spelling, vision_only="auto", templates, the candidate table's checksum


def test_candidate_countries_given_by_iso_code_or_another_spelling_become_the_papers_names(tiny_clip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=["JP", "Czechia", "ke"], cities_per_country=2
    )
    papers_names = ["Japan", "Czech Republic", "Kenya"]
    assert model.candidate_places.country_names == model.config.candidate_countries == papers_names
    expected = prompt_embeddings(tiny_clip_dir, [f"A Street View photo in {name}." for name in papers_names])
    torch.testing.assert_close(model.country_head.weight, expected, rtol=1e-4, atol=1e-5)


def test_unknown_candidate_country_fails_with_close_matches_before_any_weights_load(tiny_clip_dir, monkeypatch):
    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(lambda *_, **__: pytest.fail("weights loaded")))
    with pytest.raises(ValueError, match=r"Unknown country 'Frnace'.*Did you mean 'France'"):
        StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Japan", "Frnace"])


@pytest.mark.parametrize(
    ("checkpoint", "settings", "keeps_text_tower"),
    [
        ("small_streetclip_dir", {}, False),
        ("small_streetclip_dir", {"cities_per_country": 2}, True),
        ("small_streetclip_dir", {"country_prompt_template": "A photo taken in {country}."}, True),
        ("tiny_clip_dir", {"candidate_countries": ["Kenya"]}, True),
    ],
)
def test_vision_only_auto_drops_the_text_tower_exactly_when_no_head_needs_building(
    request, checkpoint, settings, keeps_text_tower
):
    model = StreetCLIPForGeolocation.from_pretrained(
        request.getfixturevalue(checkpoint), vision_only="auto", **settings
    )
    assert (model.text_model is not None) == keeps_text_tower
    assert model.country_head is not None and model.city_head is not None


def test_vision_only_accepts_only_true_false_or_auto(small_streetclip_dir):
    with pytest.raises(ValueError, match="vision_only must be True, False or 'auto', got 'yes'"):
        StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only="yes")


def test_a_new_prompt_template_rebuilds_the_heads_of_a_saved_folder_and_is_recorded(
    small_streetclip_dir, tiny_clip_dir
):
    template = "A photo taken in {country}."
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, country_prompt_template=template)
    expected = prompt_embeddings(tiny_clip_dir, [template.format(country=name) for name in SMALL_COUNTRIES])
    torch.testing.assert_close(model.country_head.weight, expected, rtol=1e-4, atol=1e-5)
    assert model.config.country_prompt_template == template


def test_set_candidates_takes_the_processor_or_prompts_it_tokenised_alike(tiny_clip_dir):
    processor = StreetCLIPProcessor.from_pretrained(tiny_clip_dir)
    places = atlantis_places()
    from_processor = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Kenya"])
    from_processor.set_candidates(places, processor)
    from_tokens = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Kenya"])
    from_tokens.set_candidates(places, processor.candidate_prompts(places))
    torch.testing.assert_close(from_tokens.country_head.weight, from_processor.country_head.weight)
    torch.testing.assert_close(from_tokens.city_head.weight, from_processor.city_head.weight)
    assert from_tokens.candidate_places == places


def test_prompts_tokenised_for_another_table_are_refused(tiny_clip_dir):
    processor = StreetCLIPProcessor.from_pretrained(tiny_clip_dir)
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Kenya"])
    places = atlantis_places()
    with pytest.raises(ValueError, match=r"tokenised for 1 country rows with \[2\] city rows and \[\] region rows"):
        model.set_candidates(places, processor.candidate_prompts(places.select([0])[0]))
    assert model.candidate_places.country_names == ["Kenya"]


def test_reordered_candidate_table_in_a_saved_folder_is_refused_naming_the_folder(small_streetclip_dir, tmp_path):
    folder = shutil.copytree(small_streetclip_dir, tmp_path / "edited")
    config = json.loads((folder / "config.json").read_text())
    cities = config["candidate_places"]["city_names"]
    cities[0], cities[1] = cities[1], cities[0]  # two cities of the first country: same sizes, wrong rows
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is not the one its prompt heads were built for") as raised:
        StreetCLIPForGeolocation.from_pretrained(folder, vision_only=True)
    assert str(folder) in str(raised.value)


def test_saved_heads_without_the_checksum_of_their_table_are_refused_naming_the_folder(small_streetclip_dir, tmp_path):
    folder = shutil.copytree(small_streetclip_dir, tmp_path / "unchecked")
    weights = load_file(folder / "model.safetensors")
    del weights["candidate_checksum"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="checksums differ, or it has none") as raised:
        StreetCLIPForGeolocation.from_pretrained(folder, vision_only=True)
    assert str(folder) in str(raised.value)


def test_a_folder_whose_heads_are_missing_rebuilds_them_from_its_processor_or_loads_with_a_warning(
    small_streetclip_dir, tmp_path
):
    folder = shutil.copytree(small_streetclip_dir, tmp_path / "headless")
    weights = load_file(folder / "model.safetensors")
    for name in ("country_head.weight", "city_head.weight"):
        del weights[name]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    expected = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    rebuilt = StreetCLIPForGeolocation.from_pretrained(folder)
    torch.testing.assert_close(rebuilt.city_head.weight, expected.city_head.weight, rtol=1e-4, atol=1e-5)
    for path in folder.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            path.unlink()
    with CaptureLogger(modeling.logger) as captured:
        model = StreetCLIPForGeolocation.from_pretrained(folder)
    assert f"{str(folder)!r} lacks its prompt heads, and they cannot be rebuilt" in captured.out
    assert "holds no image processor or tokenizer files" in captured.out and "model.set_candidates(" in captured.out
    assert model.city_head.weight.shape == expected.city_head.weight.shape


def test_model_folder_without_processor_files_names_the_folder_and_the_fix_when_heads_must_be_built(
    small_streetclip_dir, tmp_path
):
    folder = tmp_path / "model-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(small_streetclip_dir / name, folder / name)
    with pytest.raises(OSError, match="holds no image processor or tokenizer files") as raised:
        StreetCLIPForGeolocation.from_pretrained(folder, cities_per_country=2)
    assert f"StreetCLIPProcessor.from_pretrained(CHECKPOINT_IT_CAME_FROM).save_pretrained({str(folder)!r})" in str(
        raised.value
    )


# Conformance with transformers: outputs, configuration overrides, Accelerate's loading paths, the meta device


def test_logits_are_log_joint_probabilities_over_the_whole_table_labelled_by_id2label(
    region_streetclip_dir, pixel_values
):
    model = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir, vision_only=True)
    places = model.candidate_places
    outputs = model(pixel_values)
    assert outputs.logits.shape == (len(pixel_values), places.num_cities)
    torch.testing.assert_close(outputs.logits.exp().sum(dim=-1), torch.ones(len(pixel_values)))
    ranked = rank_places(model, outputs, top_k=places.num_cities, decision="joint")
    torch.testing.assert_close(outputs.logits.exp().gather(1, ranked.city_rows), ranked.joint_probabilities)
    assert model.config.id2label == dict(enumerate(places.city_labels))
    assert model.config.label2id[places.city_labels[3]] == 3


def test_return_dict_false_gives_the_outputs_as_a_tuple(small_streetclip_dir, pixel_values):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    as_tuple = model(pixel_values, return_dict=False)
    as_output = model(pixel_values)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_output)
    for value, expected in zip(as_tuple, as_output.values(), strict=True):
        torch.testing.assert_close(value, expected)


@pytest.mark.parametrize(
    "overrides",
    [{"output_hidden_states": True}, {"output_attentions": True}, {"return_dict": False}],
    ids=["hidden_states", "attentions", "tuple"],
)
def test_configuration_overrides_in_from_pretrained_work_as_for_clip(small_streetclip_dir, pixel_values, overrides):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, **overrides)
    clip = CLIPModel.from_pretrained(small_streetclip_dir, **overrides)
    (name, value), layers = next(iter(overrides.items())), model.config.vision_config.num_hidden_layers
    assert getattr(model.config, name) == getattr(clip.config, name) == value
    with torch.no_grad():
        outputs = model(pixel_values)
    if name == "return_dict":
        assert isinstance(outputs, tuple)
    elif name == "output_hidden_states":
        assert len(outputs.hidden_states) == layers + 1
    else:
        assert len(outputs.attentions) == layers
        assert outputs.attentions[0].shape[:2] == (len(pixel_values), model.config.vision_config.num_attention_heads)


def test_loading_instructions_survive_the_conversion_of_a_plain_clip_checkpoint(tiny_clip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=["Kenya"], attn_implementation="eager", dtype=torch.bfloat16
    )
    assert model.config._attn_implementation == model.config.vision_config._attn_implementation == "eager"
    assert model.dtype == model.city_head.weight.dtype == torch.bfloat16


# Accelerate warns of any top-level parameter or buffer in a device map, CLIPModel's own logit_scale included.
@pytest.mark.filterwarnings("ignore:The following device_map keys do not match any submodules:UserWarning")
def test_heads_offloaded_to_disk_give_the_answers_of_the_plain_load(region_streetclip_dir, tmp_path, pixel_values):
    plain = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir)
    device_map = {
        **dict.fromkeys(["text_model", "vision_model", "text_projection", "visual_projection"], "cpu"),
        **dict.fromkeys(["logit_scale", "candidate_checksum"], "cpu"),
        **dict.fromkeys(["country_head", "region_head", "city_head"], "disk"),
    }
    offloaded = StreetCLIPForGeolocation.from_pretrained(
        region_streetclip_dir, device_map=device_map, offload_folder=tmp_path
    )
    assert {offloaded.hf_device_map[name] for name in ("country_head", "region_head", "city_head")} == {"disk"}
    assert offloaded.city_head.weight.device.type == "meta"  # in memory only while a forward runs
    with torch.no_grad():
        expected, outputs = plain(pixel_values), offloaded(pixel_values)
    for name in ("logits", "country_logits", "region_logits", "city_logits"):
        torch.testing.assert_close(outputs[name], expected[name])
    for decision in ("greedy", "joint", "expected_distance"):
        assert torch.equal(
            rank_places(offloaded, outputs, top_k=5, decision=decision).city_rows,
            rank_places(plain, expected, top_k=5, decision=decision).city_rows,
        )
    with pytest.raises(ValueError, match="cannot subset country_head: it is offloaded"):
        offloaded.restrict_countries(["Japan"])


def test_a_model_built_on_the_meta_device_gets_its_buffers_from_init_weights(small_streetclip_dir, pixel_values):
    config = StreetCLIPConfig.from_pretrained(small_streetclip_dir)
    reference = StreetCLIPForGeolocation(config)
    with torch.device("meta"):
        model = StreetCLIPForGeolocation(config)
    model.to_empty(device="cpu")
    model.init_weights()
    buffers = dict(reference.named_buffers())
    assert {"candidate_checksum", "city_countries"} <= buffers.keys()
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
