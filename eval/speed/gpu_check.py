"""GPU check at StreetCLIP's real scale (ViT-L/14 at 336 px, random weights) in float32, bfloat16 and float16.

Prints preprocessing rates; per precision, images/s of the bare vision forward and of `pipeline("geolocation")` (one
call and steady state), peak memory and agreement of first answers with float32's on a probe fitted on the synthetic
geo set; then `streetclip index build` in bfloat16. Exits 1 when bfloat16 countries disagree with float32's on more
than 2%, 2 on a usage error. Run as `bash eval/speed/gpu_check.sh`; `--device cpu` is a dry run on the tiny model.
"""

import argparse
import gc
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from timing import (
    build_rate,
    noise_photos,
    seconds,
    steady_rate,
    synchronized_seconds,
    vision_forward,
    write_photo_folder,
)
from transformers import pipeline

from modeling_streetclip import CandidatePlaces, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app import DEFAULT_NUM_WORKERS
from modeling_streetclip.app.arguments import int_at_least
from modeling_streetclip.pixels import normalized_pixels, resized_pixels
from modeling_streetclip.testing_utils import PLACES, place_photo, save_random_vit_l, save_tiny_clip_checkpoint


DTYPES = ("float32", "bfloat16", "float16")
# The issue's targets: bfloat16 answers agree with float32's, and the pipeline keeps up with the bare forward.
MIN_COUNTRY_AGREEMENT = 0.98
MIN_PIPELINE_SHARE = 0.80
# CLIP's largest logit scale: the probe's logits are then as peaked as a trained StreetCLIP's.
PROBE_LOGIT_SCALE = 100.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--steps", type=int_at_least(1), default=40, help="timed batches per measurement")
    parser.add_argument("--batch_size", type=int_at_least(1), default=64)
    parser.add_argument("--size", choices=("vit-l", "tiny"), help="default: vit-l on a GPU, tiny on a CPU")
    parser.add_argument("--num_workers", type=int, default=DEFAULT_NUM_WORKERS, help="as streetclip locate's")
    parser.add_argument("--agreement_photos_per_city", type=int_at_least(1), default=17, help="held-out photos")
    parser.add_argument("--probe_photos_per_city", type=int_at_least(1), default=8, help="photos that fit the probe")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch {torch.__version__} sees no CUDA device; use --device cpu.")
    args.size = args.size or ("vit-l" if args.device.startswith("cuda") else "tiny")
    return args


def geo_photos(photos_per_city: int, seed: int) -> tuple[list[Image.Image], list[int], list[int]]:
    """Photos of the synthetic geo set with their country index and city row (in `probe_places` order)."""
    rng = np.random.default_rng(seed)
    places = [(country, city) for country, cities in enumerate(PLACES.values()) for city in range(len(cities))]
    labels = [place for place in places for _ in range(photos_per_city)]
    photos = [place_photo(country, city, rng) for country, city in labels]
    return photos, [country for country, _ in labels], [2 * country + city for country, city in labels]


def probe_places() -> CandidatePlaces:
    return CandidatePlaces.from_records(
        {"country": country, "city": city, "latitude": latitude, "longitude": longitude}
        for country, cities in PLACES.items()
        for city, latitude, longitude in cities
    )


