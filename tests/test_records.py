"""Result files: whatever moment a run is killed at, or whatever fails under it, resuming keeps exactly the complete
records, and a file is only ever added to by one run at a time with the options that wrote it."""

import csv
import io
import json
import os
import sys
import tracemalloc
from pathlib import Path

import pytest

from modeling_streetclip.app import records
from modeling_streetclip.app.records import ResultFileError, open_records, options_path, spreadsheet_safe


ANSWER = {
    "label": "Osaka, Japan",
    "country": "Japan",
    "country_code": "JP",
    "city": "Osaka",
    "latitude": 34.69379,
    "longitude": 135.50107,
    "score": 0.25,
    "country_score": 0.5,
}
OPTIONS = {"model": "/models/streetclip", "top_k": 1, "countries": None}


def write_records(path, records, grouped=False, top_k=1, options=OPTIONS):
    with open_records(path, grouped=grouped, top_k=top_k, options=options) as writer:
        for record in records:
            writer.write(record)


def resume(path, grouped=False, top_k=1, options=OPTIONS) -> dict[str, bool]:
    """What a rerun finds recorded (cutting off a partial last record, as it does)."""
    with open_records(path, grouped=grouped, top_k=top_k, options=options) as writer:
        return writer.recorded


def written_by_another_program(path, content: str):
    """A file with `content`, and the options record a run of this command would have left beside it."""
    path.write_text(content)
    options_path(path).write_text(json.dumps({"options": {"model": "/models/streetclip", "top_k": 1}}))


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_a_kill_at_any_byte_leaves_a_file_that_resumes_to_the_complete_records(tmp_path, extension):
    path = tmp_path / f"results.{extension}"
    records = [
        {"path": "/photos/a.jpg", "answers": [ANSWER]},
        {"path": "/photos/b.jpg", "error": "Image file '/photos/b.jpg' is empty (0 bytes)."},
        {"path": "/photos/c\nd.jpg", "answers": [ANSWER]},  # a newline in a name: a quoted multi-line CSV field
        {"path": "/photos/e\rf.jpg", "answers": [ANSWER]},  # and a carriage return
    ]
    with open_records(path, grouped=False, top_k=1, options=OPTIONS) as writer:
        ends = [path.stat().st_size]  # where the CSV header, then each record, is complete
        for record in records:
            writer.write(record)
            ends.append(path.stat().st_size)
    data = path.read_bytes()

    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        recorded = resume(path)
        kept = sum(end <= cut for end in ends[1:])
        assert list(recorded) == [record["path"] for record in records[:kept]], f"cut at byte {cut}"
        assert path.read_bytes() == (data[: ends[kept]] if cut >= ends[0] else data[: ends[0]]), f"cut at byte {cut}"


def test_recorded_keys_say_which_records_failed(tmp_path):
    path = tmp_path / "results.csv"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}, {"path": "/b.jpg", "error": "unreadable"}])

    assert resume(path) == {"/a.jpg": True, "/b.jpg": False}


def test_a_killed_header_is_rewritten_before_the_first_record(tmp_path):
    path = tmp_path / "results.csv"
    write_records(path, [])
    path.write_text("path,coun")

    assert resume(path) == {}
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}])

    assert path.read_text().splitlines()[0].startswith("path,label_1,country_1,")
    assert resume(path) == {"/a.jpg": True}


def stored_paths(path) -> list[str]:
    """The `path` column of a result file, read as UTF-8 by each format's ordinary reader."""
    if path.suffix == ".parquet":
        return [row["path"] for row in parquet_rows(path)]
    text = path.read_bytes().decode("utf-8")  # strict: every format is valid UTF-8
    if path.suffix == ".csv":
        return [row["path"] for row in csv.DictReader(io.StringIO(text, newline=""))]
    return [json.loads(line)["path"] for line in text.splitlines()]


@pytest.mark.parametrize("extension", ["jsonl", "csv", "parquet"])
def test_file_names_that_are_not_utf8_are_stored_alike_as_backslash_escapes_and_resume(tmp_path, extension):
    path = tmp_path / f"results.{extension}"
    name = "/photos/caf\udce9.jpg"  # how Python spells a Latin-1 file name on a UTF-8 system
    error = f"Image file {name!r} is empty (0 bytes)."

    write_records(path, [{"path": name, "answers": [ANSWER]}, {"path": name + "2", "error": error}])

    assert stored_paths(path) == ["/photos/caf\\xe9.jpg", "/photos/caf\\xe9.jpg2"]
    recorded = resume(path)
    assert len(recorded) == 2 and name in recorded and recorded[name] is True and recorded[name + "2"] is False


