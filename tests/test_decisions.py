"""Decision rules (greedy, joint, expected distance) against brute-force references, and prompt ensembles."""

import copy
import math
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoTokenizer, CLIPModel

from modeling_streetclip import (
    CandidatePlaces,
    GeolocationOutput,
    RankedPlaces,
    StreetCLIPForGeolocation,
    StreetCLIPProcessor,
)
from modeling_streetclip.decisions import (
    ZERO_SHOT_DECISIONS,
    expected_distances_km,
    place_probabilities,
    rank_places,
    within_km,
)
from modeling_streetclip.geodesy import CONFIDENCE_RADII_KM
from modeling_streetclip.testing_utils import TINY_IMAGE_SIZE


@pytest.fixture(scope="module")
def haversine_km():
    """The metric's own distance, as the references measure with."""
    metric = evaluate.load(str(Path(__file__).resolve().parents[1] / "eval" / "geodesic_accuracy"))
    return sys.modules[type(metric).__module__].haversine_km


@pytest.fixture(params=["two_levels", "region_level"])
def model(request, small_streetclip_dir, region_streetclip_dir) -> StreetCLIPForGeolocation:
    folder = small_streetclip_dir if request.param == "two_levels" else region_streetclip_dir
    return StreetCLIPForGeolocation.from_pretrained(folder, vision_only=True)


