"""`streetclip locate`: inputs, output formats, bad files, resume, exit codes, --countries and --group_by.

Most cases call `main` in-process on the tiny saved model (fast); one runs the installed console script to prove the
entry point and that `main`'s return value becomes the process's exit status.
"""

import argparse
import csv
import errno
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from builders import save_random_photos
from filelock import FileLock
from transformers import AutoImageProcessor

from modeling_streetclip import StreetCLIPForGeolocation, load_rgb_image
from modeling_streetclip.answers import format_answers
from modeling_streetclip.app.records import ANSWER_FIELDS, DECISION_FIELDS, REGION_FIELDS, lock_path, options_path
from modeling_streetclip.cli import build_parser, main
from modeling_streetclip.decisions import rank_places
from modeling_streetclip.testing_utils import SMALL_COUNTRIES, random_photo


PHOTO_SIZE = (32, 24)


def make_photos(folder: Path, names: list[str]) -> list[Path]:
    return save_random_photos(folder, names, PHOTO_SIZE)


def make_bad_files(folder: Path) -> dict[str, Path]:
    """One file for each way a photo collection goes wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    random_photo(7, (64, 48)).save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "notes.jpg").write_text("these are field notes, not a photo\n")
    random_photo(8, PHOTO_SIZE).save(folder / "scan.pdf")  # Pillow writes PDF but cannot read it
    names = ("empty.jpg", "truncated.jpg", "notes.jpg", "scan.pdf")
    return {name: folder / name for name in names}


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def jsonl_records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def flat(answer: dict) -> dict:
    """An answer as `pytest.approx` compares it, which takes no nested dict: each radius of `within_km` a field."""
    within = {f"within_{radius}km": mass for radius, mass in answer.get("within_km", {}).items()}
    return {key: value for key, value in answer.items() if key != "within_km"} | within


def assert_same_records(records: list[dict], expected: list[dict]) -> None:
    """Equal records up to float rounding in the scores (batches may be composed differently)."""
    assert [sorted(record) for record in records] == [sorted(record) for record in expected]
    for record, reference in zip(records, expected, strict=True):
        assert record.get("path") == reference.get("path") and record.get("error") == reference.get("error")
        for answer, reference_answer in zip(record.get("answers", []), reference.get("answers", []), strict=True):
            assert flat(answer) == pytest.approx(flat(reference_answer))


def test_folder_gives_one_jsonl_record_per_image_on_stdout(capsys, tmp_path, small_streetclip_dir):
    photos = make_photos(tmp_path / "photos", ["b.jpg", "a.png", "c.jpeg"])
    (tmp_path / "photos" / "labels.csv").write_text("not an image\n")

    status, out, err = run(capsys, "locate", tmp_path / "photos", "--model", small_streetclip_dir, "--num_workers", 0)

    assert status == 0
    records = jsonl_records(out)
    assert [record["path"] for record in records] == sorted(str(path) for path in photos)
    for record in records:
        (answer,) = record["answers"]
        assert set(ANSWER_FIELDS) - set(REGION_FIELDS) - set(DECISION_FIELDS) <= set(answer)
        assert answer["country"] in SMALL_COUNTRIES
    assert "streetclip locate: 3 of 3 inputs geolocated" in err
    assert "img/s" in err


def test_recursive_descends_into_subfolders_only_when_asked(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["top.jpg"])
    make_photos(tmp_path / "photos" / "day2", ["deep.jpg"])
    common = ("--model", small_streetclip_dir, "--num_workers", 0)

    _, flat, _ = run(capsys, "locate", tmp_path / "photos", *common)
    _, deep, _ = run(capsys, "locate", tmp_path / "photos", "--recursive", *common)

    assert [Path(record["path"]).name for record in jsonl_records(flat)] == ["top.jpg"]
    assert [Path(record["path"]).name for record in jsonl_records(deep)] == ["deep.jpg", "top.jpg"]


def test_glob_pattern_selects_matching_files(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["field_1.jpg", "field_2.jpg", "other.jpg"])

    status, out, _ = run(
        capsys, "locate", tmp_path / "field_*.jpg", "--model", small_streetclip_dir, "--num_workers", 0
    )

    assert status == 0
    assert [Path(record["path"]).name for record in jsonl_records(out)] == ["field_1.jpg", "field_2.jpg"]


def test_dash_reads_paths_from_stdin_one_per_line(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    photos = make_photos(tmp_path, ["one.jpg", "two.jpg"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("two.jpg\n\none.jpg\n"))

    status, out, _ = run(capsys, "locate", "-", "--model", small_streetclip_dir, "--num_workers", 0)

    assert status == 0
    assert [record["path"] for record in jsonl_records(out)] == [str(photos[1]), str(photos[0])]


def test_input_named_twice_is_recorded_once(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["a.jpg", "b.jpg"])

    _, out, _ = run(
        capsys, "locate", tmp_path, tmp_path / "a.jpg", tmp_path / "*.jpg", "--model", small_streetclip_dir
    )

    assert [Path(record["path"]).name for record in jsonl_records(out)] == ["a.jpg", "b.jpg"]


def test_csv_output_has_one_row_per_input_with_rank_suffixed_answer_columns(capsys, tmp_path, small_streetclip_dir):
    photos = make_photos(tmp_path / "photos", ["a.jpg", "b.jpg"])
    output = tmp_path / "results.csv"

    status, out, _ = run(
        capsys, "locate", tmp_path / "photos", "--model", small_streetclip_dir, "--top_k", 3, "--output", output
    )

    assert status == 0 and out == ""
    with output.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["path"] for row in rows] == [str(path) for path in photos]
    assert list(rows[0]) == ["path"] + [f"{field}_{rank}" for rank in (1, 2, 3) for field in ANSWER_FIELDS] + ["error"]
    for row in rows:
        assert row["error"] == ""
        assert float(row["score_1"]) >= float(row["score_2"]) >= float(row["score_3"])


def test_csv_and_jsonl_hold_the_same_answers(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg", "b.jpg", "c.jpg"])
    common = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--top_k", 2)

    run(capsys, *common, "--output", tmp_path / "results.jsonl")
    run(capsys, *common, "--output", tmp_path / "results.csv")

    records = jsonl_records((tmp_path / "results.jsonl").read_text())
    with (tmp_path / "results.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    for record, row in zip(records, rows, strict=True):
        for rank, answer in enumerate(record["answers"], start=1):
            assert row[f"city_{rank}"] == answer["city"]
            assert float(row[f"latitude_{rank}"]) == answer["latitude"]
            assert float(row[f"score_{rank}"]) == pytest.approx(answer["score"])


def test_bad_files_get_error_records_while_good_ones_are_answered(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    (good,) = make_photos(tmp_path, ["good.jpg"])
    bad = make_bad_files(tmp_path)
    missing = tmp_path / "missing.jpg"  # listed on standard input: one vanished file of a long list
    inputs = [good, *bad.values(), missing]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{path}\n" for path in inputs)))

    status, out, err = run(capsys, "locate", "-", "--model", small_streetclip_dir, "--batch_size", 2)

    assert status == 1
    records = {Path(record["path"]).name: record for record in jsonl_records(out)}
    assert list(records) == [path.name for path in inputs]
    assert "answers" in records["good.jpg"] and "error" not in records["good.jpg"]
    assert "empty" in records["empty.jpg"]["error"]
    assert "truncated" in records["truncated.jpg"]["error"]
    assert "not an image format" in records["notes.jpg"]["error"]
    assert "not an image format" in records["scan.pdf"]["error"]
    assert "not found" in records["missing.jpg"]["error"]
    assert all("answers" not in record for name, record in records.items() if name != "good.jpg")
    assert "streetclip locate: 1 of 6 inputs geolocated, 5 failed (see the error field)" in err


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_rerun_after_a_kill_mid_record_ends_with_every_input_exactly_once(
    capsys, tmp_path, small_streetclip_dir, extension
):
    photos = make_photos(tmp_path / "photos", [f"{index}.jpg" for index in range(7)])
    (tmp_path / "photos" / "broken.jpg").write_text("not a photo")
    command = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--top_k", 2, "--batch_size", 3)
    complete = tmp_path / f"complete.{extension}"
    assert run(capsys, *command, "--output", complete)[0] == 1
    lines = complete.read_bytes().splitlines(keepends=True)
    # Killed while writing a record: the header (CSV) and three records made it, then half of the next line.
    kept = 4 if extension == "csv" else 3
    killed = tmp_path / f"killed.{extension}"
    killed.write_bytes(b"".join(lines[:kept]) + lines[kept][: len(lines[kept]) // 2])
    shutil.copy(options_path(complete), options_path(killed))  # the killed run had recorded its options too

    status, _, err = run(capsys, *command, "--output", killed)

    assert status == 1
    rerun_lines = killed.read_bytes().splitlines(keepends=True)
    assert rerun_lines[:kept] == lines[:kept]
    assert len(rerun_lines) == len(lines)
    if extension == "csv":
        with killed.open(newline="") as stream:
            paths = [row["path"] for row in csv.DictReader(stream)]
    else:
        paths = [record["path"] for record in jsonl_records(killed.read_text())]
    assert sorted(paths) == sorted(str(path) for path in [*photos, tmp_path / "photos" / "broken.jpg"])
    assert "7 of 8 inputs geolocated, 1 failed" in err
    assert "3 were recorded by an earlier run" in err


def test_rerun_of_a_finished_output_changes_nothing_and_keeps_the_status(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["a.jpg"])
    (tmp_path / "b.jpg").write_text("not a photo")
    output = tmp_path / "results.jsonl"
    command = ("locate", tmp_path, "--model", small_streetclip_dir, "--output", output)
    assert run(capsys, *command)[0] == 1
    before = output.read_bytes()

    status, _, err = run(capsys, *command)

    assert status == 1
    assert output.read_bytes() == before
    assert "1 of 2 inputs geolocated, 1 failed" in err


def test_new_inputs_are_appended_to_an_existing_output(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg"])
    output = tmp_path / "results.csv"
    command = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--output", output)
    run(capsys, *command)
    random_photo(3, PHOTO_SIZE).save(tmp_path / "photos" / "b.jpg")

    assert run(capsys, *command)[0] == 0

    with output.open(newline="") as stream:
        assert [Path(row["path"]).name for row in csv.DictReader(stream)] == ["a.jpg", "b.jpg"]


def test_workers_decode_in_other_processes_with_the_same_results(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, [f"{index}.jpg" for index in range(5)])
    (tmp_path / "bad.jpg").write_bytes(b"")
    command = ("locate", tmp_path, "--model", small_streetclip_dir, "--batch_size", 2)

    _, in_process, _ = run(capsys, *command, "--num_workers", 0)
    _, with_workers, _ = run(capsys, *command, "--num_workers", 2)

    assert_same_records(jsonl_records(with_workers), jsonl_records(in_process))


def test_countries_file_restricts_the_answers(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg", "b.jpg"])
    countries = tmp_path / "countries.txt"
    countries.write_text("Japan\n\nKE\n")

    status, out, _ = run(
        capsys, "locate", tmp_path / "photos", "--model", small_streetclip_dir, "--top_k", 4, "--countries", countries
    )

    assert status == 0
    answers = [answer for record in jsonl_records(out) for answer in record["answers"]]
    assert {answer["country"] for answer in answers} <= {"Japan", "Kenya"}
    assert len(answers) == 8


def test_dtype_runs_the_model_in_that_precision(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["a.jpg", "b.jpg"])
    loaded_dtypes = []
    original = StreetCLIPForGeolocation.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        model = original(cls, *args, **kwargs)
        loaded_dtypes.append(model.dtype)
        return model

    monkeypatch.setattr(StreetCLIPForGeolocation, "from_pretrained", classmethod(spy))

    status, out, _ = run(capsys, "locate", tmp_path, "--model", small_streetclip_dir, "--dtype", "bfloat16")

    assert status == 0
    assert loaded_dtypes == [torch.bfloat16]
    assert all(record["answers"][0]["country"] in SMALL_COUNTRIES for record in jsonl_records(out))


def test_plain_clip_checkpoint_is_loaded_with_its_text_tower(capsys, tmp_path, tiny_clip_dir):
    make_photos(tmp_path / "photos", ["a.jpg"])
    countries = tmp_path / "countries.txt"
    countries.write_text("France\nJapan\n")

    status, out, _ = run(
        capsys, "locate", tmp_path / "photos", "--model", tiny_clip_dir, "--countries", countries, "--top_k", 2
    )

    assert status == 0
    assert {answer["country"] for answer in jsonl_records(out)[0]["answers"]} <= {"France", "Japan"}


def test_unknown_country_is_a_usage_error_that_lists_close_matches(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["a.jpg"])
    countries = tmp_path / "countries.txt"
    countries.write_text("Japan\nFrnace\n")

    status, out, err = run(capsys, "locate", tmp_path, "--model", small_streetclip_dir, "--countries", countries)

    assert status == 2 and out == ""
    assert "streetclip locate: error:" in err
    assert "'Frnace'" in err and "'France'" in err


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown model", "cannot load --model"),
        ("unreadable countries file", "cannot read --countries"),
        ("no inputs", "no inputs"),
        ("unknown output extension", "use .jsonl (JSON Lines), .csv or .parquet"),
        ("output without a record of its options", "record of the options that wrote it is missing"),
        ("overwrite without an output", "--overwrite needs --output"),
        ("group_by without a capture group", "has no capture group"),
        # The gallery's photos vote wherever they are; answers would take the names of the few countries' cities.
        ("countries with a gallery rule", "--countries does not apply to decision='gallery'"),
        pytest.param(
            "cuda without a CUDA device",
            "torch sees no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device"),
        ),
    ],
)
def test_usage_errors_exit_with_status_two_and_say_what_is_wrong(
    capsys, tmp_path, small_streetclip_dir, case, expected
):
    make_photos(tmp_path / "photos", ["a.jpg"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "top3.csv").write_text("path," + ",".join(f"{field}_1" for field in ANSWER_FIELDS) + ",error\n")
    arguments = {
        "unknown model": ["--model", tmp_path / "no-such-model"],
        "unreadable countries file": ["--countries", tmp_path / "no-such-file.txt"],
        "no inputs": [tmp_path / "empty"],
        "unknown output extension": ["--output", tmp_path / "results.txt"],
        "output without a record of its options": ["--top_k", 3, "--output", tmp_path / "top3.csv"],
        "overwrite without an output": ["--overwrite"],
        "group_by without a capture group": ["--group_by", "pano_[0-9]+"],
        "countries with a gallery rule": [
            "--countries",
            tmp_path / "countries.txt",
            "--gallery",
            tmp_path / "gallery",
        ],
        "cuda without a CUDA device": ["--device", "cuda"],
    }[case]
    inputs = [] if case == "no inputs" else [tmp_path / "photos"]

    status, out, err = run(capsys, "locate", *inputs, "--model", small_streetclip_dir, *arguments)

    assert status == 2 and out == ""
    assert "streetclip locate: error:" in err and expected in err


def pooled_reference(model_dir: Path, paths: list[Path], top_k: int) -> list[dict]:
    """The group answer by its definition: the decision on the renormalised mean of the views' embeddings."""
    model = StreetCLIPForGeolocation.from_pretrained(model_dir, vision_only=True)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    pixel_values = image_processor(images=[load_rgb_image(path) for path in paths], return_tensors="pt")
    with torch.no_grad():
        embeds = model(pixel_values=pixel_values["pixel_values"]).image_embeds
        outputs = model.locate_embeddings(F.normalize(embeds.mean(dim=0, keepdim=True), dim=-1))
        ranked = rank_places(model, outputs, top_k=top_k)
    columns = {name: column[0] for name, column in ranked._asdict().items() if column is not None}
    return format_answers(model.candidate_places, **columns)


