"""Test-only helpers: photo folders, a Hub cache laid out by hand, a fresh interpreter without this package, the
browser's request log, the gallery vote's answers alone, a count of processor loads, and training/pretrain.py run in
this process."""

import contextlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_streetclip import StreetCLIPProcessor
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


def count_processor_loads(monkeypatch) -> list[str]:
    """The names `StreetCLIPProcessor.from_pretrained` is called with from now on, in the order of the calls."""
    loads, load = [], StreetCLIPProcessor.from_pretrained.__func__

    def counted(cls, name, *args, **kwargs):
        loads.append(str(name))
        return load(cls, name, *args, **kwargs)

    monkeypatch.setattr(StreetCLIPProcessor, "from_pretrained", classmethod(counted))
    return loads


CHECKOUT = Path(__file__).resolve().parents[1]


def pretrain_args(clip_dir: Path, geo_data: Mapping[str, Path], output_dir: Path, **overrides) -> list[str]:
    """training/pretrain.py's arguments for a small run of the tiny CLIP `clip_dir` on the synthetic geo set of the
    `geo_data` fixture; `overrides` (option: value; True for a flag) add options or replace these."""
    options = {
        "model_name_or_path": clip_dir,
        "train_data": geo_data["train"],
        "countries": geo_data["countries"],
        "cities_per_country": 2,
        "output_dir": output_dir,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "report_to": "none",
        **overrides,
    }
    args = []
    for name, value in options.items():
        if value is True:
            args.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            args += [f"--{name}", *map(str, value)]
        else:
            args += [f"--{name}", str(value)]
    return args


def run_pretrain_here(args: Sequence[str], datasets_cache: Path, **environment: str) -> subprocess.CompletedProcess:
    """`python training/pretrain.py ARGS` from the checkout, run as `pretrain.main(args)` in this process: it spares
    the 5 s a fresh interpreter takes to import torch, transformers and datasets. Its standard error (the log, the
    warnings, `sys.exit`'s message or the traceback, and what its child processes write) and its exit status come
    back as a subprocess's would. Tests of the launcher, of several processes or of a killed run start a process.
    What the run changes in this process (Accelerate's state, random states, log levels, torch's thread count) is put
    back as it was."""
    import datasets
    import pretrain
    import transformers
    from accelerate.state import AcceleratorState, GradientState, PartialState

    random_states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    shared_states = {state: dict(state._shared_state) for state in (PartialState, AcceleratorState, GradientState)}
    # Before the loggers' levels: the first get_verbosity sets its library's logger up at the default verbosity.
    verbosity = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    levels = {
        name: logger.level for name, logger in logging.root.manager.loggerDict.items() if hasattr(logger, "level")
    }
    num_threads = torch.get_num_threads()
    root = logging.getLogger()
    root_level = root.level
    returncode = 0
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        log_path = Path(folder) / "stderr.txt"
        patch.chdir(CHECKOUT)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(datasets_cache))
        for name, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **environment}.items():
            patch.setenv(name, value)
        with (
            open(log_path, "a", encoding="utf-8", buffering=1) as log,
            _stderr_fd_to(log),
            contextlib.redirect_stderr(log),
        ):
            handler = logging.StreamHandler(log)
            handler.setFormatter(logging.Formatter("%(levelname)s - %(name)s - %(message)s"))
            root.addHandler(handler)
            root.setLevel(logging.INFO)  # the script's basicConfig does nothing under pytest's log handlers
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("default")  # and what a fresh interpreter hides, hidden
                    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                        warnings.simplefilter("ignore", category)
                    try:
                        pretrain.main([str(arg) for arg in args])
                    except SystemExit as stopped:
                        if isinstance(stopped.code, str):
                            log.write(stopped.code + "\n")
                        returncode = stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None)
                    except Exception:
                        returncode = 1
                        log.write(traceback.format_exc())
                for warning in caught:
                    log.write(
                        warnings.formatwarning(warning.message, warning.category, warning.filename, warning.lineno)
                    )
            finally:
                root.removeHandler(handler)
                root.setLevel(root_level)
                for name, level in levels.items():  # the script quiets two of Accelerate's loggers, for one
                    logging.getLogger(name).setLevel(level)
                transformers.utils.logging.set_verbosity(verbosity[0])
                datasets.utils.logging.set_verbosity(verbosity[1])
                for state, shared in shared_states.items():  # the very objects, not a new state made alike
                    state._shared_state.clear()
                    state._shared_state.update(shared)
                torch.set_num_threads(num_threads)
                random.setstate(random_states[0])
                np.random.set_state(random_states[1])
                torch.set_rng_state(random_states[2])
        stderr = log_path.read_text(encoding="utf-8")
    return subprocess.CompletedProcess(["pretrain.py", *map(str, args)], returncode, "", stderr)


@contextlib.contextmanager
def _stderr_fd_to(stream):
    """Point file descriptor 2, which child processes inherit, at `stream` for a while."""
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(stream.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