@pytest.fixture(scope="module")
def pixel_values() -> torch.Tensor:
    return torch.randn(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def brute_force(model: StreetCLIPForGeolocation, image_embeds: torch.Tensor, haversine_km) -> list[dict]:
    """For each image, every city's probabilities and its order under each rule, computed city by city from the
    heads, without any of the model's search."""
    places = model.candidate_places
    latitudes, longitudes = np.array(places.city_latitudes), np.array(places.city_longitudes)
    distances = haversine_km(latitudes[:, None], longitudes[:, None], latitudes[None, :], longitudes[None, :])
    decision_radius = CONFIDENCE_RADII_KM.index(model.config.decision_radius_km)
    results = []
    for embed in image_embeds:
        country_logits = model.country_head.weight @ embed
        city_logits = model.city_head.weight @ embed
        region_logits = model.region_head.weight @ embed if places.has_regions else None
        cities = []
        for row in range(places.num_cities):
            country = places.city_countries[row]
            p_country = country_logits.softmax(-1)[country].item()
            if places.has_regions:
                region = places.city_regions[row]
                siblings = places.regions_by_country[country]
                p_region = region_logits[siblings].softmax(-1)[siblings.index(region)].item()
                parent_cities = places.cities_by_region[region]
                region_key = (-region_logits[region].item(), siblings.index(region))
            else:
                p_region, parent_cities, region_key = 1.0, places.cities_by_country[country], ()
            p_city = city_logits[parent_cities].softmax(-1)[parent_cities.index(row)].item()
            position = places.cities_by_country[country].index(row)
            cities.append(
                {
                    "row": row,
                    "country": p_country,
                    "region": p_region,
                    "city": p_city,
                    "joint": p_country * p_region * p_city,
                    "greedy_key": (
                        -country_logits[country].item(),
                        country,
                        *region_key,
                        -city_logits[row].item(),
                        position,
                    ),
                }
            )
        by_joint = sorted(cities, key=lambda city: -city["joint"])
        for city in cities:
            # The mass of every city within each radius of this one: what its `within_km` holds.
            city["within"] = [
                sum(other["joint"] for other in cities if distances[city["row"], other["row"]] <= radius)
                for radius in CONFIDENCE_RADII_KM
            ]
            city["within_decision_radius"] = city["within"][decision_radius]
        pool = by_joint[: min(model.config.expected_distance_candidates, len(cities))]
        total = sum(city["joint"] for city in pool)
        for candidate in pool:
            # The O(n^2) definition: the posterior-weighted distance from this candidate to every candidate.
            candidate["expected_km"] = sum(
                other["joint"]
                / total
                * float(
                    haversine_km(
                        places.city_latitudes[candidate["row"]],
                        places.city_longitudes[candidate["row"]],
                        places.city_latitudes[other["row"]],
                        places.city_longitudes[other["row"]],
                    )
                )
                for other in pool
            )
        results.append(
            {
                "greedy": sorted(cities, key=lambda city: city["greedy_key"]),
                "joint": by_joint,
                "expected_distance": sorted(pool, key=lambda city: city["expected_km"]),
                "within_km": sorted(pool, key=lambda city: -city["within_decision_radius"]),
            }
        )
    return results


SCORE_OF = {"greedy": "city", "joint": "joint", "expected_distance": "joint", "within_km": "within_decision_radius"}


@pytest.mark.parametrize("top_k", [1, 3, None])
@pytest.mark.parametrize("decision", ZERO_SHOT_DECISIONS)
def test_each_rule_matches_a_brute_force_reference(model, pixel_values, decision, top_k, haversine_km):
    outputs = model(pixel_values)
    references = brute_force(model, outputs.image_embeds, haversine_km)
    # None: every answer the rule ranks (all cities; the posterior's candidates for expected distance).
    top_k = top_k or len(references[0][decision])
    ranked = rank_places(model, outputs, top_k=top_k, decision=decision)
    assert isinstance(ranked, RankedPlaces)
    for image, reference in enumerate(references):
        expected = reference[decision][:top_k]
        assert ranked.city_rows[image].tolist() == [city["row"] for city in expected]
        for field, key in (
            ("scores", SCORE_OF[decision]),
            ("country_scores", "country"),
            ("region_scores", "region"),
            ("joint_probabilities", "joint"),
        ):
            torch.testing.assert_close(
                getattr(ranked, field)[image].double(),
                torch.tensor([city[key] for city in expected], dtype=torch.float64),
                rtol=1e-4,
                atol=1e-6,
                msg=f"{decision}: {field} of image {image}",
            )
        torch.testing.assert_close(
            ranked.within_km[image], torch.tensor([city["within"] for city in expected], dtype=torch.float64)
        )
        if decision == "expected_distance":
            torch.testing.assert_close(
                ranked.expected_distances_km[image],
                torch.tensor([city["expected_km"] for city in expected], dtype=torch.float64),
                rtol=1e-4,
                atol=1e-6,
            )
        else:
            assert ranked.expected_distances_km is None


@pytest.mark.parametrize("decision", ZERO_SHOT_DECISIONS)
def test_answers_are_monotone_in_the_rules_criterion(model, decision):
    pixel_values = torch.randn(16, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    ranked = rank_places(model, model(pixel_values), top_k=12, decision=decision)
    places = model.candidate_places
    for image in range(len(pixel_values)):
        scores = ranked.scores[image].tolist()
        if decision == "greedy":
            # Countries by p(country); inside one, regions by p(region | country), then cities by p(city | ...).
            keys = [
                (country, places.city_regions[row] if places.has_regions else 0, region, score)
                for row, country, region, score in zip(
                    ranked.city_rows[image].tolist(),
                    ranked.country_scores[image].tolist(),
                    ranked.region_scores[image].tolist(),
                    scores,
                    strict=True,
                )
            ]
            countries = [key[0] for key in keys]
            assert countries == sorted(countries, reverse=True)
            for before, after in zip(keys, keys[1:], strict=False):
                if before[0] == after[0]:
                    assert before[2] >= after[2]
                    if before[1] == after[1]:
                        assert before[3] >= after[3]
        elif decision == "joint":
            assert scores == sorted(scores, reverse=True)
        elif decision == "expected_distance":
            distances = ranked.expected_distances_km[image].tolist()
            assert distances == sorted(distances)
        else:
            assert scores == sorted(scores, reverse=True)
        # Under every rule `scores` is a probability, as image-classification clients read it.
        assert all(0 <= score <= 1 for score in scores)
    # Under every rule the mass within a radius of an answer grows with the radius, and `radius_km` is the first
    # radius whose mass reaches the configured level.
    within = ranked.within_km
    assert (within.diff(dim=-1) >= 0).all() and ((within >= 0) & (within <= 1)).all()
    reached = within >= model.config.confidence_level
    for answer, radius in zip(reached.flatten(0, 1).tolist(), ranked.radius_km.flatten().tolist(), strict=True):
        expected = next((r for r, hit in zip(CONFIDENCE_RADII_KM, answer, strict=True) if hit), None)
        assert (radius if not math.isinf(radius) else None) == expected
    assert not ranked.calibrated.any()


def test_greedy_first_answer_is_the_forward_decision_and_the_rest_follow_its_country(model, pixel_values):
    outputs = model(pixel_values)
    places = model.candidate_places
    widest = max(len(rows) for rows in places.cities_by_country)
    ranked = rank_places(model, outputs, top_k=widest + 3)
    assert torch.equal(ranked.city_rows[:, 0], outputs.predicted_city)
    for image, rows in enumerate(ranked.city_rows.tolist()):
        first_country = places.city_countries[rows[0]]
        count = len(places.cities_by_country[first_country])
        assert [places.city_countries[row] for row in rows[:count]] == [first_country] * count
        assert places.city_countries[rows[count]] != first_country
        if places.has_regions:
            assert places.city_regions[rows[0]] == int(outputs.predicted_region[image])


def test_greedy_ties_between_regions_break_as_the_forward_decision_does(tiny_clip_dir):
    # Two regions of one name have identical prompts, so identical logits: the first listed wins in `forward`, and
    # must win in the ranking too, even where the other holds the city with the higher logit.
    places = CandidatePlaces(
        country_names=["Japan"],
        country_codes=["JP"],
        city_names=["A", "B", "C"],
        city_countries=[0, 0, 0],
        city_latitudes=[35.0, 34.0, 33.0],
        city_longitudes=[139.0, 135.0, 131.0],
        region_names=["Twin", "Twin"],
        region_countries=[0, 0],
        city_regions=[0, 1, 1],
    )
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidates=places)
    # The text tower encodes the two prompts in one padded batch, where a row's kernel can differ in the last bit;
    # the tie under test is between equal rows, so make them equal.
    model.region_head.weight.data[1] = model.region_head.weight.data[0]
    embeds = F.normalize(torch.randn(1, model.projection_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    model.city_head.weight.data = torch.stack([embeds[0], 10 * embeds[0], -embeds[0]])
    outputs = model.locate_embeddings(embeds)
    assert outputs.predicted_region.tolist() == [0] and outputs.predicted_city.tolist() == [0]
    assert rank_places(model, outputs, top_k=3).city_rows.tolist() == [[0, 1, 2]]


def test_expected_distance_is_the_bayes_decision_on_a_hand_made_posterior_where_joint_differs(
    tiny_clip_dir, haversine_km
):
    # Paris is the single most probable city, but Tokyo and Osaka, 400 km apart, hold more mass together: a guess
    # between them is expected to land far closer to the truth than Paris.
    places = CandidatePlaces.from_records(
        [
            {"country": "France", "city": "Paris", "latitude": 48.8566, "longitude": 2.3522},
            {"country": "Japan", "city": "Tokyo", "latitude": 35.6762, "longitude": 139.6503},
            {"country": "Japan", "city": "Osaka", "latitude": 34.6937, "longitude": 135.5023},
        ]
    )
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidates=places)
    posterior = [0.4, 0.3, 0.3]
    outputs = GeolocationOutput(
        country_logits=torch.tensor([[math.log(0.4), math.log(0.6)]]),
        city_logits=torch.zeros(1, 3),  # p(city | country) uniform: 1/2 each in Japan
    )
    joint = rank_places(model, outputs, top_k=3, decision="joint")
    assert joint.city_rows[0].tolist()[0] == 0
    torch.testing.assert_close(joint.scores[0], torch.tensor([0.4, 0.3, 0.3]))

    expected_km = [
        sum(
            weight * float(haversine_km(places.city_latitudes[i], places.city_longitudes[i], latitude, longitude))
            for weight, latitude, longitude in zip(
                posterior, places.city_latitudes, places.city_longitudes, strict=True
            )
        )
        for i in range(3)
    ]
    order = sorted(range(3), key=expected_km.__getitem__)
    ranked = rank_places(model, outputs, top_k=3, decision="expected_distance")
    assert ranked.city_rows[0].tolist() == order
    assert order[0] != 0, "the hand-made posterior must separate the two rules"
    torch.testing.assert_close(ranked.expected_distances_km[0], torch.tensor(sorted(expected_km), dtype=torch.float64))
    torch.testing.assert_close(ranked.joint_probabilities[0], torch.tensor([posterior[i] for i in order]))
    torch.testing.assert_close(ranked.scores, ranked.joint_probabilities)
    (only,) = rank_places(model, outputs, top_k=1, decision="expected_distance").city_rows[0].tolist()
    assert only == order[0], "the decision considers the posterior's candidates, not only the top_k answers"


def test_expected_distances_equal_the_explicit_double_sum(haversine_km):
    probabilities = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64).numpy()
    latitudes = torch.tensor([0.0, 10.0, -45.0, 80.0], dtype=torch.float64).numpy()
    longitudes = torch.tensor([0.0, 170.0, -60.0, 20.0], dtype=torch.float64).numpy()
    explicit = [
        sum(
            probabilities[j] * haversine_km(latitudes[i], longitudes[i], latitudes[j], longitudes[j]) for j in range(4)
        )
        for i in range(4)
    ]
    torch.testing.assert_close(
        torch.from_numpy(expected_distances_km(probabilities, latitudes, longitudes)),
        torch.tensor(explicit, dtype=torch.float64),
    )


def test_the_posterior_of_expected_distance_spans_the_configured_number_of_candidates(
    small_streetclip_dir, pixel_values
):
    few = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, expected_distance_candidates=1)
    # With one candidate, the posterior is that city alone: its expected distance is 0 and it is the joint's best.
    ranked = rank_places(few, few(pixel_values), top_k=1, decision="expected_distance")
    assert ranked.expected_distances_km.eq(0).all()
    assert torch.equal(ranked.city_rows, rank_places(few, few(pixel_values), top_k=1, decision="joint").city_rows)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"decision": "nearest"}, "Unknown decision rule 'nearest'"),
        ({"top_k": 0}, "top_k must be a positive integer, got 0"),
    ],
)
def test_bad_rank_options_are_refused(small_streetclip_dir, pixel_values, options, error):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    with pytest.raises(ValueError, match=error):
        rank_places(model, model(pixel_values), **options)


