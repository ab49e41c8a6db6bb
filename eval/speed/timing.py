"""What the speed scripts share: their command line, photos and photo folders, points on Earth, a small StreetCLIP
folder, the bare vision forward, interleaved and synchronized timing, `streetclip` commands in their own process, and
a fresh process's memory."""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modeling_streetclip import StreetCLIPForGeolocation
from modeling_streetclip.quantization import Int8DynamicConfig
from modeling_streetclip.testing_utils import SMALL_COUNTRIES, random_photo, save_streetclip_folder


PHOTO_SIZE = (640, 480)
T = TypeVar("T")


def speed_parser(doc: str, rounds: int = 0, batch_size: int = 0) -> argparse.ArgumentParser:
    """A script's parser, described by its docstring's first paragraph; --rounds and --batch_size given defaults."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if rounds:
        parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (medians are reported)")
    if batch_size:
        parser.add_argument("--batch_size", type=int, default=batch_size)
    return parser


def machine_line() -> str:
    """torch, its threads and how busy the machine is: other jobs skew every figure."""
    load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads; {load}"


def noise_photos(count: int, seed: int = 0) -> list[Image.Image]:
    """640x480 photos of noise, in memory."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*PHOTO_SIZE[::-1], 3), dtype=np.uint8)) for _ in range(count)]


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """640x480 JPEGs of upsampled noise, smooth as photos are, so that decoding one costs what a photo's does."""
    folder.mkdir(parents=True)
    paths = [folder / f"{seed:05d}.jpg" for seed in range(count)]
    for seed, path in enumerate(paths):
        photo = random_photo(seed, (PHOTO_SIZE[0] // 16, PHOTO_SIZE[1] // 16))
        photo.resize(PHOTO_SIZE, Image.Resampling.BICUBIC).save(path, quality=90)
    return paths


def random_points(rng: np.random.Generator, n: int) -> np.ndarray:
    """Points spread uniformly over the sphere, as (n, 2) [lat, lon] in degrees."""
    return np.column_stack([np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n))), rng.uniform(-180.0, 180.0, n)])


def write_photo_folder(folder: Path, count: int) -> Path:
    """`count` JPEGs with a metadata.csv of points on Earth: an image folder `index build` reads."""
    photos = write_jpegs(folder, count)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["file_name", "latitude", "longitude"])
        writer.writerows([path.name, rng.uniform(-80, 80), rng.uniform(-180, 180)] for path in photos)
    return folder


def save_small_streetclip(clip_dir: Path, path: Path) -> Path:
    """`clip_dir` as a StreetCLIP folder of six countries of five cities: heads that are quick to build and cost nothing
    beside the towers."""
    return save_streetclip_folder(clip_dir, path, candidate_countries=SMALL_COUNTRIES, cities_per_country=5)


def load_vision(model_dir: Path, variant: str = "float32") -> StreetCLIPForGeolocation:
    """The saved model without its text tower, in our int8 or in a torch dtype, by name."""
    kwargs = {"quantization_config": Int8DynamicConfig()} if variant == "int8" else {"dtype": getattr(torch, variant)}
    return StreetCLIPForGeolocation.from_pretrained(model_dir, vision_only=True, **kwargs)


@torch.no_grad()
def vision_forward(model: StreetCLIPForGeolocation, pixel_values: torch.Tensor) -> torch.Tensor:
    """The bare `vision_model` + `visual_projection`, the floor a pipeline is compared with: normalised float32
    embeddings."""
    embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    return F.normalize(embeds.float(), dim=-1)


def timed(function: Callable[[], T]) -> tuple[T, float]:
    """What `function()` returns, and the wall seconds it took."""
    start = time.perf_counter()
    return function(), time.perf_counter() - start


def seconds(function: Callable[[], object]) -> float:
    return timed(function)[1]


