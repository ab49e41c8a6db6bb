"""StreetCLIP geolocation demo: drop photos, see where the model places them on a world map and in a table.

    python model_card/space/app.py --model DIR_OR_HUB_ID  # else $STREETCLIP_MODEL, else README.md's `models:`

Without the `streetclip` package (on a Space) the model repository's own code runs, with the map module `publish.py`
copies beside this file. A public page bounds what a request costs (README.md, "Limits").
"""

import argparse
import copy
import html
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
import torch
from huggingface_hub.repocard import metadata_load
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke
from PIL import Image
from transformers import AutoConfig, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module


try:
    from modeling_streetclip.app.world_map import OCEAN_COLOR, draw_world
except ImportError:  # on a Space, without the package
    from world_map import OCEAN_COLOR, draw_world


TASK = "geolocation"
MODEL_ENV = "STREETCLIP_MODEL"
SPACE_README = Path(__file__).with_name("README.md")

DEFAULT_TOP_K = 5
# More answers than this crowd the map into a blur of pins and the table past a screen.
MAX_TOP_K = 20
# Restricted copies of the heads kept for reuse; each shares the model's towers, so one costs a few MB at most.
RESTRICTION_CACHE_SIZE = 8
# Photos per request: enough for a set of holiday photos, while one request cannot hold the model for long.
MAX_PHOTOS = 12
# Larger uploads are refused before Gradio stores them; a phone's full-resolution JPEG is well under it.
MAX_FILE_SIZE = "20mb"
# Gradio deletes the uploads and answers it stored once they are this old, checking this often (seconds).
CACHE_MAX_AGE_S = 600
CACHE_CHECK_EVERY_S = 300
# The table's probabilities to four significant digits, coordinates to four decimals (about ten metres).
SIGNIFICANT_DIGITS = 4
COORDINATE_DECIMALS = 4
COORDINATE_FIELDS = ("latitude", "longitude")

# The map fills the image, equirectangular, at 72 dpi so that a point (matplotlib's marker unit) is a pixel.
MAP_SIZE_PX = (1024, 512)
MAP_DPI = 72
# The best answer's colour is the benchmark maps' prediction colour; weaker answers fade toward the faint one and
# shrink with their joint probability (`score` is a distance or a conditional under some decision rules).
PIN_COLOR = (197, 27, 125)
PIN_FAINT_COLOR = (246, 208, 230)
PIN_OUTLINE_COLOR = (40, 40, 40)
PIN_RADIUS_PX = (4.0, 11.0)
LABEL_SIZE_PX = 13
# The posterior's heat: a dot per candidate city, more opaque and redder with its share of the largest mass; cities
# under HEAT_MIN_SHARE are left out, so that the map is not a haze of every candidate.
HEAT_COLORMAP = "YlOrRd"
HEAT_MIN_SHARE = 0.01
HEAT_DOT_PX = 7.0
REGION_COLOR = "#08519c"
# Beyond the metric's continent level (2500 km) an answer says little more than "somewhere on Earth".
CONFIDENT_RADIUS_KM = 2500.0
EARTH_RADIUS_KM = 6371.0088  # the package's `geodesy.EARTH_RADIUS_KM`, which a Space without it cannot import


@dataclass
class PhotoResult:
    """One uploaded file: its answers (best first, in the pipeline's format) or why it could not be read."""

    number: int
    name: str
    answers: list[dict[str, Any]] | None = None
    error: str | None = None
    heat: np.ndarray | None = None  # (candidates, 3): latitude, longitude and posterior mass
    region_km: float | None = None  # the smallest circle around the best answer holding `level` of the mass
    level: float = 0.9

    def confidence(self) -> str:
        """The best answer's confidence in words: "90% within 420 km", or "not confident: ..." past a continent."""
        if self.region_km is None:
            return ""
        share, radius = f"{self.level:.0%}", f"{max(self.region_km, 1.0):,.0f} km"
        if self.region_km < CONFIDENT_RADIUS_KM:
            return f"{share} within {radius}"
        return f"not confident: {share} only within {radius}"