def embed(model: StreetCLIPForGeolocation, pixel_values: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([vision_forward(model, batch) for batch in pixel_values.split(batch_size)])


def save_probe_model(workdir: Path, size: str, device: str, photos_per_city: int, batch_size: int) -> Path:
    """A random-weight CLIP saved as a StreetCLIP folder whose heads are a probe fitted on the synthetic geo set: each
    row the class mean of the image embeddings less the mean over all photos (random features share a large common
    direction, and removing it leaves what tells classes apart)."""
    plain = save_random_vit_l(workdir / "clip") if size == "vit-l" else save_tiny_clip_checkpoint(workdir / "clip")
    processor = StreetCLIPProcessor.from_pretrained(plain)
    places = probe_places()
    model = StreetCLIPForGeolocation.from_pretrained(plain, candidates=places).to(device)
    photos, countries, city_rows = geo_photos(photos_per_city, seed=0)
    pixel_values = processor.image_processor(images=photos, return_tensors="pt")["pixel_values"].to(device)
    embeds = embed(model, pixel_values, batch_size)
    centre = embeds.mean(dim=0)
    with torch.no_grad():
        for head, labels in ((model.country_head, countries), (model.city_head, city_rows)):
            labels = torch.tensor(labels, device=device)
            for row in range(head.weight.shape[0]):
                head.weight[row] = F.normalize(embeds[labels == row].mean(dim=0) - centre, dim=0) * PROBE_LOGIT_SCALE
    model.save_pretrained(workdir / "probe")
    processor.save_pretrained(workdir / "probe")
    return workdir / "probe"


def check_dtype(model_dir: Path, dtype: str, args: argparse.Namespace, inputs: dict) -> dict:
    """Load `dtype` without the text tower on the device, time the bare forward and the pipeline, and answer the
    held-out photos; returns the figures."""
    if args.device.startswith("cuda"):
        gc.collect()  # the previous precision's pipeline may sit in a reference cycle, holding its model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = StreetCLIPForGeolocation.from_pretrained(model_dir, vision_only=True, dtype=getattr(torch, dtype))
    model = model.to(args.device)
    geolocate = pipeline("geolocation", model=model, processor=inputs["processor"], device=args.device)
    batch = inputs["batch"].to(args.device, model.dtype)

    def bare() -> None:
        for _ in range(args.steps):
            vision_forward(model, batch)

    def run_pipeline(photos: list[Image.Image]) -> list:
        return geolocate(photos, batch_size=args.batch_size, num_workers=args.num_workers)

    embeds = embed(model, batch, args.batch_size).cpu()  # also the warm-up of the bare forward
    run_pipeline(inputs["timing_photos"][: args.batch_size])  # warm-up: workers, allocations
    bare_s = synchronized_seconds(bare, args.device)
    photos = inputs["timing_photos"]
    quarter = photos[: max(args.batch_size, len(photos) // 4)]
    photos_s = synchronized_seconds(lambda: run_pipeline(photos), args.device)
    quarter_s = synchronized_seconds(lambda: run_pipeline(quarter), args.device)
    answers = [image_answers[0] for image_answers in run_pipeline(inputs["agreement_photos"])]
    peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return {
        "attention": model.vision_model.config._attn_implementation,
        "bare": args.steps * args.batch_size / bare_s,
        "pipeline": len(photos) / photos_s,
        "steady": steady_rate(len(photos), len(quarter), photos_s, quarter_s),
        "peak_mib": peak,
        "embeds": embeds,
        "countries": [answer["country"] for answer in answers],
        "cities": [answer["city"] for answer in answers],
    }


def build_rates(model_dir: Path, workdir: Path, args: argparse.Namespace) -> tuple[float, float]:
    """Images/s of `streetclip index build` in bfloat16, over one command and in steady state (as the pipeline's)."""
    count = args.steps * args.batch_size
    quarter = max(args.batch_size, count // 4)
    folders = {photos: write_photo_folder(workdir / f"photos-{photos}", photos) for photos in {count, quarter}}
    options = ["--batch_size", args.batch_size, "--num_workers", args.num_workers, "--dtype", "bfloat16"]
    options += ["--device", "cuda" if args.device.startswith("cuda") else "cpu"]
    return build_rate(folders[count], folders[quarter], model_dir, workdir / "gallery", *options)


def main() -> int:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()  # keep the log to the figures
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    print(
        f"device {args.device}: {device_name or 'cpu'}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; model {args.size} (random weights), batch {args.batch_size}, {args.steps} "
        f"timed batches, {args.num_workers} pipeline workers; float32 matmul precision "
        f"{torch.get_float32_matmul_precision()!r}",
        flush=True,
    )
    timing_photos = noise_photos(args.steps * args.batch_size)
    agreement_photos, truth_countries, truth_cities = geo_photos(args.agreement_photos_per_city, seed=1)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        model_dir = save_probe_model(
            Path(workdir), args.size, args.device, args.probe_photos_per_city, args.batch_size
        )
        processor = StreetCLIPProcessor.from_pretrained(model_dir)
        batch = processor.image_processor(images=timing_photos[: args.batch_size], return_tensors="pt")["pixel_values"]
        inputs = {"processor": processor, "batch": batch, "timing_photos": timing_photos}
        inputs["agreement_photos"] = agreement_photos
        print(f"built and saved the probe model in {time.perf_counter() - start:.0f} s", flush=True)
        # What one CPU process preprocesses: the pipeline's ceiling is about the 8-bit rate times its workers.
        photos, image_processor = timing_photos[: args.batch_size], processor.image_processor
        full_rate = len(photos) / seconds(lambda: image_processor(images=photos))
        resized_rate = len(photos) / seconds(lambda: resized_pixels(image_processor, photos))
        on_device = normalized_pixels(image_processor, resized_pixels(image_processor, photos).to(args.device))
        difference = (on_device.cpu() - inputs["batch"]).abs().max().item()
        print(
            f"preprocessing 640x480 photos in one process ({type(image_processor).__name__}): {full_rate:.0f} img/s "
            f"in full, {resized_rate:.0f} img/s resized and cropped in 8 bits (the pipeline's workers); normalised "
            f"on {args.device}: largest difference from the image processor's pixel values {difference:.1e} (0 "
            "for its PIL backend; the torchvision one rounds its fused rescale and normalisation otherwise)",
            flush=True,
        )
        print(
            f"{'dtype':<9} {'bare img/s':>10} {'call img/s':>10} {'call/bare':>9} {'steady img/s':>12} "
            f"{'steady/bare':>11} {'peak MiB':>9} {'country=':>8} {'city=':>6} {'emb cos':>8}",
            flush=True,
        )
        results = {}
        for dtype in DTYPES:
            result = results[dtype] = check_dtype(model_dir, dtype, args, inputs)
            reference = results["float32"]
            result["country_agreement"] = np.mean(np.array(result["countries"]) == np.array(reference["countries"]))
            city_agreement = np.mean(np.array(result["cities"]) == np.array(reference["cities"]))
            cosine = F.cosine_similarity(result["embeds"], reference["embeds"]).mean().item()
            peak = f"{result['peak_mib']:9.0f}" if result["peak_mib"] is not None else f"{'n/a':>9}"
            print(
                f"{dtype:<9} {result['bare']:10.2f} {result['pipeline']:10.2f} "
                f"{result['pipeline'] / result['bare']:9.2f} {result['steady']:12.2f} "
                f"{result['steady'] / result['bare']:11.2f} {peak} {result['country_agreement']:8.3f} "
                f"{city_agreement:6.3f} {cosine:8.5f}",
                flush=True,
            )
        build_call, build_steady = build_rates(model_dir, Path(workdir), args)
        print(
            f"index build, bfloat16, 1 process, {args.num_workers} workers, batch {args.batch_size}: {build_call:.1f} "
            f"img/s over one command of {len(timing_photos):,} JPEGs (start-up included), {build_steady:.1f} img/s "
            "in steady state",
            flush=True,
        )
    places = probe_places()
    truth = np.array([places.country_names[index] for index in truth_countries])
    country_accuracy = np.mean(truth == np.array(results["float32"]["countries"]))
    truth = np.array([places.city_names[row] for row in truth_cities])
    city_accuracy = np.mean(truth == np.array(results["float32"]["cities"]))
    print(
        f"attention implementation (vision tower): {results['float32']['attention']}; probe accuracy in float32 on "
        f"{len(agreement_photos)} held-out photos: country {country_accuracy:.3f}, city {city_accuracy:.3f}"
    )
    agreement = results["bfloat16"]["country_agreement"]
    share = results["bfloat16"]["steady"] / results["bfloat16"]["bare"]
    call_share = results["bfloat16"]["pipeline"] / results["bfloat16"]["bare"]
    agrees = agreement >= MIN_COUNTRY_AGREEMENT
    print(
        f"CHECK bfloat16 first-answer country agrees with float32: {agreement:.3f} >= {MIN_COUNTRY_AGREEMENT}: "
        f"{'PASS' if agrees else 'FAIL'}"
    )
    print(
        f"TARGET bfloat16 pipeline / bare forward in steady state: {share:.3f} >= {MIN_PIPELINE_SHARE}: "
        f"{'MET' if share >= MIN_PIPELINE_SHARE else 'NOT MET'} (one call over {len(timing_photos):,} photos, "
        f"its start included: {call_share:.2f})"
    )
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
