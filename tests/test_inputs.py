"""Specification of `modeling_streetclip.app.inputs`: what `streetclip locate` is asked to read, found before any model
loads."""

import io
import os
import re

import pytest

from modeling_streetclip.app import UsageError
from modeling_streetclip.app.inputs import expand_inputs, group_pattern, group_views


def test_files_folders_patterns_and_stdin_give_absolute_paths_once_in_order_of_first_mention(tmp_path, monkeypatch):
    for name in ("b.jpg", "a.png", "notes.txt", "sub/c.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    stdin = io.StringIO("missing.jpg\n\nb.jpg\n")

    paths = expand_inputs(["notes.txt", ".", "*.jpg", "-", "https://example.com/x.jpg"], False, stdin)

    absolute = [os.path.join(str(tmp_path), name) for name in ("notes.txt", "a.png", "b.jpg", "missing.jpg")]
    assert paths == [*absolute, "https://example.com/x.jpg"]  # a folder gives its images only, sorted
    assert expand_inputs(["."], True, stdin)[-1] == os.path.join(str(tmp_path), "sub", "c.jpg")


def test_a_named_path_that_does_not_exist_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match=re.escape(f"no such file or folder: {str(tmp_path / 'nope')!r}")):
        expand_inputs([str(tmp_path / "nope")], False, io.StringIO())


def test_views_group_by_capture_group_one_and_an_unmatched_path_is_its_own_group(caplog):
    paths = ["/p/pano1_h0.jpg", "/p/other.jpg", "/p/pano1_h90.jpg"]

    groups = group_views(paths, group_pattern(r"(pano\d+)_h"))

    assert groups == [("pano1", ["/p/pano1_h0.jpg", "/p/pano1_h90.jpg"]), ("/p/other.jpg", ["/p/other.jpg"])]
    assert "does not match 1 of 3 inputs (e.g. '/p/other.jpg')" in caplog.text


@pytest.mark.parametrize(("regex", "problem"), [("(pano", "not a valid regular expression"), ("pano", "no capture")])
def test_a_group_pattern_without_a_capture_group_is_refused(regex, problem):
    with pytest.raises(UsageError, match=f"--group_by '{re.escape(regex)}' (is|has) {problem}"):
        group_pattern(regex)
