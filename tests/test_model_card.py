"""Specification of `model_card/card.py`: the card is filled from real files and its metadata parses back."""

import json
from pathlib import Path

import card as model_card
import pytest
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt

from modeling_streetclip import StreetCLIPConfig


REPO_ID = "streetclip-tests/tiny-geolocation"
IM2GPS = {
    "acc_1km": 0.0844,
    "acc_25km": 0.2827,
    "acc_200km": 0.4515,
    "acc_750km": 0.7468,
    "acc_2500km": 0.8819,
    "median_km": 231.74,
    "mean_km": 1305.2,
    "geoscore": 3102.46,
    "n": 237,
    "model": "runs/streetclip-lora",
    "data": "/benchmarks/im2gps.csv",
    "num_evaluated": 237,
    "num_failed": 0,
    "wall_time_s": 41.0,
    "protocol": {"radius_km": 6371.0088, "inclusive": True},
}
IM2GPS3K = {
    "acc_1km": 0.0107,
    "acc_25km": 0.2239,
    "acc_200km": 0.3741,
    "acc_750km": 0.6133,
    "acc_2500km": 0.8041,
    "median_km": 411.9,
    "mean_km": 1690.0,
    "geoscore": 2807.3,
    "n": 2994,
    "model": "runs/streetclip-lora",
    "data": "someone/im2gps3k",
    "split": "test",
    "num_evaluated": 2994,
    "num_failed": 3,
    "wall_time_s": 510.0,
}
# A run record as training/pretrain.py writes it: the arguments, then what the run did. `num_train_epochs` is the
# argument's default, ignored because `--max_steps` was given: 2000 steps of 250 per pass over the data are 8 epochs.
TRAINING_ARGS = {
    "model_name_or_path": "geolocal/StreetCLIP",
    "train_data": "/data/street-photos/train.csv",
    "streaming": False,
    "num_train_epochs": 1,
    "max_steps": 2000,
    "completed_steps": 2000,
    "updates_per_epoch": 250,
    "per_device_train_batch_size": 64,
    "gradient_accumulation_steps": 2,
    "world_size": 1,
    "global_batch_size": 128,
    "learning_rate": 1e-05,
    "mode": "lora",
    "lora_r": 16,
    "mixed_precision": "bf16",
    "seed": 42,
}
# The CommonMark parser with GitHub's tables, as the Hub renders cards (raw HTML on, as the Hub allows it).
MARKDOWN = MarkdownIt("commonmark").enable("table")


@pytest.fixture(scope="module")
def config(small_streetclip_dir) -> StreetCLIPConfig:
    return StreetCLIPConfig.from_pretrained(small_streetclip_dir)


@pytest.fixture
def metrics_files(tmp_path) -> dict[str, Path]:
    files = {}
    for name, record in (("im2gps", IM2GPS), ("im2gps3k", IM2GPS3K)):
        path = tmp_path / name / "metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps(record))
        files[name] = path
    return files


@pytest.fixture
def evaluated_card(config, metrics_files, tmp_path) -> ModelCard:
    """A card with a training run and two benchmarks, saved and loaded back as the Hub would read it."""
    benchmarks = [model_card.read_benchmark_result(path) for path in metrics_files.values()]
    card = model_card.build_model_card(
        config, REPO_ID, license="cc-by-nc-4.0", training_args=TRAINING_ARGS, benchmarks=benchmarks
    )
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def _section(card: ModelCard, title: str) -> str:
    return card.text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rendered(inline) -> str:
    """The text a reader sees for one parsed inline token: escapes resolved, code spans as their content."""
    return "".join(child.content for child in inline.children if child.type in ("text", "code_inline"))


def _table(section: str) -> list[dict[str, str]]:
    """The rows of the section's table as a markdown parser reads them, by header, as rendered text."""
    tokens = MARKDOWN.parse(section)
    rows, cells, header = [], [], None
    for index, token in enumerate(tokens):
        if token.type in ("th_open", "td_open"):
            cells.append(_rendered(tokens[index + 1]))
        elif token.type == "tr_close":
            if header is None:
                header = cells
            else:
                rows.append(dict(zip(header, cells, strict=True)))
            cells = []
    return rows


