"""Random CLIP checkpoints in the layout of `geolocal/StreetCLIP`, photos and a synthetic geo set for tests and
`eval/speed/`, without downloads; with the checkout, the in-browser page in headless Chromium and a tiny trained model."""

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
from safetensors.torch import load_file
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from .configuration_streetclip import StreetCLIPConfig
from .modeling_streetclip import StreetCLIPForGeolocation


# Six well-separated countries keep candidate tables small where a test does not need the paper's 193.
SMALL_COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Australia", "Canada"]
TINY_IMAGE_SIZE = 30


def _clip_size(text: tuple, vision: tuple, image_size: int, patch_size: int, projection_dim: int) -> dict:
    """CLIPConfig's sizes; `text` and `vision` give each tower's hidden size, intermediate size, layers and heads."""
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {
        "text_config": dict(zip(names, text, strict=True)),
        "vision_config": {**dict(zip(names, vision, strict=True)), "image_size": image_size, "patch_size": patch_size},
        "projection_dim": projection_dim,
    }


TINY_CLIP = _clip_size((32, 37, 2, 4), (32, 37, 2, 4), TINY_IMAGE_SIZE, 2, 16)
# openai/clip-vit-large-patch14-336, the base of geolocal/StreetCLIP: its real scale, for the speed scripts.
VIT_L_14_336 = _clip_size((768, 3072, 12, 12), (1024, 4096, 24, 16), 336, 14, 768)
# OpenAI's CLIP ViT-B/16 at 224 px, the size below StreetCLIP's that speed figures also quote.
VIT_B_16 = _clip_size((512, 2048, 12, 8), (768, 3072, 12, 12), 224, 16, 512)
# The synthetic geo set: colour encodes the country, stripes the city, so a tiny model learns it in a minute.
PLACES = {
    "France": [("Paris", 48.8566, 2.3522), ("Lyon", 45.7640, 4.8357)],
    "Japan": [("Tokyo", 35.6762, 139.6503), ("Osaka", 34.6937, 135.5023)],
    "Brazil": [("Sao Paulo", -23.5505, -46.6333), ("Rio de Janeiro", -22.9068, -43.1729)],
    "Kenya": [("Nairobi", -1.2921, 36.8219), ("Mombasa", -4.0435, 39.6682)],
    "Australia": [("Sydney", -33.8688, 151.2093), ("Melbourne", -37.8136, 144.9631)],
    "Canada": [("Toronto", 43.6532, -79.3832), ("Vancouver", 49.2827, -123.1207)],
}


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP-format byte-level BPE tokenizer with one token per byte and no merges; special tokens take the highest
    ids, as in OpenAI's vocabulary, so CLIP's end-of-text pooling finds them."""
    tokens = [char + suffix for suffix in ("", "</w>") for char in sorted(ByteLevel.alphabet())]
    vocab = {token: index for index, token in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def build_tiny_clip(tokenizer: CLIPTokenizer, seed: int = 0, preset: dict = TINY_CLIP) -> CLIPModel:
    """A CLIP model of the size `preset` gives, with random weights from `seed` and `tokenizer`'s vocabulary."""
    special = {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text_config = {**preset["text_config"], "vocab_size": len(tokenizer), **special}
    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(**{**preset, "text_config": text_config})).eval()