def test_group_by_answers_once_per_place_from_the_mean_of_its_views(capsys, tmp_path, small_streetclip_dir):
    names = ["pano1_h0.png", "pano1_h90.png", "pano1_h180.png", "pano2_h0.png", "pano2_h90.png", "lone.png"]
    photos = dict(zip(names, make_photos(tmp_path, names), strict=True))
    output = tmp_path / "places.jsonl"

    status, _, err = run(
        capsys,
        *("locate", tmp_path, "--model", small_streetclip_dir, "--output", output, "--top_k", 2),
        *("--group_by", r"(pano\d+)_h\d+", "--batch_size", 2),  # pano1's views span two batches
    )

    assert status == 0
    records = jsonl_records(output.read_text())
    # Groups come in order of first appearance; the folder lists lone.png first.
    assert [record["group"] for record in records] == [str(photos["lone.png"]), "pano1", "pano2"]
    pano1 = [photos[name] for name in ("pano1_h0.png", "pano1_h180.png", "pano1_h90.png")]
    assert records[1]["paths"] == [str(path) for path in pano1]
    assert_same_records(records[1:2], [{**records[1], "answers": pooled_reference(small_streetclip_dir, pano1, 2)}])
    assert records[0]["paths"] == [str(photos["lone.png"])]
    assert "3 of 3 groups geolocated" in err