def test_raw_bytes_in_an_older_file_are_found_by_their_escaped_spelling(tmp_path):
    path = tmp_path / "results.csv"
    write_records(path, [])
    with path.open("ab") as file:  # as the previous version wrote a non-UTF-8 name: its raw bytes
        file.write(b"/photos/caf\xe9.jpg" + b"," * (len(records.ANSWER_FIELDS) + 1) + b"\r\n")

    assert "/photos/caf\udce9.jpg" in resume(path)


def test_group_records_keep_their_member_paths(tmp_path):
    path = tmp_path / "places.csv"
    write_records(
        path, [{"group": "pano1", "paths": ["/p/pano1_h0.jpg", "/p/pano1_h90.jpg"], "answers": [ANSWER]}], True
    )

    assert (
        path.read_text()
        .splitlines()[1]
        .startswith('pano1,"[""/p/pano1_h0.jpg"", ""/p/pano1_h90.jpg""]","Osaka, Japan",Japan,')
    )
    assert resume(path, grouped=True) == {"pano1": True}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("results.jsonl", '{"path": "/a.jpg", "answers": []}\nnot json\n{"path": "/b.jpg"}\n', "line 2 is not a JSON"),
        ("results.jsonl", '{"group": "pano1", "paths": [], "answers": []}\n', "has no 'path' field"),
        ("results.csv", "path,country,error\n", "this run writes"),
    ],
)
def test_a_file_another_run_wrote_is_refused_rather_than_mixed_into(tmp_path, name, content, message):
    path = tmp_path / name
    written_by_another_program(path, content)

    with pytest.raises(ResultFileError, match=message):
        resume(path, options={"model": "/models/streetclip", "top_k": 1})
    assert path.read_text() == content


def test_options_are_recorded_beside_the_file_and_a_change_is_named(tmp_path):
    path = tmp_path / "results.jsonl"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}], options={**OPTIONS, "countries": ["JP", "FR"]})
    content = path.read_bytes()

    assert json.loads(options_path(path).read_text())["options"] == {**OPTIONS, "countries": ["JP", "FR"]}
    assert resume(path, options={**OPTIONS, "countries": ["JP", "FR"]}) == {"/a.jpg": True}
    with pytest.raises(ResultFileError, match=r"--countries was \['JP', 'FR'\], now not given\)"):
        resume(path)
    with pytest.raises(ResultFileError, match=r"--countries was .*, now \['JP'\]; --top_k was 1, now 3"):
        resume(path, top_k=3, options={**OPTIONS, "countries": ["JP"], "top_k": 3})
    assert path.read_bytes() == content


def test_an_option_added_later_with_none_for_its_default_keeps_older_files_resumable(tmp_path):
    path = tmp_path / "results.jsonl"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}])

    assert resume(path, options={**OPTIONS, "decision": None}) == {"/a.jpg": True}
    with pytest.raises(ResultFileError, match="--decision was not given, now 'joint'"):
        resume(path, options={**OPTIONS, "decision": "joint"})


def test_a_change_of_model_weights_is_named_with_both_fingerprints(tmp_path):
    path = tmp_path / "results.jsonl"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}], options={**OPTIONS, "model_weights": "0123abcd"})

    with pytest.raises(ResultFileError, match="the fingerprint of --model's weights was '0123abcd', now 'ffff0000'"):
        resume(path, options={**OPTIONS, "model_weights": "ffff0000"})
    older = tmp_path / "older.jsonl"  # written before weights were fingerprinted
    write_records(older, [{"path": "/a.jpg", "answers": [ANSWER]}])
    with pytest.raises(ResultFileError, match="the fingerprint of --model's weights was not recorded, now 'ffff0000'"):
        resume(older, options={**OPTIONS, "model_weights": "ffff0000"})


def test_a_file_without_its_options_record_is_refused_and_overwrite_starts_afresh(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"path": "/a.jpg", "answers": []}\n')

    with pytest.raises(ResultFileError, match="the record of the options that wrote it is missing"):
        resume(path)
    with open_records(path, grouped=False, top_k=1, options=OPTIONS, overwrite=True) as writer:
        assert writer.recorded == {}
    assert path.read_text() == ""
    assert json.loads(options_path(path).read_text())["options"] == {"model": "/models/streetclip", "top_k": 1}