@pytest.mark.parametrize("decision", ZERO_SHOT_DECISIONS)
def test_country_rows_give_the_answers_of_a_model_restricted_to_those_countries(model, pixel_values, decision):
    countries = ["Kenya", "JP", "Brazil"]
    rows = [model.candidate_places.country_index(name) for name in countries]
    restricted = copy.deepcopy(model)
    restricted.restrict_countries(countries)
    # The restricted table lists those countries' cities in that order: map its rows back to this model's.
    _, city_rows, _ = model.candidate_places.select(rows)
    outputs, expected_outputs = model(pixel_values), restricted(pixel_values)
    ranked = rank_places(model, outputs, top_k=7, decision=decision, country_rows=rows)
    expected = rank_places(restricted, expected_outputs, top_k=7, decision=decision)
    assert ranked.city_rows.tolist() == [[city_rows[row] for row in image] for image in expected.city_rows.tolist()]
    for field in RankedPlaces._fields[1:]:
        if getattr(expected, field) is not None:
            torch.testing.assert_close(
                getattr(ranked, field), getattr(expected, field), rtol=1e-4, atol=1e-6, equal_nan=True
            )
    probabilities = place_probabilities(model, outputs, ranked.city_rows, country_rows=rows)
    torch.testing.assert_close(probabilities["country_scores"], expected.country_scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probabilities["joint_probabilities"], expected.joint_probabilities)
    assert ranked.country_scores.sum() > rank_places(model, outputs, top_k=7, decision=decision).country_scores.sum()


