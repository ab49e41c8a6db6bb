"""Specification of `model_card/publish.py`: the repository folder it writes, and its upload (the network replaced)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub.constants
import publish
import pytest
import torch
from builders import run_as_hub_user, save_random_photos
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import hf_raise_for_status
from PIL import Image
from safetensors import safe_open
from transformers import pipeline

import modeling_streetclip
from modeling_streetclip import GeolocationPipeline, paper_countries
from modeling_streetclip.testing_utils import SMALL_COUNTRIES


REPO_ID = "streetclip-tests/tiny-geolocation"
CODE_FILES = {
    "configuration_streetclip.py",
    "modeling_streetclip.py",
    "processing_streetclip.py",
    "pipeline_geolocation.py",
    "candidates.py",
    "countries.py",
    "geonames.py",
    "captions.py",
    "images.py",
}
METRICS = {
    "acc_1km": 0.004,
    "acc_25km": 0.224,
    "acc_200km": 0.374,
    "acc_750km": 0.613,
    "acc_2500km": 0.804,
    "median_km": 411.2,
    "mean_km": 1680.5,
    "geoscore": 2811.0,
    "n": 2997,
    "model": "streetclip-tests/tiny-geolocation",
    "data": "/benchmarks/im2gps3k.csv",
    "num_evaluated": 2997,
    "num_failed": 0,
    "wall_time_s": 12.5,
}

# Runs in a fresh interpreter that cannot import this package, as for someone who never installed it: the repo's
# own code files must carry everything. Prints the answers as JSON for the parent to compare.
FRESH_PROCESS_SCRIPT = """
import json, sys
sys.modules["modeling_streetclip"] = None  # an import of it now raises ImportError, as if it were not installed
try:
    import modeling_streetclip
except ImportError:
    pass
else:
    raise SystemExit("modeling_streetclip is importable; the test would not show the repo stands alone")
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, pipeline

repo_id, images = sys.argv[1], sys.argv[2:]
geolocate = pipeline("geolocation", model=repo_id, trust_remote_code=True)
model = AutoModel.from_pretrained(repo_id, trust_remote_code=True)
config = AutoConfig.from_pretrained(repo_id, trust_remote_code=True)
pixels = geolocate.image_processor(images=[Image.open(path).convert("RGB") for path in images], return_tensors="pt")
with torch.no_grad():
    outputs = model(pixel_values=pixels["pixel_values"])
