"""Specification of the Gradio demo `model_card/space/app.py` and of its publishing as a Space.

The app runs in three ways here: its functions in this process; the command `python model_card/space/app.py` as a
server, once for this module, driven through its API by `gradio_client` and through its page by headless Chromium
(Debian's `chromium` and `chromium-driver`, which `.ci/run` installs); and, as published by `publish.py --space`, in a
process that cannot import this package, as on a Space.
"""

import ast
import importlib.util
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import publish
import pytest
from builders import run_as_hub_user
from card import build_model_card
from huggingface_hub import HfApi, ModelCard, SpaceCard
from packaging.requirements import Requirement
from packaging.version import Version
from PIL import Image
from transformers import AutoConfig, pipeline

from modeling_streetclip import GeolocationPipeline, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app import world_map
from modeling_streetclip.app.batch import geolocate_images
from modeling_streetclip.testing_utils import random_photo


ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = ROOT / "model_card" / "space"
APP_PATH = SPACE_DIR / "app.py"
REPO_ID = "streetclip-tests/tiny-geolocation"
SPACE_ID = "streetclip-tests/tiny-geolocation-demo"
# Set to 1 to rewrite the README's screenshot from the browser test.
SCREENSHOT_ENV = "STREETCLIP_UPDATE_SCREENSHOT"
SCREENSHOT_PATH = ROOT / "docs" / "space-screenshot.png"
# The command starts in seconds; on a loaded two-core machine, importing torch, transformers and gradio can take long.
SERVER_START_TIMEOUT_S = 240
PAGE_TIMEOUT_S = 90
TEXT_FIELDS = ("country", "country_code", "city")
NUMBER_FIELDS = ("latitude", "longitude", "score", "country_score")