def resolve_model(argument: str | None, readme: Path = SPACE_README) -> str:
    """The model to serve: `--model`, else `STREETCLIP_MODEL`, else the first of `models:` in the Space README."""
    if argument or os.environ.get(MODEL_ENV):
        return argument or os.environ[MODEL_ENV]
    models = (metadata_load(readme) or {}).get("models") if readme.is_file() else None
    if models:
        return models[0]
    raise ValueError(
        f"No model to serve: pass --model (a saved StreetCLIP folder or a Hub id), set {MODEL_ENV}, or list it "
        f"under `models:` in {str(readme)!r}."
    )


class Geolocator:
    """The model, loaded once, and the answers for a request's photos, options and country restriction."""

    def __init__(self, model: str):
        try:
            import modeling_streetclip as package
        except ImportError:  # on a Space: the model repository's own code (`trust_remote_code=True`)
            package = None
            config = AutoConfig.from_pretrained(model, trust_remote_code=True)
            auto_map = getattr(config, "auto_map", None) or {}
            pipelines = getattr(config, "custom_pipelines", None) or {}
            if "AutoModel" not in auto_map or TASK not in pipelines:
                raise ValueError(
                    f"{model!r} carries no StreetCLIP code (`auto_map` and a {TASK!r} entry in `custom_pipelines`). "
                    "Without the streetclip package installed, serve a repository published by model_card/publish.py, "
                    "or install the package."
                ) from None
            model_class = get_class_from_dynamic_module(auto_map["AutoModel"], model)
            pipeline_class = get_class_from_dynamic_module(pipelines[TASK]["impl"], model)
        else:
            config = AutoConfig.from_pretrained(model)
            model_class, pipeline_class = package.StreetCLIPForGeolocation, package.GeolocationPipeline
        # "auto": without the text tower (a quarter of CLIP's weights) where the folder's heads hold all it would add.
        loaded = model_class.from_pretrained(model, config=config, vision_only="auto").eval()
        processor = AutoProcessor.from_pretrained(model, trust_remote_code=package is None)
        self.pipeline = pipeline_class(model=loaded, processor=processor)
        # The library's image loading, so that a bad file gets the CLI's message; its rules and geometry, for the map.
        code = pipeline_class.__module__.rpartition(".")[0]
        images, self.decisions, self.geodesy, self.pixels = (
            importlib.import_module(f"{code}.{name}") for name in ("images", "decisions", "geodesy", "pixels")
        )
        self.load_rgb_image = images.load_rgb_image
        self.image_errors = (OSError, images.ImageLoadError)
        # A Hub id names the model; a local folder's path would only name this machine's file system.
        self.display_name = Path(model).name if Path(model).exists() else model
        self.country_names = list(loaded.candidate_places.country_names)
        self.level = loaded.config.confidence_level

    def locate(self, paths: Sequence[str], countries: Sequence[str] = (), **options: Any) -> list[PhotoResult]:
        """Each file's answers among `countries` (all candidates when empty), with `options` for the pipeline, or its
        error; more than `MAX_PHOTOS` paths, or a country that is not a candidate, is a `ValueError`."""
        if len(paths) > MAX_PHOTOS:
            raise ValueError(f"{len(paths)} photos in one request; at most {MAX_PHOTOS} are located at a time.")
        pipeline = self._restricted(self._candidate_names(countries)) if countries else self.pipeline
        results = []
        for number, path in enumerate(paths, start=1):
            result = PhotoResult(number, Path(path).name)
            results.append(result)
            try:
                image = self.load_rgb_image(path)
            except self.image_errors as error:
                result.error = str(error)
                continue
            self._answer(pipeline, image, result, options)
            del image  # before the next photo is decoded
        return results

    @torch.no_grad()
    def _answer(self, pipeline, image: Image.Image, result: PhotoResult, options: dict[str, Any]) -> None:
        """The pipeline's answers (its own steps: one forward pass gives them and the posterior), the posterior over the
        candidates, and the radius around the best answer that holds `confidence_level` of it."""
        model = pipeline.model
        pixels = pipeline.preprocess(image)["pixel_values"]
        outputs = model(pixel_values=self.pixels.normalized_pixels(pipeline.image_processor, pixels, model.dtype))
        result.answers = pipeline.postprocess(self.decisions.rank(model, outputs, **options))
        levels = model.log_probabilities(outputs.country_logits, outputs.region_logits, outputs.city_logits)
        mass = self.decisions.confidence_posterior(model, outputs, levels)[0][0].double().cpu().numpy()
        points = model.city_coordinates.numpy()
        result.heat = np.column_stack([points, mass])
        best = result.answers[0]
        distances = self.geodesy.great_circle_km(best["latitude"], best["longitude"], points[:, 0], points[:, 1])
        result.level = model.config.confidence_level
        if (model.config.calibration or {}).get("within_km"):
            # Calibrated maps hold at the five radii only: say the answer's own `radius_km`, never a finer region.
            result.region_km = float(best["radius_km"] or distances.max())
        else:
            order = np.argsort(distances, kind="stable")
            reached = np.flatnonzero(np.cumsum(mass[order]) >= result.level)
            result.region_km = float(distances[order][reached[0]] if len(reached) else distances.max())

    def _candidate_names(self, countries: Sequence[str]) -> tuple[str, ...]:
        """The candidate names of `countries` (names or ISO codes), sorted and each once: one restriction, one copy."""
        places = self.pipeline.model.candidate_places
        return tuple(sorted({places.country_names[places.country_index(country)] for country in countries}))

    @lru_cache(maxsize=RESTRICTION_CACHE_SIZE)  # noqa: B019 -- one Geolocator lives as long as the app
    def _restricted(self, countries: tuple[str, ...]):
        """A pipeline over a copy of the model restricted to `countries`; it shares the towers, so it costs its heads."""
        model = self.pipeline.model
        towers = (model.vision_model, model.visual_projection, model.text_model, model.text_projection)
        restricted = copy.deepcopy(model, memo={id(tower): tower for tower in towers if tower is not None})
        restricted.restrict_countries(list(countries))
        return type(self.pipeline)(model=restricted, processor=self.pipeline.processor)


