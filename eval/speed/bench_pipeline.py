"""Speed, cold start and memory of the geolocation pipeline at StreetCLIP's real scale (ViT-L/14 at 336 px).

Random weights have the real cost. Prints, from one run on this machine:
- per-image time of `pipeline("geolocation")` at batch 8 over the bare `vision_model` + `visual_projection` forward
  on already-preprocessed tensors (the physical floor; target <= 1.10x), under each decision rule of `--decisions`,
  with the hierarchy of `--levels` and, with `--recommended`, the recommended candidate table;
- the naive reference (CLIPModel called with every country prompt, then the chosen country's city prompts,
  re-encoding text every call) over the pipeline (target >= 2x);
- cold start: plain CLIP checkpoint to first answer (every head built at load, in batched text-tower calls), and a
  saved folder's load (heads stored, vision tower only);
- peak memory of loading with and without the text tower, each in a fresh process.

Timings interleave the methods over several rounds and report medians, so drift on a shared machine hits
all of them alike. Run: `python eval/speed/bench_pipeline.py [--rounds 3] [--batch_size 8] [--decisions greedy joint
expected_distance] [--levels country region city] [--recommended]`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer, pipeline

import modeling_streetclip  # noqa: F401  (registers the "geolocation" task)
from modeling_streetclip import CandidatePlaces, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.configuration_streetclip import RECOMMENDED_CANDIDATE_SETTINGS, REGION_LEVELS
from modeling_streetclip.decisions import ZERO_SHOT_DECISIONS
from modeling_streetclip.testing_utils import save_random_vit_l


def prompt_tokenizer(places: CandidatePlaces) -> CLIPTokenizer:
    """A CLIP-format BPE tokenizer trained on the prompts, so prompt lengths (about 10 tokens) match CLIP's own
    vocabulary, which cannot be downloaded here."""
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    texts = [f"a street view photo in {name}." for name in places.country_names]
    texts += [f"a street view photo from {name}." for name in places.city_names]
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([text.lower() for text in texts], trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(merge) for merge in model["merges"]])


def memory_after_first_answer(model_dir: Path, vision_only: bool, dtype: str) -> tuple[float, float]:
    """(weights and heads in MiB, peak resident MiB) of a fresh process that loads the model and answers once.

    Weights stay memory-mapped until touched, so on a CPU in float32 an unused text tower costs address space, not
    resident memory; a dtype cast or a copy to a GPU materialises every loaded tensor.
    """
    code = f"""
import resource, torch, modeling_streetclip
model = modeling_streetclip.StreetCLIPForGeolocation.from_pretrained(
    {str(model_dir)!r}, vision_only={vision_only}, dtype=torch.{dtype})
with torch.no_grad():
    model(torch.randn(1, 3, 336, 336, dtype=torch.{dtype}))
tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(tensors / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    tensors_mib, resident_mib = output.split()[-2:]
    return float(tensors_mib), float(resident_mib)


def naive_reference(clip: CLIPModel, processor, places: CandidatePlaces, images: list[Image.Image]) -> list[str]:
    """The method as often written: CLIPModel re-encodes every prompt on every call."""
    countries = [f"A Street View photo in {name}." for name in places.country_names]
    with torch.no_grad():
        inputs = processor(text=countries, images=images, return_tensors="pt", padding=True)
        chosen = clip(**inputs).logits_per_image.argmax(dim=-1).tolist()
        answers = []
        for image, country in zip(images, chosen, strict=True):
            rows = places.cities_by_country[country]
            cities = [f"A Street View photo from {places.city_names[row]}." for row in rows]
            inputs = processor(text=cities, images=image, return_tensors="pt", padding=True)
            answers.append(places.city_names[rows[int(clip(**inputs).logits_per_image.argmax())]])
    return answers


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure_cold_start(plain_dir: Path, saved_dir: Path, image: Image.Image) -> None:
    """Plain checkpoint to first answer (every head built at load), and a saved folder's load."""
    start = time.perf_counter()
    model = StreetCLIPForGeolocation.from_pretrained(plain_dir)
    load_s = time.perf_counter() - start
    geolocate = pipeline("geolocation", model=model, processor=StreetCLIPProcessor.from_pretrained(plain_dir))
    first_s = timed(lambda: geolocate(image))
    print(
        f"cold start, plain CLIP checkpoint: load + all {model.candidate_places.num_cities} city heads {load_s:.1f} "
        f"s, first answer {first_s:.1f} s"
    )
    save_with_processor(model, plain_dir, saved_dir)
    saved_load_s = timed(lambda: StreetCLIPForGeolocation.from_pretrained(saved_dir, vision_only=True))
    print(f"cold start, saved folder (heads stored, vision only): load {saved_load_s:.1f} s")


def measure_memory(saved_dir: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        full = memory_after_first_answer(saved_dir, vision_only=False, dtype=dtype)
        vision = memory_after_first_answer(saved_dir, vision_only=True, dtype=dtype)
        print(
            f"memory after the first answer, {dtype}: weights {full[0]:.0f} -> {vision[0]:.0f} MiB vision only "
            f"(saves {full[0] - vision[0]:.0f} MiB); peak resident {full[1]:.0f} -> {vision[1]:.0f} MiB"
        )


def measure_speed(
    plain_dir: Path, images: list[Image.Image], rounds: int, decisions: list[str], settings: dict
) -> None:
    """Per-image time of the pipeline under each decision rule, the bare vision forward and the naive reference,
    interleaved.

    The floor runs the pipeline's own model instance, so both time the same weights in the same memory; the model
    has the paper's 193 countries (and the candidate `settings`), and a warm-up call builds the region and city heads
    these images need.
    """
    model = StreetCLIPForGeolocation.from_pretrained(plain_dir, **settings)
    geolocate = pipeline("geolocation", model=model, processor=StreetCLIPProcessor.from_pretrained(plain_dir))
    clip = CLIPModel.from_pretrained(plain_dir).eval()
    processor = CLIPProcessor.from_pretrained(plain_dir)
    pixel_values = geolocate.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def floor():
        with torch.no_grad():
            model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)

    methods = {"floor": floor}
    for decision in decisions:
        methods[f"pipeline {decision}"] = partial(geolocate, images, batch_size=len(images), decision=decision)
    methods["naive"] = lambda: naive_reference(clip, processor, model.candidate_places, images)
    for method in methods.values():
        method()  # warm-up: one-off allocations, and the heads of the countries each rule visits
    times = {name: [] for name in methods}
    for round_index in range(rounds):
        # Rotate the order so that no method always runs first in a round on a shared machine.
        shift = round_index % len(methods)
        for name in list(methods)[shift:] + list(methods)[:shift]:
            times[name].append(timed(methods[name]))
    per_image = {name: statistics.median(values) / len(images) for name, values in times.items()}
    places = model.candidate_places
    print(
        f"{places.num_countries} countries, {places.num_regions} regions, {places.num_cities} cities; per image at "
        f"batch {len(images)}: " + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in per_image.items())
    )
    for decision in decisions:
        ratio = per_image[f"pipeline {decision}"] / per_image["floor"]
        print(f"pipeline {decision} / floor = {ratio:.3f} (target <= 1.10)")
    first = f"pipeline {decisions[0]}"
    print(f"naive / {first} = {per_image['naive'] / per_image[first]:.2f} (target >= 2)")


def save_with_processor(model: StreetCLIPForGeolocation, plain_dir: Path, saved_dir: Path) -> None:
    model.save_pretrained(saved_dir)
    CLIPImageProcessorPil.from_pretrained(plain_dir).save_pretrained(saved_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians are reported)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=["cold_start", "memory", "speed"],
        default=["cold_start", "memory", "speed"],
        help="what to measure; without cold_start the memory check's saved folder gets 10 countries, since "
        "building all 4321 city heads takes minutes and does not change memory",
    )
    parser.add_argument(
        "--decisions",
        nargs="+",
        choices=ZERO_SHOT_DECISIONS,
        default=["greedy"],
        help="the rules whose pipelines are timed",
    )
    parser.add_argument(
        "--levels", nargs="+", choices=REGION_LEVELS, help="the hierarchy timed (default: the paper's two levels)"
    )
    parser.add_argument(
        "--recommended", action="store_true", help="time the recommended candidate table instead of the paper's"
    )
    args = parser.parse_args()
    settings = dict(RECOMMENDED_CANDIDATE_SETTINGS) if args.recommended else {}
    if args.levels:
        settings["levels"] = args.levels
    torch.manual_seed(0)
    places = CandidatePlaces.from_geonames()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch_size)]

    with tempfile.TemporaryDirectory() as workdir:
        plain_dir, saved_dir = Path(workdir) / "plain-clip", Path(workdir) / "streetclip"
        save_random_vit_l(plain_dir, prompt_tokenizer(places))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ViT-L/14-336 random weights")
        if "cold_start" in args.measure:
            measure_cold_start(plain_dir, saved_dir, images[0])
        elif "memory" in args.measure:
            countries = places.country_names[:10]
            save_with_processor(
                StreetCLIPForGeolocation.from_pretrained(plain_dir, candidate_countries=countries),
                plain_dir,
                saved_dir,
            )
        if "memory" in args.measure:
            measure_memory(saved_dir)
        if "speed" in args.measure:
            measure_speed(plain_dir, images, args.rounds, args.decisions, settings)


if __name__ == "__main__":
    main()
