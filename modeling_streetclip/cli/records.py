"""Result files of `streetclip locate`: JSON Lines or CSV, one complete record per line, resumable after a kill.

A record counts as written once its closing newline is. `open_records` takes an exclusive lock on the file (a second
run on the same output stops at once), checks that the options which shape answers are those that wrote it, cuts off
a partial last record (the trace of a killed run) and returns a writer that knows the keys already recorded, so a
rerun of the same command skips them and every input ends up in the file exactly once. The writer writes each record
whole (a short write is continued, a failed one is cut off again and stops the run), and fsyncs every
FSYNC_INTERVAL_S.

A record is a dict: `path` (or, for pooled views, `group` and its member `paths`), then either `answers` (the
pipeline's dicts, best first) or `error`. CSV flattens the answers into rank-suffixed columns (`country_1`, `city_1`,
..., `country_2`, ...), one row per record, so that a row is a whole record and resuming never meets half an answer
list. Text cells that a spreadsheet would take for a formula are written as text (see `spreadsheet_safe`).

The options that wrote a file live beside it, in OUTPUT.options.json (a sidecar rather than a first record, so that
every line of OUTPUT stays a record and every CSV reader sees a plain table).
"""

import csv
import errno
import io
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


try:
    import fcntl
except ImportError:  # Windows: runs on one output are not locked against each other there
    fcntl = None

# The answer fields of the pipeline contract (see `GeolocationPipeline`), in CSV column order.
ANSWER_FIELDS = ("country", "country_code", "city", "latitude", "longitude", "score", "country_score")
# A record written to the file survives a killed process; fsync guards against a crashed machine too, at a cost
# (milliseconds per call) that a million-record run cannot pay per record.
FSYNC_INTERVAL_S = 10.0
# File names that are not valid UTF-8 reach Python as surrogate escapes; they round-trip as the bytes they are.
_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
# First characters that make a spreadsheet evaluate a cell (OWASP, "CSV Injection"), and the apostrophe that
# `spreadsheet_safe` puts before them; a cell starting with an apostrophe gets one too, so that the escape reverses.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_TEXT_MARK = "'"


