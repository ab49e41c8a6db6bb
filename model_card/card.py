"""The model card of a published StreetCLIP: `template.md` filled from a training run and its benchmark results.

Numbers come only from files (`training_args.json`, the `metrics.json` of `eval/benchmark.py`); every printed value is
escaped as markdown text unless it is [`Markdown`], so that no name from a file can break a table or pass HTML.
"""

import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from modeling_streetclip import CandidatePlaces, StreetCLIPConfig


TEMPLATE_PATH = Path(__file__).with_name("template.md")
TRAINING_ARGS_NAME = "training_args.json"

# The Hub has no geolocation task; image classification has this pipeline's interface (model_card/README.md).
PIPELINE_TAG = "image-classification"
TAGS = ["streetclip", "clip", "geolocation", "image-geolocation", "zero-shot"]
# The model-index task of every benchmark row (IM2GPS, IM2GPS3K, ...).
TASK_TYPE, TASK_NAME = "image-geolocation", "Image geolocation"

_ACCURACY_KEY = re.compile(r"^acc_(?P<km>\d+(?:\.\d+)?)km$")
# The geodesic accuracy metric's other outputs, in table order, with their labels.
_DISTANCE_METRICS = {"median_km": "Median error (km)", "mean_km": "Mean error (km)", "geoscore": "GeoScore"}
# Training facts with a line on the card, in order; `steps` and `epochs` are what the run did (README.md, "Training").
_TRAINING_FIELDS = {
    "model_name_or_path": "Base model",
    "train_data": "Training data",
    "mode": "Mode",
    "lora_r": "LoRA rank",
    "steps": "Steps",
    "epochs": "Epochs",
    "per_device_train_batch_size": "Batch size per device",
    "gradient_accumulation_steps": "Gradient accumulation steps",
    "world_size": "Processes",
    "global_batch_size": "Global batch size",
    "learning_rate": "Learning rate",
    "mixed_precision": "Mixed precision",
    "seed": "Seed",
}
# `training/pretrain.py` selects what it trains with these flags; a run may instead record a single `mode` string.
_MODE_FLAGS = {"use_lora": "lora", "freeze_text_tower": "freeze_text", "freeze_vision_tower": "freeze_vision"}
# Scoring settings of the metric that change its numbers (eval/geodesic_accuracy), when a run records them.
_PROTOCOL_KEYS = ("radius_km", "inclusive")
# File endings that mark a spec as a local file, even where it would also parse as `namespace/name`.
_FILE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".arrow", ".txt", ".tar", ".zip", ".safetensors")
# Markdown syntax that a character starts anywhere in a line (`&`, `<` and `>` become HTML entities instead).
_INLINE_SYNTAX = re.compile(r"([\\`*_\[\]|~$])")
# Syntax only a line's start makes: heading or bullet marker, setext underline or break, ordered-list number.
_LINE_START_MARKER = re.compile(r"^(?:#+|[-+])(?: |$)|^[=-]+$")
_ORDERED_LIST_NUMBER = re.compile(r"^\d{1,9}(?=[.)](?: |$))")
# Where `hub_link` points for each kind of Hub repository.
_HUB_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class Markdown(str):
    """Text already written as markdown, which the card's template prints as it is; everything else is escaped."""


