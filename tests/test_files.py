"""Specification of `modeling_streetclip.app.files`: a file or folder is replaced whole or not at all."""

import json
import os

import pytest

from modeling_streetclip.app.files import atomic_write, write_json


def test_a_file_is_replaced_by_what_the_block_wrote_and_flushed_to_disk(tmp_path, monkeypatch):
    path = tmp_path / "options.json"
    path.write_text("old")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    with atomic_write(path) as temporary:
        temporary.write_text("new")
        assert path.read_text() == "old"

    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["options.json"]
    assert len(synced) == 2  # the file, then its folder's entry


def test_a_folder_replaces_a_folder_and_the_old_one_goes(tmp_path):
    path = tmp_path / "dataset"
    path.mkdir()
    (path / "old.arrow").write_text("old")

    with atomic_write(path) as temporary:
        (temporary / "nested").mkdir(parents=True)
        (temporary / "nested" / "new.arrow").write_text("new")

    assert [str(p.relative_to(path)) for p in sorted(path.rglob("*"))] == ["nested", "nested/new.arrow"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]


@pytest.mark.parametrize("failing", ["the block", "the rename"])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch, failing):
    path = tmp_path / "part.parquet"
    path.write_text("old")
    if failing == "the rename":
        monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left")))

    with pytest.raises(OSError, match="No space left"):
        with atomic_write(path) as temporary:
            temporary.write_text("half")
            if failing == "the block":
                raise OSError(28, "No space left")

    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.parquet"]


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_temporary_left_by_a_killed_writer_is_removed_first(tmp_path, kind):
    path = tmp_path / "index.faiss"
    leftover = tmp_path / "index.faiss.tmp"
    if kind == "folder":
        leftover.mkdir()
        (leftover / "half").write_text("x")
    else:
        leftover.write_text("half")

    with atomic_write(path) as temporary:
        assert not temporary.exists()
        temporary.write_text("whole")

    assert path.read_text() == "whole" and not leftover.exists()


def test_json_is_written_whole_and_values_json_cannot_hold_are_refused_before_the_old_file_is_touched(tmp_path):
    path = tmp_path / "gallery.json"
    write_json(path, {"rows": 3, "name": "Zürich"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"rows": 3, "name": "Zürich"}

    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json(path, {"rows": float("nan")})
    assert json.loads(path.read_text(encoding="utf-8")) == {"rows": 3, "name": "Zürich"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.json"]
