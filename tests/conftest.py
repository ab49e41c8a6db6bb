"""Session fixtures: tiny random CLIP checkpoints, built once per session and saved as real folders.

The builders live in `modeling_streetclip.testing_utils`, shared with the speed scripts.
"""

import os
from pathlib import Path

import pytest
import torch
from builders import pretrain_args, run_pretrain_here
from filelock import FileLock
from huggingface_hub import CommitInfo, HfApi, RepoUrl

from modeling_streetclip import StreetCLIPConfig
from modeling_streetclip.testing_utils import (
    PLACES,
    SMALL_COUNTRIES,
    save_streetclip_folder,
    save_tiny_clip_checkpoint,
    write_geo_imagefolder,
)


# Tiny models run many small matmuls; on few cores, threading them costs more than it saves.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with the most slow tests first, each module's order kept: under xdist the long process-starting tests
    then overlap early and the last minute is short tests, which work stealing spreads over every worker."""
    slow = {}
    for item in items:
        slow[item.module] = slow.get(item.module, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.module])


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A plain CLIP checkpoint folder (model_type "clip"), as `geolocal/StreetCLIP` is on the Hub."""
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_streetclip_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    """A folder saved by StreetCLIPForGeolocation from the tiny CLIP: the paper's 193 countries, heads built."""
    return save_streetclip_folder(tiny_clip_dir, tmp_path_factory.mktemp("tiny-streetclip"))


@pytest.fixture(scope="session")
def small_streetclip_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    """A saved StreetCLIP folder restricted to SMALL_COUNTRIES with 5 cities each, for tests that need speed."""
    return save_streetclip_folder(
        tiny_clip_dir,
        tmp_path_factory.mktemp("small-streetclip"),
        candidate_countries=SMALL_COUNTRIES,
        cities_per_country=5,
    )


@pytest.fixture(scope="session")
def region_streetclip_dir(tiny_clip_dir, tmp_path_factory) -> Path:
    """A saved StreetCLIP folder with the region level: SMALL_COUNTRIES, 8 cities each, grouped by GeoNames region."""
    return save_streetclip_folder(
        tiny_clip_dir,
        tmp_path_factory.mktemp("region-streetclip"),
        candidate_countries=SMALL_COUNTRIES,
        cities_per_country=8,
        levels=["country", "region", "city"],
    )


@pytest.fixture
def fake_hub(monkeypatch) -> list[tuple[str, dict]]:
    """Records the Hub calls of an upload, in order; each uploaded folder's files are read before it vanishes."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
        calls.append(("upload_folder", {**kwargs, "files": files}))
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{'1' * 40}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="1" * 40,
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.fixture(scope="session")
def geo_data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic geo set: a training folder (8 photos a city, and three bad rows), a held-out one (3 a city), the
    countries file and a `datasets` cache."""
    root = tmp_path_factory.mktemp("geo-data")
    countries = root / "countries.txt"
    countries.write_text("\n".join(PLACES) + "\n", encoding="utf-8")
    return {
        "train": write_geo_imagefolder(root / "train", photos_per_city=8, seed=0, bad_rows=True),
        "eval": write_geo_imagefolder(root / "eval", photos_per_city=3, seed=1),
        "countries": countries,
        "cache": root / "datasets-cache",
    }


@pytest.fixture(scope="session")
def trained_geo_run(tiny_clip_dir, geo_data, tmp_path_factory) -> tuple[Path, str]:
    """The tiny CLIP after 40 steps of training/pretrain.py on `geo_data`, evaluated at steps 0, 20 and 40, with a
    TensorBoard log: (output folder, standard error). Trained once per session, by whichever pytest-xdist worker asks
    first (the others wait for it). Tests must not change it. A failed run is not run again: its log is kept and every
    later user fails at once with it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, which every worker shares
    output_dir, stderr = root / "trained-geo", root / "trained-geo.stderr"
    failure = root / "trained-geo.failed"
    with FileLock(root / "trained-geo.lock"):
        if not stderr.exists() and not failure.exists():
            options = {
                "eval_data": geo_data["eval"],
                "max_steps": 40,
                "per_device_train_batch_size": 16,
                "eval_steps": 20,
                "eval_on_start": True,
                "checkpointing_steps": 100,
                "logging_steps": 10,
                "dataloader_num_workers": 1,
                "report_to": "tensorboard",
                # A tiny text tower cannot carry the fine caption over to the country prompt alone: add the coarse one.
                "caption_templates": [StreetCLIPConfig().caption_template, "A Street View photo in {country}."],
                "caption_template_probabilities": [0.5, 0.5],
            }
            result = run_pretrain_here(
                pretrain_args(tiny_clip_dir, geo_data, output_dir, **options), geo_data["cache"]
            )
            (stderr if result.returncode == 0 else failure).write_text(result.stderr, encoding="utf-8")
    if failure.exists():
        pytest.fail(
            f"pretrain.py failed (once this session; not run again):\n{failure.read_text(encoding='utf-8')[-5000:]}"
        )
    return output_dir, stderr.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def trained_geo_model(trained_geo_run) -> Path:
    """The folder of `trained_geo_run`: learned answers, not random weights' near-ties. Tests must not change it."""
    return trained_geo_run[0]
