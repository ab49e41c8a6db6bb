"""Images/s of `streetclip locate`, the real command in a fresh process group, on one process and several (torchrun),
for each PxT[xW] configuration (P processes of T threads and W DataLoader workers) and model size, over generated
640x480 JPEGs; `--bare` adds the bare vision forward. Configurations alternate within each repeat, so that other jobs
slow them alike: compare the ratios of one run."""

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import timing
from transformers import AutoImageProcessor

from modeling_streetclip import load_rgb_image
from modeling_streetclip.testing_utils import VIT_B_16, VIT_L_14_336, save_random_clip, save_tiny_clip_checkpoint


SCALES = {
    "tiny": save_tiny_clip_checkpoint,
    "vit-b-16": lambda path: save_random_clip(path, VIT_B_16),
    "vit-l-14-336": lambda path: save_random_clip(path, VIT_L_14_336),
}


def bare_rate(model_dir: Path, photos: list[Path], args: argparse.Namespace) -> float:
    """Images/s of the bare vision forward over `photos`, preprocessed beforehand, in batches."""
    model = timing.load_vision(model_dir, args.dtype).to(args.device)
    images = [load_rgb_image(path) for path in photos]
    pixels = AutoImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")["pixel_values"]
    batches = pixels.to(model.device, model.dtype).split(args.batch_size)
    forward = timing.vision_forward
    forward(model, batches[0][:1])  # one-off kernel setup
    return len(photos) / timing.synchronized_seconds(lambda: [forward(model, batch) for batch in batches], args.device)


def main() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser = timing.speed_parser(__doc__, batch_size=16)
    parser.add_argument("--scales", nargs="+", choices=sorted(SCALES), default=["tiny", "vit-b-16"])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(dict.fromkeys([f"1x{cores}", "1x1", f"{cores}x1"])),
        metavar="PxT[xW]",
        help="processes x threads per process [x workers per process] (default: %(default)s, from the usable cores)",
    )
    parser.add_argument("--bare", action="store_true", help="also time the bare vision forward over the photos")
    parser.add_argument("--images", nargs=2, type=int, metavar=("TINY", "LARGER"), help="images per long run")
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    try:
        configs = [(*map(int, text.split("x")), args.num_workers)[:3] for text in args.configs]
    except ValueError:
        configs = []
    if len(configs) != len(args.configs) or any(len(config) < 3 for config in configs):
        parser.error(f"--configs are PxT or PxTxW, whole numbers joined by x; got {args.configs}")
    counts = args.images or ((2048, 128) if args.device == "cpu" else (4096, 2048))
    # A batch per process in the short run, so that all of the long run's extra images are steady-state work.
    short = args.batch_size * max(processes for processes, _, _ in configs)
    options = ("--batch_size", args.batch_size, "--device", args.device, "--dtype", args.dtype)
    print(timing.machine_line())
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        for scale in args.scales:
            images = counts[0] if scale == "tiny" else counts[1]
            photos = timing.write_jpegs(root / scale / "photos", images)
            model = timing.save_small_streetclip(SCALES[scale](root / scale / "clip"), root / scale / "streetclip")
            rates: dict[tuple[int, int, int], list[float]] = {config: [] for config in configs}
            for _ in range(args.repeats):
                for processes, threads, workers in configs:
                    output = root / scale / "answers.jsonl"
                    run = (photos, short, model, output, *options, "--num_workers", workers)
                    rate = timing.locate_rate(*run, processes=processes, threads=threads)
                    rates[processes, threads, workers].append(rate)
            setting = f"{images} images, batch {args.batch_size}"
            if args.bare:
                rate = bare_rate(model, photos[short:], args)
                print(f"{scale:>13} {args.device} {args.dtype} bare vision forward: {rate:8.1f} img/s; {setting}")
            baseline = statistics.median(rates[configs[0]])
            for (processes, threads, workers), measured in rates.items():
                rate = statistics.median(measured)
                print(
                    f"{scale:>13} {args.device} {args.dtype} {processes} process(es) x {threads} thread(s), "
                    f"{workers} worker(s) each: {rate:8.1f} img/s ({', '.join(f'{value:.1f}' for value in measured)}), "
                    f"{rate / baseline:.2f}x {args.configs[0]}; {setting}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