print(json.dumps({
    "answers": geolocate(images, top_k=3),
    "model_class": type(model).__module__ + "." + type(model).__name__,
    "config_class": type(config).__module__ + "." + type(config).__name__,
    "pipeline_class": type(geolocate).__module__ + "." + type(geolocate).__name__,
    "processor_class": type(geolocate.processor).__module__ + "." + type(geolocate.processor).__name__,
    "predicted_city": outputs.predicted_city.tolist(),
    "predicted_coordinates": outputs.predicted_coordinates.tolist(),
}))
"""


def _dry_run(model_dir: Path, out_dir: Path, *extra: str) -> Path:
    assert publish.main([str(model_dir), REPO_ID, "--dry_run", str(out_dir), *extra]) == 0
    return out_dir


def _file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def repo_folder(small_streetclip_dir, tmp_path_factory) -> Path:
    """The dry-run folder of the small saved StreetCLIP model."""
    return _dry_run(small_streetclip_dir, tmp_path_factory.mktemp("dry-run") / "repo")


@pytest.fixture
def model_copy(small_streetclip_dir, tmp_path) -> Path:
    """A private copy of the small saved model, so that a test can check nothing writes to it."""
    return Path(shutil.copytree(small_streetclip_dir, tmp_path / "model"))


@pytest.fixture
def photo_paths(tmp_path) -> list[str]:
    return [str(path) for path in save_random_photos(tmp_path, [f"photo-{seed}.png" for seed in range(3)])]


# The folder


def test_repo_folder_holds_safetensors_weights_config_processor_code_and_card(repo_folder):
    names = {path.name for path in repo_folder.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert CODE_FILES <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]


def test_repo_config_maps_auto_classes_and_geolocation_pipeline_to_repo_code(repo_folder):
    config = json.loads((repo_folder / "config.json").read_text())
    assert config["model_type"] == "streetclip"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_streetclip.StreetCLIPConfig",
        "AutoModel": "modeling_streetclip.StreetCLIPForGeolocation",
        "AutoModelForImageClassification": "modeling_streetclip.StreetCLIPForGeolocation",
    }
    assert config["custom_pipelines"] == {
        "geolocation": {"impl": "pipeline_geolocation.GeolocationPipeline", "pt": ["AutoModel"], "type": "image"}
    }
    processor_config = json.loads((repo_folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_streetclip.StreetCLIPProcessor"}


def test_repo_carries_candidate_table_and_probe_heads(repo_folder):
    places = json.loads((repo_folder / "config.json").read_text())["candidate_places"]
    assert places["country_names"] == SMALL_COUNTRIES
    assert len(places["city_names"]) == 5 * len(SMALL_COUNTRIES)
    with safe_open(repo_folder / "model.safetensors", framework="pt") as weights:
        assert weights.get_slice("country_head.weight").get_shape()[0] == len(SMALL_COUNTRIES)
        assert weights.get_slice("city_head.weight").get_shape()[0] == len(places["city_names"])


def test_repo_code_files_are_the_package_files_unchanged(repo_folder):
    package_dir = Path(modeling_streetclip.__file__).parent
    for name in CODE_FILES:
        assert (repo_folder / name).read_bytes() == (package_dir / name).read_bytes(), name


def test_repo_readme_is_the_card_for_the_repo(repo_folder):
    card = ModelCard.load(repo_folder / "README.md")
    assert card.data.library_name == "transformers"
    assert f'pipeline("geolocation", model="{REPO_ID}", trust_remote_code=True)' in card.text


# Loading the published repo


def test_repo_loads_by_id_offline_in_a_process_without_the_package_and_answers_as_the_package_does(
    repo_folder, small_streetclip_dir, photo_paths, tmp_path, monkeypatch
):
    remote = run_as_hub_user(FRESH_PROCESS_SCRIPT, [REPO_ID, *photo_paths], {REPO_ID: repo_folder}, tmp_path)
    cache = tmp_path / "hub"  # where run_as_hub_user laid the repo out
    assert remote["model_class"].startswith("transformers_modules.")
    assert remote["model_class"].endswith("modeling_streetclip.StreetCLIPForGeolocation")
    assert remote["config_class"].endswith("configuration_streetclip.StreetCLIPConfig")
    assert remote["pipeline_class"].endswith("pipeline_geolocation.GeolocationPipeline")
    assert remote["processor_class"].startswith("transformers_modules.")
    assert remote["processor_class"].endswith("processing_streetclip.StreetCLIPProcessor")

    # The same repo id, offline, here where the package is installed: no trust_remote_code, the installed classes,
    # and the very same answers.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    installed = pipeline("geolocation", model=REPO_ID)
    assert type(installed) is GeolocationPipeline and type(installed.model).__module__.startswith(
        "modeling_streetclip."
    )
    assert installed(photo_paths, top_k=3) == remote["answers"]

    local = pipeline("geolocation", model=str(small_streetclip_dir))
    expected = local(photo_paths, top_k=3)
    for remote_answers, local_answers in zip(remote["answers"], expected, strict=True):
        for remote_answer, local_answer in zip(remote_answers, local_answers, strict=True):
            assert {key: remote_answer[key] for key in ("country", "country_code", "city")} == {
                key: local_answer[key] for key in ("country", "country_code", "city")
            }
            for key in ("latitude", "longitude", "score", "country_score"):
                assert remote_answer[key] == pytest.approx(local_answer[key], abs=1e-5)
    pixels = local.image_processor(
        images=[Image.open(path).convert("RGB") for path in photo_paths], return_tensors="pt"
    )
    with torch.no_grad():
        outputs = local.model(pixel_values=pixels["pixel_values"])
    assert remote["predicted_city"] == outputs.predicted_city.tolist()
    assert remote["predicted_coordinates"] == outputs.predicted_coordinates.tolist()


def test_repo_runs_with_the_installed_package_without_remote_code(repo_folder, small_streetclip_dir, photo_paths):
    geolocate = pipeline("geolocation", model=str(repo_folder))
    assert type(geolocate) is GeolocationPipeline
    assert type(geolocate.model).__module__ == "modeling_streetclip.modeling_streetclip"
    assert geolocate(photo_paths, top_k=2) == pipeline("geolocation", model=str(small_streetclip_dir))(
        photo_paths, top_k=2
    )


# Converting a plain CLIP checkpoint


def test_plain_clip_checkpoint_becomes_a_streetclip_repo_with_heads_for_the_paper_countries(tiny_clip_dir, tmp_path):
    repo = _dry_run(tiny_clip_dir, tmp_path / "repo")
    config = json.loads((repo / "config.json").read_text())
    assert config["model_type"] == "streetclip"
    assert config["candidate_places"]["country_names"] == paper_countries()
    with safe_open(repo / "model.safetensors", framework="pt") as weights:
        assert {"country_head.weight", "city_head.weight"} <= set(weights.keys())
    card = ModelCard.load(repo / "README.md")
    assert f"the CLIP checkpoint `{tiny_clip_dir}`, unchanged" in card.text
    assert card.data.eval_results is None


# License


def test_license_is_inherited_from_the_base_model_card(model_copy, tmp_path, monkeypatch):
    (model_copy / "training_args.json").write_text(json.dumps({"model_name_or_path": "geolocal/StreetCLIP"}))
    asked, real_load = [], ModelCard.load

    def load(repo_id_or_path, *args, **kwargs):
        if repo_id_or_path != "geolocal/StreetCLIP":
            return real_load(repo_id_or_path, *args, **kwargs)
        asked.append(repo_id_or_path)
        return ModelCard("---\nlicense: cc-by-nc-4.0\n---\n# StreetCLIP\n")

    monkeypatch.setattr(ModelCard, "load", load)
    card = ModelCard.load(_dry_run(model_copy, tmp_path / "repo") / "README.md")
    assert asked == ["geolocal/StreetCLIP"]
    assert (card.data.license, card.data.base_model) == ("cc-by-nc-4.0", "geolocal/StreetCLIP")


def test_unreadable_base_model_card_leaves_the_license_undetermined_and_says_so(model_copy, tmp_path, monkeypatch):
    (model_copy / "training_args.json").write_text(json.dumps({"model_name_or_path": "geolocal/StreetCLIP"}))
    real_load = ModelCard.load

    def load(repo_id_or_path, *args, **kwargs):
        if repo_id_or_path == "geolocal/StreetCLIP":
            raise OSError("We couldn't connect to 'https://huggingface.co'.")
        return real_load(repo_id_or_path, *args, **kwargs)

    monkeypatch.setattr(ModelCard, "load", load)
    card = ModelCard.load(_dry_run(model_copy, tmp_path / "repo") / "README.md")
    assert card.data.license == "other"
    assert "could not be determined" in card.text


def test_license_argument_overrides_the_base_model_card(model_copy, tmp_path, monkeypatch):
    (model_copy / "training_args.json").write_text(json.dumps({"model_name_or_path": "geolocal/StreetCLIP"}))
    monkeypatch.setattr(publish, "base_model_license", lambda base_model: pytest.fail("looked the license up"))
    card = ModelCard.load(_dry_run(model_copy, tmp_path / "repo", "--license", "mit") / "README.md")
    assert card.data.license == "mit"


# Uploading


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces the three Hub calls of an upload with recorders; the uploaded folder is copied before it vanishes."""
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"] = {"repo_id": repo_id, **kwargs}

    def upload_folder(self, **kwargs):
        calls["upload_folder"] = {**kwargs, "files": _file_hashes(Path(kwargs["folder_path"]))}
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'1' * 40}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="1" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_upload_creates_repo_and_branch_and_uploads_exactly_the_dry_run_folder(model_copy, fake_hub, tmp_path, capsys):
    argv = [str(model_copy), REPO_ID, "--private", "--revision", "v1", "--commit_message", "First StreetCLIP"]
    assert publish.main(argv) == 0

    assert fake_hub["create_repo"] == {"repo_id": REPO_ID, "private": True, "exist_ok": True}
    assert fake_hub["create_branch"] == {"repo_id": REPO_ID, "branch": "v1", "exist_ok": True}
    upload = fake_hub["upload_folder"]
    assert (upload["repo_id"], upload["revision"], upload["commit_message"]) == (REPO_ID, "v1", "First StreetCLIP")
    assert upload["files"] == _file_hashes(_dry_run(model_copy, tmp_path / "dry-run"))
    assert f"https://huggingface.co/{REPO_ID}" in capsys.readouterr().out


