"""Every way of saving a model gives a folder that every loader accepts, with the same answers (issue 10).

Four ways to save (the README's `model.save_pretrained` + `processor.save_pretrained`, `pipe.save_pretrained`, the
training script's output, `publish.py --dry_run`) times six consumers (the pipeline, `from_pretrained(vision_only=
True)`, the Auto classes, `streetclip locate`, `eval/benchmark.py`, `publish.py`). The folders are built once per
module from the tiny CLIP with the same small candidate table, so every consumer must give the reference answers.
"""

import csv
import json
from pathlib import Path

import benchmark
import huggingface_hub.constants
import publish
import pytest
import torch
from builders import place_in_hub_cache, run_pretrain_here, save_random_photos
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor, pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from modeling_streetclip import (
    GeolocationPipeline,
    StreetCLIPConfig,
    StreetCLIPForGeolocation,
    StreetCLIPProcessor,
    format_answers,
)
from modeling_streetclip.cli import main as streetclip
from modeling_streetclip.decisions import rank_places
from modeling_streetclip.testing_utils import SMALL_COUNTRIES, random_photo


REPO_ROOT = Path(__file__).resolve().parents[1]
CITIES_PER_COUNTRY = 5
TOP_K = 3
SAVE_WAYS = ("model_and_processor", "pipeline", "training", "publish")
CONSUMERS = ("pipeline", "vision_only", "auto_classes", "streetclip_locate", "benchmark", "publish")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return save_random_photos(tmp_path_factory.mktemp("photos"), [f"photo-{seed}.png" for seed in range(3)])


@pytest.fixture(scope="module")
def small_model(tiny_clip_dir) -> StreetCLIPForGeolocation:
    return StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=SMALL_COUNTRIES, cities_per_country=CITIES_PER_COUNTRY
    )


@pytest.fixture(scope="module")
def reference(small_model, tiny_clip_dir, photos) -> list[list[dict]]:
    """The answers of the model the folders were saved from, through the pipeline built from its objects."""
    geolocate = pipeline(
        "geolocation", model=small_model, processor=StreetCLIPProcessor.from_pretrained(tiny_clip_dir), device="cpu"
    )
    return geolocate([str(path) for path in photos], top_k=TOP_K)


def write_training_data(folder: Path) -> Path:
    """Eight labelled photos, two per country of four candidates: one optimiser step's worth."""
    folder.mkdir()
    rows = []
    for number, (country, city, latitude, longitude) in enumerate(
        [("France", "Paris", 48.85, 2.35), ("Japan", "Tokyo", 35.68, 139.69)] * 2
        + [("Kenya", "Nairobi", -1.29, 36.82), ("Canada", "Toronto", 43.65, -79.38)] * 2
    ):
        random_photo(100 + number).save(folder / f"{number}.png")
        rows.append([f"{number}.png", latitude, longitude, city, "some region", country])
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as metadata:
        csv.writer(metadata).writerows([["file_name", "latitude", "longitude", "city", "region", "country"], *rows])
    return folder


def save_by_training(tiny_clip_dir: Path, root: Path) -> Path:
    """The training script's output after one step at a learning rate far below float32 resolution, with the vision
    tower frozen: a real run's folder whose weights, and so answers, are those of the starting model."""
    countries = root / "countries.txt"
    countries.write_text("# the small candidates, by ISO code\nFR\nJP\nBR\nKE\nAU\nCA\n", encoding="utf-8")
    output_dir = root / "trained"
    arguments = {
        "model_name_or_path": tiny_clip_dir,
        "train_data": write_training_data(root / "train"),
        "countries": countries,
        "cities_per_country": CITIES_PER_COUNTRY,
        "output_dir": output_dir,
        "max_steps": 1,
        "learning_rate": 1e-12,
        "per_device_train_batch_size": 4,
        "dataloader_num_workers": 0,
        "report_to": "none",
    }
    args = ["--freeze_vision_tower"]
    for name, value in arguments.items():
        args += [f"--{name}", str(value)]
    result = run_pretrain_here(args, root / "datasets-cache")
    assert result.returncode == 0, result.stderr[-5000:]
    return output_dir