def markdown_text(value: Any) -> Markdown:
    """`value` as markdown that renders as its literal text on one line, in a paragraph, a list or a table cell."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    text = _INLINE_SYNTAX.sub(r"\\\1", text)
    if _LINE_START_MARKER.match(text):
        return Markdown(f"\\{text}")
    number = _ORDERED_LIST_NUMBER.match(text)
    return Markdown(f"{text[: number.end()]}\\{text[number.end() :]}" if number else text)


def markdown_code(value: Any) -> Markdown:
    """`value` as an inline code span on one line, fenced past any backtick run inside (CommonMark); `|` is not escaped,
    so keep code out of tables."""
    text = " ".join(line for line in str(value).splitlines() if line)
    if not text:
        return Markdown('`""`')
    fence = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return Markdown(f"{fence}{pad}{text}{pad}{fence}")


def hub_link(repo_id: str, kind: str = "model") -> Markdown:
    """A markdown link to a Hub repository of `kind` ("model", "dataset" or "space"), labelled with its id."""
    if kind not in _HUB_URL_PREFIXES:
        raise ValueError(f"kind must be one of {sorted(_HUB_URL_PREFIXES)}, got {kind!r}.")
    _validate_repo_id(repo_id)
    return Markdown(f"[{markdown_text(repo_id)}](https://huggingface.co/{_HUB_URL_PREFIXES[kind]}{repo_id})")


@dataclass(frozen=True)
class BenchmarkResult:
    """One run of the benchmark runner: the metric values of its `metrics.json` and what they were measured on."""

    name: str
    source: Path
    metrics: dict[str, float]
    data: str | None = None
    split: str | None = None
    model: str | None = None
    num_evaluated: int | None = None
    num_failed: int | None = None
    protocol: dict | None = None
    calibration: dict | None = None  # metrics.json's ECE and Brier of `within_km` per radius, when it has them


def hub_repo_id(spec: Any) -> str | None:
    """`spec` if it names a Hub repo (`namespace/name`), `None` for a local path or anything else."""
    if not isinstance(spec, str) or spec.count("/") != 1 or Path(spec).exists() or spec.endswith(_FILE_SUFFIXES):
        return None
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return None
    return spec


def base_model_source(training_args: Mapping | None, converted_from: str | None) -> str | None:
    """The recorded checkpoint these weights come from (the run's start, or the converted CLIP), which every part of
    the card reads, so that no two parts disagree."""
    source = training_args.get("model_name_or_path") if training_args else converted_from
    return None if source is None else str(source)


def read_training_args(model_name_or_path: str | Path) -> dict | None:
    """The arguments `training/pretrain.py` saved next to the model, or `None` where there are none."""
    path = Path(model_name_or_path) / TRAINING_ARGS_NAME
    return _read_json_object(path) if path.is_file() else None


def read_benchmark_result(path: str | Path, name: str | None = None) -> BenchmarkResult:
    """Read one `metrics.json` of the benchmark runner; `name` labels its row (by default the file's `benchmark`
    key, else the name of its data spec)."""
    path = Path(path)
    record = _read_json_object(path)
    metrics = {key: value for key, value in record.items() if _ACCURACY_KEY.match(key) or key in _DISTANCE_METRICS}
    if not metrics:
        raise ValueError(
            f"{str(path)!r} holds no geodesic accuracy metric (acc_<t>km, median_km, mean_km, geoscore); pass the "
            "metrics.json that eval/benchmark.py writes."
        )
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{str(path)!r}: {key} must be a finite number, got {value!r}.")
        if _ACCURACY_KEY.match(key) and not 0.0 <= value <= 1.0:
            raise ValueError(f"{str(path)!r}: {key}={value!r} must be a fraction between 0 and 1, not a percentage.")
    data = record.get("data")
    # A data spec labels the row by its Hub id, or a local file or folder by its name.
    name = name or record.get("benchmark") or (data and (hub_repo_id(data) or Path(str(data).rstrip("/")).stem))
    if not name:
        raise ValueError(f"{str(path)!r} names no benchmark and no data; label it on the command line as NAME={path}.")
    # How distances were scored (radius, inclusive hits): a `protocol` object over top-level keys.
    protocol = record.get("protocol") or {}
    if not isinstance(protocol, dict):
        raise ValueError(f"{str(path)!r}: protocol must be a JSON object, got {protocol!r}.")
    protocol = {**{key: record[key] for key in _PROTOCOL_KEYS if key in record}, **protocol}
    return BenchmarkResult(
        name=str(name),
        source=path,
        metrics=metrics,
        data=None if data is None else str(data),
        split=record.get("split"),
        model=record.get("model"),
        num_evaluated=record.get("num_evaluated", record.get("n")),
        num_failed=record.get("num_failed"),
        protocol=protocol or None,
        calibration=record.get("calibration") if isinstance(record.get("calibration"), dict) else None,
    )


def build_model_card(
    config: StreetCLIPConfig,
    repo_id: str,
    *,
    license: str | None = None,
    converted_from: str | None = None,
    training_args: Mapping | None = None,
    benchmarks: Sequence[BenchmarkResult] = (),
    space: str | None = None,
    onnx: bool = False,
    web_space: str | None = None,
) -> ModelCard:
    """Fill the card of the model `config` describes, to be published as `repo_id`.

    Args:
        license: The weights' license; `None` where it could not be determined (the card says so).
        converted_from: The plain CLIP checkpoint these weights are, unchanged, when publishing converts one.
        training_args: The run's saved arguments ([`read_training_args`]); `None` where none were recorded.
        benchmarks: Results of the benchmark runner ([`read_benchmark_result`]), one table row each.
        space, web_space: The demo Space and the in-browser Space serving this model, which the card links to.
        onnx: Whether the repository holds the ONNX graphs (`publish.py --onnx`), which the card says how to run.
    """
    labels = [(benchmark.name, benchmark.split) for benchmark in benchmarks]
    if repeated := sorted({label for label in labels if labels.count(label) > 1}, key=str):
        raise ValueError(
            f"Several metrics files give results for the same benchmark and split: {repeated}; label them apart "
            "as NAME=FILE."
        )
    _validate_repo_id(repo_id)
    places = CandidatePlaces.from_dict(config.candidate_places)
    base_source = base_model_source(training_args, converted_from)
    base_model = hub_repo_id(base_source)
    train_data = hub_repo_id((training_args or {}).get("train_data"))
    model_name = repo_id.split("/")[-1]
    # One `EvalResult` per metric value of each benchmark, as `model-index` holds them.
    results = [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=hub_repo_id(benchmark.data) or benchmark.name,
            dataset_name=benchmark.name,
            dataset_split=benchmark.split,
            metric_type=key,
            metric_name=_metric_label(key),
            metric_value=value,
            metric_args=benchmark.protocol,
        )
        for benchmark in benchmarks
        for key, value in benchmark.metrics.items()
    ]
    arguments = json.dumps(dict(training_args or {}), indent=2, default=str)
    fence = "`" * max(3, _longest_backtick_run(arguments) + 1)  # no line of the arguments can close it
    card_data = ModelCardData(
        model_name=model_name,
        license=license or "other",
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=TAGS,
        base_model=base_model,
        datasets=[train_data] if train_data else None,
        eval_results=results or None,
    )
    return render_model_card(
        card_data,
        # A valid repo id holds only letters, digits, `-`, `_`, `.` and one `/`: safe verbatim in code and URLs.
        repo_id=Markdown(repo_id),
        model_name=model_name,
        weights_license=license,
        base_model=_repo_reference(base_source, "model"),
        base_model_id=base_model,
        converted_from=converted_from,
        config=config,
        places=places,
        max_cities_per_country=max(len(rows) for rows in places.cities_by_country),
        training=_training_lines(training_args),
        training_args_json=Markdown(f"{fence}json\n{arguments}\n{fence}") if training_args else None,
        evaluation=_evaluation_table(benchmarks),
        calibration=_calibration_table(benchmarks),
        benchmarks=benchmarks,
        space=hub_link(space, "space") if space else None,
        onnx=onnx,
        web_space=hub_link(web_space, "space") if web_space else None,
    )


def render_model_card(card_data: ModelCardData, template_path: Path = TEMPLATE_PATH, **values: Any) -> ModelCard:
    """Fill the Jinja template at `template_path` with `values` (each name it uses must be given), escaping every
    printed value that is not `Markdown`, as `ModelCard.from_template` would not; filters `code` and `hub_link`."""
    environment = jinja2.Environment(
        finalize=lambda value: value if isinstance(value, Markdown) else markdown_text(value),
        undefined=jinja2.StrictUndefined,
    )
    environment.filters.update(code=markdown_code, hub_link=hub_link)
    template = environment.from_string(Path(template_path).read_text(encoding="utf-8"))
    return ModelCard(template.render(card_data=Markdown(card_data.to_yaml()), **values))


def _validate_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a Hub repository id NAMESPACE/NAME: {error}") from None


def _repo_reference(spec: Any, kind: str) -> Markdown | None:
    """A recorded model or data spec as the card shows it: a link for a Hub id, a code span for a local path."""
    if spec is None:
        return None
    repo_id = hub_repo_id(spec)
    return hub_link(repo_id, kind) if repo_id else markdown_code(spec)


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _read_json_object(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}.") from None
    if not isinstance(record, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(record).__name__}.")
    return record


def _metric_label(key: str) -> str:
    match = _ACCURACY_KEY.match(key)
    return f"Accuracy within {match['km']} km" if match else _DISTANCE_METRICS[key]


def _training_lines(training_args: Mapping | None) -> list[tuple[str, Markdown]] | None:
    """(label, value) lines for the highlighted training facts, "not recorded" where the run did not save one."""
    if training_args is None:
        return None
    if "mode" in training_args:
        mode = str(training_args["mode"])
    elif _MODE_FLAGS.keys() & training_args.keys():  # the flags that select a mode, "full" when none is set
        mode = ", ".join(name for flag, name in _MODE_FLAGS.items() if training_args.get(flag)) or "full"
    else:
        mode = None
    for key in ("completed_steps", "max_steps", "updates_per_epoch"):
        value = training_args.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"training_args.json: {key} must be a whole number >= 0, got {value!r}.")
    completed, planned = training_args.get("completed_steps"), training_args.get("max_steps")
    per_epoch = training_args.get("updates_per_epoch")
    steps = None if completed is None else markdown_code(completed)
    if steps and planned not in (None, completed):  # the run stopped short of its plan
        steps = Markdown(f"{steps} of {markdown_code(planned)} planned")
    if training_args.get("streaming"):  # a streamed data set has no length, so its passes are not counted
        epochs = markdown_text("not counted (streamed data)")
    elif completed is not None and per_epoch:
        epochs = markdown_code(f"{completed / per_epoch:.2f}".rstrip("0").rstrip("."))
    else:
        epochs = None
    values = {key: markdown_code(value) for key, value in training_args.items() if value is not None}
    values.update(
        model_name_or_path=_repo_reference(training_args.get("model_name_or_path"), "model"),
        train_data=_repo_reference(training_args.get("train_data"), "dataset"),
        mode=None if mode is None else markdown_code(mode),
        steps=steps,
        epochs=epochs,
    )
    return [
        (label, values.get(key) or markdown_text("not recorded"))
        for key, label in _TRAINING_FIELDS.items()
        # The LoRA rank is a saved default in every other mode, where it means nothing.
        if key != "lora_r" or "lora" in (mode or "")
    ]


def _evaluation_table(benchmarks: Sequence[BenchmarkResult]) -> dict | None:
    """The evaluation table as header and rows of strings: accuracies in percent, distances in km."""
    if not benchmarks:
        return None
    thresholds = sorted(
        {key for benchmark in benchmarks for key in benchmark.metrics if _ACCURACY_KEY.match(key)},
        key=lambda key: float(_ACCURACY_KEY.match(key)["km"]),
    )
    distances = [key for key in _DISTANCE_METRICS if any(key in benchmark.metrics for benchmark in benchmarks)]
    # (metric, header, scale) of each metric column: accuracies in percent, then distances.
    columns = [(key, f"{_ACCURACY_KEY.match(key)['km']} km (%)", 100.0) for key in thresholds]
    columns += [(key, _DISTANCE_METRICS[key], 1.0) for key in distances]
    rows = [
        [benchmark.name, benchmark.split or "—", _cell(benchmark.num_evaluated), _cell(benchmark.num_failed)]
        + [_cell(benchmark.metrics.get(key), scale) for key, _, scale in columns]
        for benchmark in benchmarks
    ]
    return {"header": ["Benchmark", "Split", "Images", "Failed", *(label for _, label, _ in columns)], "rows": rows}


def _calibration_table(benchmarks: Sequence[BenchmarkResult]) -> dict | None:
    """The ECE of `within_km` at each radius, in percentage points, for the benchmarks whose metrics have it."""
    measured = [benchmark for benchmark in benchmarks if benchmark.calibration and "ece" in benchmark.calibration]
    if not measured:
        return None
    radii = sorted({radius for benchmark in measured for radius in benchmark.calibration["ece"]}, key=float)
    header = ["Benchmark", "Split", "Calibrated", *(f"ECE {radius} km (pp)" for radius in radii)]
    rows = [
        [benchmark.name, benchmark.split or "—", "yes" if benchmark.calibration.get("calibrated") else "no"]
        + [_cell(benchmark.calibration["ece"].get(radius), scale=100.0) for radius in radii]
        for benchmark in measured
    ]
    return {"header": header, "rows": rows}


def _cell(value: Any, scale: float | None = None) -> str:
    """A table cell: "—" where there is no value, a number times `scale` to one decimal, else the value as it is."""
    if value is None:
        return "—"
    return str(value) if scale is None else f"{value * scale:.1f}"
