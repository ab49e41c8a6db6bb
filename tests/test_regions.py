"""The optional region level (country -> first-level region -> city) through every way a model is used: the model,
saved folders, vision-only loading, the pipeline, `streetclip locate`, the benchmark runner and publishing; and
`--decision` on the command line and the benchmark runner."""

import csv
import json
import shutil
from pathlib import Path

import benchmark
import card
import publish
import pytest
import torch
import torch.nn.functional as F
from builders import run_as_hub_user, save_random_photos
from safetensors import safe_open
from transformers import AutoTokenizer, CLIPModel, pipeline

from modeling_streetclip import CandidatePlaces, StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app.records import ANSWER_FIELDS, DECISION_FIELDS, options_path
from modeling_streetclip.cli import build_parser
from modeling_streetclip.cli import main as streetclip
from modeling_streetclip.configuration_streetclip import (
    PAPER_LEVELS,
    RECOMMENDED_CANDIDATE_SETTINGS,
    REGION_LEVELS,
)
from modeling_streetclip.decisions import DECISIONS, ZERO_SHOT_DECISIONS, rank_places
from modeling_streetclip.testing_utils import (
    SMALL_COUNTRIES,
    TINY_IMAGE_SIZE,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return save_random_photos(tmp_path_factory.mktemp("photos"), [f"photo-{seed}.png" for seed in range(4)])


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(3))


def test_the_paper_two_levels_are_the_default(tiny_clip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidate_countries=["Kenya"])
    assert tuple(model.config.levels) == PAPER_LEVELS
    assert model.region_head is None and not model.candidate_places.has_regions


def test_region_heads_of_every_country_are_built_at_load(tiny_clip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=SMALL_COUNTRIES, cities_per_country=8, levels=REGION_LEVELS
    )
    assert model.config.levels == list(REGION_LEVELS) and model.uses_regions
    places = model.candidate_places
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    prompts = StreetCLIPProcessor.from_pretrained(tiny_clip_dir).render_region_prompts(
        places.region_names, [places.country_names[country] for country in places.region_countries]
    )
    tokens = AutoTokenizer.from_pretrained(tiny_clip_dir)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1) * clip.logit_scale.exp()
    torch.testing.assert_close(model.region_head.weight, expected, rtol=1e-4, atol=1e-5)


def test_the_region_decision_restricts_the_cities(region_streetclip_dir, pixel_values):
    model = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir, vision_only=True)
    places = model.candidate_places
    embeds = model(pixel_values).image_embeds[:1]
    country = int(model.locate_embeddings(embeds).predicted_country[0])
    cities = places.cities_by_country[country]
    best_in_country = cities[int((model.city_head.weight[cities] @ embeds[0]).argmax())]
    other = next(r for r in places.regions_by_country[country] if r != places.city_regions[best_in_country])
    # Make another region of that country the clear choice: the answer must then be that region's best city.
    model.region_head.weight.data[other] = 100 * embeds[0]
    outputs = model.locate_embeddings(embeds)
    assert int(outputs.predicted_region[0]) == other
    in_region = places.cities_by_region[other]
    assert int(outputs.predicted_city[0]) == in_region[int((model.city_head.weight[in_region] @ embeds[0]).argmax())]
    assert int(outputs.predicted_city[0]) != best_in_country
    assert set(rank_places(model, outputs, top_k=len(in_region)).city_rows[0].tolist()) == set(in_region)


def test_saved_folder_carries_the_region_head_table_and_checksum(region_streetclip_dir, tmp_path):
    config = json.loads((region_streetclip_dir / "config.json").read_text())
    assert config["levels"] == list(REGION_LEVELS)
    table = config["candidate_places"]
    assert {"region_names", "region_countries", "city_regions"} <= set(table)
    with safe_open(region_streetclip_dir / "model.safetensors", "pt") as weights:
        assert weights.get_tensor("region_head.weight").shape[0] == len(table["region_names"])
    # A region renamed apart from the head it was built for is caught on load.
    edited = shutil.copytree(region_streetclip_dir, tmp_path / "edited")
    table["region_names"][0] = "Atlantis"
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="checksums differ"):
        StreetCLIPForGeolocation.from_pretrained(edited)