def _training_line(card: ModelCard, label: str) -> str:
    """The rendered value of one `- **Label:** value` line of the training section."""
    for token in MARKDOWN.parse(_section(card, "Training data and procedure")):
        if token.type == "inline" and token.content.startswith(f"**{label}:** "):
            return _rendered(token).removeprefix(f"{label}: ")
    raise AssertionError(f"no {label!r} line in the training section")


# Metadata


def test_card_metadata_declares_license_library_pipeline_tags_and_base_model(evaluated_card):
    data = evaluated_card.data
    assert data.license == "cc-by-nc-4.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == model_card.PIPELINE_TAG
    assert {"streetclip", "geolocation"} <= set(data.tags)
    assert data.base_model == "geolocal/StreetCLIP"


def test_model_index_round_trips_every_metric_of_every_metrics_file(evaluated_card):
    data = evaluated_card.data
    assert data.model_name == "tiny-geolocation"
    parsed = {(result.dataset_name, result.metric_type): result for result in data.eval_results}
    expected = {
        (name, key): value
        for name, record in (("im2gps", IM2GPS), ("someone/im2gps3k", IM2GPS3K))
        for key, value in record.items()
        if key.startswith("acc_") or key in ("median_km", "mean_km", "geoscore")
    }
    assert {key: result.metric_value for key, result in parsed.items()} == expected
    assert {result.task_type for result in data.eval_results} == {model_card.TASK_TYPE}
    assert parsed["someone/im2gps3k", "acc_25km"].dataset_type == "someone/im2gps3k"
    assert parsed["someone/im2gps3k", "acc_25km"].dataset_split == "test"
    assert parsed["im2gps", "acc_25km"].dataset_type == "im2gps"
    assert parsed["im2gps", "acc_25km"].metric_args == {"radius_km": 6371.0088, "inclusive": True}


def test_local_paths_never_become_hub_metadata(config):
    args = {**TRAINING_ARGS, "model_name_or_path": "/checkpoints/clip", "train_data": "data/train.csv"}
    data = model_card.build_model_card(config, REPO_ID, training_args=args).data
    assert data.base_model is None
    assert data.datasets is None
    assert model_card.hub_repo_id("someone/street-photos") == "someone/street-photos"
    assert model_card.hub_repo_id("/abs/path/to/data") is None
    assert model_card.hub_repo_id("bad//id") is None


def test_hub_training_data_is_declared_as_a_dataset(config):
    args = {**TRAINING_ARGS, "train_data": "someone/street-photos"}
    assert model_card.build_model_card(config, REPO_ID, training_args=args).data.datasets == ["someone/street-photos"]


# Evaluation


def test_evaluation_table_has_one_row_per_metrics_file_matching_its_values(evaluated_card):
    rows = {row["Benchmark"]: row for row in _table(_section(evaluated_card, "Evaluation"))}
    assert set(rows) == {"im2gps", "someone/im2gps3k"}
    for name, record in (("im2gps", IM2GPS), ("someone/im2gps3k", IM2GPS3K)):
        row = rows[name]
        for km in (1, 25, 200, 750, 2500):
            assert float(row[f"{km} km (%)"]) == pytest.approx(100 * record[f"acc_{km}km"], abs=0.05)
        assert float(row["Median error (km)"]) == pytest.approx(record["median_km"], abs=0.05)
        assert float(row["Mean error (km)"]) == pytest.approx(record["mean_km"], abs=0.05)
        assert float(row["GeoScore"]) == pytest.approx(record["geoscore"], abs=0.05)
        assert int(row["Images"]) == record["num_evaluated"]
        assert int(row["Failed"]) == record["num_failed"]
    assert rows["someone/im2gps3k"]["Split"] == "test"
    assert rows["im2gps"]["Split"] == "—"


def test_evaluation_names_the_file_model_data_and_protocol_of_each_row(evaluated_card):
    section = _section(evaluated_card, "Evaluation")
    assert "model `runs/streetclip-lora`, data `/benchmarks/im2gps.csv`" in section
    assert "`radius_km=6371.0088`, `inclusive=True`" in section


def test_extra_thresholds_get_columns_in_distance_order_and_missing_values_a_dash(config, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"acc_0.5km": 0.01, "acc_25km": 0.3, "acc_1km": 0.02, "n": 10, "data": "mine"}))
    benchmark = model_card.read_benchmark_result(path)
    card = model_card.build_model_card(config, REPO_ID, benchmarks=[benchmark])
    [row] = _table(_section(card, "Evaluation"))
    assert list(row)[4:] == ["0.5 km (%)", "1 km (%)", "25 km (%)"]
    assert row["Failed"] == "—"


