"""Below the float32 floor on the CPU: int8 (ours, and torchao's when installed), bfloat16 and float16 inference at
ViT-L/14 336 px (random weights): time, embedding cosine with float32, load time and memory. Random weights lack
trained CLIP's activation outliers: `tests/test_quantization.py` checks answers on a trained model."""

import tempfile
from functools import partial
from pathlib import Path

import timing
import torch
import torch.nn.functional as F
from transformers import pipeline

from modeling_streetclip import StreetCLIPProcessor
from modeling_streetclip.testing_utils import save_random_vit_l


VARIANTS = ("float32", "int8", "torchao_int8", "bfloat16", "float16")


def load_variant(model_dir: Path, variant: str):
    """The saved model without its text tower, as `variant` runs it; None when the variant's package is missing."""
    if variant != "torchao_int8":
        return timing.load_vision(model_dir, variant)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print("torchao_int8: skipped, torchao is not installed (pip install torchao to compare)")
        return None
    # The layers Int8DynamicConfig quantizes; transformers' TorchAoConfig cannot load CLIP (no get_input_embeddings).
    model = timing.load_vision(model_dir)
    quantize_(model.vision_model, Int8DynamicActivationInt8WeightConfig())
    return model


def measure_speed(model_dir: Path, variants: list[str], batch_size: int, rounds: int) -> None:
    images = timing.noise_photos(batch_size)
    methods, embeddings, load_seconds = {}, {}, {}
    for variant in variants:
        model, load_s = timing.timed(partial(load_variant, model_dir, variant))
        if model is None:
            continue
        load_seconds[variant] = load_s
        geolocate = pipeline("geolocation", model=model, processor=StreetCLIPProcessor.from_pretrained(model_dir))
        pixel_values = geolocate.image_processor(images=images, return_tensors="pt")["pixel_values"]
        embeddings[variant] = timing.vision_forward(model, pixel_values.to(model.dtype))
        if variant == "float32":
            methods["float32 floor"] = lambda model=model, pixels=pixel_values: timing.vision_forward(model, pixels)
        methods[f"{variant} pipeline"] = lambda geolocate=geolocate: geolocate(images, batch_size=len(images))
    ratios = {name: ("float32 floor", " (target <= 0.60)" if name == "int8 pipeline" else "") for name in methods}
    timing.print_per_image(methods, rounds, batch_size, ratios)
    for variant, embeds in embeddings.items():
        if variant != "float32":
            cosine = F.cosine_similarity(embeds, embeddings["float32"]).mean().item()
            target = " (target >= 0.99)" if variant == "int8" else ""
            print(f"  {variant} image embeddings vs float32: mean cosine {cosine:.5f}{target}")
    print("  load seconds: " + ", ".join(f"{variant} {seconds:.1f}" for variant, seconds in load_seconds.items()))


def main() -> None:
    parser = timing.speed_parser(__doc__, rounds=2, batch_size=8)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--skip_memory", action="store_true", help="skip the fresh-process memory figures")
    args = parser.parse_args()
    variants = ["float32", *(variant for variant in args.variants if variant != "float32")]  # float32 is the floor
    print(f"{timing.machine_line()}; quantized engine {torch.backends.quantized.engine}; ViT-L/14-336 random weights")
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = timing.save_small_streetclip(
            save_random_vit_l(Path(workdir) / "clip"), Path(workdir) / "streetclip"
        )
        measure_speed(model_dir, variants, args.batch_size, args.rounds)
        if args.skip_memory:
            return
        print(f"resident memory of a fresh process, vision tower only, one batch of {args.batch_size} (MiB):")
        for variant in ("float32", "int8", "bfloat16"):
            memory = timing.memory_after_one_batch(model_dir, args.batch_size, variant=variant)
            print(
                f"  {variant:<9} peak {memory['peak']:6.0f}; after the batch {memory['total']:6.0f} = "
                f"{memory['anonymous']:5.0f} anonymous + {memory['file']:5.0f} file-backed (memory-mapped weights)"
            )


if __name__ == "__main__":
    main()
