"""Result files: whatever moment a run is killed at, resuming keeps exactly the complete records."""

import pytest

from modeling_streetclip.cli.records import ResultFileError, open_records, resume_records


ANSWER = {
    "country": "Japan",
    "country_code": "JP",
    "city": "Osaka",
    "latitude": 34.69379,
    "longitude": 135.50107,
    "score": 0.25,
    "country_score": 0.5,
}


def write_records(path, records, grouped=False, top_k=1):
    with open_records(path, grouped=grouped, top_k=top_k) as writer:
        for record in records:
            writer.write(record)


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_a_kill_at_any_byte_leaves_a_file_that_resumes_to_the_complete_records(tmp_path, extension):
    path = tmp_path / f"results.{extension}"
    records = [
        {"path": "/photos/a.jpg", "answers": [ANSWER]},
        {"path": "/photos/b.jpg", "error": "Image file '/photos/b.jpg' is empty (0 bytes)."},
        {"path": "/photos/c\nd.jpg", "answers": [ANSWER]},  # a newline in a name: a quoted multi-line CSV field
    ]
    with open_records(path, grouped=False, top_k=1) as writer:
        ends = [path.stat().st_size]  # where the CSV header, then each record, is complete
        for record in records:
            writer.write(record)
            ends.append(path.stat().st_size)
    data = path.read_bytes()

    for cut in range(len(data) + 1):
        path.write_bytes(data[:cut])
        recorded = resume_records(path, grouped=False, top_k=1)
        kept = sum(end <= cut for end in ends[1:])
        assert list(recorded) == [record["path"] for record in records[:kept]], f"cut at byte {cut}"
        assert path.read_bytes() == (data[: ends[kept]] if cut >= ends[0] else b""), f"cut at byte {cut}"


def test_recorded_keys_say_which_records_failed(tmp_path):
    path = tmp_path / "results.csv"
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}, {"path": "/b.jpg", "error": "unreadable"}])

    assert resume_records(path, grouped=False, top_k=1) == {"/a.jpg": True, "/b.jpg": False}


def test_a_killed_header_is_rewritten_before_the_first_record(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("path,coun")

    assert resume_records(path, grouped=False, top_k=1) == {}
    write_records(path, [{"path": "/a.jpg", "answers": [ANSWER]}])

    assert path.read_text().splitlines()[0].startswith("path,country_1,")
    assert resume_records(path, grouped=False, top_k=1) == {"/a.jpg": True}


@pytest.mark.parametrize("extension", ["jsonl", "csv"])
def test_file_names_that_are_not_utf8_round_trip(tmp_path, extension):
    path = tmp_path / f"results.{extension}"
    name = "/photos/caf\udce9.jpg"  # how Python spells a Latin-1 file name on a UTF-8 system

    write_records(path, [{"path": name, "answers": [ANSWER]}])

    assert resume_records(path, grouped=False, top_k=1) == {name: True}


def test_group_records_keep_their_member_paths(tmp_path):
    path = tmp_path / "places.csv"
    write_records(
        path, [{"group": "pano1", "paths": ["/p/pano1_h0.jpg", "/p/pano1_h90.jpg"], "answers": [ANSWER]}], True
    )

    assert path.read_text().splitlines()[1].startswith('pano1,"[""/p/pano1_h0.jpg"", ""/p/pano1_h90.jpg""]",Japan,')
    assert resume_records(path, grouped=True, top_k=1) == {"pano1": True}


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
    path.write_text(content)

    with pytest.raises(ResultFileError, match=message):
        resume_records(path, grouped=False, top_k=1)
    assert path.read_text() == content
