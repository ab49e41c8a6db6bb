"""Test-only helpers: photo folders, a Hub cache laid out by hand, a fresh interpreter without this package, the
browser's request log, and the gallery vote's answers alone."""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from modeling_streetclip.gallery_vote import neighbor_vote
from modeling_streetclip.testing_utils import random_photo


def place_in_hub_cache(
    folder: Path, cache_dir: Path, repo_id: str, revision: str = "0" * 40, repo_type: str = "model"
) -> Path:
    """Lay `folder` out as the Hugging Face cache holds a downloaded repo (`models--ORG--NAME/snapshots/REV`, or
    `datasets--...` for `repo_type="dataset"`)."""
    repo_dir = cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir


# Prepended to the scripts of `run_as_hub_user`: their `import modeling_streetclip` then raises ImportError.
_WITHOUT_THIS_PACKAGE = 'import sys\nsys.modules["modeling_streetclip"] = None\n'


def run_as_hub_user(
    script: str, args: Sequence[str], repos: Mapping[str, Path], workdir: Path, cwd: Path | None = None
) -> dict:
    """Run the Python source `script` with `args` as someone who never installed this package: a fresh interpreter
    that cannot import it, with the Hub offline and each folder of `repos` (Hub id -> folder) in its Hub cache, as
    if downloaded (the cache is `workdir / "hub"`, for callers that load the same ids). Returns the JSON object the
    script prints last; a failing script raises with its standard error.
    """
    cache = workdir / "hub"
    for repo_id, folder in repos.items():
        place_in_hub_cache(folder, cache, repo_id)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(workdir / "hf-home"),
        "HF_HUB_CACHE": str(cache),
        "PYTHONPATH": "",
    }
    child = subprocess.run(
        [sys.executable, "-c", _WITHOUT_THIS_PACKAGE + script, *args],
        env=env,
        cwd=cwd or workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if child.returncode != 0:
        raise RuntimeError(f"The script exited with status {child.returncode}:\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def save_random_photos(folder: Path, names: Sequence[str], size: tuple[int, int] = (48, 40)) -> list[Path]:
    """Save `random_photo(i, size)` as `folder / names[i]` for each name (the format follows the extension), creating
    the folder; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for seed, path in enumerate(paths):
        random_photo(seed, size).save(path)
    return paths


def requested_urls(chromium) -> list[str]:
    """Every URL the browser requested since the last call (DevTools' network events), the page's own and any
    other's."""
    urls = []
    for entry in chromium.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def kernel_vote(*args, **kwargs) -> list[tuple[int, float]]:
    """`neighbor_vote`'s answers `(position, score)`, best first."""
    return neighbor_vote(*args, **kwargs).answers