def test_saved_folder_reloads_with_identical_answers_and_vision_only_too(
    region_streetclip_dir, tiny_clip_dir, pixel_values
):
    built = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=SMALL_COUNTRIES, cities_per_country=8, levels=list(REGION_LEVELS)
    )
    full = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir)
    vision = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir, vision_only=True)
    assert vision.text_model is None and vision.uses_regions
    with torch.no_grad():
        outputs = [model(pixel_values) for model in (built, full, vision)]
    for decision in ZERO_SHOT_DECISIONS:
        ranked = [
            rank_places(model, out, top_k=5, decision=decision)
            for model, out in zip((built, full, vision), outputs, strict=True)
        ]
        for other in ranked[1:]:
            assert torch.equal(other.city_rows, ranked[0].city_rows)
            for reference, value in zip(ranked[0][1:], other[1:], strict=True):
                torch.testing.assert_close(value, reference)
    assert torch.equal(outputs[2].predicted_region, outputs[0].predicted_region)


def test_restricting_countries_keeps_their_regions_and_region_heads(
    region_streetclip_dir, tiny_clip_dir, pixel_values
):
    model = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir, vision_only=True)
    model.restrict_countries(["Japan", "BR"])
    rebuilt = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=["Japan", "Brazil"], cities_per_country=8, levels=list(REGION_LEVELS)
    )
    assert model.candidate_places == rebuilt.candidate_places
    torch.testing.assert_close(model.region_head.weight, rebuilt.region_head.weight)
    assert torch.equal(model(pixel_values).predicted_region, rebuilt(pixel_values).predicted_region)


def test_pipeline_answers_name_the_region_and_its_probability(region_streetclip_dir, photos):
    geolocate = pipeline("geolocation", model=str(region_streetclip_dir))
    places = geolocate.model.candidate_places
    for answers in geolocate([str(path) for path in photos], top_k=4):
        for answer in answers:
            (row,) = [
                row
                for row in places.cities_by_country[places.country_index(answer["country"])]
                if places.city_names[row] == answer["city"]
            ]
            assert answer["region"] == places.region_names[places.city_regions[row]]
            assert answer["joint_probability"] == pytest.approx(
                answer["country_score"] * answer["region_score"] * answer["score"], rel=1e-5
            )
    assert set(ANSWER_FIELDS) - set(DECISION_FIELDS) == set(answers[0])


def test_decision_choices_of_the_command_line_are_the_decision_rules():
    for decision in DECISIONS:
        assert build_parser().parse_args(["locate", "photo.jpg", "--decision", decision]).decision == decision
    with pytest.raises(SystemExit):
        build_parser().parse_args(["locate", "photo.jpg", "--decision", "nearest"])


def test_locate_takes_a_decision_and_a_region_model_and_writes_the_region_columns(
    capsys, tmp_path, region_streetclip_dir, photos
):
    output = tmp_path / "answers.csv"
    arguments = [
        *map(str, photos),
        "--model",
        str(region_streetclip_dir),
        "--top_k",
        "3",
        "--num_workers",
        "0",
        "--output",
        str(output),
    ]
    assert streetclip(["locate", *arguments, "--decision", "joint"]) == 0
    with output.open(newline="") as file:
        rows = list(csv.DictReader(file))
    expected = pipeline("geolocation", model=str(region_streetclip_dir))(
        [str(path) for path in photos], top_k=3, decision="joint"
    )
    for row, answers in zip(rows, expected, strict=True):
        assert [row[f"city_{rank}"] for rank in (1, 2, 3)] == [answer["city"] for answer in answers]
        assert [row[f"region_{rank}"] for rank in (1, 2, 3)] == [answer["region"] for answer in answers]
        scores = [float(row[f"score_{rank}"]) for rank in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True)
        assert scores == pytest.approx([float(row[f"joint_probability_{rank}"]) for rank in (1, 2, 3)])
    assert json.loads(options_path(output).read_text())["options"]["decision"] == "joint"
    capsys.readouterr()
    # A rerun with another rule would mix two orders in one file: refused, naming the option.
    assert streetclip(["locate", *arguments, "--decision", "expected_distance"]) == 2
    assert "decision" in capsys.readouterr().err


def test_locate_with_the_default_rule_records_no_decision_so_earlier_files_stay_resumable(
    capsys, tmp_path, small_streetclip_dir, photos
):
    output = tmp_path / "answers.jsonl"
    arguments = [str(photos[0]), "--model", str(small_streetclip_dir), "--num_workers", "0", "--output", str(output)]
    assert streetclip(["locate", *arguments]) == 0
    assert "decision" not in json.loads(options_path(output).read_text())["options"]
    (record,) = [json.loads(line) for line in output.read_text().splitlines()]
    assert "region" not in record["answers"][0] and "joint_probability" in record["answers"][0]
    assert streetclip(["locate", *arguments, "--decision", "greedy"]) == 0
    assert "1 were recorded by an earlier run" in capsys.readouterr().err