def test_top_k_under_country_rows_is_capped_at_their_cities(small_streetclip_dir, pixel_values):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    kenya = model.candidate_places.country_index("Kenya")
    ranked = rank_places(model, model(pixel_values), top_k=100, decision="joint", country_rows=[kenya])
    assert sorted(ranked.city_rows[0].tolist()) == model.candidate_places.cities_by_country[kenya]
    torch.testing.assert_close(ranked.country_scores, torch.ones_like(ranked.country_scores))


@pytest.mark.parametrize(
    ("country_rows", "error"),
    [([], "country_rows is empty"), ([0, 99], "holds 99, which is not a row"), (["Kenya"], "holds 'Kenya'")],
)
def test_bad_country_rows_are_refused(small_streetclip_dir, pixel_values, country_rows, error):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    with pytest.raises(ValueError, match=error):
        rank_places(model, model(pixel_values), country_rows=country_rows)


ENSEMBLE = {
    "country_prompt_template": ["A Street View photo in {country}.", "A road in {country}."],
    "city_prompt_template": ["A Street View photo from {city}.", "Streets of {city}, {country}.", "{city}."],
}


def ensemble_rows(clip_dir, templates: list[str], **places) -> torch.Tensor:
    """Head rows by their definition: per place, the normalised mean of CLIP's normalised text features of each
    template's prompt, times the logit scale."""
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    names = list(zip(*places.values(), strict=True))
    rows = []
    for values in names:
        fields = dict(zip(places, values, strict=True))
        prompts = [template.format(**fields) for template in templates]
        with torch.no_grad():
            features = clip.get_text_features(**tokenizer(prompts, padding=True, return_tensors="pt")).pooler_output
        rows.append(F.normalize(F.normalize(features, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows) * clip.logit_scale.exp()


def test_prompt_ensembles_give_the_normalised_mean_of_normalised_template_embeddings(tiny_clip_dir, tmp_path):
    model = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=["Kenya", "Japan"], cities_per_country=3, **ENSEMBLE
    )
    places = model.candidate_places
    torch.testing.assert_close(
        model.country_head.weight,
        ensemble_rows(tiny_clip_dir, ENSEMBLE["country_prompt_template"], country=places.country_names),
    )
    countries = [places.country_names[country] for country in places.city_countries]
    torch.testing.assert_close(
        model.city_head.weight,
        ensemble_rows(tiny_clip_dir, ENSEMBLE["city_prompt_template"], city=places.city_names, country=countries),
    )
    # The configuration records the ensembles, and a saved folder keeps them.
    model.save_pretrained(tmp_path)
    StreetCLIPProcessor.from_pretrained(tiny_clip_dir, **ENSEMBLE).save_pretrained(tmp_path)
    reloaded = StreetCLIPForGeolocation.from_pretrained(tmp_path, vision_only=True)
    assert reloaded.config.city_prompt_template == ENSEMBLE["city_prompt_template"]
    assert StreetCLIPProcessor.from_pretrained(tmp_path).country_prompt_template == ENSEMBLE["country_prompt_template"]
    torch.testing.assert_close(reloaded.city_head.weight, model.city_head.weight)


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        ({"city_prompt_template": []}, "city_prompt_template is an empty list"),
        (
            {"country_prompt_template": ["In {country}.", "A photo."]},
            "country_prompt_template='A photo.' must contain",
        ),
        ({"region_prompt_template": "In {country}."}, "region_prompt_template='In {country}.' must contain {region}"),
    ],
)
def test_ensembles_with_a_template_missing_its_place_are_refused(tiny_clip_dir, templates, message):
    with pytest.raises(ValueError, match=message):
        StreetCLIPProcessor.from_pretrained(tiny_clip_dir, **templates)


