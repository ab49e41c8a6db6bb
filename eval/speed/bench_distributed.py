"""Time `streetclip locate` on one process and on several (torchrun): images/s at each model size.

A configuration is PROCESSESxTHREADS: that many processes, each with that many torch threads (OMP_NUM_THREADS); by
default one process with all the usable cores, one with a single thread, and one process per core with a thread each.
Each run is the real command in a fresh process group over generated 640x480 JPEGs, with a random-weight model of six
countries of five cities; the rate is that of a run over --images less one over a batch per process, so that start-up
cancels out. Configurations alternate within each repeat, so that other jobs slow them alike: compare the ratios of
one run.

    python eval/speed/bench_distributed.py [--scales tiny vit-b-16] [--configs 1x2 1x1 2x1] [--images 2048 128]
        [--batch_size 16] [--num_workers 1] [--repeats 2] [--device cpu] [--dtype float32]
"""

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from timing import locate_rate, machine_line, save_small_streetclip, write_jpegs

from modeling_streetclip.testing_utils import VIT_B_16, VIT_L_14_336, save_random_clip, save_tiny_clip_checkpoint


SCALES = {
    "tiny": save_tiny_clip_checkpoint,
    "vit-b-16": lambda path: save_random_clip(path, VIT_B_16),
    "vit-l-14-336": lambda path: save_random_clip(path, VIT_L_14_336),
}


def main() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", choices=sorted(SCALES), default=["tiny", "vit-b-16"])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(dict.fromkeys([f"1x{cores}", "1x1", f"{cores}x1"])),
        metavar="PxT",
        help="processes x threads per process (default: %(default)s, from the usable cores)",
    )
    parser.add_argument("--images", nargs=2, type=int, metavar=("TINY", "LARGER"), help="images per long run")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader workers per process")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()
    configs = [tuple(int(part) for part in text.split("x")) for text in args.configs]
    counts = args.images or ((2048, 128) if args.device == "cpu" else (4096, 2048))
    # A batch per process in the short run, so that all of the long run's extra images are steady-state work.
    short = args.batch_size * max(processes for processes, _ in configs)
    options = ("--batch_size", args.batch_size, "--num_workers", args.num_workers, "--device", args.device)
    options += ("--dtype", args.dtype)
    print(machine_line())
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        for scale in args.scales:
            images = counts[0] if scale == "tiny" else counts[1]
            photos = write_jpegs(root / scale / "photos", images)
            model = save_small_streetclip(SCALES[scale](root / scale / "clip"), root / scale / "streetclip")
            rates: dict[tuple[int, int], list[float]] = {config: [] for config in configs}
            for _ in range(args.repeats):
                for processes, threads in configs:
                    output = root / scale / "answers.jsonl"
                    rate = locate_rate(photos, short, model, output, *options, processes=processes, threads=threads)
                    rates[processes, threads].append(rate)
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