def answers_table(results: Sequence[PhotoResult]) -> pd.DataFrame:
    """One row per answer, with the photo's number, its file name, the answer's rank and the pipeline's fields."""
    rows = [
        {"photo": result.number, "file": result.name, "rank": rank, **answer}
        for result in results
        for rank, answer in enumerate(result.answers or [], start=1)
    ]
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["photo", "file", "rank"]
    table = pd.DataFrame(rows, columns=columns)
    for field in table.columns[table.dtypes == np.float64]:
        table[field] = table[field].map(partial(shown_number, field))
    return table


def shown_number(field: str, value: float) -> float:
    """`value` of the answers' `field` as the table shows it: a coordinate rounded, other numbers to a few digits."""
    if field in COORDINATE_FIELDS:
        return round(value, COORDINATE_DECIMALS)
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def errors_html(results: Sequence[PhotoResult]) -> str:
    """The files that could not be read, each with its reason, as HTML (empty when every file was answered)."""
    failed = [(result, result.error) for result in results if result.error is not None]
    return _photos_html(f"{len(failed)} of {len(results)} files could not be read:", failed)


def confidence_html(results: Sequence[PhotoResult]) -> str:
    """Each answered photo's confidence in words, as HTML."""
    sure = [(result, result.confidence()) for result in results if result.answers and result.region_km is not None]
    return _photos_html("How sure, around each best answer:", sure)


def _photos_html(title: str, photos: list[tuple[PhotoResult, str]]) -> str:
    items = "".join(
        f"<li><b>{photo.number}. {html.escape(photo.name)}</b>: {html.escape(text)}</li>" for photo, text in photos
    )
    return f"<p>{title}</p><ul>{items}</ul>" if items else ""