def test_the_card_shows_the_ece_table_when_the_metrics_have_one_and_says_so_nowhere_else(
    config, metrics_files, evaluated_card, tmp_path
):
    ece = {"1": 0.61, "25": 0.2, "200": 0.0412, "750": 0.0304, "2500": 0.012}
    path = tmp_path / "calibrated" / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps({**IM2GPS, "calibration": {"ece": ece, "brier": ece, "calibrated": True}}))
    benchmarks = [model_card.read_benchmark_result(path, name="im2gps-calibrated")]
    benchmarks.append(model_card.read_benchmark_result(metrics_files["im2gps3k"]))
    section = _section(model_card.build_model_card(config, REPO_ID, benchmarks=benchmarks), "Evaluation")
    (row,) = _table(section.split("How honest the confidence is", 1)[1])
    assert row["Benchmark"] == "im2gps-calibrated" and row["Calibrated"] == "yes"
    assert {km: float(row[f"ECE {km} km (pp)"]) for km in ece} == pytest.approx(
        {km: 100 * value for km, value in ece.items()}, abs=0.05
    )
    assert "How honest the confidence is" not in _section(evaluated_card, "Evaluation")


def test_card_without_metrics_says_no_evaluation_was_supplied_and_has_no_model_index(config, tmp_path):
    card = model_card.build_model_card(config, REPO_ID)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert "No evaluation results were supplied" in _section(loaded, "Evaluation")
    assert "|" not in _section(loaded, "Evaluation")
    assert loaded.data.eval_results is None
    assert "model-index" not in loaded.content


def test_benchmark_row_is_named_by_argument_then_benchmark_key_then_data(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**IM2GPS, "benchmark": "IM2GPS"}))
    assert model_card.read_benchmark_result(path, name="im2gps-val").name == "im2gps-val"
    assert model_card.read_benchmark_result(path).name == "IM2GPS"
    path.write_text(json.dumps(IM2GPS3K))
    assert model_card.read_benchmark_result(path).name == "someone/im2gps3k"


def test_protocol_is_read_from_top_level_keys_too(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"acc_25km": 0.2, "data": "x", "radius_km": 6378.137, "inclusive": False}))
    assert model_card.read_benchmark_result(path).protocol == {"radius_km": 6378.137, "inclusive": False}


def test_same_benchmark_and_split_twice_is_refused(config, metrics_files):
    twice = [model_card.read_benchmark_result(metrics_files["im2gps"])] * 2
    with pytest.raises(ValueError, match=r"same benchmark and split.*im2gps.*NAME=FILE"):
        model_card.build_model_card(config, REPO_ID, benchmarks=twice)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[0.2, 0.3]", "must hold a JSON object"),
        ('{"n": 10, "data": "x"}', "holds no geodesic accuracy metric"),
        ('{"acc_25km": 28.3, "data": "x"}', "must be a fraction between 0 and 1"),
        ('{"acc_25km": "high", "data": "x"}', "must be a finite number"),
        ('{"acc_25km": 0.2}', "names no benchmark and no data"),
    ],
)
def test_bad_metrics_file_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        model_card.read_benchmark_result(path)
    assert str(path) in str(error.value)


# Training


def test_training_section_lists_the_recorded_arguments_and_marks_the_others_not_recorded(config, evaluated_card):
    assert _training_line(evaluated_card, "Base model") == "geolocal/StreetCLIP"
    assert _training_line(evaluated_card, "Training data") == "/data/street-photos/train.csv"
    assert _training_line(evaluated_card, "Steps") == "2000"
    assert _training_line(evaluated_card, "Batch size per device") == "64"
    assert _training_line(evaluated_card, "Processes") == "1"
    assert _training_line(evaluated_card, "Global batch size") == "128"
    assert _training_line(evaluated_card, "Learning rate") == "1e-05"
    assert _training_line(evaluated_card, "Mode") == "lora"
    assert _training_line(evaluated_card, "LoRA rank") == "16"
    assert _training_line(evaluated_card, "Mixed precision") == "bf16"
    assert json.dumps(TRAINING_ARGS, indent=2) in _section(evaluated_card, "Training data and procedure")
    sparse = {key: value for key, value in TRAINING_ARGS.items() if key not in ("seed", "world_size")}
    card = model_card.build_model_card(config, REPO_ID, training_args=sparse)
    assert _training_line(card, "Seed") == _training_line(card, "Processes") == "not recorded"