def test_group_with_an_unreadable_view_gets_an_error_record_and_is_recorded_once(
    capsys, tmp_path, small_streetclip_dir
):
    make_photos(tmp_path, ["pano1_h0.png", "pano1_h90.png", "pano2_h0.png"])
    (tmp_path / "pano2_h90.png").write_bytes(b"")
    output = tmp_path / "places.csv"
    command = ("locate", tmp_path, "--model", small_streetclip_dir, "--output", output, "--group_by", r"(pano\d+)_")

    status, _, err = run(capsys, *command)
    rerun_status, _, _ = run(capsys, *command)

    assert status == rerun_status == 1
    with output.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["group"] for row in rows] == ["pano1", "pano2"]
    assert json.loads(rows[1]["paths"]) == [str(tmp_path / "pano2_h0.png"), str(tmp_path / "pano2_h90.png")]
    assert rows[0]["error"] == "" and rows[0]["country_1"] in SMALL_COUNTRIES
    assert "pano2_h90.png" in rows[1]["error"] and rows[1]["country_1"] == ""
    assert "1 of 2 groups geolocated, 1 failed" in err


def test_help_says_what_every_option_does(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as exit_info:
        main(["locate", "--help"])
    help_text = capsys.readouterr().out

    assert exit_info.value.code == 0
    locate = next(action for action in parser._actions if action.dest == "command").choices["locate"]
    for action in locate._actions:
        assert action.help, f"{action.dest} has no help"
        for option in action.option_strings:
            assert option in help_text
    assert "locate" in parser.format_help()


def run_console_script(*argv, cwd: Path) -> subprocess.CompletedProcess:
    script = shutil.which("streetclip", path=os.path.dirname(sys.executable))
    assert script, "the streetclip console script is not installed next to this Python"
    return subprocess.run([script, *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_console_script_exits_one_when_some_inputs_fail(tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg", "b.jpg"])
    (tmp_path / "photos" / "c.jpg").write_bytes(b"")

    result = run_console_script(
        "locate", "photos", "--model", small_streetclip_dir, "--output", "out.jsonl", cwd=tmp_path
    )

    assert result.returncode == 1, result.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3
    assert "2 of 3 inputs geolocated, 1 failed" in result.stderr
    # Nothing but the command's own bar and summary (transformers' handler writes to the real standard error, which
    # only a separate process shows): no loading bars, no note of a second registration with transformers.
    assert "Loading weights" not in result.stderr and "already registered" not in result.stderr


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as stream:
        return list(csv.DictReader(stream))


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_rerun_with_other_options_stops_naming_them_and_overwrite_starts_afresh(
    capsys, tmp_path, small_streetclip_dir, extension
):
    make_photos(tmp_path / "photos", ["a.jpg", "b.jpg"])
    countries = tmp_path / "countries.txt"
    countries.write_text("Japan\n")
    output = tmp_path / f"answers.{extension}"
    command = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--output", output, "--num_workers", 0)
    assert run(capsys, *command)[0] == 0
    before = output.read_bytes()

    for changed, named in [
        (["--countries", countries], "--countries was not given, now ['Japan']"),
        (["--top_k", 2], "--top_k was 1, now 2"),
        (["--dtype", "bfloat16"], "--dtype was 'float32', now 'bfloat16'"),
        (["--group_by", "(a)"], "--group_by was not given, now '(a)'"),
    ]:
        status, out, err = run(capsys, *command, *changed)
        assert status == 2 and out == "", changed
        assert "written with other options" in err and named in err and "--overwrite" in err, err
        assert output.read_bytes() == before

    status, _, err = run(capsys, *command, "--countries", countries, "--overwrite")

    assert status == 0 and "earlier run" not in err
    if extension == "csv":
        assert [row["country_1"] for row in csv_rows(output)] == ["Japan", "Japan"]
    else:
        assert [record["answers"][0]["country"] for record in jsonl_records(output.read_text())] == ["Japan", "Japan"]
    assert json.loads(options_path(output).read_text())["options"]["countries"] == ["Japan"]
    status, _, err = run(capsys, *command, "--countries", countries)  # the new options resume the new file
    assert status == 0 and "2 were recorded by an earlier run" in err, err


def test_a_relative_model_path_resumes_what_its_absolute_path_wrote(
    capsys, monkeypatch, tmp_path, small_streetclip_dir
):
    make_photos(tmp_path, ["a.jpg"])
    output = tmp_path / "answers.jsonl"
    assert run(capsys, "locate", tmp_path, "--model", small_streetclip_dir, "--output", output)[0] == 0
    monkeypatch.chdir(small_streetclip_dir.parent)

    status, _, err = run(capsys, "locate", tmp_path, "--model", small_streetclip_dir.name, "--output", output)

    assert status == 0 and "1 were recorded by an earlier run" in err


def test_a_second_run_on_an_output_being_written_exits_two(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["a.jpg"])
    output = tmp_path / "answers.jsonl"
    output.write_text("")
    monkeypatch.setattr("modeling_streetclip.app.loading.load_model", model_must_not_load)

    with FileLock(lock_path(output)):  # as a running `streetclip locate` holds it
        status, out, err = run(capsys, "locate", tmp_path, "--model", small_streetclip_dir, "--output", output)

    assert status == 2 and out == ""
    assert f"another run is writing {str(output)!r}" in err
    assert output.read_text() == ""


def model_must_not_load(*args, **kwargs):
    raise AssertionError("the model loaded before the output was checked")


@pytest.mark.parametrize("case", ["folder", "read-only file", "device"])
def test_an_output_that_cannot_be_written_fails_before_the_model_loads(
    capsys, monkeypatch, tmp_path, small_streetclip_dir, case
):
    make_photos(tmp_path / "photos", ["a.jpg"])
    output = tmp_path / "answers.jsonl"
    if case == "folder":
        output.mkdir()
        expected = "is a folder"
    elif case == "device":
        output.symlink_to("/dev/full")  # resume once read it without end, as a file
        expected = "not a regular file"
    else:
        output.write_text("")
        real_open = os.open

        def read_only(path, flags, *args):  # as root, chmod does not stop a write; the system's refusal is this
            if Path(path) == output and flags & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", read_only)
        expected = "cannot open --output"
    monkeypatch.setattr("modeling_streetclip.app.loading.load_model", model_must_not_load)

    status, out, err = run(capsys, "locate", tmp_path / "photos", "--model", small_streetclip_dir, "--output", output)

    assert status == 2 and out == ""
    assert "streetclip locate: error:" in err and expected in err and str(output) in err
    assert len(err.strip().splitlines()) == 1


def failing_writes(monkeypatch, output: Path, fail_on: bytes, error: int | None):
    """Make the system's writes to `output` short (7 bytes at most), and, when `error` is set, fail with it halfway
    through the first write whose data holds `fail_on`, as a disk that fills up does."""
    real_write = os.write
    target = os.stat(output)

    def write(fd, data):
        written_to = os.fstat(fd)
        if (written_to.st_dev, written_to.st_ino) != (target.st_dev, target.st_ino):
            return real_write(fd, data)
        if error is not None and fail_on in bytes(data):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(error, os.strerror(error))
        return real_write(fd, bytes(data)[:7])

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_a_full_disk_stops_the_run_with_exit_two_and_leaves_the_file_resumable(
    capsys, monkeypatch, tmp_path, small_streetclip_dir, extension
):
    photos = make_photos(tmp_path / "photos", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    output = tmp_path / f"answers.{extension}"
    output.write_text("")
    command = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--output", output, "--batch_size", 1)
    failing_writes(monkeypatch, output, fail_on=b"c.jpg", error=errno.ENOSPC)

    status, out, err = run(capsys, *command)

    assert status == 2 and out == ""
    assert f"cannot write to --output {str(output)!r}: No space left on device" in err
    assert err.strip().splitlines()[-1].startswith("streetclip locate: error: cannot write to --output")
    kept = csv_rows(output) if extension == "csv" else jsonl_records(output.read_text())
    assert [Path(record["path"]).name for record in kept] == ["a.jpg", "b.jpg"]  # whole records, nothing after

    monkeypatch.undo()  # space freed
    status, _, err = run(capsys, *command)

    assert status == 0 and "2 were recorded by an earlier run" in err, err
    records = csv_rows(output) if extension == "csv" else jsonl_records(output.read_text())
    assert [record["path"] for record in records] == [str(path) for path in photos]


def test_short_writes_still_give_whole_records(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg", "b.jpg"])
    command = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--top_k", 3)
    reference = tmp_path / "reference.csv"
    run(capsys, *command, "--output", reference)
    output = tmp_path / "answers.csv"
    output.write_text("")
    failing_writes(monkeypatch, output, fail_on=b"", error=None)

    assert run(capsys, *command, "--output", output)[0] == 0

    assert output.read_bytes() == reference.read_bytes()


def test_a_carriage_return_in_a_file_name_stays_in_its_csv_row_and_resumes(capsys, tmp_path, small_streetclip_dir):
    photos = make_photos(tmp_path / "photos", ["a\rb.jpg", "c.jpg"])
    output = tmp_path / "answers.csv"
    command = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--output", output)
    assert run(capsys, *command)[0] == 0
    before = output.read_bytes()

    status, _, err = run(capsys, *command)

    assert status == 0 and "2 were recorded by an earlier run" in err, err
    assert output.read_bytes() == before
    assert sorted(row["path"] for row in csv_rows(output)) == sorted(str(path) for path in photos)


def test_spreadsheet_formulas_in_csv_cells_are_written_as_text_and_resume(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["=1+1_h0.png", "=1+1_h90.png", "@sum_h0.png"])
    output = tmp_path / "places.csv"
    command = ("locate", tmp_path, "--model", small_streetclip_dir, "--output", output, "--group_by", r"/([^/]+)_h\d")
    assert run(capsys, *command)[0] == 0

    status, _, err = run(capsys, *command)

    assert status == 0 and "2 were recorded by an earlier run" in err, err
    rows = csv_rows(output)
    assert [row["group"] for row in rows] == ["'=1+1", "'@sum"]
    assert all(not cell.startswith(("=", "+", "@")) for row in rows for cell in row.values())
    assert all(isinstance(float(row["latitude_1"]), float) for row in rows)  # numbers, negative ones too, stay numbers


def test_an_unreadable_input_folder_exits_two_and_an_unreadable_subfolder_is_skipped_with_a_warning(
    capsys, caplog, monkeypatch, tmp_path, small_streetclip_dir
):
    make_photos(tmp_path / "photos", ["a.jpg"])
    make_photos(tmp_path / "photos" / "private", ["b.jpg"])
    real_scandir = os.scandir
    locked = {str(tmp_path / "photos"), str(tmp_path / "photos" / "private")}

    def scandir(path="."):  # as root, chmod does not stop a read; the system's refusal is this
        if not isinstance(path, int) and os.fspath(path) in locked:  # an int is a folder's file descriptor
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    status, out, err = run(capsys, "locate", tmp_path / "photos", "--model", small_streetclip_dir)
    assert status == 2 and out == ""
    assert f"cannot read the folder {str(tmp_path / 'photos')!r}: Permission denied" in err

    locked.remove(str(tmp_path / "photos"))
    status, out, err = run(capsys, "locate", tmp_path / "photos", "--recursive", "--model", small_streetclip_dir)
    assert status == 0
    assert [Path(record["path"]).name for record in jsonl_records(out)] == ["a.jpg"]
    assert f"skipping the folder {str(tmp_path / 'photos' / 'private')!r}: Permission denied" in caplog.text


def test_an_empty_folder_among_the_inputs_is_named_in_a_warning(capsys, caplog, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg"])
    (tmp_path / "empty").mkdir()

    status, out, _ = run(capsys, "locate", tmp_path / "photos", tmp_path / "empty", "--model", small_streetclip_dir)

    assert status == 0 and len(jsonl_records(out)) == 1
    assert f"the folder {str(tmp_path / 'empty')!r} holds no image file" in caplog.text


def test_a_url_input_gets_an_error_record_that_says_urls_are_not_fetched(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path, ["a.jpg"])
    url = "https://example.com/street.jpg?size=large"

    status, out, _ = run(capsys, "locate", tmp_path / "a.jpg", url, "--model", small_streetclip_dir)

    assert status == 1
    _, record = jsonl_records(out)
    assert record["path"] == url and "URLs are not fetched" in record["error"]


def broken_model_folders(source: Path, root: Path) -> dict[str, Path]:
    """A copy of a saved StreetCLIP folder for each way a model folder arrives broken."""

    def edited(name, edit):
        folder = root / name
        shutil.copytree(source, folder)
        edit(folder)
        return folder

    def edit_config(edit):
        def apply(folder):
            config = json.loads((folder / "config.json").read_text())
            edit(config)
            (folder / "config.json").write_text(json.dumps(config))

        return apply

    def truncate(folder):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    def drop_last_country(config):  # the heads keep their sizes: one country row too many
        places = config["candidate_places"]
        last = len(places["country_names"]) - 1
        keep = [row for row, country in enumerate(places["city_countries"]) if country != last]
        for column in ("city_countries", "city_latitudes", "city_longitudes", "city_names"):
            places[column] = [places[column][row] for row in keep]
        for column in ("country_names", "country_codes"):
            places[column] = places[column][:last]
        config["candidate_countries"] = config["candidate_countries"][:last]

    return {
        "truncated weights": edited("truncated", truncate),
        "garbage weights": edited(
            "garbage", lambda folder: (folder / "model.safetensors").write_bytes(b"\0junk" * 99)
        ),
        "heads of other sizes": edited("heads", edit_config(drop_last_country)),
        "malformed candidate table": edited("table", edit_config(lambda config: config.update(candidate_places="x"))),
    }


def test_a_broken_model_folder_exits_two_naming_it(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg"])

    for case, folder in broken_model_folders(small_streetclip_dir, tmp_path).items():
        status, out, err = run(capsys, "locate", tmp_path / "photos", "--model", folder)

        assert status == 2 and out == "", case
        assert f"streetclip locate: error: cannot load --model {str(folder)!r}" in err, case


def test_batch_and_worker_defaults_have_one_home_and_workers_fit_the_cores():
    from modeling_streetclip.app import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS
    from modeling_streetclip.app.batch import geolocate_images

    args = build_parser().parse_args(["locate", "photo.jpg"])

    assert (
        args.batch_size == DEFAULT_BATCH_SIZE == inspect.signature(geolocate_images).parameters["batch_size"].default
    )
    assert args.num_workers == DEFAULT_NUM_WORKERS
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= DEFAULT_NUM_WORKERS <= cores


def test_locate_index_build_and_the_benchmark_declare_the_shared_options_alike():
    import benchmark

    def options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
        shared = ("--batch_size", "--num_workers", "--device", "--dtype", "--verbose")
        return {
            action.option_strings[0]: (action.default, action.choices, action.help, action.metavar)
            for action in parser._actions
            if action.option_strings and action.option_strings[0] in shared
        }

    commands = next(action for action in build_parser()._actions if action.dest == "command").choices
    build = next(action for action in commands["index"]._actions if action.dest == "index_command").choices["build"]
    locate = options(commands["locate"])

    assert len(locate) == 5 and locate == options(build) == options(benchmark.build_parser())


@pytest.mark.slow
def test_help_under_python_m_imports_neither_torch_nor_accelerate(tmp_path):
    """`accelerate launch -m modeling_streetclip.cli` and `torchrun -m` run the package as `python -m` does: its
    `--help` must answer as fast as the console script's."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "modeling_streetclip.cli", "locate", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0 and "--dataset" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert {"torch", "accelerate", "transformers", "datasets"}.isdisjoint(imported)


# Inputs from a dataset


def encoded(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": None}


def answers_by_path(capsys, paths: list[Path], model: Path) -> dict[str, list[dict]]:
    """The answers of each photo when named by its path, the reference for the same images read from a dataset."""
    _, out, _ = run(capsys, "locate", *paths, "--model", model, "--num_workers", 0)
    return {Path(record["path"]).name: record.get("answers") for record in jsonl_records(out)}


def test_dataset_saved_to_disk_gives_one_record_per_row_under_its_id_column(capsys, tmp_path, small_streetclip_dir):
    photos = make_photos(tmp_path / "photos", ["a.jpg", "b.png", "c.jpg"])
    features = datasets.Features({"photo_key": datasets.Value("string"), "image": datasets.Image()})
    rows = {"photo_key": ["k-a", "k-b", "k-bad", "k-c"], "image": [encoded(photos[0]), encoded(photos[1])]}
    rows["image"] += [{"bytes": b"not an image", "path": None}, encoded(photos[2])]
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    output = tmp_path / "answers.jsonl"
    command = ("locate", "--dataset", tmp_path / "saved", "--id_column", "photo_key", "--output", output)

    status, _, err = run(capsys, *command, "--model", small_streetclip_dir, "--num_workers", 0, "--batch_size", 2)

    assert status == 1 and "3 of 4 inputs geolocated, 1 failed" in err
    records = jsonl_records(output.read_text())
    assert [record["photo_key"] for record in records] == ["k-a", "k-b", "k-bad", "k-c"]
    assert "is not an image format" in records[2]["error"] and "path" not in records[0]
    reference = answers_by_path(capsys, photos, small_streetclip_dir)
    for record, name in zip([*records[:2], records[3]], ["a.jpg", "b.png", "c.jpg"], strict=True):
        for answer, expected in zip(record["answers"], reference[name], strict=True):
            assert flat(answer) == pytest.approx(flat(expected))

    status, _, err = run(capsys, *command, "--model", small_streetclip_dir, "--num_workers", 0)
    assert status == 1 and "4 were recorded by an earlier run" in err
    assert len(output.read_text().splitlines()) == 4


def test_image_folder_dataset_names_its_records_by_file_name(capsys, tmp_path, small_streetclip_dir):
    photos = make_photos(tmp_path / "folder", ["b.jpg", "a.png", "c.jpeg"])
    output = tmp_path / "answers.csv"

    status, _, err = run(
        capsys, "locate", "--dataset", tmp_path / "folder", "--model", small_streetclip_dir, "--output", output
    )

    assert status == 0 and "3 of 3 inputs geolocated" in err
    rows = csv_rows(output)
    assert sorted(row["id"] for row in rows) == ["a.png", "b.jpg", "c.jpeg"]
    reference = answers_by_path(capsys, photos, small_streetclip_dir)
    assert {row["id"]: row["city_1"] for row in rows} == {
        name: answers[0]["city"] for name, answers in reference.items()
    }


def test_streamed_dataset_is_resumed_by_its_id_column(capsys, tmp_path, small_streetclip_dir):
    photos = make_photos(tmp_path / "photos", [f"{index}.jpg" for index in range(5)])
    features = datasets.Features({"image_id": datasets.Value("int64"), "image": datasets.Image()})
    rows = {"image_id": [10 + index for index in range(5)], "image": [encoded(photo) for photo in photos]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    output = tmp_path / "answers.jsonl"
    command = ("locate", "--dataset", tmp_path / "saved", "--streaming", "--output", output, "--batch_size", 2)
    assert run(capsys, *command, "--model", small_streetclip_dir, "--num_workers", 0)[0] == 0
    complete = jsonl_records(output.read_text())
    assert [record["image_id"] for record in complete] == ["10", "11", "12", "13", "14"]
    output.write_text("".join(line + "\n" for line in output.read_text().splitlines()[:3]))  # killed after three

    status, _, err = run(capsys, *command, "--model", small_streetclip_dir, "--num_workers", 0)

    assert status == 0 and "5 of 5 inputs geolocated; 3 were recorded by an earlier run" in err
    resumed = jsonl_records(output.read_text())
    assert resumed[:3] == complete[:3] and [record["image_id"] for record in resumed] == ["10", "11", "12", "13", "14"]
    assert_same_records(resumed, complete)  # the last two, now in a batch of their own


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["photos", "--dataset", "saved"], "give either INPUTS"),
        ([], "no inputs: give image files, folders or patterns, or --dataset"),
        (["--dataset", "saved", "--group_by", "(x)"], "--group_by applies to file inputs"),
        (["photos", "--streaming"], "--streaming, --image_column and --id_column apply to --dataset"),
        (["--dataset", "./no-such-folder"], "cannot read --dataset './no-such-folder': No data set folder"),
        (["--dataset", "saved", "--id_column", "nope"], "has no id column 'nope'; its columns are ['image']"),
        (["--dataset", "saved", "--image_column", "nope"], "has no image column 'nope'"),
    ],
)
def test_dataset_usage_errors_exit_two_naming_the_problem(
    capsys, monkeypatch, tmp_path, small_streetclip_dir, arguments, expected
):
    make_photos(tmp_path / "photos", ["a.jpg"])
    datasets.Dataset.from_dict({"image": [encoded(tmp_path / "photos" / "a.jpg")]}).cast_column(
        "image", datasets.Image()
    ).save_to_disk(tmp_path / "saved")
    monkeypatch.chdir(tmp_path)

    status, out, err = run(capsys, "locate", *arguments, "--model", small_streetclip_dir)

    assert status == 2 and out == ""
    assert "streetclip locate: error:" in err and expected in err


@pytest.mark.parametrize("streaming", [False, True])
def test_a_dataset_id_met_twice_exits_two_naming_both_rows(capsys, monkeypatch, tmp_path, streaming):
    make_photos(tmp_path / "photos", ["a.jpg"])
    image = encoded(tmp_path / "photos" / "a.jpg")
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image()})
    rows = {"id": ["x", "y", "x"], "image": [image] * 3}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    fail_if_a_model_loads(monkeypatch)
    command = ["locate", "--dataset", tmp_path / "saved", "--output", tmp_path / "answers.jsonl"]

    status, _, err = run(capsys, *command, *(["--streaming"] if streaming else []))

    assert status == 2 and "has the id 'x' on rows 0 and 2; records are resumed by id, so each must be unique" in err


# Parquet output


def test_parquet_output_loads_with_datasets_and_holds_the_jsonl_records(capsys, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "photos" / "d.jpg").write_text("not a photo")
    command = ("locate", tmp_path / "photos", "--model", small_streetclip_dir, "--top_k", 2, "--num_workers", 0)
    run(capsys, *command, "--output", tmp_path / "answers.jsonl")

    status, _, err = run(capsys, *command, "--output", tmp_path / "answers.parquet")

    assert status == 1 and "3 of 4 inputs geolocated, 1 failed" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "answers.jsonl",
        "answers.jsonl.lock",
        "answers.jsonl.options.json",
        "answers.parquet",
        "answers.parquet.lock",
        "answers.parquet.options.json",
        "photos",
    ]
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "answers.parquet"), split="train")
    expected = jsonl_records((tmp_path / "answers.jsonl").read_text())
    assert loaded.column_names == ["path", "answers", "error"] and len(loaded) == 4
    for row, record in zip(loaded, expected, strict=True):
        assert row["path"] == record["path"] and row["error"] == record.get("error")
        if row["answers"] is not None:
            assert [{k: v for k, v in answer.items() if v is not None} for answer in row["answers"]] == [
                {k: v for k, v in answer.items() if k in ANSWER_FIELDS and v is not None}
                for answer in record["answers"]
            ]
    assert row["answers"] is None and "not an image format" in row["error"]


# `streetclip locate`, except that it writes a Parquet part every two records and is SIGKILLed after the second.
KILL_AFTER_TWO_PARTS = """
import os, signal, sys

from modeling_streetclip.app import records
from modeling_streetclip.cli import main

records.PARQUET_PART_ROWS = 2
flush = records.ParquetRecordWriter.flush


def flush_then_die(writer):
    flush(writer)
    if writer.next_part == 2:
        os.kill(os.getpid(), signal.SIGKILL)


records.ParquetRecordWriter.flush = flush_then_die
sys.exit(main())
"""


@pytest.mark.slow
def test_a_parquet_run_killed_mid_way_is_completed_by_a_rerun(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    make_photos(tmp_path / "photos", [f"{index}.jpg" for index in range(7)])
    (tmp_path / "photos" / "bad.jpg").write_text("not a photo")
    (tmp_path / "killer.py").write_text(KILL_AFTER_TWO_PARTS)
    output = tmp_path / "answers.parquet"
    command = ["locate", "photos", "--model", str(small_streetclip_dir), "--output", str(output), "--num_workers", "0"]
    command += ["--batch_size", "2"]

    killed = subprocess.run(
        [sys.executable, "killer.py", *command], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )

    assert killed.returncode == -9, killed.stderr
    assert not output.exists()
    parts = tmp_path / "answers.parquet.parts"
    assert sorted(part.name for part in parts.iterdir()) == ["part-000000.parquet", "part-000001.parquet"]
    monkeypatch.chdir(tmp_path)
    status, _, err = run(capsys, *command)
    assert status == 1 and "7 of 8 inputs geolocated, 1 failed (see the error field); 4 were recorded" in err
    loaded = datasets.load_dataset("parquet", data_files=str(output), split="train")
    assert sorted(loaded["path"]) == sorted(str(path) for path in (tmp_path / "photos").iterdir())
    assert not parts.exists()


# Inputs and models that cannot be used, named at once; rows and paths that fail, recorded


def fail_if_a_model_loads(monkeypatch) -> None:
    from modeling_streetclip.app import loading

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", load_model)


def test_a_missing_input_path_exits_two_before_the_model_loads(capsys, monkeypatch, tmp_path):
    (photo,) = make_photos(tmp_path, ["a.jpg"])
    fail_if_a_model_loads(monkeypatch)
    output = tmp_path / "answers.jsonl"

    status, out, err = run(capsys, "locate", photo, tmp_path / "phtoos", "--output", output)

    assert status == 2 and out == ""
    assert f"streetclip locate: error: no such file or folder: {str(tmp_path / 'phtoos')!r}" in err
    assert not output.exists() or output.read_text() == ""


def test_a_name_too_long_for_the_file_system_gets_an_error_record_from_arguments_and_stdin(
    capsys, monkeypatch, tmp_path, small_streetclip_dir
):
    (photo,) = make_photos(tmp_path, ["a.jpg"])
    long_name = str(tmp_path / ("x" * 300 + ".jpg"))  # over the 255 bytes a file name may have
    common = ("--model", small_streetclip_dir, "--num_workers", 0)

    from_arguments = run(capsys, "locate", photo, long_name, *common)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{photo}\n{long_name}\n"))
    from_stdin = run(capsys, "locate", "-", *common)

    for status, out, err in (from_arguments, from_stdin):
        assert status == 1 and "1 of 2 inputs geolocated, 1 failed" in err
        records = jsonl_records(out)
        assert [record["path"] for record in records] == [str(photo), long_name]
        assert "answers" in records[0] and "too long" in records[1]["error"]


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_a_dataset_row_without_an_image_gets_an_error_record_and_the_rerun_goes_on(
    capsys, tmp_path, small_streetclip_dir, streaming
):
    photos = make_photos(tmp_path / "photos", ["a.jpg", "b.jpg"])
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image()})
    rows = {"key": ["a", "none", "b"], "image": [encoded(photos[0]), None, encoded(photos[1])]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "saved")
    output = tmp_path / "answers.jsonl"
    command = ["locate", "--dataset", tmp_path / "saved", "--id_column", "key", "--output", output]
    command += ["--model", small_streetclip_dir, "--num_workers", 0] + (["--streaming"] if streaming else [])

    status, _, err = run(capsys, *command)

    assert status == 1 and "2 of 3 inputs geolocated, 1 failed" in err
    records = jsonl_records(output.read_text())
    assert [record["key"] for record in records] == ["a", "none", "b"]
    assert records[1] == {"key": "none", "error": "no image: the row's image is empty (None)."}
    status, _, err = run(capsys, *command)
    assert status == 1 and "3 were recorded by an earlier run" in err
    assert len(output.read_text().splitlines()) == 3


def test_streaming_and_not_streaming_do_not_share_an_output_whose_ids_they_spell_differently(
    capsys, tmp_path, small_streetclip_dir
):
    make_photos(tmp_path / "folder", ["b.jpg", "a.png"])
    output = tmp_path / "answers.jsonl"
    command = ("locate", "--dataset", tmp_path / "folder", "--output", output, "--model", small_streetclip_dir)
    assert run(capsys, *command, "--num_workers", 0)[0] == 0
    content = output.read_bytes()
    assert sorted(record["id"] for record in jsonl_records(content.decode())) == ["a.png", "b.jpg"]  # file names

    status, _, err = run(capsys, *command, "--num_workers", 0, "--streaming")  # which names rows by number

    assert status == 2 and "--streaming was not given, now True" in err
    assert output.read_bytes() == content  # not 4 records for 2 inputs


def test_weights_swapped_in_a_model_folder_stop_the_resume_naming_both_fingerprints(
    capsys, tmp_path, small_streetclip_dir
):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(small_streetclip_dir, model)
    make_photos(tmp_path / "photos", ["a.jpg"])
    output = tmp_path / "answers.jsonl"
    command = ("locate", tmp_path / "photos", "--model", model, "--output", output, "--num_workers", 0)
    assert run(capsys, *command)[0] == 0
    before = json.loads(options_path(output).read_text())["options"]["model_weights"]
    weights = load_file(model / "model.safetensors")  # another training step: the same shapes, other values
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, model / "model.safetensors")
    make_photos(tmp_path / "photos", ["b.jpg"])

    status, _, err = run(capsys, *command)

    assert status == 2
    assert f"the fingerprint of --model's weights was {before!r}, now '" in err
    after = err.split(", now '")[1][:16]
    assert len(before) == len(after) == 16 and after != before
    assert len(output.read_text().splitlines()) == 1


@pytest.mark.parametrize("kind", ["device", "folder", "huge"])
def test_a_countries_file_that_is_not_a_small_regular_file_is_refused(capsys, monkeypatch, tmp_path, kind):
    make_photos(tmp_path, ["a.jpg"])
    fail_if_a_model_loads(monkeypatch)
    countries = {"device": Path("/dev/zero"), "folder": tmp_path, "huge": tmp_path / "countries.txt"}[kind]
    if kind == "huge":
        with countries.open("wb") as file:
            file.truncate(2_000_000)  # sparse: no disk used

    status, _, err = run(capsys, "locate", tmp_path / "a.jpg", "--countries", countries)

    assert status == 2 and f"--countries {str(countries)!r}" in err
    assert {"device": "not a regular file", "folder": "is a folder", "huge": "holds 2,000,000 bytes"}[kind] in err


@pytest.mark.parametrize(
    "edit, expected",
    [
        ({"size": {"shortest_edge": -5}}, "has size.shortest_edge = -5; image sizes are positive integers"),
        ({"crop_size": {"height": 0, "width": 0}}, "has crop_size.height = 0"),
        ({"crop_size": {"height": 20, "width": 20}}, "gives 20 x 20 pixels, but the model takes 30 x 30"),
    ],
)
def test_an_image_processor_config_without_usable_sizes_exits_two_naming_the_file_and_value(
    capsys, tmp_path, small_streetclip_dir, edit, expected
):
    model = tmp_path / "model"
    shutil.copytree(small_streetclip_dir, model)
    config_file = model / "preprocessor_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | edit))
    make_photos(tmp_path / "photos", ["a.jpg"])

    status, out, err = run(capsys, "locate", tmp_path / "photos", "--model", model, "--num_workers", 0)

    assert status == 2 and out == ""
    assert f"streetclip locate: error: cannot use --model {str(model)!r}: {str(config_file)!r} {expected}" in err


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """A Hugging Face cache with nothing in it, for this test alone."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_a_hub_model_offline_and_not_in_the_cache_is_named_as_such(capsys, monkeypatch, tmp_path, empty_hub_cache):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    fail_if_a_model_loads_from_the_hub(monkeypatch)
    make_photos(tmp_path / "photos", ["a.jpg"])

    status, out, err = run(capsys, "locate", tmp_path / "photos")  # the default --model, from the Hub

    assert status == 2 and out == ""
    assert "cannot load --model 'geolocal/StreetCLIP': it is not a local folder nor in the Hugging Face cache" in err
    assert "offline mode (HF_HUB_OFFLINE)" in err and "Give --model a local folder" in err


def test_a_hub_model_not_in_the_cache_while_the_hub_cannot_be_reached_is_named_after_one_try(
    capsys, monkeypatch, tmp_path, empty_hub_cache
):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import httpx

    tries = []

    def unreachable(url, **kwargs):
        tries.append(url)
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    fail_if_a_model_loads_from_the_hub(monkeypatch)
    make_photos(tmp_path / "photos", ["a.jpg"])

    status, out, err = run(capsys, "locate", tmp_path / "photos")

    assert status == 2 and out == "" and len(tries) == 1
    assert "the Hugging Face Hub (https://huggingface.co) cannot be reached (" in err
    assert "and the model is not in its cache" in err and "Give --model a local folder" in err


def fail_if_a_model_loads_from_the_hub(monkeypatch) -> None:
    from modeling_streetclip.processing_streetclip import StreetCLIPProcessor

    def from_pretrained(*args, **kwargs):
        raise AssertionError("the loaders were asked")

    monkeypatch.setattr(StreetCLIPProcessor, "from_pretrained", from_pretrained)


@pytest.mark.slow
def test_the_default_model_offline_fails_at_once_from_the_shell(tmp_path):
    make_photos(tmp_path / "photos", ["a.jpg"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_CACHE", None)
    script = shutil.which("streetclip", path=os.path.dirname(sys.executable))

    result = subprocess.run(
        [script, "locate", "photos", "--output", "out.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True
    )

    assert result.returncode == 2, result.stderr
    assert "cannot load --model 'geolocal/StreetCLIP': it is not a local folder nor in the Hugging Face cache" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr


# Quiet by default


def test_a_default_run_hides_the_libraries_loading_output_and_verbose_shows_it(capsys, tmp_path, small_streetclip_dir):
    for name in ("quiet", "verbose"):
        make_photos(tmp_path / name, ["a.jpg", "b.jpg"])  # two folders: datasets prepares each once
    common = ("--model", small_streetclip_dir, "--num_workers", 0)

    quiet_status, _, quiet = run(capsys, "locate", "--dataset", tmp_path / "quiet", *common)
    verbose_status, _, verbose = run(capsys, "locate", "--dataset", tmp_path / "verbose", *common, "--verbose")

    assert quiet_status == verbose_status == 0
    for noise in ("Loading weights", "Generating train split"):
        assert noise not in quiet and noise in verbose
    for output in (quiet, verbose):  # the command's own bar and summary, either way
        assert "streetclip locate: 100%" in output and "2 of 2 inputs geolocated" in output
