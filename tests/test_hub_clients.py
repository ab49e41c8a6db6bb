"""The pipeline as the Hub's image-classification clients see it: answers that parse as their output elements under
every decision rule, and call parameters that cover the Hub's inference spec (issue 20)."""

import dataclasses
import inspect
import json
import re
import typing
from textwrap import dedent

import pytest
from huggingface_hub import (
    ImageClassificationInput,
    ImageClassificationOutputElement,
    ImageClassificationParameters,
)
from transformers import pipeline

from modeling_streetclip import GeolocationPipeline, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app.gallery_build import build_gallery
from modeling_streetclip.testing_utils import random_photo, write_geo_imagefolder


# The pipeline's own parameters beyond the Hub's image-classification spec; transformers allows `timeout` besides.
GEOLOCATION_ONLY_PARAMETERS = {"decision", "candidate_countries", "gallery"}


@pytest.fixture(scope="module", params=["two_levels", "region_level"])
def geolocate(request, small_streetclip_dir, region_streetclip_dir) -> GeolocationPipeline:
    folder = small_streetclip_dir if request.param == "two_levels" else region_streetclip_dir
    return pipeline("geolocation", model=str(folder))


@pytest.fixture(scope="module")
def gallery(small_streetclip_dir, tmp_path_factory):
    """A gallery of one synthetic photo per city, embedded by the small model."""
    photos = write_geo_imagefolder(tmp_path_factory.mktemp("photos") / "data", photos_per_city=1, seed=0)
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    processor = StreetCLIPProcessor.from_pretrained(small_streetclip_dir)
    folder = tmp_path_factory.mktemp("gallery") / "g"
    build_gallery(model, processor, str(photos), folder, progress=False)
    return folder


def assert_image_classification_answers(answers: list[dict], places) -> None:
    """The answers parse as the Hub's image-classification output, each labelled with its own candidate city and
    scored with a probability."""
    elements = ImageClassificationOutputElement.parse_obj_as_list(json.dumps(answers))
    assert [element.label for element in elements] == [answer["label"] for answer in answers]
    for element, answer in zip(elements, answers, strict=True):
        assert 0.0 <= element.score <= 1.0
        parts = [answer["city"], answer.get("region"), answer["country"]]
        assert element.label == ", ".join(part for part in parts if part is not None)
        assert element.label in places.city_labels


@pytest.mark.parametrize("decision", ["greedy", "joint", "expected_distance"])
def test_answers_parse_as_image_classification_elements_under_every_decision(geolocate, decision):
    places = geolocate.model.candidate_places
    for seed in range(3):
        answers = geolocate(random_photo(seed), top_k=5, decision=decision)
        assert_image_classification_answers(answers, places)
        assert ("expected_distance_km" in answers[0]) == (decision == "expected_distance")
    (first, *_), (second, *_) = geolocate([random_photo(0), random_photo(1)], decision=decision)
    assert_image_classification_answers([first, second], places)


def test_expected_distance_orders_by_its_own_field_and_scores_the_joint_probability(geolocate):
    answers = geolocate(random_photo(2), top_k=6, decision="expected_distance")
    distances = [answer["expected_distance_km"] for answer in answers]
    assert distances == sorted(distances) and distances[0] > 0
    assert [answer["score"] for answer in answers] == [answer["joint_probability"] for answer in answers]


@pytest.mark.parametrize("decision", ["gallery", "hybrid"])
def test_gallery_answers_parse_as_image_classification_elements(small_streetclip_dir, gallery, decision):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir), gallery=str(gallery))
    answers = geolocate(random_photo(4), top_k=3, decision=decision)
    assert_image_classification_answers(answers, geolocate.model.candidate_places)
    assert all("gallery_row" in answer for answer in answers)


def test_candidate_countries_are_refused_with_a_gallery_decision(small_streetclip_dir, gallery):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir), gallery=str(gallery))
    with pytest.raises(ValueError, match="candidate_countries does not apply to decision='gallery'"):
        geolocate(random_photo(4), candidate_countries=["JP"])


def test_the_hubs_parameters_object_passes_straight_to_the_pipeline(geolocate):
    parameters = ImageClassificationParameters(function_to_apply="softmax", top_k=3)
    answers = geolocate(random_photo(1), **dataclasses.asdict(parameters))
    assert answers == geolocate(random_photo(1), top_k=3)


def documented_arguments(docstring: str) -> list[str]:
    """The names of a Google-style docstring's `Args:` block, read by indentation as transformers' pipeline tests
    read them (`parse_args_from_docstring_by_indentation`)."""
    lines = [(len(line) - len(line.lstrip()), line.strip()) for line in dedent(docstring).splitlines() if line.strip()]
    start = next(number for number, (_, line) in enumerate(lines) if line == "Args:")
    indent = lines[start][0]
    block = []
    for line_indent, line in lines[start + 1 :]:
        if line_indent <= indent:
            break
        block.append((line_indent, line))
    outer = min(line_indent for line_indent, _ in block)
    return [re.match(r"(\w+)\W", line).group(1) for line_indent, line in block if line_indent == outer]


def hub_spec_arguments(spec: type) -> set[str]:
    """The argument names of a Hub input spec, one level of nested parameters flattened, as transformers' pipeline
    tests read them (`get_arg_names_from_hub_spec`)."""
    names = set()
    for field in dataclasses.fields(spec):
        nested = [kind for kind in (field.type, *typing.get_args(field.type)) if dataclasses.is_dataclass(kind)]
        names |= {inner.name for inner in dataclasses.fields(nested[0])} if nested else {field.name}
    return names


def test_call_documents_the_hubs_image_classification_arguments_and_accepts_what_it_documents():
    """transformers' `compare_pipeline_args_to_hub_spec`, allowing the geolocation-only parameters by name."""
    documented = set(documented_arguments(inspect.getdoc(GeolocationPipeline.__call__)))
    hub = hub_spec_arguments(ImageClassificationInput)
    assert hub == {"inputs", "function_to_apply", "top_k"}
    assert hub <= documented
    assert documented - hub - {"timeout"} == GEOLOCATION_ONLY_PARAMETERS
    accepted = set(inspect.signature(GeolocationPipeline._sanitize_parameters).parameters) - {"self", "unknown"}
    assert accepted == documented - {"inputs"}