def synchronized_seconds(run: Callable[[], object], device: str) -> float:
    """Seconds of `run` with the device's queued work included."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    synchronize()
    return seconds(lambda: (run(), synchronize()))


def interleaved_medians(methods: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each method over `rounds`, after a warm-up call each; the order rotates every round, so that
    drift on a shared machine hits every method alike."""
    for method in methods.values():
        method()
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds(methods[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def print_per_image(
    methods: dict[str, Callable[[], object]], rounds: int, batch_size: int, ratios: dict[str, tuple[str, str]]
) -> None:
    """Print the interleaved median seconds per image of `methods`, each on a batch of `batch_size`, with the ratio of
    each method in `ratios` to its (reference, target)."""
    per_image = {name: median / batch_size for name, median in interleaved_medians(methods, rounds).items()}
    print(f"per image at batch {batch_size}, median of {rounds} rounds:")
    for name, time_s in per_image.items():
        reference, target = ratios.get(name, ("", ""))
        ratio = f"  {time_s / per_image[reference]:5.2f}x {reference}{target}" if reference else ""
        print(f"  {name:<32} {time_s:7.3f} s{ratio}")


def command_seconds(arguments: Sequence[object], processes: int = 1, threads: int = 0) -> float:
    """Wall seconds of one `streetclip` command in its own process, under torchrun for several `processes`;
    `threads` sets OMP_NUM_THREADS."""
    command = [sys.executable, "-m"]
    if processes > 1:
        command += ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    command += ["modeling_streetclip.cli", *map(str, arguments)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    result, elapsed = timed(lambda: subprocess.run(command, env=env, capture_output=True, text=True))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return elapsed


def locate_rate(photos: Sequence[Path], short: int, model_dir: Path, output: Path, *options, **placement) -> float:
    """Images/s of `streetclip locate` once started: a run over `photos` less one over the first `short`, so that
    start-up (imports, process group, model loading) cancels out; `placement` goes to `command_seconds`."""

    def run(count: int) -> float:
        output.unlink(missing_ok=True)
        output.with_name(output.name + ".options.json").unlink(missing_ok=True)
        arguments = ["locate", *photos[:count], "--model", model_dir, "--output", output, *options]
        return command_seconds(arguments, **placement)

    return steady_rate(len(photos), short, run(len(photos)), run(short))


def build_rate(photos: Path, short: Path, model_dir: Path, output: Path, *options, **placement) -> tuple[float, float]:
    """Images/s of `streetclip index build` over the folder `photos` (`write_photo_folder`'s): over the whole command,
    start-up included, and once started, what it adds to a run over the smaller folder `short` (nan when `short` is
    `photos`); `placement` goes to `command_seconds`."""

    def run(folder: Path) -> float:
        shutil.rmtree(output, ignore_errors=True)
        return command_seconds(
            ["index", "build", folder, "--model", model_dir, "--output", output, *options], **placement
        )

    images, part = (sum(1 for _ in folder.glob("*.jpg")) for folder in (photos, short))
    images_s = run(photos)
    part_s = run(short) if short != photos else images_s
    return images / images_s, steady_rate(images, part, images_s, part_s)


def steady_rate(images: int, part: int, images_s: float, part_s: float) -> float:
    """Images/s once running: what a run over `images` adds to one over `part`; nan where that cannot be measured
    (the same count, or the longer run not slower: too few images for the machine's noise)."""
    return (images - part) / (images_s - part_s) if images > part and images_s > part_s else float("nan")


# load_vision's arguments written out: importing this module would add its imports to the memory measured.
_MEMORY_CHILD = """
import json, sys, torch
from pathlib import Path
from modeling_streetclip import StreetCLIPForGeolocation
from modeling_streetclip.quantization import Int8DynamicConfig
model_dir, vision_only, variant, batch_size = sys.argv[1:]
kwargs = {"quantization_config": Int8DynamicConfig()} if variant == "int8" else {"dtype": getattr(torch, variant)}
model = StreetCLIPForGeolocation.from_pretrained(model_dir, vision_only=vision_only == "1", **kwargs)
size = model.config.vision_config.image_size
with torch.no_grad():
    model(torch.randn(int(batch_size), 3, size, size, dtype=model.dtype))
tensors = [value for value in model.state_dict().values() if isinstance(value, torch.Tensor)]
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
keys = {"peak": "VmHWM", "total": "VmRSS", "anonymous": "RssAnon", "file": "RssFile"}
figures = {name: int(status[key].split()[0]) / 1024 for name, key in keys.items()}
print(json.dumps({"weights": sum(t.numel() * t.element_size() for t in tensors) / 2**20, **figures}))
"""


def memory_after_one_batch(
    model_dir: Path, batch_size: int = 1, vision_only: bool = True, variant: str = "float32"
) -> dict[str, float]:
    """MiB of a fresh process that loads the model (in `variant`, as `load_vision` names it) and answers one batch:
    weights and heads, peak resident memory (VmHWM: unlike getrusage, not inherited across fork and exec), and its
    total, anonymous and file-backed parts."""
    arguments = [str(model_dir), str(int(vision_only)), variant, str(batch_size)]
    result = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring the memory of {arguments} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])