@pytest.fixture(scope="module")
def saved_folders(small_model, tiny_clip_dir, tmp_path_factory) -> dict[str, Path]:
    """One folder per way of saving, all holding the same model and candidates."""
    root = tmp_path_factory.mktemp("saved")
    processor = StreetCLIPProcessor.from_pretrained(tiny_clip_dir)
    folders = {way: root / way for way in SAVE_WAYS}
    small_model.save_pretrained(folders["model_and_processor"])
    processor.save_pretrained(folders["model_and_processor"])
    pipeline("geolocation", model=small_model, processor=processor, device="cpu").save_pretrained(folders["pipeline"])
    folders["training"] = save_by_training(tiny_clip_dir, root)
    assert (
        publish.main([str(folders["model_and_processor"]), "someone/small", "--dry_run", str(folders["publish"])]) == 0
    )
    return folders


def answers_from_model(model: StreetCLIPForGeolocation, image_processor, photos: list[Path]) -> list[list[dict]]:
    pixels = image_processor(images=[Image.open(path).convert("RGB") for path in photos], return_tensors="pt")
    with torch.no_grad():
        ranked = rank_places(model, model(pixel_values=pixels["pixel_values"]), top_k=TOP_K)
    columns = {name: column for name, column in ranked._asdict().items() if column is not None}
    return [
        format_answers(model.candidate_places, **{name: column[image] for name, column in columns.items()})
        for image in range(len(photos))
    ]


class ConsumerFailed(Exception):
    """A command-line consumer exited with an error: its exit status and what it printed on standard error."""

    def __init__(self, status: int, stderr: str):
        super().__init__(stderr)
        self.status = status


def consume(consumer: str, folder: Path, photos: list[Path], work: Path, capsys) -> list[list[dict]]:
    """Load `folder` as `consumer` does and return its answers for `photos`."""
    if consumer == "pipeline":
        return pipeline("geolocation", model=str(folder))([str(path) for path in photos], top_k=TOP_K)
    if consumer == "vision_only":
        model = StreetCLIPForGeolocation.from_pretrained(folder, vision_only=True)
        assert model.text_model is None
        return answers_from_model(model, StreetCLIPProcessor.from_pretrained(folder).image_processor, photos)
    if consumer == "auto_classes":
        assert isinstance(AutoConfig.from_pretrained(folder), StreetCLIPConfig)
        model, processor = AutoModel.from_pretrained(folder), AutoProcessor.from_pretrained(folder)
        assert (type(model), type(processor)) == (StreetCLIPForGeolocation, StreetCLIPProcessor)
        return answers_from_model(model, processor.image_processor, photos)
    if consumer == "streetclip_locate":
        output = work / "answers.jsonl"
        argv = ["locate", *map(str, photos), "--model", str(folder), "--top_k", str(TOP_K), "--num_workers", "0"]
        if status := streetclip([*argv, "--output", str(output)]):
            raise ConsumerFailed(status, capsys.readouterr().err)
        records = {record["path"]: record["answers"] for record in map(json.loads, output.read_text().splitlines())}
        return [records[str(path)] for path in photos]
    if consumer == "benchmark":
        data = work / "benchmark.csv"
        data.write_text("IMG_ID,LAT,LON\n" + "".join(f"{path.name},10.0,20.0\n" for path in photos))
        output_dir = work / "results"
        try:
            benchmark.main(
                ["--model", str(folder), "--data", str(data), "--image_dir", str(photos[0].parent)]
                + ["--output_dir", str(output_dir), "--top_k", str(TOP_K), "--num_workers", "0", "--device", "cpu"]
            )
        except SystemExit as exit:
            raise ConsumerFailed(exit.code, capsys.readouterr().err) from None
        with open(output_dir / "predictions.csv", encoding="utf-8") as predictions:
            rows = list(csv.DictReader(predictions))
        return [[first_answer(row), *json.loads(row["runner_ups"])] for row in rows]
    if consumer == "publish":
        repo = work / "repo"
        if status := publish.main([str(folder), "someone/republished", "--dry_run", str(repo)]):
            raise ConsumerFailed(status, capsys.readouterr().err)
        return pipeline("geolocation", model=str(repo))([str(path) for path in photos], top_k=TOP_K)
    raise ValueError(f"unknown consumer {consumer!r}")


def first_answer(row: dict) -> dict:
    """The first answer of a predictions.csv row, in the pipeline's format."""
    return {
        "country": row["predicted_country"],
        "country_code": row["predicted_country_code"],
        "city": row["predicted_city"],
        "latitude": float(row["predicted_latitude"]),
        "longitude": float(row["predicted_longitude"]),
        "score": float(row["score"]),
        "country_score": float(row["country_score"]),
    }


