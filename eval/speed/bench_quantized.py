"""Below the float32 floor on the CPU: int8, bfloat16 and float16 inference at StreetCLIP's real scale (ViT-L/14 at
336 px, random weights, which cost what trained ones do).

Prints, from one run on this machine, per image at one batch size (8 by default):
- the bare float32 vision forward (`vision_model` + `visual_projection` on preprocessed tensors): the floor;
- `pipeline("geolocation")` in float32, with the vision tower in int8 (`Int8DynamicConfig`, the route the package
  uses), with torchao's int8 dynamic quantization instead (the route compared against; skipped when torchao is not
  installed), and in bfloat16 and float16; each as a ratio to the float32 floor (target for int8: <= 0.60);
- the mean cosine similarity of each variant's image embeddings with float32's (target for int8: >= 0.99);
- seconds to load (and quantize) each variant, and the peak and final resident memory of a fresh process that loads
  the model without its text tower and answers one batch, in float32, int8 and bfloat16.

Random weights have benign activations; trained CLIP has a few large activation outliers that make int8 harder, so
the answers' agreement is measured on a trained model in `tests/test_quantization.py`. Timings interleave the
variants over rounds and report medians, so drift on a shared machine hits all of them alike.

Run: `python eval/speed/bench_quantized.py [--rounds 2] [--batch_size 8] [--variants ...] [--skip_memory]`.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import pipeline

import modeling_streetclip  # noqa: F401  (registers the "geolocation" task)
from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.quantization import Int8DynamicConfig
from modeling_streetclip.testing_utils import SMALL_COUNTRIES, save_random_vit_l, save_streetclip_folder


VARIANTS = ("float32", "int8", "torchao_int8", "bfloat16", "float16")


def load_variant(model_dir: Path, variant: str) -> StreetCLIPForGeolocation | None:
    """The saved model without its text tower, as `variant` runs it; None when the variant's package is missing."""
    if variant in ("float32", "bfloat16", "float16"):
        return StreetCLIPForGeolocation.from_pretrained(model_dir, vision_only=True, dtype=getattr(torch, variant))
    if variant == "int8":
        return StreetCLIPForGeolocation.from_pretrained(
            model_dir, vision_only=True, quantization_config=Int8DynamicConfig()
        )
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print("torchao_int8: skipped, torchao is not installed (pip install torchao to compare)")
        return None
    # The same layers as Int8DynamicConfig (the vision tower's linear layers), through torchao's tensor subclass;
    # transformers' TorchAoConfig cannot load a CLIP model, which lacks `get_input_embeddings`.
    model = StreetCLIPForGeolocation.from_pretrained(model_dir, vision_only=True)
    quantize_(model.vision_model, Int8DynamicActivationInt8WeightConfig())
    return model


