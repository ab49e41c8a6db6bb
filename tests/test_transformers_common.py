"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`) against
`StreetCLIPForGeolocation`, `StreetCLIPConfig` and `StreetCLIPProcessor` at a tiny size.

The mixins come from the source distribution of the installed transformers release on PyPI, downloaded with pip at
test time (never copied into this repository) and cached in `~/.cache/streetclip-tests` (`STREETCLIP_TESTS_CACHE`
moves it) under a file lock, so a machine pays the download once and parallel workers share it. Without it (no
index reachable) the module is skipped with pip's reason.

The source distribution holds transformers' top-level `tests/*.py` only. What they import from elsewhere in
transformers' repository is stubbed below, each stub saying why it does not weaken a test that applies here.
"""

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import types
import unittest
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from filelock import FileLock
from transformers import CLIPImageProcessorPil

from modeling_streetclip import CandidatePlaces, StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.testing_utils import TINY_IMAGE_SIZE, build_tiny_tokenizer, random_photo


# The package name the release's `tests/` folder is imported under (its files import each other relatively).
PACKAGE = "transformers_release_tests"
TEST_MODULES = ("test_modeling_common", "test_configuration_common", "test_processing_common")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streetclip-tests"
    return Path(os.environ.get("STREETCLIP_TESTS_CACHE") or default)


def release_tests_dir(version: str = transformers.__version__) -> Path:
    """The `tests/` folder of transformers `version`'s source distribution, downloaded and extracted once per
    machine; raises `RuntimeError` with pip's message when the download fails."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"transformers-{version}-tests"
    with FileLock(str(root / f"transformers-{version}.lock")):
        if (target / "__init__.py").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=root) as staging:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
            command += ["--dest", staging, f"transformers=={version}"]
            download = subprocess.run(command, capture_output=True, text=True, timeout=600)
            archives = list(Path(staging).glob("transformers-*.tar.gz"))
            if download.returncode != 0 or not archives:
                reason = download.stderr.strip().splitlines()[-1:] or [f"exit status {download.returncode}"]
                raise RuntimeError(f"pip could not download it: {reason[0]}")
            prefix = f"{archives[0].name.removesuffix('.tar.gz')}/tests/"
            with tarfile.open(archives[0]) as archive:
                members = [
                    member
                    for member in archive.getmembers()
                    if member.name.startswith(prefix) and "/" not in member.name[len(prefix) :]
                ]
                archive.extractall(staging, members=members, filter="data")
            # transformers' repository has an empty `tests/__init__.py`, which the distribution leaves out and
            # `test_configuration_common` loads by path.
            (Path(staging) / prefix / "__init__.py").touch()
            os.replace(Path(staging) / prefix, target)
    return target


def import_release_tests(tests_dir: Path) -> dict[str, types.ModuleType]:
    """Import `TEST_MODULES` from `tests_dir` as the package `PACKAGE`, with stubs for the modules of transformers'
    repository that its source distribution leaves out."""
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(tests_dir)]
    stubs = {
        # Export tests of transformers' own exporters; this model's `torch.export` is tested in test_export.py.
        f"{PACKAGE}.exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        # Generation tests; the mixin only checks that a model that cannot `generate` does not inherit it.
        f"{PACKAGE}.generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        # Read only by `ConfigTester.check_config_arguments_init`, which returns before it for composite configs
        # (ours has a text and a vision sub-config).
        f"{PACKAGE}.utils.test_configuration_utils": {"config_common_kwargs": {}},
        # Maps the Hub's fixture URLs to local copies; offline, the image fixture is a local photo instead.
        "fetch_hub_objects_for_ci": {"url_to_local_path": local_fixture},
    }
    sys.modules[PACKAGE] = package
    for name, attributes in stubs.items():
        parts = name.split(".")
        for depth in range(2, len(parts)):  # the stubs' parent packages
            sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module
    return {name: importlib.import_module(f"{PACKAGE}.{name}") for name in TEST_MODULES}


def local_fixture(url: str) -> str:
    """A local stand-in for a Hub fixture file: a photo for the image fixtures; other modalities (video, audio)
    keep their URL, since a processor of images and text never reads them."""
    if not url.endswith((".png", ".jpg")):
        return url
    path = cache_dir() / "fixture-photo.png"
    if not path.is_file():
        # Written whole, then renamed: a parallel worker sees no file or all of it.
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as file:
            random_photo(0, size=(640, 480)).save(file, format="PNG")
        os.replace(file.name, path)
    return str(path)


try:
    with warnings.catch_warnings():
        # Markers that transformers' own conftest registers (flash_attn_test, torch_compile_test...).
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        RELEASE = import_release_tests(release_tests_dir())
except (RuntimeError, OSError, subprocess.TimeoutExpired, ImportError) as error:
    pytest.skip(
        f"transformers {transformers.__version__}'s common tests could not be had from its source distribution "
        f"on PyPI: {error}",
        allow_module_level=True,
    )
ModelTesterMixin = RELEASE["test_modeling_common"].ModelTesterMixin
floats_tensor = RELEASE["test_modeling_common"].floats_tensor
ConfigTester = RELEASE["test_configuration_common"].ConfigTester
ProcessorTesterMixin = RELEASE["test_processing_common"].ProcessorTesterMixin