class ResultFileError(ValueError):
    """An output file this run cannot write or resume; the message names the file and what would be accepted."""


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that spreadsheets show as text instead of evaluating (OWASP's defence against CSV injection).

    A string that starts with `= + - @`, a tab or a carriage return gets a leading apostrophe, which spreadsheets
    hide; so does one that starts with an apostrophe, so that reading a cell back (drop one leading apostrophe) gives
    the value exactly. Numbers and other values pass unchanged: `-33.9` stays a number.
    """
    if isinstance(value, str) and value.startswith((*_FORMULA_STARTS, _TEXT_MARK)):
        return _TEXT_MARK + value
    return value


def _from_spreadsheet_safe(cell: str) -> str:
    """The value that `spreadsheet_safe` wrote as `cell`."""
    return cell[1:] if cell.startswith(_TEXT_MARK) else cell


class _Lines:
    """The complete (newline-terminated) lines of a binary stream, decoded, read one at a time.

    `end` is the byte offset just after the last line handed out; `exhausted` says that nothing complete follows it
    (the stream ended, or a partial line without its newline is all that is left).
    """

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.end = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[str]:
        for line in self.stream:
            if not line.endswith(b"\n"):
                break
            self.end += len(line)
            yield line.decode(**_ENCODING)
        self.exhausted = True


class _JsonLines:
    """One JSON object per line; `json.dumps` escapes newlines and non-ASCII, so a record never spans lines."""

    def __init__(self, key: str):
        self.key = key

    def header(self) -> str:
        return ""

    def format(self, record: dict[str, Any]) -> str:
        return json.dumps(record) + "\n"

    def read(self, lines: _Lines, path: Path) -> tuple[dict[str, bool], int]:
        """The records of `lines` as {key: succeeded}, and the byte offset where the complete records end."""
        recorded = {}
        for number, line in enumerate(lines, start=1):
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
        return recorded, lines.end


class _Csv:
    """A header row, then one row per record: the key, member paths (a JSON list) for groups, `top_k` rank-suffixed
    answer column sets (empty where a record has fewer answers) and `error`.

    Rows end in CRLF, as RFC 4180 has it: with that terminator the csv module quotes every field holding a CR or LF,
    so a file name with a carriage return stays inside its row.
    """

    def __init__(self, key: str, top_k: int):
        self.key = key
        self.columns = [key] + (["paths"] if key == "group" else [])
        self.columns += [f"{field}_{rank}" for rank in range(1, top_k + 1) for field in ANSWER_FIELDS]
        self.columns.append("error")
        self.top_k = top_k

    def _row(self, values: list[Any]) -> str:
        line = io.StringIO()
        csv.writer(line).writerow([spreadsheet_safe(value) for value in values])
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

    def read(self, lines: _Lines, path: Path) -> tuple[dict[str, bool], int]:
        """The records of `lines` as {key: succeeded}, and the byte offset where the complete records end."""
        reader = csv.reader(lines, strict=True)
        recorded, complete = {}, 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                if lines.exhausted:
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
                recorded[_from_spreadsheet_safe(row[0])] = row[-1] == ""
            complete = lines.end
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


def options_path(path: Path) -> Path:
    """The sidecar file that records the options which wrote `path`: `path` + ".options.json"."""
    return path.with_name(path.name + ".options.json")


def _check_options(path: Path, options: dict[str, Any]) -> None:
    """Refuse to add to `path` unless its sidecar records exactly `options`, naming each option that differs."""
    sidecar = options_path(path)
    advice = "pass --overwrite to start afresh, or write to a new --output file"
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))["options"]
    except FileNotFoundError:
        raise ResultFileError(
            f"{str(path)!r} is not empty, but the record of the options that wrote it is missing ({str(sidecar)!r}: "
            f"an earlier version of streetclip or another program wrote it); {advice}."
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ResultFileError(
            f"cannot read the options of {str(path)!r} from {str(sidecar)!r} ({error}); {advice}."
        ) from None
    differing = [name for name in sorted(recorded.keys() | options.keys()) if recorded.get(name) != options.get(name)]
    if differing:
        changes = "; ".join(
            f"--{name} was {_shown(recorded.get(name))}, now {_shown(options.get(name))}" for name in differing
        )
        raise ResultFileError(
            f"{str(path)!r} was written with other options ({changes}). Rerun with the options that wrote it to "
            f"resume, {advice}."
        )


def _shown(value: Any) -> str:
    """An option's value for a one-line message: "not given" for a missing one, long lists cut short."""
    if value is None:
        return "not given"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _write_options(path: Path, options: dict[str, Any]) -> None:
    """Record `options` beside `path`, atomically (a temporary file renamed over the sidecar)."""
    sidecar = options_path(path)
    temporary = sidecar.with_name(sidecar.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        json.dump({"written_by": "streetclip locate", "options": options}, stream, indent=2)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, sidecar)


class RecordWriter:
    """Appends records to an output file (a locked file descriptor) or to standard output, each record whole.

    `recorded` holds the keys an earlier run wrote to the file, as {key: succeeded}. A write that fails (a full disk,
    an I/O error) cuts the file back to its last complete record and raises `ResultFileError`, so that the run stops
    with the file resumable.
    """

    def __init__(self, file_format: _JsonLines | _Csv, fd: int | None = None, path: Path | None = None):
        self.file_format = file_format
        self.fd = fd
        self.path = path
        self.name = "standard output" if fd is None else f"--output {str(path)!r}"
        self.recorded: dict[str, bool] = {}
        self.size = os.fstat(fd).st_size if fd is not None else 0
        self.last_sync = time.monotonic()
        self.unsynced = False  # bytes written since the last fsync

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; it is whole in the file (or not there at all) when this returns or raises."""
        self._write(self.file_format.format(record).encode(**_ENCODING))

    def _write(self, data: bytes) -> None:
        if self.fd is None:
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            except BrokenPipeError:
                raise  # the reader went away: the command's own exit status says so
            except OSError as error:
                raise ResultFileError(f"cannot write to {self.name}: {error}.") from None
            return
        try:
            remaining = memoryview(data)
            while remaining:
                written = os.write(self.fd, remaining)
                if written == 0:  # never for a regular file, but a loop that cannot advance must not spin
                    raise OSError(errno.EIO, "the system wrote 0 bytes")
                remaining = remaining[written:]
            self.unsynced = True
            if time.monotonic() - self.last_sync >= FSYNC_INTERVAL_S:
                os.fsync(self.fd)
                self.last_sync, self.unsynced = time.monotonic(), False
        except OSError as error:
            self._fail(error)
        self.size += len(data)

    def _fail(self, error: OSError) -> None:
        """Cut off the part of a record that made it before `error`, then stop the run naming the file."""
        try:
            os.ftruncate(self.fd, self.size)
        except OSError:
            pass  # the next run's resume cuts the partial line off instead
        raise ResultFileError(
            f"cannot write to {self.name}: {error.strerror or error}; the {self.size:,} bytes of complete records "
            "before it are kept. Rerun the same command to resume once the cause is fixed."
        ) from None

    def close(self) -> None:
        """Flush the records to disk and release the file (and its lock)."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.unsynced:
                os.fsync(fd)
        except OSError as error:
            raise ResultFileError(f"cannot write to {self.name}: {error.strerror or error}.") from None
        finally:
            os.close(fd)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_records(
    path: Path | None,
    grouped: bool,
    top_k: int,
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> RecordWriter:
    """A writer that appends to `path`, resuming what an earlier run with the same `options` wrote there; standard
    output (`path=None`) gets JSON Lines, without resume.

    Everything that could stop the run at the file is checked here, before a model loads: the extension, the folder,
    that `path` is a regular file this process may write, that no other run holds it, and that the options recorded
    beside it (see `options_path`) equal `options` (options whose value is None are left out, so that an option added
    later, with None meaning the earlier behaviour, keeps older files resumable). `overwrite` empties the file
    instead. A new or emptied file starts with its options sidecar and the CSV header.
    """
    file_format = _file_format(path, grouped, top_k)
    if path is None:
        return RecordWriter(file_format)
    options = json.loads(json.dumps({name: value for name, value in (options or {}).items() if value is not None}))
    if not path.parent.is_dir():
        raise ResultFileError(f"The folder of --output {str(path)!r} does not exist.")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"
        raise ResultFileError(
            f"--output {str(path)!r} is {kind}; results need a regular file, new or written by this command."
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as error:
        raise ResultFileError(f"cannot open --output {str(path)!r} for writing: {error.strerror or error}.") from None
    try:
        _lock(fd, path)
        recorded_options = not overwrite and os.fstat(fd).st_size > 0
        if overwrite:
            os.ftruncate(fd, 0)
        elif recorded_options:
            _check_options(path, options)
        writer = RecordWriter(file_format, fd, path)
        with os.fdopen(os.dup(fd), "rb") as stream:  # a duplicate shares the offset, which appends ignore
            stream.seek(0)
            writer.recorded, complete = file_format.read(_Lines(stream), path)
        if complete < writer.size:
            os.ftruncate(fd, complete)  # a partial record, or a CSV header, cut off by a kill
            writer.size = complete
        if complete == 0:
            if not recorded_options:  # (a file checked above has them recorded already)
                _write_options(path, options)
            writer._write(file_format.header().encode(**_ENCODING))
    except OSError as error:
        os.close(fd)
        raise ResultFileError(f"cannot prepare --output {str(path)!r}: {error}.") from None
    except BaseException:
        os.close(fd)
        raise
    return writer


def _lock(fd: int, path: Path) -> None:
    """Hold an exclusive lock on the open output until it is closed (the system drops it if the process dies)."""
    if fcntl is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ResultFileError(
            f"another run is writing {str(path)!r}; wait for it to finish, or write to another --output file."
        ) from None


__all__ = [
    "ANSWER_FIELDS",
    "RecordWriter",
    "ResultFileError",
    "open_records",
    "options_path",
    "spreadsheet_safe",
]