@pytest.mark.parametrize(
    ("completed", "max_steps", "per_epoch", "steps", "epochs"),
    [
        # The run: 60 steps over 3 optimiser steps per pass, logged as epoch 19 (counted from 0).
        (60, 60, 3, "60", "20"),
        (7, 7, 3, "7", "2.33"),
        (1, 1, 4, "1", "0.25"),
        # A run that ended before its planned steps (a streamed or filtered data set ran out).
        (45, 60, 3, "45 of 60 planned", "15"),
    ],
)
def test_epochs_are_counted_from_the_steps_run_not_the_requested_epochs(
    config, completed, max_steps, per_epoch, steps, epochs
):
    record = {
        **TRAINING_ARGS,
        "num_train_epochs": 1,
        "max_steps": max_steps,
        "completed_steps": completed,
        "updates_per_epoch": per_epoch,
    }
    card = model_card.build_model_card(config, REPO_ID, training_args=record)
    assert _training_line(card, "Steps") == steps
    assert _training_line(card, "Epochs") == epochs


def test_epochs_of_streamed_or_unrecorded_runs_are_not_guessed(config):
    streamed = {**TRAINING_ARGS, "streaming": True, "updates_per_epoch": None}
    card = model_card.build_model_card(config, REPO_ID, training_args=streamed)
    assert _training_line(card, "Epochs") == "not counted (streamed data)"
    older = {key: value for key, value in TRAINING_ARGS.items() if key not in ("completed_steps", "updates_per_epoch")}
    card = model_card.build_model_card(config, REPO_ID, training_args=older)
    assert _training_line(card, "Epochs") == _training_line(card, "Steps") == "not recorded"


@pytest.mark.parametrize("value", ["60", 2.5, True, -1])
def test_a_run_record_with_a_bad_step_count_is_refused_naming_the_field(config, value):
    with pytest.raises(ValueError, match=r"completed_steps must be a whole number >= 0, got"):
        model_card.build_model_card(config, REPO_ID, training_args={**TRAINING_ARGS, "completed_steps": value})


def test_mixed_precision_off_reads_no_and_an_unrecorded_value_never_reads_none(config):
    card = model_card.build_model_card(config, REPO_ID, training_args={**TRAINING_ARGS, "mixed_precision": "no"})
    assert _training_line(card, "Mixed precision") == "no"
    # An older record holds the argument (null: "whatever `accelerate config` says"), not what the run used.
    card = model_card.build_model_card(config, REPO_ID, training_args={**TRAINING_ARGS, "mixed_precision": None})
    assert _training_line(card, "Mixed precision") == "not recorded"
    section = _section(card, "Training data and procedure").split("<details>")[0]
    assert "None" not in section


def test_lora_rank_is_left_out_when_training_was_not_lora(config):
    card = model_card.build_model_card(config, REPO_ID, training_args={**TRAINING_ARGS, "mode": "full"})
    assert "LoRA rank" not in _section(card, "Training data and procedure")


def test_mode_is_read_from_the_training_flags_when_no_mode_was_recorded(config):
    flags = {key: value for key, value in TRAINING_ARGS.items() if key != "mode"}
    for recorded, mode in (
        ({"use_lora": True, "freeze_text_tower": False}, "lora"),
        ({"use_lora": False, "freeze_text_tower": True, "freeze_vision_tower": False}, "freeze_text"),
        ({"use_lora": False, "freeze_text_tower": False, "freeze_vision_tower": False}, "full"),
    ):
        card = model_card.build_model_card(config, REPO_ID, training_args={**flags, **recorded})
        section = _section(card, "Training data and procedure")
        assert f"- **Mode:** `{mode}`" in section
        assert ("LoRA rank" in section) == (mode == "lora")
    section = _section(
        model_card.build_model_card(config, REPO_ID, training_args=flags), "Training data and procedure"
    )
    assert "- **Mode:** not recorded" in section


def test_card_without_training_arguments_says_they_were_not_recorded(config):
    section = _section(model_card.build_model_card(config, REPO_ID), "Training data and procedure")
    assert section.strip().startswith("Not recorded")