def tiny_places() -> CandidatePlaces:
    """Three countries with regions and cities, written out (no GeoNames), so that every head and buffer exists."""
    rows = [
        ("France", "Île-de-France", "Paris", 48.86, 2.35),
        ("France", "Île-de-France", "Versailles", 48.80, 2.13),
        ("France", "Auvergne-Rhône-Alpes", "Lyon", 45.76, 4.84),
        ("Japan", "Tokyo", "Tokyo", 35.68, 139.65),
        ("Japan", "Osaka", "Osaka", 34.69, 135.50),
        ("Kenya", "Nairobi", "Nairobi", -1.29, 36.82),
    ]
    return CandidatePlaces.from_records(
        {"country": country, "region": region, "city": city, "latitude": latitude, "longitude": longitude}
        for country, region, city, latitude, longitude in rows
    )


class StreetCLIPModelTester:
    """A tiny StreetCLIP configuration and pixel inputs, with the sizes the common tests check outputs against
    (those of the vision tower, whose hidden states and attentions the model returns)."""

    def __init__(self, parent, batch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = TINY_IMAGE_SIZE
        self.patch_size = 6
        self.num_channels = 3
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.seq_length = (self.image_size // self.patch_size) ** 2 + 1  # the patches and the class token
        self.is_training = True  # gradients flow (see NOT_APPLICABLE for the tests that need a loss)
        tokenizer = build_tiny_tokenizer()
        self.text_config = {
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        self.vision_config = {
            "hidden_size": self.hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
        }

    def get_config(self) -> StreetCLIPConfig:
        return StreetCLIPConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            projection_dim=16,
            levels=["country", "region", "city"],
            candidate_places=tiny_places().to_dict(),
        )

    def prepare_config_and_inputs_for_common(self) -> tuple[StreetCLIPConfig, dict]:
        shape = [self.batch_size, self.num_channels, self.image_size, self.image_size]
        return self.get_config(), {"pixel_values": floats_tensor(shape)}


# The common tests that do not apply, each with the reason; everything else runs and must pass.
NOT_APPLICABLE = {
    # StreetCLIP has no supervised loss: it is trained contrastively by training/pretrain.py, through CLIPModel's
    # own forward, so the loss and training tests have nothing to call.
    "test_training": "no supervised loss (trained contrastively by training/pretrain.py)",
    "test_training_gradient_checkpointing": "no supervised loss (trained contrastively by training/pretrain.py)",
    "test_training_gradient_checkpointing_use_reentrant_false": "no supervised loss",
    "test_training_gradient_checkpointing_use_reentrant_true": "no supervised loss",
    # The geolocation head reads pixels only: the text tower builds the heads once, never in `forward`.
    "test_get_text_features_output": "the geolocation forward is vision-only (text builds the heads)",
    "test_get_text_features_hidden_states": "the geolocation forward is vision-only (text builds the heads)",
    "test_get_text_features_attentions": "the geolocation forward is vision-only (text builds the heads)",
    "test_inputs_embeds": "the input is pixels, with no embedding lookup to bypass",
    "test_inputs_embeds_matches_input_ids": "the input is pixels, with no embedding lookup to bypass",
}


class StreetCLIPForGeolocationTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (StreetCLIPForGeolocation,)
    # A vision model's input embedding is its patch convolution, which resizing a vocabulary does not apply to.
    test_resize_embeddings = False
    _is_composite = True

    def setUp(self):
        self.model_tester = StreetCLIPModelTester(self)
        self.config_tester = ConfigTester(self, config_class=StreetCLIPConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        # The vision models' version of this test (as transformers' CLIP vision tests write it): the input
        # embedding is the patch convolution, not an `nn.Embedding`.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = StreetCLIPForGeolocation(config)
        self.assertIs(model.get_input_embeddings(), model.vision_model.embeddings.patch_embedding)
        replacement = torch.nn.Conv2d(3, 32, kernel_size=6, stride=6, bias=False)
        model.set_input_embeddings(replacement)
        self.assertIs(model.get_input_embeddings(), replacement)
        self.assertIsNone(model.get_output_embeddings())


# Parameterized tests are methods named after the test with an index (`test_get_text_features_output_0`).
for _name in dir(StreetCLIPForGeolocationTest):
    for _test, _reason in NOT_APPLICABLE.items():
        if re.fullmatch(rf"{_test}(_\d+.*)?", _name):
            setattr(StreetCLIPForGeolocationTest, _name, unittest.skip(_reason)(lambda self: None))


class StreetCLIPProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = StreetCLIPProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return build_tiny_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
        return CLIPImageProcessorPil(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size=size)


def test_the_release_tests_are_cached_once_per_machine(monkeypatch):
    """A second session reads the cache: pip is not run again."""
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail(f"downloaded again: {args}"))
    assert (release_tests_dir() / "test_modeling_common.py").is_file()


@pytest.mark.slow
def test_a_release_that_cannot_be_downloaded_is_reported_with_pips_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("STREETCLIP_TESTS_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="pip could not download it: ERROR: No matching distribution found"):
        release_tests_dir("0.0.0.dev0")