def test_upload_without_revision_or_private_leaves_both_to_the_hub(model_copy, fake_hub):
    assert publish.main([str(model_copy), REPO_ID]) == 0
    assert fake_hub["create_repo"]["private"] is None
    assert "create_branch" not in fake_hub
    assert fake_hub["upload_folder"]["revision"] is None


def test_failed_upload_is_reported_with_nonzero_exit_and_leaves_the_model_folder_untouched(
    model_copy, fake_hub, monkeypatch, capsys
):
    def refuse(self, **kwargs):
        request = httpx2.Request("POST", f"https://huggingface.co/api/models/{kwargs['repo_id']}/commit/main")
        hf_raise_for_status(httpx2.Response(401, request=request, text="Invalid credentials"))

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    before = _file_hashes(model_copy)
    assert publish.main([str(model_copy), REPO_ID]) == 1
    error = capsys.readouterr().err
    assert f"Upload to {REPO_ID} failed" in error
    assert "401" in error
    assert f"{model_copy} is untouched" in error
    assert _file_hashes(model_copy) == before


# Arguments


def test_metrics_argument_names_its_row_with_an_optional_prefix(tmp_path):
    assert publish.split_metrics_argument("IM2GPS=runs/im2gps/metrics.json") == ("IM2GPS", "runs/im2gps/metrics.json")
    assert publish.split_metrics_argument("runs/im2gps/metrics.json") == (None, "runs/im2gps/metrics.json")
    odd = tmp_path / "lr=1e-5" / "metrics.json"
    assert publish.split_metrics_argument(str(odd)) == (None, str(odd))


