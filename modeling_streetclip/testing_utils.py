"""Tiny random CLIP checkpoints and photos for tests and speed scripts, built without any download.

They mirror the published `geolocal/StreetCLIP` layout (a plain CLIP folder: config.json, weights, tokenizer and
image-processor files) at hidden size 32, so the loading code a user runs is exercised in milliseconds; the speed
scripts build the same layout at ViT-L/14-336 scale. The synthetic geo set (`PLACES`, `place_photo`,
`write_geo_imagefolder`) is what a tiny model learns in tests that need answers that are not near-ties. transformers
ships its own `testing_utils`; this is ours, importable by tests and by the scripts under `eval/speed/` alike. The
in-browser page (`model_card/web/`) is served and driven in headless Chromium from here too, and a tiny model is
trained with `training/pretrain.py`: those need the checkout.
"""

import colorsys
import contextlib
import csv
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from .configuration_streetclip import StreetCLIPConfig
from .modeling_streetclip import StreetCLIPForGeolocation


# Six well-separated countries keep candidate tables small where a test does not need the paper's 193.
SMALL_COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Australia", "Canada"]
TINY_IMAGE_SIZE = 30
# openai/clip-vit-large-patch14-336, the base of geolocal/StreetCLIP: its real scale, for the speed scripts.
VIT_L_14_336 = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    },
    "projection_dim": 768,
}
# OpenAI's CLIP ViT-B/16 at 224 px, the size below StreetCLIP's that speed figures also quote.
VIT_B_16 = {
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 16,
    },
    "projection_dim": 512,
}
# The synthetic geo set: two well-separated cities in each of six countries; in its photos colour encodes the
# country, stripe direction the city, so a tiny model can learn it in a minute and then answers without near-ties.
PLACES = {
    "France": [("Paris", 48.8566, 2.3522), ("Lyon", 45.7640, 4.8357)],
    "Japan": [("Tokyo", 35.6762, 139.6503), ("Osaka", 34.6937, 135.5023)],
    "Brazil": [("Sao Paulo", -23.5505, -46.6333), ("Rio de Janeiro", -22.9068, -43.1729)],
    "Kenya": [("Nairobi", -1.2921, 36.8219), ("Mombasa", -4.0435, 39.6682)],
    "Australia": [("Sydney", -33.8688, 151.2093), ("Melbourne", -37.8136, 144.9631)],
    "Canada": [("Toronto", 43.6532, -79.3832), ("Vancouver", 49.2827, -123.1207)],
}


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP-format byte-level BPE tokenizer with one token per byte and no merges.

    Special tokens take the highest ids, as in OpenAI's vocabulary, so CLIP's end-of-text pooling finds them.
    """
    vocab = {}
    for suffix in ("", "</w>"):
        for char in sorted(ByteLevel.alphabet()):
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny_clip(tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            **special,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=2,
        ),
        projection_dim=16,
    )
    return CLIPModel(config).eval()


def save_tiny_clip_checkpoint(path: Path, seed: int = 0, pickle_weights: bool = False) -> Path:
    """Save a plain CLIP checkpoint folder in the layout of `geolocal/StreetCLIP`; `pickle_weights` writes the
    legacy `pytorch_model.bin` that older Hub repos hold instead of safetensors."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_clip(tokenizer, seed)
    model.save_pretrained(path)
    if pickle_weights:
        torch.save(model.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(path)
    return path


def save_random_vit_l(path: Path, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> Path:
    """Save a plain CLIP checkpoint folder of ViT-L/14 at 336 px with random weights: the real cost, no download.

    `tokenizer` defaults to the tiny byte-level one, whose longer prompts only slow the one-off head building.
    """
    return save_random_clip(path, VIT_L_14_336, tokenizer, seed)


def save_random_clip(path: Path, preset: dict, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> Path:
    """Save a plain CLIP checkpoint folder of the size `preset` gives (VIT_L_14_336, VIT_B_16) with random weights,
    the tokenizer (by default the tiny one) and an image processor at the preset's image size."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    special = {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = CLIPConfig(
        text_config={**preset["text_config"], "vocab_size": len(tokenizer), **special},
        vision_config=preset["vision_config"],
        projection_dim=preset["projection_dim"],
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    size = preset["vision_config"]["image_size"]
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        path
    )
    return path


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


def random_photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A deterministic random RGB photo."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def save_random_photos(folder: Path, names: Sequence[str], size: tuple[int, int] = (48, 40)) -> list[Path]:
    """Save `random_photo(i, size)` as `folder / names[i]` for each name (the format follows the extension), creating
    the folder; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for seed, path in enumerate(paths):
        random_photo(seed, size).save(path)
    return paths


def place_photo(country: int, city: int, rng: np.random.Generator) -> Image.Image:
    """A noisy photo of the synthetic geo set whose hue identifies the country (index into `PLACES`) and whose
    stripe direction identifies the city (0 or 1)."""
    base = np.array(colorsys.hsv_to_rgb(country / len(PLACES), 0.8, 0.9)) * 255
    rows, columns = np.mgrid[0:TINY_IMAGE_SIZE, 0:TINY_IMAGE_SIZE]
    stripes = ((columns if city == 0 else rows) // 3) % 2
    pixels = base * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_geo_imagefolder(folder: Path, photos_per_city: int, seed: int, bad_rows: bool = False) -> Path:
    """The synthetic geo set as an imagefolder with metadata.csv (files named `{country}-{city index}-{number}.png`);
    half the rows carry place labels, the rest must be geocoded. `bad_rows` adds an unreadable photo, one without
    coordinates and one with latitude and longitude swapped."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for country_index, (country, cities) in enumerate(PLACES.items()):
        for city_index, (city, latitude, longitude) in enumerate(cities):
            for number in range(photos_per_city):
                name = f"{country}-{city_index}-{number}.png"
                place_photo(country_index, city_index, rng).save(folder / name)
                labelled = rng.random() < 0.5
                rows.append(
                    {
                        "file_name": name,
                        "latitude": latitude + rng.normal(0, 0.05),
                        "longitude": longitude + rng.normal(0, 0.05),
                        "city": city if labelled else "",
                        "region": "",
                        "country": country if labelled else "",
                    }
                )
    if bad_rows:
        (folder / "broken.png").write_bytes(b"not a png")
        place_photo(0, 0, rng).save(folder / "no-coordinates.png")
        place_photo(0, 0, rng).save(folder / "swapped.png")
        rows += [
            {"file_name": "broken.png", "latitude": 48.0, "longitude": 2.0},
            {"file_name": "no-coordinates.png", "latitude": "", "longitude": ""},
            {"file_name": "swapped.png", "latitude": 151.2, "longitude": -33.8},
        ]
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as metadata:
        writer = csv.DictWriter(metadata, fieldnames=list(rows[0]), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return folder


def save_streetclip_folder(clip_dir: Path, path: Path, **from_pretrained_kwargs) -> Path:
    """Convert a plain CLIP folder into a saved StreetCLIPForGeolocation folder with heads and processor files."""
    model = StreetCLIPForGeolocation.from_pretrained(clip_dir, **from_pretrained_kwargs)
    model.save_pretrained(path)
    AutoImageProcessor.from_pretrained(clip_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(clip_dir).save_pretrained(path)
    return path


# The in-browser page (model_card/web/): tests and eval/speed/bench_onnx.py serve it with a model beside it and open it
# in headless Chromium.
WEB_DIR = Path(__file__).resolve().parents[1] / "model_card" / "web"
# Headers under which the page is cross-origin isolated, as its Space serves it, so WebAssembly may use threads.
CROSS_ORIGIN_ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "cross-origin",
}
WEB_PAGE_TIMEOUT_S = 120


def install_web_dependencies(folder: Path = WEB_DIR) -> Path:
    """Install the page's npm packages from its lockfile (`npm ci`) unless `folder/node_modules` holds them already;
    parallel test workers take turns (a file lock). Raises FileNotFoundError when npm is not installed."""
    from filelock import FileLock

    lock = json.loads((folder / "package-lock.json").read_text(encoding="utf-8"))
    wanted = {
        path: package["version"] for path, package in lock["packages"].items() if path.startswith("node_modules/")
    }

    def installed() -> bool:
        for path, version in wanted.items():
            manifest = folder / path / "package.json"
            if not manifest.is_file() or json.loads(manifest.read_text(encoding="utf-8"))["version"] != version:
                return False
        return True

    if installed():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(f"npm is not installed; the page's packages install with `npm ci --prefix {folder}`.")
    with FileLock(folder / "node_modules.lock"):
        if not installed():
            command = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
            subprocess.run(command, cwd=folder, check=True, capture_output=True, timeout=600)
    return folder


@dataclass
class ServedFolders:
    """Where `serve_folders` listens (`url`, ending in /) and every request it got, as (method, path)."""

    url: str = ""
    requests: list[tuple[str, str]] = field(default_factory=list)


@contextlib.contextmanager
def serve_folders(routes: Mapping[str, Path]) -> Iterator[ServedFolders]:
    """Serve folders over HTTP on 127.0.0.1 at a free port, in a thread: `routes` maps URL prefixes (`"/"`,
    `"/model/"`) to folders, the longest prefix first. Responses are cross-origin isolated; requests are recorded."""
    served = ServedFolders()
    prefixes = sorted(routes, key=len, reverse=True)

    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript"}

        def translate_path(self, path: str) -> str:
            path = urllib.parse.urlsplit(path).path
            prefix = next((prefix for prefix in prefixes if path.startswith(prefix)), None)
            if prefix is None:
                return ""  # no file: 404
            self.directory = str(routes[prefix])
            return super().translate_path("/" + path[len(prefix) :])

        def end_headers(self) -> None:
            for name, value in CROSS_ORIGIN_ISOLATION.items():
                self.send_header(name, value)
            super().end_headers()

        def log_request(self, code="-", size="-") -> None:
            served.requests.append((self.command, urllib.parse.urlsplit(self.path).path))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.url = f"http://127.0.0.1:{server.server_address[1]}/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def headless_chromium():
    """Headless Chromium and its driver from the system (Debian's `chromium` and `chromium-driver`), never a
    downloaded browser, recording its network requests (see `requested_urls`). Raises FileNotFoundError without
    them."""
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not browser or not driver:
        raise FileNotFoundError(
            "Chromium or chromedriver not found; install them with `apt-get install -y chromium chromium-driver`"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # Root in CI has no user namespace sandbox; /dev/shm is small in containers.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    chromium = webdriver.Chrome(service=Service(driver), options=options)
    chromium.set_page_load_timeout(WEB_PAGE_TIMEOUT_S)
    return chromium


def requested_urls(chromium) -> list[str]:
    """Every URL the browser requested since the last call (DevTools' network events), the page's own and any
    other's."""
    urls = []
    for entry in chromium.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _page_phase(chromium) -> str:
    return chromium.execute_script("return document.getElementById('status').dataset.phase")


def open_web_page(chromium, url: str) -> None:
    """Open the page at `url` and wait until its model is loaded (or failed to load)."""
    from selenium.webdriver.support.ui import WebDriverWait

    chromium.get(url)
    WebDriverWait(chromium, WEB_PAGE_TIMEOUT_S).until(lambda driver: _page_phase(driver) in ("ready", "error"))


def drop_photos(chromium, paths: Sequence[Path], timeout: float = WEB_PAGE_TIMEOUT_S) -> None:
    """Choose `paths` in the page's file input, as a user does, and wait until the page has answered them all."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # The page marks the end of each batch; clear the last one's mark first.
    chromium.execute_script("document.getElementById('status').dataset.phase = 'busy'")
    chromium.find_element(By.ID, "photos").send_keys("\n".join(str(path) for path in paths))
    WebDriverWait(chromium, timeout).until(lambda driver: _page_phase(driver) == "done")


def train_geo_model(root: Path, clip_dir: Path | None = None) -> Path:
    """The tiny CLIP (`clip_dir`, by default a fresh one) after 40 steps of `training/pretrain.py` on the synthetic
    geo set (about a minute): a model whose answers are learned, not the near-ties of random weights, so that the
    agreement of two ways of running it means something. Needs the checkout; returns the trained model's folder."""
    root.mkdir(parents=True, exist_ok=True)
    clip_dir = clip_dir or save_tiny_clip_checkpoint(root / "clip")
    countries = root / "countries.txt"
    countries.write_text("\n".join(PLACES) + "\n", encoding="utf-8")
    arguments = {
        "model_name_or_path": clip_dir,
        "train_data": write_geo_imagefolder(root / "train", photos_per_city=8, seed=0),
        "countries": countries,
        "cities_per_country": 2,
        "output_dir": root / "run",
        "max_steps": 40,
        "per_device_train_batch_size": 16,
        "learning_rate": 1e-3,
        "checkpointing_steps": 100,
        "dataloader_num_workers": 0,
        "report_to": "none",
    }
    checkout = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(checkout / "training" / "pretrain.py")]
    command += [item for name, value in arguments.items() for item in (f"--{name}", str(value))]
    # A tiny text tower cannot carry the fine caption over to the country prompt alone: mix in the coarse one.
    command += ["--caption_templates", StreetCLIPConfig().caption_template, "A Street View photo in {country}."]
    command += ["--caption_template_probabilities", "0.5", "0.5"]
    environment = {**os.environ, "HF_DATASETS_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=environment, cwd=checkout, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"training/pretrain.py failed with status {result.returncode}:\n{result.stderr[-5000:]}")
    return root / "run"