@pytest.mark.parametrize("extension", ["jsonl", "parquet"])
def test_a_second_writer_of_the_same_file_is_refused_while_the_first_holds_it(tmp_path, extension):
    path = tmp_path / f"results.{extension}"

    with open_records(path, grouped=False, top_k=1, options=OPTIONS) as first:
        first.write({"path": "/a.jpg", "answers": [ANSWER]})
        with pytest.raises(ResultFileError, match=f"another run is writing {str(path)!r}"):
            resume(path)
        first.write({"path": "/b.jpg", "answers": [ANSWER]})

    assert resume(path) == {"/a.jpg": True, "/b.jpg": True}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc, a folder that takes no new files")
def test_a_lock_file_that_cannot_be_created_is_not_taken_for_another_run():
    with pytest.raises(
        ResultFileError, match="cannot create the lock file '/proc/results.jsonl.lock' beside --output"
    ):
        open_records(Path("/proc/results.jsonl"), grouped=False, top_k=1, options=OPTIONS)


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_resume_streams_the_file_instead_of_reading_it_whole(tmp_path, extension):
    path = tmp_path / f"results.{extension}"
    long_error = "x" * 100_000
    write_records(path, [{"path": f"/{index}.jpg", "error": long_error} for index in range(100)])
    assert path.stat().st_size > 10_000_000

    tracemalloc.start()
    try:
        recorded = resume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert len(recorded) == 100
    assert peak < 2_000_000  # a few lines at a time; the whole file would be 10 MB of bytes and as much text


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_an_endless_last_record_is_cut_off_in_bounded_memory_saying_how_many_bytes_went(
    tmp_path, monkeypatch, caplog, extension
):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1_000_000)
    path = tmp_path / f"results.{extension}"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}])
    complete = path.stat().st_size
    with path.open("ab") as file:  # 16 MB without a newline: what a run killed in a giant write would leave
        for _ in range(16):
            file.write(b"x" * 1_000_000)

    tracemalloc.start()
    try:
        recorded = resume(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert recorded == {"/a.jpg": True} and path.stat().st_size == complete
    assert peak < 4_000_000  # a line of at most MAX_RECORD_BYTES at a time, never the 16 MB tail
    assert f"ends in an incomplete record (16,000,000 bytes after the last complete one, at byte {complete:,})" in (
        caplog.text
    )


def test_a_complete_line_longer_than_any_record_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "results.jsonl"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}])
    with path.open("ab") as file:
        file.write(b'{"path": "/b.jpg", "error": "' + b"x" * 5000 + b'"}\n')
    content = path.read_bytes()

    with pytest.raises(ResultFileError, match="has a line of over 1,000 bytes"):
        resume(path)
    assert path.read_bytes() == content


def test_spreadsheet_formulas_become_text_and_read_back_as_written(tmp_path):
    dangerous = ['=HYPERLINK("http://x")', "+1", "-1+2", "@SUM(A1)", "\tcmd", "\rcmd", "'quoted"]

    assert [spreadsheet_safe(value) for value in dangerous] == ["'" + value for value in dangerous]
    assert [spreadsheet_safe(value) for value in ("/photos/a.jpg", "Osaka", -33.9, 0.25, "")] == [
        "/photos/a.jpg",
        "Osaka",
        -33.9,
        0.25,
        "",
    ]
    path = tmp_path / "places.csv"
    write_records(path, [{"group": key, "paths": [], "answers": [ANSWER]} for key in dangerous], grouped=True)

    assert resume(path, grouped=True) == dict.fromkeys(dangerous, True)
    assert "\n=" not in path.read_text() and ",=" not in path.read_text()


@pytest.mark.parametrize("kind", ["folder", "device"])
def test_an_output_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    path = tmp_path / "results.jsonl"
    if kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(os.devnull)

    with pytest.raises(ResultFileError, match="is a folder" if kind == "folder" else "is not a regular file"):
        resume(path)


# Parquet: complete part files while a run goes, one file once it ends


def parquet_rows(path) -> list[dict]:
    pq = pytest.importorskip("pyarrow.parquet")
    return pq.read_table(path).to_pylist()


