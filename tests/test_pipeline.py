"""The "geolocation" pipeline: parity with the paper's method, output format, and every kind of bad input."""

import doctest
import io
import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, pipeline

import modeling_streetclip
from modeling_streetclip import (
    GeolocationPipeline,
    ImageLoadError,
    StreetCLIPForGeolocation,
    StreetCLIPProcessor,
    configuration_streetclip,
)
from modeling_streetclip.testing_utils import SMALL_COUNTRIES, random_photo


@pytest.fixture(scope="module")
def geolocator(small_streetclip_dir):
    return pipeline("geolocation", model=str(small_streetclip_dir))


def reference_decision(clip, processor, places, image) -> tuple[str, str]:
    """The paper's method written plainly: score every country prompt, take the best, then score that country's
    city prompts and take the best."""
    country_prompts = [f"A Street View photo in {country}." for country in places.country_names]
    inputs = processor(text=country_prompts, images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        country = places.country_names[int(clip(**inputs).logits_per_image.argmax())]
    cities = [places.city_names[row] for row in places.cities_by_country[places.country_names.index(country)]]
    inputs = processor(
        text=[f"A Street View photo from {city}." for city in cities], images=image, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        city = cities[int(clip(**inputs).logits_per_image.argmax())]
    return country, city


def test_first_answer_matches_reference_method(tiny_clip_dir):
    geolocate = pipeline("geolocation", model=str(tiny_clip_dir))
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    places = geolocate.model.candidate_places
    images = [random_photo(seed) for seed in range(24)]
    answers = geolocate(images, top_k=3, batch_size=8)
    expected = [reference_decision(clip, processor, places, image) for image in images]
    assert [(answer[0]["country"], answer[0]["city"]) for answer in answers] == expected
    assert len({country for country, _ in expected}) > 1, "a degenerate model would make the parity check vacuous"


def test_pipeline_task_is_registered_with_transformers():
    from transformers.pipelines import PIPELINE_REGISTRY

    task, implementation, _ = PIPELINE_REGISTRY.check_task("geolocation")
    assert implementation["impl"] is GeolocationPipeline
    assert implementation["pt"] == (StreetCLIPForGeolocation,)
    assert modeling_streetclip.GeolocationPipeline is GeolocationPipeline


# An application that imports this package and is run as `python -m myapp.serve`, importing the package (or one of
# its modules) before or after transformers; `serve` prints what transformers then knows of it.
APPLICATION_IMPORTS = {
    "package_then_transformers": "import modeling_streetclip\n",
    "transformers_then_package": "import transformers\nimport modeling_streetclip\n",
    "a_module_that_imports_transformers": "from modeling_streetclip.pipeline_geolocation import GeolocationPipeline\n",
}
APPLICATION_SERVE = """
import json
from transformers import AutoConfig, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

_, pipeline, _ = PIPELINE_REGISTRY.check_task("geolocation")
print(json.dumps([pipeline["impl"].__name__, type(AutoConfig.for_model("streetclip")).__name__]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("imports", list(APPLICATION_IMPORTS))
def test_an_application_run_with_python_m_gets_the_task_however_it_imports_the_package(tmp_path, imports):
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text(APPLICATION_IMPORTS[imports])
    (tmp_path / "myapp" / "serve.py").write_text(APPLICATION_SERVE)
    result = subprocess.run(
        [sys.executable, "-m", "myapp.serve"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == ["GeolocationPipeline", "StreetCLIPConfig"]


def test_the_recommended_candidate_settings_are_exported_where_the_readme_imports_them():
    from modeling_streetclip.configuration_streetclip import RECOMMENDED_CANDIDATE_SETTINGS

    assert modeling_streetclip.RECOMMENDED_CANDIDATE_SETTINGS is RECOMMENDED_CANDIDATE_SETTINGS
    assert "RECOMMENDED_CANDIDATE_SETTINGS" in modeling_streetclip.__all__
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "from modeling_streetclip import RECOMMENDED_CANDIDATE_SETTINGS" in readme


def test_the_package_version_is_the_one_pyproject_declares():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert modeling_streetclip.__version__ == pyproject["project"]["version"]
    assert "__version__" in modeling_streetclip.__all__


@pytest.mark.parametrize("module", [configuration_streetclip], ids=lambda module: module.__name__)
def test_the_docstring_examples_run_as_written(module):
    results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0


def test_answer_has_the_documented_fields_and_candidate_values(geolocator):
    (answer,) = geolocator(random_photo(1))
    assert set(answer) == {
        "label",
        "country",
        "country_code",
        "city",
        "latitude",
        "longitude",
        "score",
        "country_score",
        "joint_probability",
        "within_km",
        "radius_km",
        "calibrated",
    }
    assert list(answer["within_km"]) == ["1", "25", "200", "750", "2500"] and answer["calibrated"] is False
    places = geolocator.model.candidate_places
    assert answer["country"] in SMALL_COUNTRIES
    country = places.country_index(answer["country"])
    assert answer["country_code"] == places.country_codes[country]
    rows = [row for row in places.cities_by_country[country] if places.city_names[row] == answer["city"]]
    assert (answer["latitude"], answer["longitude"]) == (
        places.city_latitudes[rows[0]],
        places.city_longitudes[rows[0]],
    )
    assert answer["label"] == places.city_labels[rows[0]] == f"{answer['city']}, {answer['country']}"
    # Under the default (greedy) rule, `score` is p(city | country) and the joint probability is their product.
    assert 0.0 < answer["joint_probability"] <= answer["country_score"] <= 1.0
    assert 0.0 < answer["score"] <= 1.0
    assert answer["joint_probability"] == pytest.approx(answer["score"] * answer["country_score"], rel=1e-5)


@pytest.mark.parametrize("decision", ["greedy", "joint", "expected_distance"])
def test_top_k_answers_follow_the_decision_rules_own_order(geolocator, decision):
    for seed in range(5):
        answers = geolocator(random_photo(seed), top_k=8, decision=decision)
        assert len(answers) == 8
        assert len({(answer["country"], answer["city"]) for answer in answers}) == 8
        assert sum(answer["joint_probability"] for answer in answers) <= 1.0 + 1e-6
        scores = [answer["score"] for answer in answers]
        assert all(0.0 <= score <= 1.0 for score in scores)  # a probability under every rule
        if decision == "greedy":
            # Countries by p(country), then cities by p(city | country) inside each country.
            keys = [(answer["country_score"], answer["score"]) for answer in answers]
            assert keys == sorted(keys, reverse=True)
        elif decision == "joint":
            assert scores == sorted(scores, reverse=True)
        else:
            distances = [answer["expected_distance_km"] for answer in answers]
            assert distances == sorted(distances) and distances[0] > 0  # in km, smallest first
        if decision != "greedy":
            assert scores == [answer["joint_probability"] for answer in answers]
        assert ("expected_distance_km" in answers[0]) == (decision == "expected_distance")


def test_default_decision_is_greedy_and_its_first_answer_is_the_papers(geolocator):
    image = random_photo(4)
    assert geolocator(image, top_k=3) == geolocator(image, top_k=3, decision="greedy")
    model = geolocator.model
    with torch.no_grad():
        outputs = model(geolocator.image_processor(images=image, return_tensors="pt")["pixel_values"])
    (first, *_) = geolocator(image, top_k=3)
    assert first["city"] == model.candidate_places.city_names[int(outputs.predicted_city[0])]


def test_unknown_decision_rule_is_refused_listing_the_rules(geolocator):
    with pytest.raises(
        ValueError, match="Unknown decision rule 'nearest'; choose one of greedy, joint, expected_distance"
    ):
        geolocator(random_photo(0), decision="nearest")


def test_list_input_gives_one_list_per_image_in_order(geolocator):
    images = [random_photo(seed) for seed in range(5)]
    batched = geolocator(images, top_k=2, batch_size=2)
    assert len(batched) == 5 and all(len(answers) == 2 for answers in batched)
    for answers, image in zip(batched, images, strict=True):
        single = geolocator(image, top_k=2)
        assert [(a["country"], a["city"]) for a in answers] == [(a["country"], a["city"]) for a in single]
        assert [a["score"] for a in answers] == pytest.approx([a["score"] for a in single], rel=1e-5)


def test_paths_and_pil_images_give_the_same_answer(geolocator, tmp_path):
    image = random_photo(3)
    image.save(tmp_path / "photo.png")
    assert geolocator(str(tmp_path / "photo.png")) == geolocator(image)


def test_plain_clip_checkpoint_works_through_the_pipeline(tiny_clip_dir):
    answers = pipeline("geolocation", model=str(tiny_clip_dir))(random_photo(0), top_k=2)
    assert len(answers) == 2 and answers[0]["country"] in modeling_streetclip.paper_countries()


def test_bfloat16_pipeline_gives_answers(small_streetclip_dir):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir), dtype=torch.bfloat16, device="cpu")
    assert geolocate.model.dtype == torch.bfloat16
    (answer,) = geolocate(random_photo(2))
    assert answer["country"] in SMALL_COUNTRIES


def test_model_kwargs_override_the_models_configuration_and_the_answers_stay(small_streetclip_dir, geolocator):
    verbose = pipeline("geolocation", model=str(small_streetclip_dir), model_kwargs={"output_hidden_states": True})
    assert verbose.model.config.output_hidden_states is True
    assert verbose([random_photo(2), random_photo(3)], top_k=3) == geolocator(
        [random_photo(2), random_photo(3)], top_k=3
    )


@pytest.mark.parametrize("option", [{"topk": 5}, {"rule": "joint"}, {"top_k": 2, "countries": ["Japan"]}])
def test_unknown_keyword_arguments_are_refused_naming_them(geolocator, option):
    unknown = next(name for name in option if name != "top_k")
    with pytest.raises(TypeError, match=f"got an unexpected keyword argument '{unknown}'"):
        geolocator(random_photo(0), **option)


def test_unknown_keyword_argument_of_the_pipeline_factory_is_refused(small_streetclip_dir):
    with pytest.raises(TypeError, match="got an unexpected keyword argument 'topk'"):
        pipeline("geolocation", model=str(small_streetclip_dir), topk=3)


def test_pipeline_holds_the_streetclip_processor_of_its_folder_or_of_a_plain_clip_checkpoint(
    geolocator, tiny_clip_dir
):
    assert type(geolocator.processor) is StreetCLIPProcessor
    assert geolocator.image_processor is geolocator.processor.image_processor
    plain = pipeline("geolocation", model=str(tiny_clip_dir))
    assert type(plain.processor) is StreetCLIPProcessor
    assert plain.processor.country_prompt_template == plain.model.config.country_prompt_template


def test_pipeline_built_from_a_model_and_an_image_processor_answers_but_refuses_an_incomplete_save(
    geolocator, tmp_path
):
    bare = GeolocationPipeline(model=geolocator.model, image_processor=geolocator.image_processor, device="cpu")
    assert bare(random_photo(4), top_k=2) == geolocator(random_photo(4), top_k=2)
    with pytest.raises(ValueError, match="no tokenizer or templates to save"):
        bare.save_pretrained(tmp_path / "incomplete")
    assert not (tmp_path / "incomplete").exists()


@pytest.fixture(scope="module")
def restricted_geolocator(small_streetclip_dir, geolocator):
    """The small model restricted to Japan and Kenya with `restrict_countries`, as a pipeline."""
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    model.restrict_countries(["Japan", "Kenya"])
    return pipeline("geolocation", model=model, processor=geolocator.processor, device="cpu")


@pytest.mark.parametrize("decision", ["greedy", "joint", "expected_distance", "within_km"])
def test_candidate_countries_on_a_call_answer_as_a_model_restricted_to_them(
    geolocator, restricted_geolocator, decision
):
    before = geolocator(random_photo(6), top_k=4, decision=decision)
    images = [random_photo(seed) for seed in range(4)]
    restricted = geolocator(images, top_k=4, decision=decision, candidate_countries=["JP", "Kenya"])
    expected = restricted_geolocator(images, top_k=4, decision=decision)
    for got, want in zip(restricted, expected, strict=True):
        assert [answer["label"] for answer in got] == [answer["label"] for answer in want]
        assert {answer["country"] for answer in got} <= {"Japan", "Kenya"}
        for key in set(want[0]) - {"label", "country", "country_code", "city", "within_km", "radius_km"}:
            assert [answer[key] for answer in got] == pytest.approx(
                [answer[key] for answer in want], rel=1e-6, abs=1e-6
            ), key
        for mine, theirs in zip(got, want, strict=True):
            assert mine["within_km"] == pytest.approx(theirs["within_km"], rel=1e-6, abs=1e-6)
            assert mine["radius_km"] == theirs["radius_km"]
    # The call restricted nothing for good: the pipeline's model keeps every candidate.
    assert geolocator.model.candidate_places.country_names == SMALL_COUNTRIES
    assert geolocator(random_photo(6), top_k=4, decision=decision) == before


@pytest.mark.parametrize(
    ("countries", "error", "message"),
    [
        (["JP", "Atlantis"], ValueError, "'Atlantis' is not one of the 6 candidate countries of this model"),
        (["Germany"], ValueError, "'Germany' is not one of the 6 candidate countries"),
        ([], ValueError, "candidate_countries is empty"),
        (["JP", "Japan"], ValueError, "'JP' and 'Japan' both name Japan; name it once"),  # its cities counted twice
        ("JP", TypeError, "candidate_countries must be a list of country names or ISO codes"),
    ],
)
def test_bad_candidate_countries_are_refused_naming_them(geolocator, countries, error, message):
    with pytest.raises(error, match=message):
        geolocator(random_photo(0), candidate_countries=countries)


def test_a_list_of_no_images_gets_no_answers(geolocator):
    assert geolocator([]) == [] and geolocator([], top_k=3) == []
    with pytest.raises(ValueError, match="top_k"):
        geolocator([], top_k=0)


@pytest.mark.parametrize("decision", ["gallery", "hybrid"])
def test_candidate_countries_are_refused_with_the_gallery_decisions_saying_why(geolocator, decision):
    with pytest.raises(ValueError, match=f"candidate_countries does not apply to decision='{decision}'"):
        geolocator(random_photo(0), decision=decision, candidate_countries=["JP"])


@pytest.mark.parametrize("function_to_apply", ["softmax", "SOFTMAX", None])
def test_function_to_apply_softmax_is_what_the_pipeline_does(geolocator, function_to_apply):
    assert geolocator(random_photo(3), top_k=3, function_to_apply=function_to_apply) == geolocator(
        random_photo(3), top_k=3
    )


@pytest.mark.parametrize(
    ("function_to_apply", "message"),
    [("sigmoid", "does not apply to geolocation"), ("none", "does not apply to geolocation"), ("tanh", "Unknown")],
)
def test_other_functions_to_apply_are_refused_with_the_reason(geolocator, function_to_apply, message):
    with pytest.raises(ValueError, match=message):
        geolocator(random_photo(0), function_to_apply=function_to_apply)


@pytest.fixture(scope="module")
def photo_server():
    """A local HTTP server: `/photo.png`, `/notes.png` (not an image), `/slow.png` (answers after a second); 404
    elsewhere."""
    photo = photo_bytes(random_photo(3), "PNG")
    files = {"/photo.png": photo, "/slow.png": photo, "/notes.png": b"these are field notes, not pixels"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(1)
            if self.path not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])

        def log_message(self, *args):
            pass  # no access log on the test's stderr

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_an_image_url_is_fetched_and_answers_as_the_image(geolocator, photo_server):
    assert geolocator(f"{photo_server}/photo.png", top_k=2, timeout=30) == geolocator(random_photo(3), top_k=2)


@pytest.mark.parametrize(
    ("path", "timeout", "message"),
    [("/slow.png", 0.1, "Could not fetch the image URL .*timed out"), ("/gone.png", 30, "Could not fetch.*404")],
)
def test_a_url_that_cannot_be_fetched_in_time_raises_naming_it(geolocator, photo_server, path, timeout, message):
    with pytest.raises(ImageLoadError, match=message) as raised:
        geolocator(f"{photo_server}{path}", timeout=timeout)
    assert repr(f"{photo_server}{path}") in str(raised.value)


def test_a_fetched_file_that_is_not_an_image_raises_naming_the_url(geolocator, photo_server):
    with pytest.raises(ImageLoadError, match="not an image format") as raised:
        geolocator(f"{photo_server}/notes.png")
    assert repr(f"{photo_server}/notes.png") in str(raised.value)


@pytest.mark.parametrize("timeout", [0, -1, "5", True])
def test_bad_timeout_is_refused(geolocator, timeout):
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        geolocator(random_photo(0), timeout=timeout)


@pytest.mark.parametrize("top_k", [0, -1, 1.5, "3"])
def test_bad_top_k_is_refused(geolocator, top_k):
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        geolocator(random_photo(0), top_k=top_k)


def photo_bytes(image: Image.Image, format: str, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save_kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("empty.jpg", b"", ImageLoadError, "is empty"),
        ("notes.jpg", b"these are field notes, not pixels", ImageLoadError, "not an image format"),
        ("cut.jpg", photo_bytes(random_photo(0, (64, 64)), "JPEG")[:300], ImageLoadError, "truncated or corrupt"),
        ("cut.png", photo_bytes(random_photo(0, (64, 64)), "PNG")[:200], ImageLoadError, "truncated or corrupt"),
    ],
)
def test_bad_files_raise_an_error_that_names_the_file(geolocator, tmp_path, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=message) as raised:
        geolocator(str(path))
    assert str(path) in str(raised.value)


def test_missing_file_raises_file_not_found_naming_it(geolocator, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        geolocator(str(tmp_path / "missing.jpg"))


def test_non_image_input_type_is_refused(geolocator):
    with pytest.raises(TypeError, match="Expected an image path or a PIL.Image.Image, got int"):
        geolocator(42)


def test_decompression_bomb_is_refused_before_decoding(geolocator, tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (400, 400)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    with pytest.raises(ImageLoadError, match="too large to decode safely") as raised:
        geolocator(str(path))
    assert str(path) in str(raised.value)


def mode_images() -> dict[str, Image.Image]:
    rgb = random_photo(5, (40, 32))
    sixteen_bit = Image.fromarray((np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50).astype("<u2"))
    return {
        "L": rgb.convert("L"),
        "LA": rgb.convert("LA"),
        "P": rgb.convert("P"),
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": sixteen_bit,
        "I": rgb.convert("I"),
        "F": rgb.convert("F"),
        "1": rgb.convert("1"),
    }


@pytest.mark.parametrize("mode", list(mode_images()))
def test_every_pil_mode_is_geolocated(geolocator, mode):
    image = mode_images()[mode]
    assert image.mode == mode
    rgb = modeling_streetclip.load_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == image.size
    (answer,) = geolocator(image)
    assert answer["country"] in SMALL_COUNTRIES


def test_sixteen_bit_images_keep_their_brightness():
    white = Image.fromarray(np.full((4, 4), 65535, dtype="<u2"))
    assert modeling_streetclip.load_rgb_image(white).getpixel((0, 0)) == (255, 255, 255)


def test_transparent_pixels_are_composited_on_white():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert modeling_streetclip.load_rgb_image(clear).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path, geolocator):
    image = Image.new("RGB", (60, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert modeling_streetclip.load_rgb_image(path).size == (20, 60)
    upright = image.transpose(Image.Transpose.ROTATE_270)
    assert geolocator(str(path)) == geolocator(upright)


def test_encoded_bytes_load_like_the_file_they_came_from(tmp_path):
    path = tmp_path / "photo.png"
    random_photo(4).save(path)
    from_bytes = modeling_streetclip.load_rgb_image(path.read_bytes())
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(modeling_streetclip.load_rgb_image(path)))
    with pytest.raises(ImageLoadError, match="of 0 bytes is empty"):
        modeling_streetclip.load_rgb_image(b"")
    with pytest.raises(ImageLoadError, match="of 5 bytes is not an image format"):
        modeling_streetclip.load_rgb_image(b"hello")