def test_confidence_radii_are_the_metrics_thresholds():
    geodesic = evaluate.load(str(Path(__file__).resolve().parents[1] / "eval" / "geodesic_accuracy"))
    assert CONFIDENCE_RADII_KM == sys.modules[type(geodesic).__module__].DEFAULT_THRESHOLDS_KM


def test_within_km_is_the_bayes_decision_where_joint_and_expected_distance_differ(tiny_clip_dir, haversine_km):
    # The counterexample, with C's mass shared with a neighbour 10 km away: B is the most probable city, A in
    # the middle is the nearest on average, yet C's 25 km holds the most mass.
    longitudes = {"A": 0.0, "B": -5.4, "C": 5.4, "C2": 5.49}
    posterior = [0.2, 0.38, 0.32, 0.10]
    countries = ["France", "Japan", "Kenya", "Brazil"]
    records = [
        {"country": country, "city": city, "latitude": 0.0, "longitude": longitude}
        for country, (city, longitude) in zip(countries, longitudes.items(), strict=True)
    ]
    model = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, candidates=CandidatePlaces.from_records(records))
    outputs = GeolocationOutput(
        country_logits=torch.tensor([posterior]).log(), city_logits=torch.zeros(1, 4)
    )  # one city per country: the joint is p(country)
    lon = np.array(list(longitudes.values()))
    distances = haversine_km(0.0, lon[:, None], 0.0, lon[None, :])
    within_25 = [sum(p for p, d in zip(posterior, row, strict=True) if d <= 25) for row in distances]
    expected_km = distances @ np.array(posterior)
    best = {
        "joint": int(np.argmax(posterior)),
        "expected_distance": int(np.argmin(expected_km)),
        "within_km": int(np.argmax(within_25)),
    }
    assert len(set(best.values())) == 3, "the hand-made posterior must separate the three rules"
    for decision, row in best.items():
        ranked = rank_places(model, outputs, top_k=4, decision=decision)
        assert ranked.city_rows[0, 0] == row, decision
    ranked = rank_places(model, outputs, top_k=4, decision="within_km")
    order = sorted(range(4), key=lambda i: -within_25[i])
    assert ranked.city_rows[0].tolist() == order
    torch.testing.assert_close(ranked.scores[0], torch.tensor([within_25[i] for i in order], dtype=torch.float64))
    torch.testing.assert_close(ranked.scores, ranked.within_km[..., CONFIDENCE_RADII_KM.index(25)])