def assert_same_answers(actual: list[list[dict]], expected: list[list[dict]]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert [(a["country"], a["country_code"], a["city"]) for a in got] == [
            (a["country"], a["country_code"], a["city"]) for a in want
        ]
        for a, b in zip(got, want, strict=True):
            for key in ("latitude", "longitude", "score", "country_score"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("way", SAVE_WAYS)
def test_every_saved_folder_loads_in_every_consumer_with_the_same_answers(
    saved_folders, reference, photos, way, consumer, tmp_path, capsys
):
    assert_same_answers(consume(consumer, saved_folders[way], photos, tmp_path, capsys), reference)


def test_training_output_holds_the_papers_names_for_countries_listed_by_iso_code(saved_folders):
    assert StreetCLIPConfig.from_pretrained(saved_folders["training"]).candidate_places["country_names"] == (
        SMALL_COUNTRIES
    )


def test_pipeline_saves_the_complete_remote_code_set_whose_entries_resolve(saved_folders):
    folder = saved_folders["pipeline"]
    config = json.loads((folder / "config.json").read_text())
    entry = config["custom_pipelines"]["geolocation"]
    modules = {entry["impl"], *config["auto_map"].values()}
    processor_map = json.loads((folder / "processor_config.json").read_text())["auto_map"]
    modules.add(processor_map["AutoProcessor"])
    for class_reference in modules:
        module, name = class_reference.split(".")
        assert f"class {name}(" in (folder / f"{module}.py").read_text(), class_reference
    copied = {path.name: path.read_text() for path in folder.glob("*.py")}
    for name, code in copied.items():
        imported = {line.split()[1].lstrip(".") + ".py" for line in code.splitlines() if line.startswith("from .")}
        assert imported <= copied.keys(), f"{name} imports files that were not copied: {imported - copied.keys()}"
    assert entry["pt"] == ["AutoModel"]


def test_a_published_config_hides_its_pipeline_from_transformers_only_where_the_package_registered_it(
    saved_folders, monkeypatch
):
    config = AutoConfig.from_pretrained(saved_folders["publish"])
    assert config.custom_pipelines == {}
    assert "geolocation" in config.to_dict()["custom_pipelines"]
    unregistered = {task: entry for task, entry in PIPELINE_REGISTRY.supported_tasks.items() if task != "geolocation"}
    monkeypatch.setattr(PIPELINE_REGISTRY, "supported_tasks", unregistered)
    assert set(config.custom_pipelines) == {"geolocation"}


def test_published_repo_runs_the_installed_classes_by_repo_id_offline_without_trust_remote_code(
    saved_folders, reference, photos, tmp_path, monkeypatch
):
    place_in_hub_cache(saved_folders["publish"], tmp_path / "hub", "someone/small")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    geolocate = pipeline("geolocation", model="someone/small")
    assert type(geolocate) is GeolocationPipeline
    assert type(geolocate.model) is StreetCLIPForGeolocation and type(geolocate.processor) is StreetCLIPProcessor
    assert_same_answers(geolocate([str(path) for path in photos], top_k=TOP_K), reference)


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_a_model_folder_without_processor_files_gets_one_error_naming_the_folder_and_the_fix(
    saved_folders, photos, consumer, tmp_path, capsys
):
    folder = tmp_path / "model-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((saved_folders["model_and_processor"] / name).read_bytes())
    with pytest.raises((OSError, ConsumerFailed)) as raised:
        consume(consumer, folder, photos, tmp_path, capsys)
    if isinstance(raised.value, ConsumerFailed):
        assert raised.value.status == 2
    assert "holds no image processor or tokenizer files" in str(raised.value)
    assert f"save_pretrained({str(folder)!r})" in str(raised.value)


def readme_save_snippet() -> str:
    """The README's Python block that saves `streetclip-with-heads`, as printed."""
    blocks = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("```python\n")[1:]
    (snippet,) = [block.split("```")[0] for block in blocks if "save_pretrained(" in block]
    return snippet


def test_readme_save_snippet_runs_as_printed_and_its_folder_loads_with_the_checkpoints_answers(
    tiny_clip_dir, photos, tmp_path, monkeypatch
):
    place_in_hub_cache(tiny_clip_dir, tmp_path / "hub", "geolocal/StreetCLIP")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(readme_save_snippet(), namespace)
    assert namespace["fast"].text_model is None
    images = [str(path) for path in photos]
    assert_same_answers(
        pipeline("geolocation", model="streetclip-with-heads")(images, top_k=TOP_K),
        pipeline("geolocation", model="geolocal/StreetCLIP")(images, top_k=TOP_K),
    )
