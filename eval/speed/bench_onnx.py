"""ONNX Runtime against PyTorch on the CPU, and the model in a browser: the graphs of `streetclip export` at ViT-L/14
336 px (random weights). eval/README.md lists the options, figures and targets; the browser needs Chromium,
chromedriver and npm (it runs `npm ci` once)."""

import os
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime
import timing
from PIL import Image
from transformers import pipeline

from modeling_streetclip import StreetCLIPProcessor, testing_utils
from modeling_streetclip.app import export
from modeling_streetclip.app.export import GRAPH_FILE, ONNX_FOLDER, QUANTIZED_GRAPH_FILE


def graph_pipeline(folder: Path, graph: str, processor: StreetCLIPProcessor):
    """`pipeline("geolocation")` on an exported graph, as `streetclip locate --backend onnxruntime` runs it."""
    return pipeline("geolocation", model=export.OnnxRuntimeModel.from_export(folder, graph), processor=processor)


def agreement(ours: list[dict], theirs: list[dict], key: str) -> float:
    return float(np.mean([a[key] == b[key] for a, b in zip(ours, theirs, strict=True)]))


def measure_speed(workdir: Path, batch_size: int, rounds: int) -> None:
    model_dir = timing.save_small_streetclip(testing_utils.save_random_vit_l(workdir / "clip"), workdir / "streetclip")
    processor = StreetCLIPProcessor.from_pretrained(model_dir)
    model = timing.load_vision(model_dir)
    export_seconds = timing.seconds(lambda: export.save_onnx_folder(model, processor, workdir / "onnx-export"))
    graphs = workdir / "onnx-export" / ONNX_FOLDER
    sizes = (f"{name} {(graphs / name).stat().st_size / 2**20:.0f} MiB" for name in (GRAPH_FILE, QUANTIZED_GRAPH_FILE))
    print(f"export of ViT-L/14-336: {export_seconds:.0f} s; {', '.join(sizes)}")
    images = timing.noise_photos(batch_size)
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    int8 = timing.load_vision(model_dir, "int8")
    pipelines = {
        "ONNX Runtime float32 pipeline": graph_pipeline(workdir / "onnx-export", GRAPH_FILE, processor),
        "PyTorch int8 pipeline": pipeline("geolocation", model=int8, processor=processor),
        "ONNX Runtime int8 pipeline": graph_pipeline(workdir / "onnx-export", QUANTIZED_GRAPH_FILE, processor),
    }
    methods = {"PyTorch float32 bare forward": lambda: timing.vision_forward(model, pixel_values)}
    methods |= {name: partial(geolocate, images, batch_size=batch_size) for name, geolocate in pipelines.items()}
    ratios = {
        "ONNX Runtime float32 pipeline": ("PyTorch float32 bare forward", " (target <= 1.0)"),
        "ONNX Runtime int8 pipeline": ("PyTorch int8 pipeline", " (target <= 0.8)"),
    }
    timing.print_per_image(methods, rounds, batch_size, ratios)


def measure_agreement(workdir: Path) -> None:
    """First answers of the int8 graph against the float32 graph's, and the float32 graph's against PyTorch's, on
    held-out photos of the synthetic geo set, with the tiny model trained on it."""
    model_dir = testing_utils.train_geo_model(workdir / "trained")
    model = timing.load_vision(model_dir)
    processor = StreetCLIPProcessor.from_pretrained(model_dir)
    export.save_onnx_folder(model, processor, workdir / "trained-onnx")
    paths = sorted(testing_utils.write_geo_imagefolder(workdir / "held-out", photos_per_city=17, seed=1).glob("*.png"))
    images = [Image.open(path).convert("RGB") for path in paths]
    pipelines = {
        "PyTorch float32": pipeline("geolocation", model=model, processor=processor),
        "ONNX float32": graph_pipeline(workdir / "trained-onnx", GRAPH_FILE, processor),
        "ONNX int8": graph_pipeline(workdir / "trained-onnx", QUANTIZED_GRAPH_FILE, processor),
    }
    answers = {name: [answer[0] for answer in geolocate(images)] for name, geolocate in pipelines.items()}
    accuracy = agreement(answers["ONNX float32"], [{"country": path.name.split("-")[0]} for path in paths], "country")
    scored = f"{len(paths)} held-out photos of the trained tiny model"
    print(f"first answers on {scored} (float32 country accuracy {accuracy:.3f}):")
    for ours, theirs, target in (
        ("ONNX int8", "ONNX float32", " (target >= 0.98)"),
        ("ONNX float32", "PyTorch float32", ""),
    ):
        countries, cities = (agreement(answers[ours], answers[theirs], key) for key in ("country", "label"))
        print(f"  {ours} vs {theirs}: countries agree {countries:.3f}{target}, cities {cities:.3f}")


def measure_browser(workdir: Path, photos: int) -> None:
    """Photos per second of the page in headless Chromium at ViT-B/16 (after one photo of warm-up)."""
    clip_dir = testing_utils.save_random_clip(workdir / "clip-b16", testing_utils.VIT_B_16)
    model_dir = timing.save_small_streetclip(clip_dir, workdir / "streetclip-b16")
    model = timing.load_vision(model_dir)
    export.save_onnx_folder(model, StreetCLIPProcessor.from_pretrained(model_dir), workdir / "web-model")
    testing_utils.install_web_dependencies()
    paths = [workdir / f"photo-{seed}.png" for seed in range(photos + 1)]
    for seed, path in enumerate(paths):
        testing_utils.random_photo(seed, size=(640, 480)).save(path)
    threads = os.cpu_count()
    print(f"headless Chromium, onnxruntime-web (WebAssembly, {threads} threads), ViT-B/16 at 224 px:")
    with testing_utils.serve_folders({"/": testing_utils.WEB_DIR, "/model/": workdir / "web-model"}) as served:
        driver = testing_utils.headless_chromium()
        try:
            for graph in (GRAPH_FILE, QUANTIZED_GRAPH_FILE):
                testing_utils.open_web_page(driver, f"{served.url}?threads={threads}&graph={ONNX_FOLDER}/{graph}")
                testing_utils.drop_photos(driver, paths[:1])
                testing_utils.drop_photos(driver, paths[1:])
                status = driver.execute_script("return document.getElementById('status').dataset")
                rate = int(status["photos"]) / float(status["seconds"])
                print(
                    f"  {graph:<22} {rate:6.2f} photos/s ({status['photos']} photos of 640 x 480, decoding included)"
                )
        finally:
            driver.quit()


def main() -> None:
    parser = timing.speed_parser(__doc__, rounds=2, batch_size=8)
    parser.add_argument("--browser_photos", type=int, default=8, help="photos timed in the browser")
    parser.add_argument("--skip_speed", action="store_true", help="skip the ViT-L/14-336 timings")
    parser.add_argument("--skip_agreement", action="store_true", help="skip training the tiny model and its agreement")
    parser.add_argument("--skip_browser", action="store_true", help="skip the browser's photos per second")
    args = parser.parse_args()
    print(f"{timing.machine_line()}; onnxruntime {onnxruntime.__version__}")
    with tempfile.TemporaryDirectory() as workdir:
        if not args.skip_speed:
            measure_speed(Path(workdir), args.batch_size, args.rounds)
        if not args.skip_agreement:
            measure_agreement(Path(workdir))
        if not args.skip_browser:
            measure_browser(Path(workdir), args.browser_photos)


if __name__ == "__main__":
    main()