def vision_forward(model: StreetCLIPForGeolocation, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings from the bare vision tower: what the heads score."""
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    return F.normalize(embeds.float(), dim=-1)


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure_speed(model_dir: Path, images: list[Image.Image], variants: list[str], rounds: int) -> None:
    """Per-image time of the float32 floor and of the pipeline in each variant, interleaved over `rounds`."""
    methods: dict[str, Callable[[], object]] = {}
    embeddings: dict[str, torch.Tensor] = {}
    load_seconds: dict[str, float] = {}
    for variant in variants:
        start = time.perf_counter()
        model = load_variant(model_dir, variant)
        if model is None:
            continue
        load_seconds[variant] = time.perf_counter() - start
        geolocate = pipeline("geolocation", model=model, processor=StreetCLIPProcessor.from_pretrained(model_dir))
        pixel_values = geolocate.image_processor(images=images, return_tensors="pt")["pixel_values"]
        embeddings[variant] = vision_forward(model, pixel_values.to(model.dtype))
        if variant == "float32":
            methods["float32 floor"] = lambda model=model, pixel_values=pixel_values: vision_forward(
                model, pixel_values
            )
        methods[f"{variant} pipeline"] = lambda geolocate=geolocate: geolocate(images, batch_size=len(images))
    for method in methods.values():
        method()  # warm-up: one-off allocations and kernel choices
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_index in range(rounds):
        # Rotate the order so that no method always runs first in a round on a shared machine.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(methods[name]))
    per_image = {name: statistics.median(values) / len(images) for name, values in times.items()}
    floor = per_image["float32 floor"]
    print(f"per image at batch {len(images)}, median of {rounds} rounds (ratio to the float32 floor):")
    for name, seconds in per_image.items():
        target = " (target <= 0.60)" if name == "int8 pipeline" else ""
        print(f"  {name:<22} {seconds:7.3f} s  {seconds / floor:5.2f}x{target}")
    reference = embeddings.get("float32")
    for variant, embeds in embeddings.items():
        if variant != "float32" and reference is not None:
            cosine = F.cosine_similarity(embeds, reference).mean().item()
            target = " (target >= 0.99)" if variant == "int8" else ""
            print(f"  {variant} image embeddings vs float32: mean cosine {cosine:.5f}{target}")
    print("  load seconds: " + ", ".join(f"{variant} {seconds:.1f}" for variant, seconds in load_seconds.items()))


def memory_after_one_batch(model_dir: Path, variant: str, batch_size: int) -> dict[str, float]:
    """Resident MiB of a fresh process (this script with `--memory_of`) that loads `variant` without the text tower
    and answers one batch: its peak (`VmHWM`), and after the batch its total, anonymous and file-backed parts.

    float32 weights stay memory-mapped from the safetensors file (file-backed: page cache that the kernel can
    reclaim); int8 and bfloat16 read that file once to convert it, so its pages stay resident beside their own
    copies until the kernel needs the memory. The anonymous part is what the process itself holds.
    """
    command = [sys.executable, __file__, "--memory_of", variant, str(model_dir), "--batch_size", str(batch_size)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"measuring the memory of {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def report_own_memory(variant: str, model_dir: Path, batch_size: int) -> None:
    """The child side of `memory_after_one_batch`: print this process's memory figures as one JSON line."""
    model = load_variant(model_dir, variant)
    vision_forward(model, torch.randn(batch_size, 3, 336, 336, dtype=model.dtype))
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    # /proc reports kB; VmHWM, unlike getrusage's ru_maxrss, is not inherited from the parent across fork and exec.
    keys = {"peak": "VmHWM", "total": "VmRSS", "anonymous": "RssAnon", "file": "RssFile"}
    print(json.dumps({name: int(status[key].split()[0]) / 1024 for name, key in keys.items()}))


def measure_memory(model_dir: Path, batch_size: int) -> None:
    print(f"resident memory of a fresh process, vision tower only, one batch of {batch_size} (MiB):")
    for variant in ("float32", "int8", "bfloat16"):
        memory = memory_after_one_batch(model_dir, variant, batch_size)
        print(
            f"  {variant:<9} peak {memory['peak']:6.0f}; after the batch {memory['total']:6.0f} = "
            f"{memory['anonymous']:5.0f} anonymous + {memory['file']:5.0f} file-backed (memory-mapped weights)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (medians are reported)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--skip_memory", action="store_true", help="skip the fresh-process memory figures")
    parser.add_argument("--memory_of", nargs=2, metavar=("VARIANT", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        report_own_memory(args.memory_of[0], Path(args.memory_of[1]), args.batch_size)
        return
    variants = ["float32", *(variant for variant in args.variants if variant != "float32")]  # float32 is the floor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(args.batch_size)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine "
        f"{torch.backends.quantized.engine}; ViT-L/14-336 random weights"
    )
    with tempfile.TemporaryDirectory() as workdir:
        # Six countries of five cities: the heads' size is noise next to ViT-L, and building few heads is quick.
        model_dir = save_streetclip_folder(
            save_random_vit_l(Path(workdir) / "clip"),
            Path(workdir) / "streetclip",
            candidate_countries=SMALL_COUNTRIES,
            cities_per_country=5,
        )
        measure_speed(model_dir, images, variants, args.rounds)
        if not args.skip_memory:
            measure_memory(model_dir, args.batch_size)


if __name__ == "__main__":
    main()