@pytest.mark.parametrize("decision", ZERO_SHOT_DECISIONS)
def test_first_answers_do_not_depend_on_top_k(small_streetclip_dir, pixel_values, decision):
    # With a pool of 3, the rules that weigh a pool (expected distance, within_km) once widened it with top_k.
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, expected_distance_candidates=3)
    outputs = model(pixel_values)
    every = rank_places(model, outputs, top_k=model.candidate_places.num_cities, decision=decision)
    for top_k in (1, 2, 3, 7):
        ranked = rank_places(model, outputs, top_k=top_k, decision=decision)
        assert torch.equal(ranked.city_rows, every.city_rows[:, :top_k])
        torch.testing.assert_close(ranked.scores, every.scores[:, :top_k])


def test_a_stored_calibration_divides_each_levels_logits_by_its_temperature(region_streetclip_dir, pixel_values):
    temperatures = {"country": 2.0, "region": 0.5, "city": 3.0}
    model = StreetCLIPForGeolocation.from_pretrained(region_streetclip_dir, vision_only=True)
    calibrated = StreetCLIPForGeolocation.from_pretrained(
        region_streetclip_dir, vision_only=True, calibration={"temperatures": temperatures}
    )
    outputs = model(pixel_values)
    raw, scaled = rank_places(model, outputs, top_k=4), rank_places(calibrated, outputs, top_k=4)
    assert torch.equal(raw.city_rows, scaled.city_rows) and torch.equal(raw.scores, scaled.scores)
    assert scaled.calibrated.all() and not raw.calibrated.any()
    # The reference: the uncalibrated model's within_km of logits divided by hand.
    divided = GeolocationOutput(
        country_logits=outputs.country_logits / 2.0,
        region_logits=outputs.region_logits / 0.5,
        city_logits=outputs.city_logits / 3.0,
    )
    points = model.city_coordinates[scaled.city_rows]
    posterior = model.log_probabilities(divided.country_logits, divided.region_logits, divided.city_logits)
    torch.testing.assert_close(scaled.within_km, within_km(model, points, posterior["joint"].exp()))
    assert not torch.allclose(scaled.within_km, raw.within_km)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"calibration": {"temperatures": {"country": 1.0}}}, "must hold 'temperatures' for the levels"),
        ({"calibration": {"temperatures": {"country": 1.0, "city": 0.0}}}, "temperatures must be > 0"),
        ({"confidence_level": 1.0}, "confidence_level a probability strictly between 0 and 1"),
        ({"decision_radius_km": float("nan")}, "decision_radius_km must be a finite number"),
    ],
)
def test_bad_confidence_settings_are_refused(small_streetclip_dir, settings, message):
    # The configuration's validator raises a ValueError, which strict dataclasses wrap.
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True, **settings)


