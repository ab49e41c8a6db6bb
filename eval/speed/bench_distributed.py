"""Time `streetclip locate` on one process and on several (torchrun): images/s at each model size.

Each run is the real command in a fresh process group, over generated 640x480 JPEGs, with a random-weight model
saved as a StreetCLIP folder (six countries of five cities). Images/s are those of geolocation alone: every
configuration runs twice, over --images and over a few images, and the rate is the difference of images over the
difference of wall times, so that start-up (imports, process group, model loading) cancels out. The configurations
alternate within each repeat, so that a machine loaded by other jobs slows them alike: compare the ratios of one run.

A configuration is PROCESSESxTHREADS: that many processes (torchrun when more than one), each with that many torch
threads (OMP_NUM_THREADS). By default: one process with all the cores, one with a single thread, and one process per
core with a thread each (as torchrun sets it). On a CPU, N processes have the cores one process had: any gain over
one process with all the threads comes from work that one process leaves serial (Python between batches, the
hand-over from the decoding worker) or from threads that wait on each other, which a machine loaded by other jobs
makes worse; the gathers cost something. On a machine with N GPUs, each process has its own.

Usage, from the repository root:

    python eval/speed/bench_distributed.py [--scales tiny vit-b-16] [--configs 1x2 1x1 2x1] [--images 2048 128]
        [--batch_size 16] [--num_workers 1] [--repeats 2] [--device cpu] [--dtype float32]
    python eval/speed/bench_distributed.py --device cuda --dtype bfloat16 --scales vit-b-16 vit-l-14-336 \
        --configs 1x16 --batch_size 64 --num_workers 8   # one GPU; compare with --device cpu on the same machine

It prints figures; it asserts nothing.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from modeling_streetclip.testing_utils import (
    SMALL_COUNTRIES,
    VIT_B_16,
    VIT_L_14_336,
    random_photo,
    save_random_clip,
    save_streetclip_folder,
    save_tiny_clip_checkpoint,
)


# Per scale: how to save its plain CLIP checkpoint.
SCALES = {
    "tiny": save_tiny_clip_checkpoint,
    "vit-b-16": lambda path: save_random_clip(path, VIT_B_16),
    "vit-l-14-336": lambda path: save_random_clip(path, VIT_L_14_336),
}
# Images of the short run, per process and batch: enough for every process to run a batch, so that the long run's
# extra images are all steady-state work.
WARMUP_BATCHES = 1


def make_photos(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> None:
    """JPEGs with the smooth content of photos (upsampled noise), so that decoding costs what a real photo does."""
    folder.mkdir(parents=True)
    for seed in range(count):
        photo = random_photo(seed, (size[0] // 16, size[1] // 16)).resize(size, Image.Resampling.BICUBIC)
        photo.save(folder / f"{seed:05d}.jpg", quality=90)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_locate(config: tuple[int, int], photos: Path, model: Path, output: Path, args: argparse.Namespace) -> float:
    """Wall seconds of one `streetclip locate` over `photos` with `config` = (processes, threads per process)."""
    processes, threads = config
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m"]
    if processes > 1:
        command += ["torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    command += ["modeling_streetclip.cli", "locate", str(photos), "--model", str(model), "--output", str(output)]
    command += ["--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers), "--device", args.device]
    command += ["--dtype", args.dtype]
    output.unlink(missing_ok=True)
    Path(str(output) + ".options.json").unlink(missing_ok=True)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", choices=sorted(SCALES), default=["tiny", "vit-b-16"])
    cores = usable_cores()
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(dict.fromkeys([f"1x{cores}", "1x1", f"{cores}x1"])),
        metavar="PxT",
        help="processes x threads per process (default: %(default)s, from the usable cores)",
    )
    parser.add_argument(
        "--images", nargs=2, type=int, default=None, metavar=("TINY", "LARGER"), help="images per long run"
    )
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    configs = [tuple(int(part) for part in text.split("x")) for text in args.configs]
    tiny_images, larger_images = args.images or ((2048, 128) if args.device == "cpu" else (4096, 2048))
    short = WARMUP_BATCHES * args.batch_size * max(processes for processes, _ in configs)

    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        for scale in args.scales:
            images = tiny_images if scale == "tiny" else larger_images
            photos = {count: root / scale / f"photos-{count}" for count in (short, images)}
            for count, folder in photos.items():
                make_photos(folder, count)
            model = save_streetclip_folder(
                SCALES[scale](root / scale / "clip"),
                root / scale / "streetclip",
                candidate_countries=SMALL_COUNTRIES,
                cities_per_country=5,
            )
            rates: dict[tuple[int, int], list[float]] = {config: [] for config in configs}
            for _ in range(args.repeats):
                for config in configs:  # alternating, so that load drift hits every configuration
                    output = root / scale / "answers.jsonl"
                    long_s = run_locate(config, photos[images], model, output, args)
                    short_s = run_locate(config, photos[short], model, output, args)
                    rates[config].append((images - short) / max(long_s - short_s, 1e-9))
            baseline = statistics.median(rates[configs[0]])
            for (processes, threads), measured in rates.items():
                rate = statistics.median(measured)
                print(
                    f"{scale:>13} {args.device} {args.dtype} {processes} process(es) x {threads} thread(s): "
                    f"{rate:8.1f} img/s ({', '.join(f'{value:.1f}' for value in measured)}), {rate / baseline:.2f}x "
                    f"{args.configs[0]}; {images} images, batch {args.batch_size}, {args.num_workers} worker(s) per "
                    "process",
                    flush=True,
                )


if __name__ == "__main__":
    main()
