"""Time `streetclip locate`: decoding in the main process against DataLoader workers (tiny model), and the whole
command against the bare vision forward at StreetCLIP's real scale (ViT-L/14 at 336 px, random weights).

The command runs in its own process, as a user starts it, over generated 640x480 JPEGs; its rate is that of a run
over all the photos less one over a batch of them, so that start-up (imports, Accelerate, model loading) cancels out.
Settings alternate within each repeat, so that other load on the machine hits them alike; the best repeat counts.

    python eval/speed/bench_locate.py [--images 200] [--large_images 16] [--batch_size 8] [--repeats 2] [--skip_large]
"""

import argparse
import tempfile
from pathlib import Path

from timing import locate_rate, machine_line, save_small_streetclip, seconds, vision_forward, write_jpegs
from transformers import AutoImageProcessor

from modeling_streetclip import StreetCLIPForGeolocation, load_rgb_image
from modeling_streetclip.testing_utils import save_random_vit_l, save_tiny_clip_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="JPEGs for the tiny model's throughput")
    parser.add_argument("--large_images", type=int, default=16, help="JPEGs for the ViT-L/14-336 overhead")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="alternated runs of each setting; the best counts")
    parser.add_argument("--skip_large", action="store_true", help="time the tiny model only")
    args = parser.parse_args()
    batch = args.batch_size
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        print(machine_line())
        photos = write_jpegs(scratch / "photos", max(args.images, args.large_images))
        output = scratch / "answers.jsonl"
        tiny = save_small_streetclip(save_tiny_clip_checkpoint(scratch / "tiny-clip"), scratch / "tiny")
        rates: dict[int, list[float]] = {0: [], 2: []}
        for _ in range(args.repeats):
            for workers in rates:
                options = ("--batch_size", batch, "--num_workers", workers)
                rates[workers].append(locate_rate(photos[: args.images], batch, tiny, output, *options))
        best = {workers: max(values) for workers, values in rates.items()}
        print(
            f"tiny model, {args.images} JPEGs, batch {batch}: "
            + ", ".join(f"--num_workers {workers} {rate:.1f} img/s" for workers, rate in best.items())
            + f"; workers 2 / workers 0: {best[2] / best[0]:.2f}x"
        )
        if args.skip_large:
            return

        large = save_small_streetclip(save_random_vit_l(scratch / "vit-l-clip"), scratch / "vit-l")
        model = StreetCLIPForGeolocation.from_pretrained(large, vision_only=True)
        timed_photos = [load_rgb_image(path) for path in photos[batch : args.large_images]]
        pixels = AutoImageProcessor.from_pretrained(large)(images=timed_photos, return_tensors="pt")["pixel_values"]
        vision_forward(model, pixels[:1])  # one-off kernel setup
        bare, command = [], []
        for _ in range(args.repeats):
            forward_s = seconds(lambda: [vision_forward(model, part) for part in pixels.split(batch)])
            bare.append(len(timed_photos) / forward_s)
            options = ("--batch_size", batch, "--num_workers", 2)
            command.append(locate_rate(photos[: args.large_images], batch, large, output, *options))
        print(
            f"ViT-L/14-336, {args.large_images} JPEGs, batch {batch}: bare vision forward {max(bare):.2f} img/s, "
            f"streetclip locate {max(command):.2f} img/s; command / bare forward time {max(bare) / max(command):.3f}x"
        )


if __name__ == "__main__":
    main()