def test_a_stored_monotone_map_takes_each_radius_mass_and_keeps_it_non_decreasing(small_streetclip_dir, pixel_values):
    temperatures = {"country": 1.0, "city": 1.0}
    maps = {"1": {"x": [0.0, 1.0], "y": [0.0, 0.0]}, "200": {"x": [0.0, 1.0], "y": [0.0, 0.01]}}
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    mapped = StreetCLIPForGeolocation.from_pretrained(
        small_streetclip_dir, vision_only=True, calibration={"temperatures": temperatures, "within_km": maps}
    )
    outputs = model(pixel_values)
    raw, ranked = rank_places(model, outputs, top_k=3), rank_places(mapped, outputs, top_k=3)
    assert ranked.within_km[..., 0].eq(0).all()  # 1 km: mapped to 0
    torch.testing.assert_close(ranked.within_km[..., 1], raw.within_km[..., 1])  # 25 km: no map, identity
    # 200 km maps below 25 km's mass: the running maximum lifts it back, so that the mass never falls with radius.
    torch.testing.assert_close(ranked.within_km[..., 2], raw.within_km[..., 1])
    torch.testing.assert_close(ranked.within_km[..., 3:], raw.within_km[..., 3:])
    # Unequal lengths, shares above 1, NaN (bare NaN in JSON Lines), words, a fall,
    # and a radius the answers do not have.
    for bad in (
        {"1": {"x": [0.0]}},
        {"25": {"x": [0.0, 1.0], "y": [3.0, 3.0]}},
        {"25": {"x": [0.0, 1.0], "y": [0.0, math.nan]}},
        {"25": {"x": ["a", "b"], "y": [0.0, 1.0]}},
        {"25": {"x": [0.0, 1.0], "y": [0.5, 0.2]}},
        {"30": {"x": [0.0, 1.0], "y": [0.0, 1.0]}},
    ):
        with pytest.raises(
            StrictDataclassClassValidationError, match=r"calibration\['within_km'\]\['(1|25|30)'\] must be the knots"
        ):
            StreetCLIPForGeolocation.from_pretrained(
                small_streetclip_dir, calibration={"temperatures": temperatures, "within_km": bad}
            )