def test_converted_clip_checkpoint_card_says_no_training_was_done_and_names_its_base(config):
    card = model_card.build_model_card(config, REPO_ID, converted_from="geolocal/StreetCLIP")
    assert card.data.base_model == "geolocal/StreetCLIP"
    section = _section(card, "Training data and procedure")
    assert "[geolocal/StreetCLIP](https://huggingface.co/geolocal/StreetCLIP), unchanged" in section
    assert "No further training was done here" in section


@pytest.mark.parametrize(
    ("training_args", "converted_from", "reference"),
    [
        (TRAINING_ARGS, None, "[geolocal/StreetCLIP](https://huggingface.co/geolocal/StreetCLIP)"),
        ({**TRAINING_ARGS, "model_name_or_path": "/checkpoints/clip"}, None, "`/checkpoints/clip`"),
        (None, "/checkpoints/clip", "`/checkpoints/clip`"),
    ],
)
def test_every_section_names_the_same_recorded_base_model(config, training_args, converted_from, reference):
    card = model_card.build_model_card(config, REPO_ID, training_args=training_args, converted_from=converted_from)
    assert f"derived from {reference}" in card.text.split("\n## ", 1)[0]
    assert f"derived from {reference} and inherit" in _section(card, "License")
    if training_args is not None:
        assert f"- **Base model:** {reference}\n" in _section(card, "Training data and procedure")
    assert "not recorded" not in _section(card, "License")


def test_training_arguments_are_read_from_the_model_folder_when_saved_there(tmp_path):
    assert model_card.read_training_args(tmp_path) is None
    (tmp_path / model_card.TRAINING_ARGS_NAME).write_text(json.dumps(TRAINING_ARGS))
    assert model_card.read_training_args(tmp_path) == TRAINING_ARGS
    assert model_card.read_training_args("geolocal/StreetCLIP") is None


# The rest of the card


def test_card_covers_use_method_candidates_limits_citation_and_license(evaluated_card, config):
    text = evaluated_card.text
    for title in (
        "How to use",
        "Method",
        "Intended use",
        "Out-of-scope use",
        "Bias, risks and limitations",
        "Citation",
        "License",
    ):
        assert f"\n## {title}\n" in text
    assert f'pipeline("geolocation", model="{REPO_ID}", trust_remote_code=True)' in text
    assert "pipeline_class=GeolocationPipeline" in text
    assert config.caption_template in _section(evaluated_card, "Method")
    assert ", ".join(config.candidate_places["country_names"]) in _section(evaluated_card, "Method")
    assert "surveillance" in _section(evaluated_card, "Out-of-scope use").lower()
    assert "City snapping" in _section(evaluated_card, "Bias, risks and limitations")
    assert "eprint={2302.00275}" in _section(evaluated_card, "Citation")
    assert "`cc-by-nc-4.0`" in _section(evaluated_card, "License")


def test_undetermined_license_is_stated_rather_than_invented(config):
    card = model_card.build_model_card(config, REPO_ID, converted_from="/checkpoints/clip")
    assert card.data.license == "other"
    assert "could not be determined" in _section(card, "License")
    unknown_base = model_card.build_model_card(config, REPO_ID, training_args={"seed": 1})
    assert "a base model that was not recorded" in _section(unknown_base, "License")
    assert _training_line(unknown_base, "Base model") == "not recorded"


def test_pipeline_tag_is_the_closest_hub_task_and_the_readme_says_why():
    # The pipeline takes an image and `top_k` and ranks labels stored with the model, as image classification does;
    # zero-shot image classification would want `candidate_labels` with every call.
    assert model_card.PIPELINE_TAG == "image-classification"
    readme = (Path(model_card.__file__).parent / "README.md").read_text(encoding="utf-8")
    assert "`pipeline_tag: image-classification`" in readme
    assert "zero-shot-image-classification" in readme


# Hostile values: names and paths from files and command lines render as their literal text and change nothing else

HOSTILE = [
    "im2gps\n| injected | row |\n\n## Injected heading",
    "<script>alert(1)</script>",
    '<img src="x" onerror="alert(1)">',
    "a | b || c",
    "[click](javascript:alert(1)) ![x](https://evil.example/x.png)",
    "**bold** _em_ ~~gone~~ $x$ \\ back\\slash",
    "# heading",
    "- item",
    "1. item",
    "===",
    "&lt;entity&gt; &amp; &#60;",
    "`code` ``two`` ```fence```",
    "line\r\nbreak\rand\u2028separator",
]


