"""Speed, cold start and memory of `pipeline("geolocation")` at StreetCLIP's real scale (ViT-L/14 at 336 px, random
weights, which cost what trained ones do), against the bare vision forward and the naive CLIP reference."""

import json
import tempfile
from functools import partial
from pathlib import Path

import timing
import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer, pipeline

from modeling_streetclip import CandidatePlaces, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.configuration_streetclip import RECOMMENDED_CANDIDATE_SETTINGS, REGION_LEVELS
from modeling_streetclip.decisions import ZERO_SHOT_DECISIONS
from modeling_streetclip.testing_utils import save_random_vit_l


def prompt_tokenizer(places: CandidatePlaces) -> CLIPTokenizer:
    """A CLIP-format BPE tokenizer trained on the prompts, so that they are as long as under CLIP's own vocabulary
    (about 10 tokens), which cannot be downloaded here."""
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    words = pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([words, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    texts = [f"a street view photo in {name}." for name in places.country_names]
    texts += [f"a street view photo from {name}." for name in places.city_names]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=8000, end_of_word_suffix="</w>", initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator([text.lower() for text in texts], trainer)
    model = json.loads(backend.to_str())["model"]
    size = len(model["vocab"])
    vocab = {**model["vocab"], "<|startoftext|>": size, "<|endoftext|>": size + 1}
    return CLIPTokenizer(vocab=vocab, merges=[tuple(merge) for merge in model["merges"]])


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


def save_folder(model: StreetCLIPForGeolocation, plain_dir: Path, saved_dir: Path) -> None:
    model.save_pretrained(saved_dir)
    CLIPImageProcessorPil.from_pretrained(plain_dir).save_pretrained(saved_dir)


def measure_cold_start(plain_dir: Path, saved_dir: Path, image: Image.Image) -> None:
    model, load_s = timing.timed(lambda: StreetCLIPForGeolocation.from_pretrained(plain_dir))
    geolocate = pipeline("geolocation", model=model, processor=StreetCLIPProcessor.from_pretrained(plain_dir))
    first_s = timing.seconds(lambda: geolocate(image))
    heads = f"load + all {model.candidate_places.num_cities} city heads {load_s:.1f} s"
    print(f"cold start, plain CLIP checkpoint: {heads}, first answer {first_s:.1f} s")
    save_folder(model, plain_dir, saved_dir)
    saved_s = timing.seconds(lambda: timing.load_vision(saved_dir))
    print(f"cold start, saved folder (heads stored, vision only): load {saved_s:.1f} s")


def measure_memory(saved_dir: Path) -> None:
    for dtype in ("float32", "bfloat16"):
        full = timing.memory_after_one_batch(saved_dir, vision_only=False, variant=dtype)
        vision = timing.memory_after_one_batch(saved_dir, vision_only=True, variant=dtype)
        print(
            f"memory after the first answer, {dtype}: weights {full['weights']:.0f} -> {vision['weights']:.0f} MiB "
            f"vision only; peak resident {full['peak']:.0f} -> {vision['peak']:.0f} MiB"
        )


def measure_speed(plain_dir: Path, images: list[Image.Image], rounds: int, decisions: list[str], settings: dict):
    """The floor runs the pipeline's own model, so that both time the same weights in the same memory."""
    model = StreetCLIPForGeolocation.from_pretrained(plain_dir, **settings)
    geolocate = pipeline("geolocation", model=model, processor=StreetCLIPProcessor.from_pretrained(plain_dir))
    clip, processor = CLIPModel.from_pretrained(plain_dir).eval(), CLIPProcessor.from_pretrained(plain_dir)
    pixel_values = geolocate.image_processor(images=images, return_tensors="pt")["pixel_values"]
    places = model.candidate_places
    methods = {"floor": lambda: timing.vision_forward(model, pixel_values)}
    ratios = {f"pipeline {decision}": ("floor", " (target <= 1.10)") for decision in decisions}
    ratios["naive"] = (f"pipeline {decisions[0]}", " (target >= 2)")
    for decision in decisions:
        methods[f"pipeline {decision}"] = partial(geolocate, images, batch_size=len(images), decision=decision)
    methods["naive"] = lambda: naive_reference(clip, processor, places, images)
    print(f"{places.num_countries} countries, {places.num_regions} regions, {places.num_cities} cities")
    timing.print_per_image(methods, rounds, len(images), ratios)


def main() -> None:
    parser = timing.speed_parser(__doc__, rounds=3, batch_size=8)
    measures = ["cold_start", "memory", "speed"]
    parser.add_argument(
        "--measure",
        nargs="+",
        choices=measures,
        default=measures,
        help="what to measure; without cold_start, memory is measured on a folder of 10 countries (building every "
        "city head takes minutes and does not change memory)",
    )
    parser.add_argument("--decisions", nargs="+", choices=ZERO_SHOT_DECISIONS, default=["greedy"])
    parser.add_argument("--levels", nargs="+", choices=REGION_LEVELS, help="default: the paper's two levels")
    parser.add_argument("--recommended", action="store_true", help="the recommended candidate table, not the paper's")
    args = parser.parse_args()
    settings = dict(RECOMMENDED_CANDIDATE_SETTINGS) if args.recommended else {}
    if args.levels:
        settings["levels"] = args.levels
    torch.manual_seed(0)
    places = CandidatePlaces.from_geonames()
    images = timing.noise_photos(args.batch_size)
    with tempfile.TemporaryDirectory() as workdir:
        plain_dir, saved_dir = Path(workdir) / "plain-clip", Path(workdir) / "streetclip"
        save_random_vit_l(plain_dir, prompt_tokenizer(places))
        print(f"{timing.machine_line()}; ViT-L/14-336 random weights")
        if "cold_start" in args.measure:
            measure_cold_start(plain_dir, saved_dir, images[0])
        elif "memory" in args.measure:
            countries = places.country_names[:10]
            model = StreetCLIPForGeolocation.from_pretrained(plain_dir, candidate_countries=countries)
            save_folder(model, plain_dir, saved_dir)
        if "memory" in args.measure:
            measure_memory(saved_dir)
        if "speed" in args.measure:
            measure_speed(plain_dir, images, args.rounds, args.decisions, settings)


if __name__ == "__main__":
    main()