def test_pooled_views_follow_the_decision_too(capsys, tmp_path, small_streetclip_dir, photos):
    arguments = [*map(str, photos), "--model", str(small_streetclip_dir), "--num_workers", "0", "--top_k", "4"]
    assert streetclip(["locate", *arguments, "--group_by", r"(photo)-\d", "--decision", "expected_distance"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    distances = [answer["expected_distance_km"] for answer in record["answers"]]
    assert distances == sorted(distances) and len(distances) == 4


def test_benchmark_runner_scores_a_region_model_under_a_decision_and_records_it(
    tmp_path, region_streetclip_dir, photos
):
    metadata = tmp_path / "benchmark.csv"
    metadata.write_text("IMG_ID,LAT,LON\n" + "".join(f"{path.name},48.85,2.35\n" for path in photos))
    output_dir = tmp_path / "results"
    benchmark.main(
        [
            "--model", str(region_streetclip_dir), "--data", str(metadata), "--image_dir", str(photos[0].parent),
            "--output_dir", str(output_dir), "--num_workers", "0", "--top_k", "2", "--decision", "expected_distance",
        ]
    )  # fmt: skip
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["decision"] == "expected_distance" and metrics["levels"] == list(REGION_LEVELS)
    assert metrics["num_candidate_regions"] > len(SMALL_COUNTRIES) and metrics["n"] == len(photos)
    with (output_dir / "predictions.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    expected = pipeline("geolocation", model=str(region_streetclip_dir))(
        [str(path) for path in photos], top_k=2, decision="expected_distance"
    )
    assert [row["predicted_city"] for row in rows] == [answers[0]["city"] for answers in expected]
    assert [row["predicted_region"] for row in rows] == [answers[0]["region"] for answers in expected]


PUBLISHED_REGION_SCRIPT = """
import json, sys
from transformers import pipeline

repo_id, images = sys.argv[1], sys.argv[2:]
geolocate = pipeline("geolocation", model=repo_id, trust_remote_code=True)
print(json.dumps({decision: geolocate(images, top_k=3, decision=decision) for decision in
                  ("greedy", "joint", "expected_distance")}))
"""


@pytest.mark.slow
def test_a_published_region_model_answers_without_the_package_as_with_it(region_streetclip_dir, photos, tmp_path):
    repo = tmp_path / "repo"
    assert publish.main([str(region_streetclip_dir), "org/regions", "--dry_run", str(repo)]) == 0
    assert "region_head.weight" in safe_open(repo / "model.safetensors", "pt").keys()
    assert (
        StreetCLIPProcessor.from_pretrained(repo).region_prompt_template
        == StreetCLIPProcessor.from_pretrained(region_streetclip_dir).region_prompt_template
    )
    images = [str(path) for path in photos]
    remote = run_as_hub_user(PUBLISHED_REGION_SCRIPT, ["org/regions", *images], {"org/regions": repo}, tmp_path)
    local = pipeline("geolocation", model=str(region_streetclip_dir))
    for decision, answers in remote.items():
        expected = local(images, top_k=3, decision=decision)
        for remote_answers, local_answers in zip(answers, expected, strict=True):
            assert [(a["city"], a["region"]) for a in remote_answers] == [
                (a["city"], a["region"]) for a in local_answers
            ]
            for remote_answer, local_answer in zip(remote_answers, local_answers, strict=True):
                assert remote_answer.keys() == local_answer.keys()
                for key, value in local_answer.items():
                    assert remote_answer[key] == (
                        value if isinstance(value, str) or value is None else pytest.approx(value, rel=1e-5)
                    )


def test_model_card_describes_the_region_level_the_decision_rules_and_the_candidate_rule(region_streetclip_dir):
    config = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir, vision_only=True).config
    text = card.build_model_card(config, "org/regions").text
    places = CandidatePlaces.from_dict(config.candidate_places)
    assert "first-level\n  regions (GeoNames admin1: states, provinces) of the best country, " in text
    assert f"{places.num_regions} in all" in text and "`region_head`" in text
    assert "`A Street View photo in {region}, {country}.`" in text
    assert "`region_score` (p(region | country))" in text and '`"expected_distance"` by the expected distance' in text
    assert "square root" not in text and "merged" not in text  # the paper's table, as this model has it

    recommended = StreetCLIPConfig(**RECOMMENDED_CANDIDATE_SETTINGS, candidate_places=places.to_dict())
    text = card.build_model_card(recommended, "org/recommended").text
    assert "square root of each one's urban population" in text
    assert "merged into the most populous candidate within\n  25 km" in text
    assert "first-level\n  regions" in text