def _structure(text: str) -> list[tuple[str, str]]:
    """Every token a markdown parser makes of `text`, block and inline, as (type, tag): the card's shape."""
    shape = []
    for token in MARKDOWN.parse(text):
        shape.append((token.type, token.tag))
        shape += [(child.type, child.tag) for child in token.children or ()]
    return shape


def _card_with(config, tmp_path, value: str) -> ModelCard:
    """A card in which every value that comes from a file or command line is `value`, saved and loaded back."""
    tmp_path.mkdir()
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps({**IM2GPS, "model": value, "data": value, "split": value, "protocol": {value: value}}),
        encoding="utf-8",
    )
    training_args = {
        **TRAINING_ARGS,
        "model_name_or_path": value,
        "train_data": value,
        "mode": value,
        "mixed_precision": value,
        "seed": value,
    }
    card = model_card.build_model_card(
        config,
        REPO_ID,
        license=value,
        training_args=training_args,
        benchmarks=[model_card.read_benchmark_result(metrics, name=value)],
    )
    card.save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_render_as_their_text_and_leave_the_card_shape_alone(config, tmp_path, value):
    hostile = _card_with(config, tmp_path / "hostile", value)
    benign = _card_with(config, tmp_path / "benign", "x")
    assert _structure(hostile.text) == _structure(benign.text)
    shown = " ".join(value.split())
    [row] = _table(_section(hostile, "Evaluation"))
    assert (row["Benchmark"], row["Split"]) == (shown, shown)
    assert _training_line(hostile, "Training data") == shown
    assert _training_line(hostile, "Mixed precision") == shown
    assert _training_line(hostile, "Base model") == shown
    assert "<script>" not in MARKDOWN.render(hostile.text)
    assert "<img" not in MARKDOWN.render(hostile.text)
    # The metadata keeps the value exactly: YAML quotes what markdown would misread.
    assert {result.dataset_name for result in hostile.data.eval_results} == {value}
    assert hostile.data.license == value


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_candidate_names_and_prompt_templates_render_as_their_text(config, value):
    places = {**config.candidate_places, "country_names": [value, *config.candidate_places["country_names"][1:]]}
    hostile = StreetCLIPConfig.from_dict({**config.to_dict(), "candidate_places": places, "caption_template": value})
    card = model_card.build_model_card(hostile, REPO_ID)
    benign = model_card.build_model_card(config, REPO_ID)
    assert _structure(card.text) == _structure(benign.text)
    countries = [token for token in MARKDOWN.parse(_section(card, "Method")) if token.type == "inline"][-1]
    assert _rendered(countries).startswith(" ".join(value.split()) + ", ")


@pytest.mark.parametrize(
    ("value", "span"),
    [
        ("plain", "`plain`"),
        ("a`b", "``a`b``"),
        ("`edge`", "`` `edge` ``"),
        ("x ``` y", "````x ``` y````"),
        ("two\nlines", "`two lines`"),
        ("", '`""`'),
    ],
)
def test_code_spans_fence_longer_than_any_backtick_run_inside(value, span):
    assert model_card.markdown_code(value) == span
    [inline] = [token for token in MARKDOWN.parse(f"see {span} here") if token.type == "inline"]
    if value:
        assert [child.content for child in inline.children if child.type == "code_inline"] == [
            " ".join(value.split("\n"))
        ]


def test_training_arguments_json_block_cannot_be_closed_by_a_value(config):
    value = "x\n```\n<script>alert(1)</script>"
    card = model_card.build_model_card(config, REPO_ID, training_args={**TRAINING_ARGS, "note": value})
    [block] = [token for token in MARKDOWN.parse(card.text) if token.type == "fence" and token.info == "json"]
    assert json.loads(block.content)["note"] == value


def test_a_repo_id_that_is_not_a_hub_id_is_refused(config):
    with pytest.raises(ValueError, match=r"'bad\"id/x' is not a Hub repository id"):
        model_card.build_model_card(config, 'bad"id/x')


def test_hub_links_go_to_the_right_kind_of_repository():
    assert model_card.hub_link("someone/demo", "space") == "[someone/demo](https://huggingface.co/spaces/someone/demo)"
    assert model_card.hub_link("someone/data", "dataset").endswith("(https://huggingface.co/datasets/someone/data)")
    with pytest.raises(ValueError, match="kind must be one of"):
        model_card.hub_link("someone/demo", "notebook")