def test_parquet_holds_one_row_per_record_with_answers_as_a_list_of_structs(tmp_path):
    path = tmp_path / "answers.parquet"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER, ANSWER]}, {"path": "/b.jpg", "error": "unreadable"}])

    answer = {field: ANSWER.get(field) for field in records.ANSWER_FIELDS}
    assert parquet_rows(path) == [
        {"path": "/a.jpg", "answers": [answer, answer], "error": None},
        {"path": "/b.jpg", "answers": None, "error": "unreadable"},
    ]
    assert not (tmp_path / "answers.parquet.parts").exists()
    assert json.loads(options_path(path).read_text())["options"] == {"model": "/models/streetclip", "top_k": 1}
    assert resume(path) == {"/a.jpg": True, "/b.jpg": False}


def test_parquet_parts_left_by_a_kill_are_resumed_and_merged_after_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "PARQUET_PART_ROWS", 2)
    path = tmp_path / "answers.parquet"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}])
    writer = open_records(path, grouped=False, top_k=1, options=OPTIONS)
    for name in ("/b.jpg", "/c.jpg", "/d.jpg"):
        writer.write({"path": name, "error": "unreadable"})
    writer.lock.release()  # killed: the system drops the lock, nothing else happens; /d.jpg was not written yet

    parts = tmp_path / "answers.parquet.parts"
    assert [part.name for part in parts.iterdir()] == ["part-000000.parquet"]
    assert resume(path) == {"/a.jpg": True, "/b.jpg": False, "/c.jpg": False}
    assert [row["path"] for row in parquet_rows(path)] == ["/a.jpg", "/b.jpg", "/c.jpg"]
    assert not parts.exists()


def test_a_part_that_a_killed_merge_left_behind_is_dropped_not_counted_twice(tmp_path):
    path = tmp_path / "answers.parquet"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}, {"path": "/b.jpg", "error": "unreadable"}])
    parts = tmp_path / "answers.parquet.parts"
    parts.mkdir()
    (parts / "part-000003.parquet").write_bytes(path.read_bytes())  # merged into the file, then the kill
    (parts / "merged.tmp").write_bytes(path.read_bytes()[:100])  # and a merge cut short

    assert resume(path) == {"/a.jpg": True, "/b.jpg": False}
    assert [row["path"] for row in parquet_rows(path)] == ["/a.jpg", "/b.jpg"]
    assert not parts.exists()


@pytest.mark.parametrize("kind", ["grouped", "another program"])
def test_a_parquet_file_of_another_kind_is_refused_and_left_as_it_is(tmp_path, kind):
    path = tmp_path / "answers.parquet"
    if kind == "grouped":
        write_records(path, [{"group": "pano1", "paths": ["/p1.jpg"], "answers": [ANSWER]}], grouped=True)
        message = r"has the columns \['group', 'paths', 'answers', 'error'\], but this run writes \['path'"
    else:
        written_by_another_program(path, "not parquet")
        message = "is not a Parquet file this command wrote"
    content = path.read_bytes()

    with pytest.raises(ResultFileError, match=message):
        resume(path, options={"model": "/models/streetclip", "top_k": 1})
    assert path.read_bytes() == content
    assert not (tmp_path / "answers.parquet.parts").exists()


def test_a_failed_part_write_stops_the_run_and_keeps_the_parts_before_it(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "PARQUET_PART_ROWS", 1)
    path = tmp_path / "answers.parquet"
    real_replace = os.replace

    def full_disk_on_the_second_part(source, destination):
        if str(destination).endswith("part-000001.parquet"):
            raise OSError(28, "No space left on device")
        real_replace(source, destination)

    monkeypatch.setattr(records.os, "replace", full_disk_on_the_second_part)
    with pytest.raises(ResultFileError, match="No space left on device; the records written before are kept"):
        write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}, {"path": "/b.jpg", "answers": [ANSWER]}])
    monkeypatch.setattr(records.os, "replace", real_replace)

    assert not path.exists()
    assert sorted(part.name for part in (tmp_path / "answers.parquet.parts").iterdir()) == ["part-000000.parquet"]
    assert resume(path) == {"/a.jpg": True}


def test_parquet_without_pyarrow_is_refused_naming_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)

    with pytest.raises(ResultFileError, match=r"Parquet output needs the `pyarrow` package .*pip install pyarrow"):
        resume(tmp_path / "answers.parquet")
    assert list(tmp_path.iterdir()) == []  # refused before the file, its lock or its options were touched
