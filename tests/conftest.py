"""Session fixtures: tiny random CLIP checkpoints, built once per session and saved as real folders.

The builders live in `modeling_streetclip.testing_utils`, shared with the speed scripts.
"""

import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from huggingface_hub import CommitInfo, HfApi, RepoUrl

from modeling_streetclip.testing_utils import (
    SMALL_COUNTRIES,
    save_streetclip_folder,
    save_tiny_clip_checkpoint,
    train_geo_model,
)


# Tiny models run many small matmuls; on few cores, threading them costs more than it saves.
torch.set_num_threads(1)


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
def trained_geo_model(tmp_path_factory) -> Path:
    """The tiny CLIP after 40 steps on the synthetic geo set (`train_geo_model`): trained once per session, by
    whichever pytest-xdist worker asks first (the others wait for it). Tests must not change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, which every worker shares
    done = root / "trained-geo.done"
    with FileLock(root / "trained-geo.lock"):
        if not done.exists():
            done.write_text(str(train_geo_model(root / "trained-geo")), encoding="utf-8")
    return Path(done.read_text(encoding="utf-8"))