def _load_app(path: Path = APP_PATH):
    spec = importlib.util.spec_from_file_location("streetclip_space_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def app() -> ModuleType:
    """The demo's module. Loaded here, not at collection: a pytest-xdist worker that runs no test of this module
    then never imports gradio (~3 s); and every test here skips without gradio."""
    pytest.importorskip("gradio", reason="the demo needs the [demo] extra: pip install -e '.[demo]'")
    return _load_app()


@pytest.fixture(scope="module")
def geolocator(app, small_streetclip_dir):
    return app.Geolocator(str(small_streetclip_dir))


@pytest.fixture(scope="module")
def reference(small_streetclip_dir) -> GeolocationPipeline:
    """The package's own pipeline on the served model: the answers the app must show."""
    return pipeline("geolocation", model=str(small_streetclip_dir))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Two photos and a file that is not an image, as a user would drop them."""
    folder = tmp_path_factory.mktemp("photos")
    paths = {"street": folder / "street.png", "square": folder / "square.jpg", "broken": folder / "broken.jpg"}
    random_photo(1, size=(96, 72)).save(paths["street"])
    random_photo(2, size=(64, 80)).save(paths["square"])
    paths["broken"].write_bytes(b"these bytes are no JPEG")
    return paths


@pytest.fixture(scope="module")
def cli_error(reference):
    """The message `streetclip locate` records for a file it cannot read."""

    def error_of(path: Path) -> str:
        (record,) = geolocate_images(reference.model, reference.image_processor, [str(path)])
        return record.error

    return error_of


def _assert_same_answers(shown: list[dict], expected: list[dict], table: ModuleType | None = None) -> None:
    """`shown` answers are the `expected` ones: as the pipeline gives them, or as the `table` of the demo's module
    `app` rounds them."""
    assert len(shown) == len(expected)
    for answer, reference_answer in zip(shown, expected, strict=True):
        assert {field: answer[field] for field in TEXT_FIELDS} == {
            field: reference_answer[field] for field in TEXT_FIELDS
        }
        for field in NUMBER_FIELDS:
            if table is not None:
                assert float(answer[field]) == table.shown_number(field, reference_answer[field])
            else:
                assert float(answer[field]) == pytest.approx(reference_answer[field], abs=1e-6)


def _pin_pixels(image: Image.Image, pin_color: tuple[int, int, int], tolerance: int = 12) -> int:
    """How many pixels of `image` have the colour `pin_color` of a best-answer pin."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(pin_color)).max(axis=-1) <= tolerance).sum())


# Choosing and loading the model


def test_model_comes_from_argument_then_environment_then_space_readme(app, tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("---\nsdk: gradio\nmodels:\n- org/from-readme\n---\n# demo\n")
    monkeypatch.setenv(app.MODEL_ENV, "org/from-environment")
    assert app.resolve_model("org/from-argument", readme) == "org/from-argument"
    assert app.resolve_model(None, readme) == "org/from-environment"
    monkeypatch.delenv(app.MODEL_ENV)
    assert app.resolve_model(None, readme) == "org/from-readme"


def test_no_model_anywhere_names_every_way_to_give_one(app, tmp_path, monkeypatch):
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    readme = tmp_path / "README.md"
    readme.write_text("---\nsdk: gradio\n---\n# demo\n")
    with pytest.raises(ValueError, match=r"--model.*STREETCLIP_MODEL.*models:"):
        app.resolve_model(None, readme)
    # The README in the checkout names no model: publish.py fills it in for a Space.
    with pytest.raises(ValueError, match="No model to serve"):
        app.resolve_model(None)


def test_saved_folder_is_served_without_its_text_tower_and_plain_clip_with_it(app, geolocator, tiny_clip_dir):
    assert geolocator.pipeline.model.text_model is None
    plain = app.Geolocator(str(tiny_clip_dir))
    assert plain.pipeline.model.text_model is not None
    assert len(plain.country_names) == 193


def test_command_with_an_unloadable_model_says_so_and_exits_2(app, tmp_path, capsys):
    assert app.main(["--model", str(tmp_path / "missing")]) == 2
    assert "cannot load the model" in capsys.readouterr().err


# Answers, errors, table and map


def test_answers_are_the_pipelines_and_a_bad_file_gets_the_cli_message_while_the_rest_are_answered(
    app, geolocator, reference, photos, cli_error
):
    results = geolocator.locate([str(photos["street"]), str(photos["broken"]), str(photos["square"])], top_k=3)
    assert [(result.number, result.name) for result in results] == [
        (1, "street.png"),
        (2, "broken.jpg"),
        (3, "square.jpg"),
    ]
    _assert_same_answers(results[0].answers, reference(str(photos["street"]), top_k=3))
    _assert_same_answers(results[2].answers, reference(str(photos["square"]), top_k=3))
    assert results[1].answers is None
    assert results[1].error == cli_error(photos["broken"])
    assert "broken.jpg" in results[1].error and "not an image format" in results[1].error
    page_error = app.errors_html(results)
    assert "1 of 3 files could not be read" in page_error
    assert "<b>2. broken.jpg</b>" in page_error


def test_country_restriction_answers_as_restrict_countries_and_leaves_the_served_model_whole(
    geolocator, reference, small_streetclip_dir, photos
):
    everywhere = geolocator.locate([str(photos["street"])], top_k=4)[0].answers
    restricted = geolocator.locate([str(photos["street"])], top_k=4, countries=["Kenya", "Japan"])[0].answers

    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    model.restrict_countries(["Kenya", "Japan"])
    expected = GeolocationPipeline(model=model, processor=reference.processor)(str(photos["street"]), top_k=4)
    _assert_same_answers(restricted, expected)
    assert {answer["country"] for answer in restricted} <= {"Kenya", "Japan"}
    # The served model keeps every candidate, and the restricted copy shares its vision tower.
    assert geolocator.pipeline.model.candidate_places.num_countries == 6
    _assert_same_answers(geolocator.locate([str(photos["street"])], top_k=4)[0].answers, everywhere)
    restricted_model = geolocator._restricted(("Japan", "Kenya")).model
    assert restricted_model.vision_model is geolocator.pipeline.model.vision_model


def test_table_has_a_row_per_answer_with_the_pipelines_fields(app, geolocator, photos):
    results = geolocator.locate([str(photos["street"]), str(photos["square"])], top_k=2)
    table = app.answers_table(results)
    assert list(table.columns) == ["photo", "file", "rank", *results[0].answers[0]]
    assert table[["photo", "file", "rank"]].values.tolist() == [
        [1, "street.png", 1],
        [1, "street.png", 2],
        [2, "square.jpg", 1],
        [2, "square.jpg", 2],
    ]
    assert table["city"].tolist() == [answer["city"] for result in results for answer in result.answers]
    assert list(app.answers_table([]).columns) == ["photo", "file", "rank"]


def test_table_shows_probabilities_to_four_significant_digits_and_coordinates_to_four_decimals(
    app, geolocator, photos
):
    assert app.shown_number("score", 0.09364717453718185) == 0.09365
    assert app.shown_number("joint_probability", 0.000123456) == 0.0001235
    assert app.shown_number("latitude", 35.67623456) == 35.6762
    results = geolocator.locate([str(photos["street"]), str(photos["square"])], top_k=3)
    table = app.answers_table(results)
    answers = [answer for result in results for answer in result.answers]
    for field in table.columns[table.dtypes == np.float64]:
        shown = table[field].tolist()
        assert shown == [app.shown_number(field, answer[field]) for answer in answers]
        # Not the float's seventeen digits: at most four significant ones (four decimals for a coordinate).
        digits = [f"{value:.15g}".lstrip("-0.").replace(".", "").split("e")[0] for value in shown]
        if field not in app.COORDINATE_FIELDS:
            assert max(len(value) for value in digits) <= app.SIGNIFICANT_DIGITS, (field, shown)
    assert all(round(value, 4) == value for value in table["latitude"])


def test_photos_are_decoded_one_at_a_time_each_released_before_the_next(geolocator, photos, monkeypatch):
    decode, decoded, alive_at_each_decode = geolocator.load_rgb_image, [], []

    def tracked_decode(path):
        alive_at_each_decode.append(sum(reference() is not None for reference in decoded))
        image = decode(path)
        decoded.append(weakref.ref(image))
        return image

    monkeypatch.setattr(geolocator, "load_rgb_image", tracked_decode)
    results = geolocator.locate([str(photos["street"]), str(photos["square"]), str(photos["street"])], top_k=1)
    assert alive_at_each_decode == [0, 0, 0] and all(result.answers for result in results)


def test_more_photos_than_the_maximum_are_refused_naming_the_maximum(app, geolocator, photos):
    with pytest.raises(ValueError, match=rf"^{app.MAX_PHOTOS + 1} photos in one request; at most {app.MAX_PHOTOS} "):
        geolocator.locate([str(photos["street"])] * (app.MAX_PHOTOS + 1))
    assert len(geolocator.locate([str(photos["street"])] * app.MAX_PHOTOS, top_k=1)) == app.MAX_PHOTOS
    readme = (SPACE_DIR / "README.md").read_text()
    assert f"at most {app.MAX_PHOTOS} photos per request" in readme and f'"{app.MAX_FILE_SIZE}"' in readme


def test_a_country_given_twice_or_by_code_and_name_is_one_restriction(geolocator, photos):
    once = geolocator.locate([str(photos["street"])], ["Brazil"], top_k=3)[0].answers
    for countries in (["Brazil", "Brazil"], ["BR", "Brazil"]):
        _assert_same_answers(geolocator.locate([str(photos["street"])], countries, top_k=3)[0].answers, once)
    assert geolocator._candidate_names(["BR", "Brazil", "Kenya"]) == ("Brazil", "Kenya")
    with pytest.raises(ValueError, match="'Atlantis' is not one of the 6 candidate countries"):
        geolocator.locate([str(photos["street"])], ["Atlantis"])


@pytest.mark.slow
def test_the_page_deletes_stored_uploads_once_they_are_old(app, geolocator, photos, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    monkeypatch.setattr(app, "CACHE_CHECK_EVERY_S", 1)
    monkeypatch.setattr(app, "CACHE_MAX_AGE_S", 1)
    demo = app.build_demo(geolocator)
    _, url, _ = demo.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), max_file_size=app.MAX_FILE_SIZE
    )
    try:
        uploaded = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.png", photos["street"].read_bytes())})
        (stored,) = map(Path, uploaded.json())
        assert stored.is_file() and stored.is_relative_to(tmp_path)
        deadline = time.monotonic() + 30
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not stored.exists()
    finally:
        demo.close()


def _answer(city: str, latitude: float, longitude: float, score: float) -> dict:
    return {
        "country": "X",
        "country_code": "XX",
        "city": city,
        "latitude": latitude,
        "longitude": longitude,
        "score": score,
        "country_score": 0.5,
        "joint_probability": score,  # what pins are sized and shaded by
    }


def _color_at(image: Image.Image, latitude: float, longitude: float) -> tuple[int, int, int]:
    """The colour where a point lies on the map, which fills the image equirectangularly."""
    x, y = (longitude + 180) / 360 * image.width, (90 - latitude) / 180 * image.height
    return image.getpixel((int(x), int(y)))


def test_map_of_one_photo_pins_every_answer_shaded_by_score_with_the_best_in_full_colour(app):
    answers = [_answer("Best", 10.0, 20.0, 0.6), _answer("Second", -30.0, -60.0, 0.3), _answer("Third", 50, 100, 0.1)]
    world = app.draw_map([app.PhotoResult(1, "photo.png", answers=answers)])
    assert _pin_pixels(app.draw_map([]), app.PIN_COLOR) == 0
    assert _color_at(world, 10.0, 20.0) == app.PIN_COLOR
    second, third = _color_at(world, -30.0, -60.0), _color_at(world, 50.0, 100.0)
    assert second == app._blend(app.PIN_FAINT_COLOR, app.PIN_COLOR, 0.5)
    assert third == app._blend(app.PIN_FAINT_COLOR, app.PIN_COLOR, 1 / 6)
    # A pin's area grows with its score.
    pixels = np.asarray(world)
    assert (pixels == second).all(axis=-1).sum() > (pixels == third).all(axis=-1).sum() > 0


def test_pins_follow_the_joint_probability_not_the_rules_score(app):
    # Under expected_distance, `score` is a distance in km (smallest first): the best pin must not be the faint one.
    best = {**_answer("Best", 10.0, 20.0, 0.6), "score": 120.0}
    second = {**_answer("Second", -30.0, -60.0, 0.3), "score": 900.0}
    world = app.draw_map([app.PhotoResult(1, "photo.png", answers=[best, second])])
    assert _color_at(world, -30.0, -60.0) == app._blend(app.PIN_FAINT_COLOR, app.PIN_COLOR, 0.5)


def test_map_of_several_photos_pins_each_photos_best_answer_only(app):
    results = [
        app.PhotoResult(1, "a.png", answers=[_answer("A", 10.0, 20.0, 0.5), _answer("A2", -30.0, -60.0, 0.4)]),
        app.PhotoResult(2, "b.png", error="unreadable"),
        app.PhotoResult(3, "c.png", answers=[_answer("C", 40.0, -100.0, 0.2), _answer("C2", 50.0, 100.0, 0.1)]),
    ]
    world = app.draw_map(results)
    assert _color_at(world, 10.0, 20.0) == app.PIN_COLOR
    assert _color_at(world, 40.0, -100.0) == app.PIN_COLOR
    base = app.draw_map([])
    for latitude, longitude in ((-30.0, -60.0), (50.0, 100.0)):
        assert _color_at(world, latitude, longitude) == _color_at(base, latitude, longitude)


def test_confidence_is_said_in_words_and_past_a_continent_is_not_confident(app):
    assert app.PhotoResult(1, "a.png", answers=[{}], region_km=419.6).confidence() == "90% within 420 km"
    far = app.PhotoResult(1, "a.png", answers=[{}], region_km=2500.0, level=0.8)
    assert far.confidence() == "not confident: 80% only within 2,500 km"
    assert "<b>1. a.png</b>: not confident: 80% only within 2,500 km" in app.confidence_html([far])
    assert app.confidence_html([app.PhotoResult(2, "b.png", error="unreadable")]) == ""


def test_the_region_holds_the_configured_share_of_the_posterior_the_heat_layer_draws(geolocator, photos):
    (result,) = geolocator.locate([str(photos["street"])], top_k=3)
    model = geolocator.pipeline.model
    assert result.heat.shape == (model.candidate_places.num_cities, 3) and result.heat[:, 2].sum() == pytest.approx(1)
    best = result.answers[0]
    distances = world_map_distances(best, result.heat)
    level = model.config.confidence_level
    assert result.heat[distances <= result.region_km, 2].sum() >= level - 1e-9
    assert result.heat[distances < result.region_km, 2].sum() < level
    # The answers' own `within_km` agrees: the region is no wider than the first radius that reaches the level.
    if best["radius_km"] is not None:
        assert result.region_km <= best["radius_km"]


def test_a_calibrated_model_s_words_are_its_answers_radius_km(app, small_streetclip_dir, photos, tmp_path):
    # Maps that make every radius certain: the answers say 1 km, where the raw posterior of random weights is wide.
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    certain = {str(radius): {"x": [0.0, 1.0], "y": [1.0, 1.0]} for radius in (1, 25, 200, 750, 2500)}
    model.config.calibration = {"temperatures": dict.fromkeys(model.config.levels, 1.0), "within_km": certain}
    model.save_pretrained(tmp_path / "calibrated")
    StreetCLIPProcessor.from_pretrained(small_streetclip_dir).save_pretrained(tmp_path / "calibrated")

    (result,) = app.Geolocator(str(tmp_path / "calibrated")).locate([str(photos["street"])])
    assert result.answers[0]["calibrated"] and result.answers[0]["radius_km"] == 1
    assert result.confidence() == "90% within 1 km"


def world_map_distances(answer: dict, heat: np.ndarray) -> np.ndarray:
    from modeling_streetclip.geodesy import great_circle_km

    return great_circle_km(answer["latitude"], answer["longitude"], heat[:, 0], heat[:, 1])


def test_map_of_one_photo_shades_the_posterior_and_circles_its_region(app):
    answers = [_answer("Best", 10.0, 20.0, 0.6), _answer("Second", -30.0, -60.0, 0.3)]
    heat = np.array([[10.0, 20.0, 0.6], [-30.0, -60.0, 0.3], [45.0, -100.0, 0.1], [-60.0, 120.0, 1e-6]])
    result = app.PhotoResult(1, "photo.png", answers=answers, heat=heat, region_km=1500.0)
    world, base = app.draw_map([result]), app.draw_map([])
    assert _color_at(world, 45.0, -100.0) != _color_at(base, 45.0, -100.0)  # a candidate with mass is shaded
    assert _color_at(world, -60.0, 120.0) == _color_at(base, -60.0, 120.0)  # one with almost none is not
    circle = np.asarray(world, dtype=np.int16) - np.array([8, 81, 156])  # REGION_COLOR
    assert (np.abs(circle).max(axis=-1) <= 12).sum() > 100
    latitudes, longitudes = app.circle_points(10.0, 20.0, 1500.0)
    assert np.allclose(
        world_map_distances({"latitude": 10.0, "longitude": 20.0}, np.column_stack([latitudes, longitudes])), 1500.0
    )


# Publishing the Space


def test_space_requirements_are_the_packages_inference_dependencies():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lines = (SPACE_DIR / "requirements.txt").read_text().splitlines()
    requirements = [line for line in lines if line.strip() and not line.startswith("#")]
    extras = pyproject["project"]["optional-dependencies"]
    (matplotlib,) = [line for line in extras["demo"] if Requirement(line).name == "matplotlib"]
    assert requirements == [*pyproject["project"]["dependencies"], matplotlib]
    assert {re.split("[<>=~!]", requirement)[0] for requirement in extras["demo"]} >= {
        "gradio",
        "gradio_client",
        "selenium",
    }
    included = {extra for requirement in extras["dev"] for extra in re.findall(r"^streetclip\[(.*)\]", requirement)}
    assert "demo" in ",".join(included).split(",")


def test_space_readme_pins_a_gradio_sdk_the_demo_extra_allows():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    metadata = SpaceCard.load(SPACE_DIR / "README.md").data
    assert (metadata.sdk, metadata.app_file) == ("gradio", "app.py")
    demo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["demo"]
    (gradio,) = [Requirement(line) for line in demo if Requirement(line).name == "gradio"]
    assert Version(metadata.sdk_version) in gradio.specifier


@pytest.fixture(scope="module")
def published(small_streetclip_dir, tmp_path_factory) -> tuple[Path, Path]:
    """`publish.py --space --dry_run`: the model repository's folder and the Space's."""
    folder = tmp_path_factory.mktemp("published") / "repo"
    assert publish.main([str(small_streetclip_dir), REPO_ID, "--space", SPACE_ID, "--dry_run", str(folder)]) == 0
    return folder, publish.space_dry_run(folder)


def test_the_map_module_imports_nothing_from_the_package():
    """publish.py copies it beside the Space's app, where the package is not installed."""
    tree = ast.parse(Path(world_map.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative and not {name for name in imported if name.startswith("modeling_streetclip")}


def test_dry_run_writes_the_space_beside_the_repo_serving_the_model(published):
    repo, space = published
    assert space == repo.with_name("repo-space")
    assert sorted(path.name for path in space.iterdir()) == ["README.md", "app.py", "requirements.txt", "world_map.py"]
    assert not any(path.name == "app.py" for path in repo.iterdir())
    assert (space / "app.py").read_bytes() == APP_PATH.read_bytes()
    assert (space / "world_map.py").read_bytes() == Path(world_map.__file__).read_bytes()
    assert (space / "requirements.txt").read_bytes() == (SPACE_DIR / "requirements.txt").read_bytes()
    card = SpaceCard.load(space / "README.md")
    assert card.data.models == [REPO_ID]
    assert card.data.sdk == "gradio"
    assert card.text == SpaceCard.load(SPACE_DIR / "README.md").text
    assert _load_app(space / "app.py").resolve_model(None, space / "README.md") == REPO_ID


def test_model_card_links_to_the_space_only_when_there_is_one(published, small_streetclip_dir):
    card = ModelCard.load(published[0] / "README.md")
    assert f"[{SPACE_ID}](https://huggingface.co/spaces/{SPACE_ID})" in card.text
    config = AutoConfig.from_pretrained(small_streetclip_dir)
    assert "huggingface.co/spaces" not in build_model_card(config, REPO_ID).text


# Runs in a fresh interpreter that cannot import this package, in the Space's folder, as the Space runs: the app must
# find its model in its README and its code in the model repository. Prints the answers as JSON.
SPACE_PROCESS_SCRIPT = """
import json, sys
sys.path.insert(0, ".")
import app
geolocator = app.Geolocator(app.resolve_model(None))
results = geolocator.locate(sys.argv[1:], top_k=3, countries=["Japan", "Kenya"])
print(json.dumps({
    "pipeline_class": type(geolocator.pipeline).__module__,
    "text_model": geolocator.pipeline.model.text_model is not None,
    "map_module": app.draw_world.__module__,
    "map_size": app.draw_map(results).size,
    "results": [{"answers": result.answers, "error": result.error} for result in results],
}))
"""


@pytest.mark.slow
def test_published_space_runs_on_the_model_repos_code_without_the_package(
    app, published, small_streetclip_dir, reference, photos, cli_error, tmp_path, monkeypatch
):
    repo, space = published
    monkeypatch.delenv(app.MODEL_ENV, raising=False)  # the Space must find its model in its README
    ran = run_as_hub_user(
        SPACE_PROCESS_SCRIPT, [str(photos["street"]), str(photos["broken"])], {REPO_ID: repo}, tmp_path, cwd=space
    )
    assert ran["pipeline_class"].startswith("transformers_modules.")
    assert ran["text_model"] is False
    assert (ran["map_module"], ran["map_size"]) == ("world_map", list(app.MAP_SIZE_PX))
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    model.restrict_countries(["Japan", "Kenya"])
    expected = GeolocationPipeline(model=model, processor=reference.processor)(str(photos["street"]), top_k=3)
    street, broken = ran["results"]
    _assert_same_answers(street["answers"], expected)
    assert broken["error"] == cli_error(photos["broken"])


def test_upload_publishes_the_model_then_a_gradio_space_with_the_dry_run_files(
    small_streetclip_dir, published, fake_hub, capsys
):
    assert publish.main([str(small_streetclip_dir), REPO_ID, "--space", SPACE_ID]) == 0
    (_, model_repo), (_, model_upload), (_, space_repo), (_, space_upload) = fake_hub
    assert (model_repo["repo_id"], model_upload["repo_id"]) == (REPO_ID, REPO_ID)
    assert space_repo == {
        "repo_id": SPACE_ID,
        "repo_type": "space",
        "space_sdk": "gradio",
        "private": None,
        "exist_ok": True,
    }
    assert (space_upload["repo_id"], space_upload["repo_type"]) == (SPACE_ID, "space")
    dry_run_space = published[1]
    assert space_upload["files"] == {path.name: path.read_bytes() for path in dry_run_space.iterdir()}
    assert f"https://huggingface.co/spaces/{SPACE_ID}" in capsys.readouterr().out


def test_failed_space_upload_says_the_model_is_published_and_exits_1(
    small_streetclip_dir, fake_hub, monkeypatch, capsys
):
    recording_upload = HfApi.upload_folder

    def refuse_spaces(self, **kwargs):
        if kwargs.get("repo_type") == "space":
            raise OSError("403 Forbidden: no write access to spaces")
        return recording_upload(self, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", refuse_spaces)
    assert publish.main([str(small_streetclip_dir), REPO_ID, "--space", SPACE_ID]) == 1
    error = capsys.readouterr().err
    assert f"The model is published, but the upload of the Space {SPACE_ID} failed" in error
    assert "403 Forbidden" in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--space", "no-namespace"], "--space must be a Hub repository id"),
        (["--space", SPACE_ID, "--revision", "v1"], "--space serves the main branch"),
    ],
)
def test_bad_space_arguments_are_refused(small_streetclip_dir, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        publish.parse_args([str(small_streetclip_dir), REPO_ID, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_refuses_a_non_empty_space_folder(small_streetclip_dir, tmp_path, capsys):
    (tmp_path / "repo-space").mkdir()
    (tmp_path / "repo-space" / "keep.txt").write_text("someone's work")
    with pytest.raises(SystemExit):
        publish.parse_args(
            [str(small_streetclip_dir), REPO_ID, "--space", SPACE_ID, "--dry_run", str(tmp_path / "repo")]
        )
    assert "repo-space" in capsys.readouterr().err
    assert (tmp_path / "repo-space" / "keep.txt").read_text() == "someone's work"


# The running app: its API and its page


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server_cache(tmp_path_factory) -> Path:
    """The folder where the server's Gradio stores uploads and answers (its GRADIO_TEMP_DIR)."""
    return tmp_path_factory.mktemp("gradio-cache")


@pytest.fixture(scope="module")
def server(small_streetclip_dir, server_cache, tmp_path_factory):
    """`python model_card/space/app.py --model DIR`, listening where GRADIO_SERVER_NAME and _PORT say; its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(server_cache),
    }
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, str(APP_PATH), "--model", str(small_streetclip_dir)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"app.py did not answer at {url} in {SERVER_START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.slow
def test_api_answers_with_the_map_table_and_errors(app, server, reference, photos):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    world, table, errors, confidence = client.predict(
        [handle_file(str(photos["street"])), handle_file(str(photos["broken"]))],
        3,
        [],
        api_name="/geolocate",
    )
    rows = [dict(zip(table["headers"], row, strict=True)) for row in table["data"]]
    assert [row["file"] for row in rows] == ["street.png"] * 3
    _assert_same_answers(rows, reference(str(photos["street"]), top_k=3), table=app)
    assert "broken.jpg" in errors and "is not an image format Pillow can read" in errors
    assert _pin_pixels(Image.open(world), app.PIN_COLOR) > 0
    assert "<b>1. street.png</b>: " in confidence and " within " in confidence

    # A country restriction is one more input; a country given twice is that country.
    for countries in (["Brazil"], ["Brazil", "Brazil"]):
        _, table, _, _ = client.predict([handle_file(str(photos["square"]))], 2, countries, api_name="/geolocate")
        assert {row[table["headers"].index("country")] for row in table["data"]} == {"Brazil"}


@pytest.mark.slow
def test_api_errors_carry_their_message(app, server, photos):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    too_many = [handle_file(str(photos["street"]))] * (app.MAX_PHOTOS + 1)
    with pytest.raises(AppError, match=f"{app.MAX_PHOTOS + 1} photos in one request; at most {app.MAX_PHOTOS}"):
        client.predict(too_many, 1, [], api_name="/geolocate")


@pytest.mark.slow
def test_an_upload_over_the_size_limit_is_refused_and_not_stored(app, server, server_cache, photos):
    limit = 20 * 1024 * 1024
    assert app.MAX_FILE_SIZE == "20mb"
    refused = httpx.post(f"{server}gradio_api/upload", files={"files": ("big.jpg", os.urandom(limit + 1))}, timeout=60)
    assert refused.status_code == 413 and "maximum allowed size" in refused.text
    accepted = httpx.post(f"{server}gradio_api/upload", files={"files": ("ok.png", photos["street"].read_bytes())})
    assert accepted.status_code == 200
    stored = [path.stat().st_size for path in server_cache.rglob("*") if path.is_file()]
    assert stored and max(stored) <= limit


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium and its driver from the system (Debian's `chromium` and `chromium-driver`), never a
    downloaded browser."""
    found = _chromium()
    if found is None:
        pytest.skip(
            "Chromium or chromedriver not found; install them with `apt-get install -y chromium chromium-driver`"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    # Root in CI has no user namespace sandbox; /dev/shm is small in containers.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    yield driver
    driver.quit()


def _open_page(browser, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#photos input[type=file]"))
    )
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#map img"))
    )


def _upload(browser, *paths: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, "#photos input[type=file]").send_keys("\n".join(map(str, paths)))


def _wait_for_rows(browser, count: int) -> list[dict[str, str]]:
    """The answers table once the page shows `count` complete rows. Gradio draws the header as a table and the rows
    as ARIA grid rows, and redraws both as an answer arrives: a half-drawn table counts as not there yet."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def complete_rows(driver) -> list[dict[str, str]] | None:
        headers = [cell.text.strip() for cell in driver.find_elements(By.CSS_SELECTOR, "#answers thead th")]
        rows = [
            [cell.text.strip() for cell in row.find_elements(By.CSS_SELECTOR, "[role=gridcell]")]
            for row in driver.find_elements(By.XPATH, "//*[@id='answers']//*[@role='row'][*[@role='gridcell']]")
        ]
        if len(rows) != count or any(len(cells) != len(headers) for cells in rows):
            return None
        return [dict(zip(headers, cells, strict=True)) for cells in rows]

    return WebDriverWait(browser, PAGE_TIMEOUT_S, ignored_exceptions=(StaleElementReferenceException,)).until(
        complete_rows
    )


def _map_screenshot(browser) -> Image.Image:
    from selenium.webdriver.common.by import By

    return Image.open(io.BytesIO(browser.find_element(By.CSS_SELECTOR, "#map img").screenshot_as_png))


@pytest.mark.slow
def test_page_answers_an_uploaded_photo_as_the_pipeline_and_pins_it(app, server, browser, reference, photos):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(browser, server)
    assert _pin_pixels(_map_screenshot(browser), app.PIN_COLOR) == 0
    _upload(browser, photos["street"])
    expected = reference(str(photos["street"]), top_k=app.DEFAULT_TOP_K)
    rows = _wait_for_rows(browser, len(expected))
    assert [row["file"] for row in rows] == ["street.png"] * len(expected)
    assert [row["rank"] for row in rows] == [str(rank) for rank in range(1, len(expected) + 1)]
    _assert_same_answers(rows, expected, table=app)
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda driver: _pin_pixels(_map_screenshot(driver), app.PIN_COLOR) > 50
    )
    # The confidence in words, and the region's circle on the map.
    words = browser.find_element(By.ID, "confidence").text
    assert re.search(r"street\.png: (not confident: )?90% (only )?within [\d,]+ km", words), words
    region = np.asarray(_map_screenshot(browser).convert("RGB"), dtype=np.int16) - np.array([8, 81, 156])
    assert (np.abs(region).max(axis=-1) <= 12).sum() > 50

    # Everything the page loaded came from the app itself: no CDN, no tile server.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(entry => entry.name)")
    assert loaded and all(name.startswith(server) for name in loaded)

    if os.environ.get(SCREENSHOT_ENV) == "1":
        SCREENSHOT_PATH.parent.mkdir(exist_ok=True)
        page = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
        # A palette of 128 colours keeps the PNG near 60 kB; octree quantisation keeps the pins' colour.
        page.quantize(128, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
            SCREENSHOT_PATH, optimize=True
        )
        assert _pin_pixels(Image.open(SCREENSHOT_PATH), app.PIN_COLOR) > 50


@pytest.mark.slow
def test_page_shows_a_bad_files_error_and_answers_the_other_photo(app, server, browser, reference, photos, cli_error):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open_page(browser, server)
    _upload(browser, photos["broken"], photos["square"])
    message = cli_error(photos["broken"]).split("' ")[-1]  # the reason; the page names the upload's own copy
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(lambda driver: message in driver.find_element(By.ID, "errors").text)
    assert "1. broken.jpg" in browser.find_element(By.ID, "errors").text
    rows = _wait_for_rows(browser, app.DEFAULT_TOP_K)
    assert {row["file"] for row in rows} == {"square.jpg"}
    _assert_same_answers(rows, reference(str(photos["square"]), top_k=app.DEFAULT_TOP_K), table=app)
