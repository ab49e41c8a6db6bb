"""Samples per second of a training step and of the data pipeline alone (target >= 5x the step, so that the
accelerator sets the pace), at tiny and ViT-B/16 scale with random weights; and the one-off caption map and reverse
geocoding. Run with PYTHONPATH=training."""

import csv
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from contrastive import ContrastiveTowers, contrastive_loss
from data import GeoCollator, PlaceCaptioner, caption_dataset, load_geo_dataset
from geocoding import reverse_geocoder
from PIL import Image
from timing import random_points, seconds, speed_parser, timed
from torch.utils.data import DataLoader
from transformers import CLIPConfig, CLIPImageProcessorPil

from modeling_streetclip import StreetCLIPConfig, StreetCLIPForGeolocation
from modeling_streetclip.captions import CaptionMix
from modeling_streetclip.testing_utils import VIT_B_16, build_tiny_clip, build_tiny_tokenizer


# Per scale: the CLIP configuration and the per-process batch of its training step.
SCALES = {
    "tiny": (lambda: build_tiny_clip(build_tiny_tokenizer()).config, 32),
    "vit-b-16": (lambda: CLIPConfig(**VIT_B_16), 16),
}
# Tokens of the paper's caption under CLIP's BPE tokenizer, start and end included.
CAPTION_TOKENS = 24


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Noise JPEGs (hard to compress, so decoding costs what a photo's does) near random GeoNames places."""
    rng = np.random.default_rng(0)
    geocoder = reverse_geocoder()
    points = geocoder._tree.data[rng.integers(0, len(geocoder), count)]  # unit vectors of random places
    latitudes = np.degrees(np.arcsin(points[:, 2])) + rng.normal(0, 0.05, count)
    longitudes = np.degrees(np.arctan2(points[:, 1], points[:, 0]))
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as metadata:
        writer = csv.writer(metadata)
        writer.writerow(["file_name", "latitude", "longitude"])
        for index in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.jpg", quality=90)
            writer.writerow([f"{index}.jpg", np.clip(latitudes[index], -90, 90), longitudes[index]])


def time_geocoding(points: int) -> float:
    latitudes, longitudes = random_points(np.random.default_rng(0), points).T
    geocoder = reverse_geocoder()
    return points / seconds(lambda: geocoder.lookup(latitudes, longitudes))


def time_loader(dataset, tokenizer, image_size: int, batch_size: int, num_workers: int) -> float:
    """Samples per second of the DataLoader (decoding, preprocessing, collating) after its first batch."""
    square = {"height": image_size, "width": image_size}
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size=square)
    collate = GeoCollator(processor, tokenizer, "image", [])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, collate_fn=collate)
    batches = iter(loader)
    next(batches)  # worker start-up is paid once per run, not per step
    samples, loop_s = timed(lambda: sum(batch["pixel_values"].shape[0] for batch in batches))
    return samples / loop_s


def time_training_step(clip_config: CLIPConfig, batch_size: int, steps: int) -> float:
    config = StreetCLIPConfig.from_clip_config(clip_config)
    towers = ContrastiveTowers(StreetCLIPForGeolocation(config)).train()
    optimizer = torch.optim.AdamW(towers.parameters(), lr=1e-5)
    image_size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, image_size, image_size)
    input_ids = torch.randint(0, config.text_config.vocab_size - 2, (batch_size, CAPTION_TOKENS))
    input_ids[:, -1] = config.text_config.eos_token_id

    def step():
        loss = contrastive_loss(*towers(pixel_values, input_ids, torch.ones_like(input_ids)), torch.arange(batch_size))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # the first step allocates optimiser state
    return steps * batch_size / seconds(lambda: [step() for _ in range(steps)])


def main() -> None:
    parser = speed_parser(__doc__)
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    parser.add_argument("--steps", type=int, default=5, help="Timed training steps per scale.")
    parser.add_argument("--images", type=int, default=512, help="Photos in the generated image folder.")
    parser.add_argument("--photo_size", type=int, nargs=2, default=(640, 480), help="Width and height of each photo.")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--geocoding_points", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the training step.")
    args = parser.parse_args()
    if args.images < (needed := 2 * max(SCALES[name][1] for name in args.scales)):
        parser.error(
            f"--images must be at least {needed}: two batches, since the first (workers starting) is not timed"
        )
    PartialState()  # the data module logs through accelerate
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}, DataLoader workers: {args.num_workers}")
    print(f"reverse geocoding: {time_geocoding(args.geocoding_points):,.0f} points/s (uniform over the globe)")
    tokenizer = build_tiny_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        write_photos(Path(folder), args.images, tuple(args.photo_size))
        mix = CaptionMix((StreetCLIPConfig().caption_template,), (1.0,))
        captioner = PlaceCaptioner(mix, tokenizer, max_length=77, country_names={})
        raw = load_geo_dataset(folder, "train", "image")
        dataset, map_s = timed(lambda: caption_dataset(raw, captioner, "image"))
        print(f"caption map (geocoding, captions, tokens; once per data set): {len(dataset) / map_s:,.0f} rows/s")
        for name in args.scales:
            build_config, batch_size = SCALES[name]
            clip_config = build_config()
            image_size = clip_config.vision_config.image_size
            pipeline_rate = time_loader(dataset, tokenizer, image_size, batch_size, args.num_workers)
            step_rate = time_training_step(clip_config, batch_size, args.steps)
            print(
                f"{name}: training step {step_rate:,.1f} samples/s (batch {batch_size}); data pipeline "
                f"{pipeline_rate:,.1f} samples/s ({args.photo_size[0]}x{args.photo_size[1]} JPEG -> {image_size} px), "
                f"{pipeline_rate / step_rate:,.1f}x the step"
            )


if __name__ == "__main__":
    main()