def save_tiny_clip_checkpoint(path: Path, seed: int = 0, pickle_weights: bool = False) -> Path:
    """Save a tiny CLIP folder; `pickle_weights` writes the legacy `pytorch_model.bin` instead of safetensors."""
    save_random_clip(path, TINY_CLIP, seed=seed)
    if pickle_weights:
        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def save_random_vit_l(path: Path, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> Path:
    """Save a random ViT-L/14 CLIP at 336 px: the real cost, no download."""
    return save_random_clip(path, VIT_L_14_336, tokenizer, seed)


def save_random_clip(path: Path, preset: dict, tokenizer: CLIPTokenizer | None = None, seed: int = 0) -> Path:
    """Save a random CLIP of the size `preset` gives, with `tokenizer` (default: the tiny one) and image processor."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    build_tiny_clip(tokenizer, seed, preset).save_pretrained(path)
    tokenizer.save_pretrained(path)
    size = preset["vision_config"]["image_size"]
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(path)
    return path


def random_photo(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A deterministic random RGB photo."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


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
    rows = [("file_name", "latitude", "longitude", "city", "region", "country")]
    for country_index, (country, cities) in enumerate(PLACES.items()):
        for city_index, (city, latitude, longitude) in enumerate(cities):
            for number in range(photos_per_city):
                name = f"{country}-{city_index}-{number}.png"
                place_photo(country_index, city_index, rng).save(folder / name)
                place = (city, "", country) if rng.random() < 0.5 else ("", "", "")
                rows.append((name, latitude + rng.normal(0, 0.05), longitude + rng.normal(0, 0.05), *place))
    if bad_rows:
        (folder / "broken.png").write_bytes(b"not a png")
        place_photo(0, 0, rng).save(folder / "no-coordinates.png")
        place_photo(0, 0, rng).save(folder / "swapped.png")
        rows += [("broken.png", 48.0, 2.0), ("no-coordinates.png", "", ""), ("swapped.png", 151.2, -33.8)]
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as metadata:
        csv.writer(metadata).writerows(row + ("",) * (6 - len(row)) for row in rows)
    return folder


def save_streetclip_folder(clip_dir: Path, path: Path, **from_pretrained_kwargs) -> Path:
    """Convert a plain CLIP folder into a saved StreetCLIPForGeolocation folder with heads and processor files."""
    model = StreetCLIPForGeolocation.from_pretrained(clip_dir, **from_pretrained_kwargs)
    model.save_pretrained(path)
    AutoImageProcessor.from_pretrained(clip_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(clip_dir).save_pretrained(path)
    return path


# The in-browser page, which tests and eval/speed/bench_onnx.py serve beside a model and open in headless Chromium.
CHECKOUT = Path(__file__).resolve().parents[1]
WEB_DIR = CHECKOUT / "model_card" / "web"
# Headers under which the page is cross-origin isolated, as its Space serves it, so WebAssembly may use threads.
CROSS_ORIGIN_ISOLATION = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "cross-origin",
}
WEB_PAGE_TIMEOUT_S = 120


def install_web_dependencies(folder: Path = WEB_DIR) -> Path:
    """`npm ci` the page's packages unless `folder/node_modules` holds them, under a file lock for parallel workers;
    FileNotFoundError without npm."""
    from filelock import FileLock

    lock = json.loads((folder / "package-lock.json").read_text(encoding="utf-8"))
    wanted = {
        path: package["version"] for path, package in lock["packages"].items() if path.startswith("node_modules/")
    }

    def installed() -> bool:
        manifests = ((folder / path / "package.json", version) for path, version in wanted.items())
        return all(
            path.is_file() and json.loads(path.read_bytes())["version"] == version for path, version in manifests
        )

    if installed():
        return folder
    if (npm := shutil.which("npm")) is None:
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

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        served.url = f"http://127.0.0.1:{server.server_address[1]}/"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield served
        finally:
            server.shutdown()
            thread.join()


def headless_chromium():
    """Headless Chromium and its driver from the system (Debian's `chromium` and `chromium-driver`), never a
    downloaded browser, logging its network requests. Raises FileNotFoundError without them."""
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
    """The folder of the tiny CLIP (`clip_dir`, default a fresh one) after 40 steps of `training/pretrain.py` on the
    synthetic geo set: learned answers, not random weights' near-ties, to compare two ways of running it."""
    root.mkdir(parents=True, exist_ok=True)
    (countries := root / "countries.txt").write_text("\n".join(PLACES) + "\n", encoding="utf-8")
    arguments = {
        "model_name_or_path": clip_dir or save_tiny_clip_checkpoint(root / "clip"),
        "train_data": write_geo_imagefolder(root / "train", photos_per_city=8, seed=0),
        "countries": countries,
        "output_dir": root / "run",
    }
    command = [sys.executable, str(CHECKOUT / "training" / "pretrain.py")]
    command += [item for name, value in arguments.items() for item in (f"--{name}", str(value))]
    command += "--cities_per_country 2 --max_steps 40 --per_device_train_batch_size 16 --learning_rate 1e-3".split()
    command += "--checkpointing_steps 100 --dataloader_num_workers 0 --report_to none".split()
    # A tiny text tower cannot carry the fine caption over to the country prompt alone: mix in the coarse one.
    command += ["--caption_templates", StreetCLIPConfig().caption_template, "A Street View photo in {country}."]
    command += ["--caption_template_probabilities", "0.5", "0.5"]
    environment = {**os.environ, "HF_DATASETS_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=environment, cwd=CHECKOUT, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"training/pretrain.py failed with status {result.returncode}:\n{result.stderr[-5000:]}")
    return root / "run"