def test_repo_id_without_namespace_is_refused(small_streetclip_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        publish.parse_args([str(small_streetclip_dir), "tiny-geolocation"])
    assert exit_info.value.code == 2
    assert "NAMESPACE/NAME" in capsys.readouterr().err


def test_dry_run_into_a_non_empty_folder_is_refused(small_streetclip_dir, capsys):
    with pytest.raises(SystemExit):
        publish.parse_args([str(small_streetclip_dir), REPO_ID, "--dry_run", str(small_streetclip_dir)])
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["missing", "empty"])
def test_model_that_is_missing_or_an_empty_folder_is_an_error_line_and_writes_nothing(name, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert publish.main([str(tmp_path / name), REPO_ID, "--dry_run", str(tmp_path / "repo")]) == 2
    assert capsys.readouterr().err.startswith(f"publish.py: error: cannot load MODEL {str(tmp_path / name)!r}: ")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("content", "problem"), [(None, "No such file"), ("{", "is not valid JSON"), ("[1]", "must hold a JSON object")]
)
def test_metrics_file_missing_or_not_a_json_object_is_an_error_line_before_the_model_loads(
    content, problem, tmp_path, monkeypatch, capsys
):
    metrics = tmp_path / "metrics.json"
    if content is not None:
        metrics.write_text(content)
    monkeypatch.setattr(publish.AutoConfig, "from_pretrained", lambda *args: pytest.fail("loaded the model"))
    argv = ["model", REPO_ID, "--metrics", str(metrics), "--dry_run", str(tmp_path / "repo")]
    assert publish.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("publish.py: error: ") and problem in error and str(metrics) in error
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("dry_run", ["repo", "repo/inner", "out"])
def test_dry_run_onto_a_file_is_refused(dry_run, small_streetclip_dir, tmp_path, capsys):
    for name in ("repo", "out-space"):
        (tmp_path / name).write_text("mine")
    argv = [
        str(small_streetclip_dir),
        REPO_ID,
        "--space",
        "streetclip-tests/demo",
        "--dry_run",
        str(tmp_path / dry_run),
    ]
    with pytest.raises(SystemExit) as exit_info:
        publish.parse_args(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("is a file.")
    assert (tmp_path / "repo").read_text() == (tmp_path / "out-space").read_text() == "mine"


def test_command_runs_from_the_checkout_as_documented():
    script = Path(publish.__file__)
    result = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=script.parents[1], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--dry_run DIR" in result.stdout