def draw_map(results: Sequence[PhotoResult]) -> Image.Image:
    """The world map of the answers over their posteriors: for one photo a pin per answer, sized and shaded by its
    joint probability, the best one outlined and labelled, with its region circled; for several photos one outlined
    pin per photo's best answer, labelled with the numbers of the photos it answers."""
    answered = [result for result in results if result.answers]
    # (answer, label): a labelled pin is a best answer, drawn in the full colour with a heavy outline.
    if len(answered) == 1:
        (result,) = answered
        label = "best" if result.region_km is None else f"best: {result.confidence()}"
        pins = [(answer, None if rank else label) for rank, answer in enumerate(result.answers)]
    else:
        # Photos answered with the same city share one pin, sized by the strongest of their probabilities.
        places: dict[tuple[float, float], tuple[dict[str, Any], list[str]]] = {}
        for result in answered:
            best = result.answers[0]
            strongest, numbers = places.get((best["latitude"], best["longitude"]), (best, []))
            strongest = max(strongest, best, key=lambda answer: answer["joint_probability"])
            places[best["latitude"], best["longitude"]] = (strongest, [*numbers, str(result.number)])
        pins = [(best, ", ".join(numbers)) for best, numbers in places.values()]
    figure = Figure(figsize=(MAP_SIZE_PX[0] / MAP_DPI, MAP_SIZE_PX[1] / MAP_DPI), dpi=MAP_DPI, facecolor=OCEAN_COLOR)
    FigureCanvasAgg(figure)
    axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axes.set_axis_off()
    draw_world(axes)
    if heat := [result.heat for result in answered if result.heat is not None]:
        # Every photo's posterior, weakest first, shaded against the largest mass of all.
        points = np.concatenate(heat)
        points = points[np.argsort(points[:, 2], kind="stable")]
        shares = points[:, 2] / max(points[-1, 2], 1e-300)
        points, shares = points[shares >= HEAT_MIN_SHARE], shares[shares >= HEAT_MIN_SHARE]
        style = {"cmap": HEAT_COLORMAP, "vmin": 0.0, "vmax": 1.0, "linewidths": 0, "zorder": 1}
        axes.scatter(points[:, 1], points[:, 0], s=HEAT_DOT_PX**2, c=shares, alpha=0.35 + 0.6 * shares, **style)
    if len(answered) == 1 and answered[0].region_km is not None:
        best = answered[0].answers[0]
        latitudes, longitudes = circle_points(best["latitude"], best["longitude"], answered[0].region_km)
        axes.plot(longitudes, latitudes, color=REGION_COLOR, linewidth=2, linestyle="--", zorder=1.5)
    top_score = max((answer["joint_probability"] for answer, _ in pins), default=0.0)
    outline = np.divide(PIN_OUTLINE_COLOR, 255)
    # Labels haloed in the ocean's colour, so that they read over land and pins.
    text = {"textcoords": "offset points", "va": "center", "fontsize": LABEL_SIZE_PX, "color": outline}
    text["path_effects"] = [withStroke(linewidth=2, foreground=OCEAN_COLOR)]
    # Weakest first, so that stronger pins and every label are drawn over them.
    for answer, label in sorted(pins, key=lambda pin: (pin[1] is not None, pin[0]["joint_probability"])):
        share = answer["joint_probability"] / top_score if top_score > 0 else 1.0
        radius = PIN_RADIUS_PX[0] + (PIN_RADIUS_PX[1] - PIN_RADIUS_PX[0]) * share**0.5
        color = PIN_COLOR if label is not None else _blend(PIN_FAINT_COLOR, PIN_COLOR, share)
        point, width = (answer["longitude"], answer["latitude"]), 1 if label is None else 2
        axes.scatter(*point, s=(2 * radius) ** 2, color=np.divide(color, 255), edgecolors=outline, linewidths=width)
        if label is not None:
            axes.annotate(label, point, xytext=(radius + 2, 0), **text)
    figure.canvas.draw()
    return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")


