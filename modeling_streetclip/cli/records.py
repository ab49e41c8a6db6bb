"""Result files of `streetclip locate`: JSON Lines or CSV, one complete record per line, resumable after a kill.

A record counts as written once its closing newline is. Each record goes to the file in one unbuffered `write` call, so
a killed process leaves only complete records; should a crashed machine leave part of one, `resume_records` cuts that
partial line off. It returns the keys already recorded, so a rerun of the same command skips them and every input ends
up in the file exactly once.

A record is a dict: `path` (or, for pooled views, `group` and its member `paths`), then either `answers` (the
pipeline's dicts, best first) or `error`. CSV flattens the answers into rank-suffixed columns (`country_1`, `city_1`,
..., `country_2`, ...), one row per record, so that a row is a whole record and resuming never meets half an answer
list.
"""

import csv
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO


# The answer fields of the pipeline contract (see `GeolocationPipeline`), in CSV column order.
ANSWER_FIELDS = ("country", "country_code", "city", "latitude", "longitude", "score", "country_score")
# A record written to the file survives a killed process; fsync guards against a crashed machine too, at a cost
# (milliseconds per call) that a million-record run cannot pay per record.
FSYNC_INTERVAL_S = 10.0
# File names that are not valid UTF-8 reach Python as surrogate escapes; they round-trip as the bytes they are.
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}


class ResultFileError(ValueError):
    """An output file this run cannot write or resume; the message names the file and what would be accepted."""


class _JsonLines:
    """One JSON object per line; `json.dumps` escapes newlines and non-ASCII, so a record never spans lines."""

    def __init__(self, key: str):
        self.key = key

    def header(self) -> str:
        return ""

    def format(self, record: dict[str, Any]) -> str:
        return json.dumps(record) + "\n"

    def read(self, text: str, path: Path) -> tuple[dict[str, bool], int]:
        recorded = {}
        for number, line in enumerate(text.split("\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ResultFileError(
                    f"{str(path)!r} line {number} is not a JSON record ({error}); resume needs a file this command "
                    "wrote. Write to a new --output file."
                ) from None
            if not isinstance(record, dict) or self.key not in record:
                raise ResultFileError(
                    f"{str(path)!r} line {number} has no {self.key!r} field: it was written by another kind of run "
                    "(with or without --group_by). Write to a new --output file."
                )
            recorded[record[self.key]] = "error" not in record
        return recorded, len(text)


class _Csv:
    """A header row, then one row per record: the key, member paths (a JSON list) for groups, `top_k` rank-suffixed
    answer column sets (empty where a record has fewer answers) and `error`."""

    def __init__(self, key: str, top_k: int):
        self.key = key
        self.columns = [key] + (["paths"] if key == "group" else [])
        self.columns += [f"{field}_{rank}" for rank in range(1, top_k + 1) for field in ANSWER_FIELDS]
        self.columns.append("error")
        self.top_k = top_k

    def _row(self, values: list[Any]) -> str:
        line = io.StringIO()
        csv.writer(line, lineterminator="\n").writerow(values)
        return line.getvalue()

    def header(self) -> str:
        return self._row(self.columns)

    def format(self, record: dict[str, Any]) -> str:
        values = [record[self.key]] + ([json.dumps(record["paths"])] if self.key == "group" else [])
        answers = record.get("answers", [])
        for rank in range(self.top_k):
            answer = answers[rank] if rank < len(answers) else dict.fromkeys(ANSWER_FIELDS, "")
            values += [answer[field] for field in ANSWER_FIELDS]
        values.append(record.get("error", ""))
        return self._row(values)

    def read(self, text: str, path: Path) -> tuple[dict[str, bool], int]:
        lines = io.StringIO(text)
        reader = csv.reader(iter(lines.readline, ""), strict=True)
        recorded, complete = {}, 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                if lines.tell() == len(text):
                    break  # a quoted field cut off by the kill: the partial record ends the file
                raise ResultFileError(f"{str(path)!r} row {reader.line_num} is malformed CSV ({error}).") from None
            if reader.line_num == 1 and row != self.columns:
                raise ResultFileError(
                    f"{str(path)!r} has the columns {row}, but this run writes {self.columns} (the options --top_k "
                    "and --group_by decide them). Rerun with the options that wrote it, or write to a new file."
                )
            if len(row) != len(self.columns):
                raise ResultFileError(
                    f"{str(path)!r} row {reader.line_num} has {len(row)} fields where the header has "
                    f"{len(self.columns)}; resume needs a file this command wrote. Write to a new --output file."
                )
            if reader.line_num > 1:
                recorded[row[0]] = row[-1] == ""
            complete = lines.tell()
        return recorded, complete


def _file_format(path: Path | None, grouped: bool, top_k: int) -> _JsonLines | _Csv:
    """The format of an output file by its extension; standard output (`path=None`) gets JSON Lines."""
    key = "group" if grouped else "path"
    suffix = ".jsonl" if path is None else path.suffix.lower()
    if suffix == ".jsonl":
        return _JsonLines(key)
    if suffix == ".csv":
        return _Csv(key, top_k)
    raise ResultFileError(
        f"Cannot tell the format of --output {str(path)!r} from its extension; use .jsonl (JSON Lines) or .csv."
    )


def resume_records(path: Path, grouped: bool, top_k: int) -> dict[str, bool]:
    """The records already in `path`, as {key: succeeded}, after cutting off a partial last record (the trace of a
    killed run); an empty dict when the file does not exist yet."""
    file_format = _file_format(path, grouped, top_k)
    if not path.parent.is_dir():
        raise ResultFileError(f"The folder of --output {str(path)!r} does not exist.")
    if not path.exists():
        return {}
    with path.open("rb") as stream:
        data = stream.read()
    # Every record, and the CSV header, ends with a newline: anything after the last one is a partial record.
    text = data[: data.rfind(b"\n") + 1].decode(**_ENCODING)
    recorded, complete = file_format.read(text, path)
    complete_bytes = len(text[:complete].encode(**_ENCODING))
    if complete_bytes < len(data):
        os.truncate(path, complete_bytes)
    return recorded


class RecordWriter:
    """Appends records to a binary stream, each in one write call and flushed at once; fsyncs files every
    FSYNC_INTERVAL_S."""

    def __init__(self, stream: BinaryIO, file_format: _JsonLines | _Csv, is_file: bool):
        self.stream = stream
        self.file_format = file_format
        self.is_file = is_file
        self.last_sync = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(self.file_format.format(record).encode(**_ENCODING))
        self.stream.flush()
        if self.is_file and time.monotonic() - self.last_sync >= FSYNC_INTERVAL_S:
            os.fsync(self.stream.fileno())
            self.last_sync = time.monotonic()

    def close(self) -> None:
        self.stream.flush()
        if self.is_file:
            os.fsync(self.stream.fileno())
            self.stream.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_records(path: Path | None, grouped: bool, top_k: int) -> RecordWriter:
    """A writer that appends to `path` (after `resume_records`), starting a new or empty CSV file with its header;
    standard output (`path=None`) gets JSON Lines."""
    file_format = _file_format(path, grouped, top_k)
    if path is None:
        return RecordWriter(sys.stdout.buffer, file_format, is_file=False)
    # Unbuffered, so that each record reaches the file in the single write call that `RecordWriter.write` makes.
    stream = path.open("ab", buffering=0)
    if stream.tell() == 0:
        stream.write(file_format.header().encode(**_ENCODING))
    return RecordWriter(stream, file_format, is_file=True)


__all__ = ["ANSWER_FIELDS", "RecordWriter", "ResultFileError", "open_records", "resume_records"]
