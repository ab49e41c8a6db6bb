"""Time `streetclip locate`: images/s with decoding in the main process vs in DataLoader workers, and the whole
command's overhead over the bare vision forward at ViT-L/14-336 scale.

1. 200 generated 640x480 JPEGs and the tiny random model of the tests: images/s at `--num_workers 0` and `--num_workers 2`.
2. A random-weight CLIP at the size of `geolocal/StreetCLIP` (ViT-L/14 at 336 px), saved as a StreetCLIP folder with a
   small candidate table: the command over a few of those JPEGs against `vision_model` + `visual_projection` on the
   same images, already preprocessed.

Usage, from the repository root:

    python eval/speed/bench_locate.py [--images 200] [--large_images 16] [--batch_size 8] [--repeats 2] [--skip_large]

It prints figures; it asserts nothing. Both parts run the command in its own process, as a user does, and count
its time less its start-up (Python, imports, Accelerate), measured as the best of a few reruns on a finished output,
which find every input recorded and stop before loading the model.
"""

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor

from modeling_streetclip import StreetCLIPForGeolocation, load_rgb_image
from modeling_streetclip.testing_utils import (
    SMALL_COUNTRIES,
    random_photo,
    save_random_vit_l,
    save_streetclip_folder,
    save_tiny_clip_checkpoint,
)


def make_photos(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """JPEGs with the smooth content of photos (upsampled noise), so that decoding costs what a real photo does."""
    folder.mkdir(parents=True)
    paths = []
    for seed in range(count):
        path = folder / f"{seed:04d}.jpg"
        random_photo(seed, (size[0] // 16, size[1] // 16)).resize(size, Image.Resampling.BICUBIC).save(
            path, quality=90
        )
        paths.append(path)
    return paths


def timed_locate(arguments: list) -> float:
    """Seconds that one whole `streetclip locate` run takes in its own process, its output kept off the terminal."""
    command = [sys.executable, "-m", "modeling_streetclip.cli", "locate", *map(str, arguments)]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with status {completed.returncode}: {completed.stderr}")
    return seconds


def startup_seconds(arguments: list, repeats: int) -> float:
    """The command's start-up: the best of `repeats` reruns of `arguments`, whose --output is finished already."""
    return min(timed_locate(arguments) for _ in range(repeats))


def save_vit_l_streetclip(folder: Path) -> Path:
    """A random-weight ViT-L/14-336 CLIP saved as a StreetCLIP folder with heads for six countries of five cities."""
    return save_streetclip_folder(
        save_random_vit_l(folder / "vit-l-clip"),
        folder / "vit-l-streetclip",
        candidate_countries=SMALL_COUNTRIES,
        cities_per_country=5,
    )


@torch.no_grad()
def bare_vision_forward(model_dir: Path, photos: list[Path], batch_size: int) -> tuple[float, Callable[[], float]]:
    """Seconds to load the model (vision tower only), and a function that times `vision_model` + `visual_projection`
    over the photos, preprocessed beforehand, in batches of `batch_size`."""
    start = time.perf_counter()
    model = StreetCLIPForGeolocation.from_pretrained(model_dir, vision_only=True)
    load_seconds = time.perf_counter() - start
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    pixel_values = image_processor(images=[load_rgb_image(path) for path in photos], return_tensors="pt")
    batches = pixel_values["pixel_values"].split(batch_size)
    model.visual_projection(model.vision_model(pixel_values=batches[0][:1]).pooler_output)  # one-off kernel setup

    @torch.no_grad()
    def forward_seconds() -> float:
        start = time.perf_counter()
        for batch in batches:
            model.visual_projection(model.vision_model(pixel_values=batch).pooler_output)
        return time.perf_counter() - start

    return load_seconds, forward_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="640x480 JPEGs for the tiny-model throughput")
    parser.add_argument("--large_images", type=int, default=16, help="JPEGs for the ViT-L/14-336 overhead")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of each setting; the best counts")
    parser.add_argument("--skip_large", action="store_true", help="time the tiny model only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = scratch / "photos"
        make_photos(folder, args.images)
        tiny_dir = save_streetclip_folder(
            save_tiny_clip_checkpoint(scratch / "tiny-clip"),
            scratch / "tiny-streetclip",
            candidate_countries=SMALL_COUNTRIES,
            cities_per_country=5,
        )
        # Other processes on the machine skew every figure below: say how busy it was.
        print(
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch uses {torch.get_num_threads()} threads"
        )
        print(f"tiny model, {args.images} 640x480 JPEGs, batch {args.batch_size}:")
        # Alternated and repeated, best of each: other load on the machine then skews both sides alike.
        seconds = {0: math.inf, 2: math.inf}
        for run in range(args.repeats):
            for workers in seconds:
                common = [folder, "--model", tiny_dir, "--batch_size", args.batch_size, "--num_workers", workers]
                output = scratch / f"tiny-w{workers}-{run}.jsonl"
                seconds[workers] = min(seconds[workers], timed_locate([*common, "--output", output]))
        startup = startup_seconds([*common, "--output", output], args.repeats + 1)
        print(f"  start-up (Python, imports, Accelerate): {startup:6.2f} s, left out below")
        seconds = {workers: best - startup for workers, best in seconds.items()}
        rates = {workers: args.images / best for workers, best in seconds.items()}
        for workers, rate in rates.items():
            print(f"  --num_workers {workers}: {seconds[workers]:6.2f} s  {rate:7.1f} images/s")
        print(f"  workers 2 / workers 0: {rates[2] / rates[0]:.2f}x")

        if args.skip_large:
            return
        large_dir = save_vit_l_streetclip(scratch)
        large_photos = make_photos(scratch / "large-photos", args.large_images)
        load_seconds, forward_seconds = bare_vision_forward(large_dir, large_photos, args.batch_size)
        command = [*large_photos, "--model", large_dir, "--batch_size", args.batch_size, "--num_workers", 2]
        bare_seconds, command_seconds = math.inf, math.inf
        for run in range(args.repeats):
            bare_seconds = min(bare_seconds, forward_seconds())
            command_seconds = min(
                command_seconds, timed_locate([*command, "--output", scratch / f"vit-l-{run}.jsonl"])
            )
        command_seconds -= startup_seconds([*command, "--output", scratch / "vit-l-0.jsonl"], args.repeats + 1)
        print(f"load average {os.getloadavg()[0]:.1f}")
        print(f"ViT-L/14-336 (random weights), {args.large_images} 640x480 JPEGs, batch {args.batch_size}:")
        print(f"  bare vision forward (preprocessed tensors): {bare_seconds:7.2f} s")
        print(f"  model load (vision tower only):             {load_seconds:7.2f} s")
        print(f"  streetclip locate, less its start-up:       {command_seconds:7.2f} s")
        print(f"  overhead, whole command / bare forward:     {command_seconds / bare_seconds:7.3f}x")
        print(f"  overhead, command less model load / bare:   {(command_seconds - load_seconds) / bare_seconds:7.3f}x")


if __name__ == "__main__":
    main()