def circle_points(latitude: float, longitude: float, radius_km: float, steps: int = 361) -> tuple[np.ndarray, ...]:
    """Latitudes and longitudes of the circle of `radius_km` around a point on the sphere, broken (NaN) where it
    crosses the map's edge at 180 degrees."""
    angle = min(radius_km / EARTH_RADIUS_KM, np.pi)
    phi, lam = np.radians(latitude), np.radians(longitude)
    bearings = np.linspace(0, 2 * np.pi, steps)
    lat = np.arcsin(np.sin(phi) * np.cos(angle) + np.cos(phi) * np.sin(angle) * np.cos(bearings))
    lon = lam + np.arctan2(np.sin(bearings) * np.sin(angle) * np.cos(phi), np.cos(angle) - np.sin(phi) * np.sin(lat))
    lat, lon = np.degrees(lat), (np.degrees(lon) + 180) % 360 - 180
    lon[np.flatnonzero(np.abs(np.diff(lon)) > 180) + 1] = np.nan
    return lat, lon


def _blend(low: tuple[int, int, int], high: tuple[int, int, int], share: float) -> tuple[int, int, int]:
    return tuple(round(a + (b - a) * share) for a, b in zip(low, high, strict=True))


def build_demo(geolocator: Geolocator) -> gr.Blocks:
    """The page: photos, `top_k` and a country restriction in; the map, the answers table and file errors out."""

    def geolocate(files: list[str] | None, top_k: int, countries: list[str] | None):
        try:
            results = geolocator.locate(files or [], countries or [], top_k=int(top_k))
        except ValueError as error:  # the request's own mistake: shown on the page and in the API's error event
            raise gr.Error(str(error)) from None
        return draw_map(results), answers_table(results), errors_html(results), confidence_html(results)

    with gr.Blocks(
        title="StreetCLIP: where was this photo taken?",
        analytics_enabled=False,
        delete_cache=(CACHE_CHECK_EVERY_S, CACHE_MAX_AGE_S),
    ) as demo:
        gr.Markdown(
            f"# Where was this photo taken?\nStreetCLIP (`{geolocator.display_name}`) picks the most likely "
            "country among its candidates, then the most likely city of that country. Drop one photo to see its "
            f"best answers, or up to {MAX_PHOTOS} to see each photo's best answer (at most {MAX_FILE_SIZE.upper()} "
            "each). Outdoor street-level photos work best. The map shades the model's probability over its candidate "
            f"cities, and for one photo circles the region around the best answer that holds {geolocator.level:.0%} of it."
        )
        with gr.Row():
            with gr.Column(scale=1):
                photos = gr.File(label="Photos", file_count="multiple", elem_id="photos")
                top_k = gr.Slider(
                    1, MAX_TOP_K, value=DEFAULT_TOP_K, step=1, label="Answers per photo (top_k)", elem_id="top_k"
                )
                countries = gr.Dropdown(
                    choices=geolocator.country_names,
                    multiselect=True,
                    label="Only these countries (empty: all candidates)",
                    elem_id="countries",
                )
                locate = gr.Button("Locate", variant="primary", elem_id="locate")
                errors = gr.HTML(elem_id="errors")
                confidence = gr.HTML(elem_id="confidence")
            with gr.Column(scale=2):
                # PNG, lossless: pins keep their colours.
                world = gr.Image(
                    draw_map([]), label="Answers on the map", format="png", interactive=False, elem_id="map"
                )
        table = gr.Dataframe(
            value=answers_table([]), label="Answers, best first", interactive=False, elem_id="answers"
        )
        gr.on(
            triggers=[photos.upload, locate.click],
            fn=geolocate,
            inputs=[photos, top_k, countries],
            outputs=[world, table, errors, confidence],
            api_name="geolocate",
        )
    return demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help=f"a saved StreetCLIP folder or a Hub id (default: ${MODEL_ENV}, else the first `models:` entry of "
        f"{SPACE_README.name})",
    )
    args = parser.parse_args(argv)
    try:
        geolocator = Geolocator(resolve_model(args.model))
    except (OSError, ValueError) as error:
        print(f"app.py: cannot load the model: {error}", file=sys.stderr)
        return 2
    build_demo(geolocator).launch(max_file_size=MAX_FILE_SIZE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
