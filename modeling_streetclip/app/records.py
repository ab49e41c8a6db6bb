"""Result files of `streetclip locate`: JSON Lines, CSV or Parquet, resumable after a kill.

A record counts as written once its closing newline is. `open_records` takes an exclusive lock on the file (a second
run on the same output stops at once), checks that the options which shape answers are those that wrote it, cuts off
a partial last record (the trace of a killed run) and returns a writer that knows the keys already recorded, so a
rerun of the same command skips them and every input ends up in the file exactly once. The writer writes each record
whole (a short write is continued, a failed one is cut off again and stops the run), and fsyncs every
FSYNC_INTERVAL_S.

A record is a dict: its key, `path` (or, for pooled views, `group` and its member `paths`; for the rows of a dataset,
the id column, named as there), then either `answers` (the pipeline's dicts, best first) or `error`. CSV flattens the answers into rank-suffixed columns (`country_1`, `city_1`,
..., `country_2`, ...), one row per record, so that a row is a whole record and resuming never meets half an answer
list. Text cells that a spreadsheet would take for a formula are written as text (see `spreadsheet_safe`).

Every format holds valid UTF-8, with one spelling of a file name whose bytes are not UTF-8 (Python hands such a name
over with surrogate escapes): each such byte as a backslash escape, `\\xff` (see `storable`). Resume finds an input
by that spelling.

The options that wrote a file live beside it, in OUTPUT.options.json (a sidecar rather than a first record, so that
every line of OUTPUT stays a record and every CSV reader sees a plain table).

Parquet has no lines to append: a file is whole only once its footer is written. So a Parquet run writes its records
as complete part files, one every FSYNC_INTERVAL_S (or PARQUET_PART_ROWS records), into the folder
OUTPUT.parts/, which it holds the lock on; closing the writer merges OUTPUT and the parts into a new OUTPUT (each
part a row group, renamed into place) and removes the folder. A killed run leaves its parts; the rerun reads their
keys with those of OUTPUT, and merges them all when it ends. See `ParquetRecordWriter`.
"""

import csv
import errno
import io
import json
import logging
import os
import shutil
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
ANSWER_FIELDS = (
    "label",
    "country",
    "country_code",
    "region",
    "city",
    "latitude",
    "longitude",
    "score",
    "country_score",
    "region_score",
    "joint_probability",
    "expected_distance_km",
)
# The answer fields only a model with a region level gives, and the one only the expected-distance decision gives;
# other answers leave them empty (CSV) or null (Parquet).
REGION_FIELDS = ("region", "region_score")
DECISION_FIELDS = ("expected_distance_km",)
# A record written to the file survives a killed process; fsync guards against a crashed machine too, at a cost
# (milliseconds per call) that a million-record run cannot pay per record.
FSYNC_INTERVAL_S = 10.0
# A Parquet part is written at least every FSYNC_INTERVAL_S, and sooner after this many records: a row group of
# 10,000 small records is a few hundred kB, large enough to read fast, small enough to hold in memory.
PARQUET_PART_ROWS = 10_000
# The longest line a resumed file may hold. A record with top_k answers over the largest candidate table, or a
# group of many thousand views, stays far below it; a longer line is the unfinished tail of a killed run (or not a
# record at all), and reading it whole could take any amount of memory.
MAX_RECORD_BYTES = 64 * 1024 * 1024
# First characters that make a spreadsheet evaluate a cell (OWASP, "CSV Injection"), and the apostrophe that
# `spreadsheet_safe` puts before them; a cell starting with an apostrophe gets one too, so that the escape reverses.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_TEXT_MARK = "'"


logger = logging.getLogger(__name__)


# How a recorded option that is no command-line option of its own is named in messages.
_OPTION_LABELS = {"model_weights": "the fingerprint of --model's weights"}


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


def storable(text: str) -> str:
    """`text` as result files hold it, valid UTF-8: the bytes of a file name that are not UTF-8, which reach Python
    as surrogate escapes, become backslash escapes (`\\xff`), alike in JSON Lines, CSV and Parquet; other text is
    unchanged."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _storable_record(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with its key, member paths and error `storable` (answers hold candidate names, valid already)."""
    stored = dict(record)
    for field, value in record.items():
        if isinstance(value, str):
            stored[field] = storable(value)
    if "paths" in record:
        stored["paths"] = [storable(path) for path in record["paths"]]
    return stored


class _StoredKeys(dict):
    """{key: succeeded} as a file stores its keys; a key is looked up by its stored form (`storable`)."""

    def __contains__(self, key: object) -> bool:
        return super().__contains__(storable(key) if isinstance(key, str) else key)

    def __getitem__(self, key: str) -> bool:
        return super().__getitem__(storable(key))


class _Lines:
    """The complete (newline-terminated) lines of a binary stream, decoded, read one at a time, each within
    MAX_RECORD_BYTES of memory.

    `end` is the byte offset just after the last line handed out; `exhausted` says that nothing complete follows it
    (the stream ended, or a partial line without its newline is all that is left, however long). A complete line
    longer than MAX_RECORD_BYTES is refused: no run of this command writes one.
    """

    def __init__(self, stream: BinaryIO, path: Path):
        self.stream = stream
        self.path = path
        self.end = 0
        self.exhausted = False

    def __iter__(self) -> Iterator[str]:
        while line := self.stream.readline(MAX_RECORD_BYTES):
            if not line.endswith(b"\n"):
                if len(line) == MAX_RECORD_BYTES and self._newline_follows():
                    raise ResultFileError(
                        f"{str(self.path)!r} has a line of over {MAX_RECORD_BYTES:,} bytes after byte {self.end:,}; "
                        "no record this command writes is that long. Write to a new --output file."
                    )
                break
            self.end += len(line)
            # Older files may hold a name's raw bytes; `storable` keys find them.
            yield line.decode("utf-8", "surrogateescape")
        self.exhausted = True

    def _newline_follows(self) -> bool:
        """Whether the rest of the stream holds a newline, read a block at a time."""
        while block := self.stream.read(1024 * 1024):
            if b"\n" in block:
                return True
        return False


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
        recorded = _StoredKeys()
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
            if not isinstance(record, dict) or not isinstance(record.get(self.key), str):
                raise ResultFileError(
                    f"{str(path)!r} line {number} has no {self.key!r} field: it was written by another kind of run "
                    "(with or without --group_by, from files or from a --dataset with another id column). Write to a "
                    "new --output file."
                )
            recorded[storable(record[self.key])] = "error" not in record
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
            answer = answers[rank] if rank < len(answers) else {}
            values += [answer.get(field, "") for field in ANSWER_FIELDS]
        values.append(record.get("error", ""))
        return self._row(values)

    def read(self, lines: _Lines, path: Path) -> tuple[dict[str, bool], int]:
        """The records of `lines` as {key: succeeded}, and the byte offset where the complete records end."""
        reader = csv.reader(lines, strict=True)
        recorded, complete = _StoredKeys(), 0
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
                    f"{str(path)!r} has the columns {row}, but this run writes {self.columns} (the options --top_k, "
                    "--group_by and --dataset's id column decide them). Rerun with the options that wrote it, or write "
                    "to a new file."
                )
            if len(row) != len(self.columns):
                raise ResultFileError(
                    f"{str(path)!r} row {reader.line_num} has {len(row)} fields where the header has "
                    f"{len(self.columns)}; resume needs a file this command wrote. Write to a new --output file."
                )
            if reader.line_num > 1:
                recorded[storable(_from_spreadsheet_safe(row[0]))] = row[-1] == ""
            complete = lines.end
        return recorded, complete


def _file_format(path: Path | None, key: str, top_k: int) -> _JsonLines | _Csv:
    """The line format of an output file by its extension; standard output (`path=None`) gets JSON Lines."""
    suffix = ".jsonl" if path is None else path.suffix.lower()
    if suffix == ".jsonl":
        return _JsonLines(key)
    if suffix == ".csv":
        return _Csv(key, top_k)
    raise ResultFileError(
        f"Cannot tell the format of --output {str(path)!r} from its extension; use .jsonl (JSON Lines), .csv or "
        ".parquet."
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
            f"{_OPTION_LABELS.get(name, '--' + name)} was {_shown(recorded.get(name), name)}, now "
            f"{_shown(options.get(name), name)}"
            for name in differing
        )
        raise ResultFileError(
            f"{str(path)!r} was written with other options ({changes}). Rerun with the options that wrote it to "
            f"resume, {advice}."
        )


def _shown(value: Any, name: str) -> str:
    """An option's value for a one-line message: "not given" for a missing one ("not recorded" for one that is not
    an option of its own, which an earlier version did not record), long lists cut short."""
    if value is None:
        return "not recorded" if name in _OPTION_LABELS else "not given"
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
        self.recorded: dict[str, bool] = _StoredKeys()
        self.size = os.fstat(fd).st_size if fd is not None else 0
        self.last_sync = time.monotonic()
        self.unsynced = False  # bytes written since the last fsync

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; it is whole in the file (or not there at all) when this returns or raises."""
        self._write(self.file_format.format(_storable_record(record)).encode("utf-8"))

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
    key: str | None = None,
) -> "RecordWriter | ParquetRecordWriter":
    """A writer that adds to `path`, resuming what an earlier run with the same `options` wrote there; standard
    output (`path=None`) gets JSON Lines, without resume.

    Everything that could stop the run at the file is checked here, before a model loads: the extension, the folder,
    that `path` is a regular file this process may write, that no other run holds it, and that the options recorded
    beside it (see `options_path`) equal `options` (options whose value is None are left out, so that an option added
    later, with None meaning the earlier behaviour, keeps older files resumable). `overwrite` empties the file
    instead. A new or emptied file starts with its options sidecar and the CSV header. `key` names the field that
    identifies a record: `path` by default, `group` when `grouped`, a dataset's id column for its rows.
    """
    key = key or ("group" if grouped else "path")
    if path is not None and path.suffix.lower() == ".parquet":
        _check_output_path(path)
        return ParquetRecordWriter.open(path, key, grouped, _recordable(options), overwrite)
    file_format = _file_format(path, key, top_k)
    if path is None:
        return RecordWriter(file_format)
    options = _recordable(options)
    _check_output_path(path)
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
            writer.recorded, complete = file_format.read(_Lines(stream, path), path)
        if complete < writer.size:
            # A partial record, or a CSV header, cut off by a kill: said, since the bytes go.
            logger.warning(
                f"streetclip locate: {str(path)!r} ends in an incomplete record ({writer.size - complete:,} bytes "
                f"after the last complete one, at byte {complete:,}), as a killed run leaves it; it is cut off and "
                "its input done again."
            )
            os.ftruncate(fd, complete)
            writer.size = complete
        if complete == 0:
            if not recorded_options:  # (a file checked above has them recorded already)
                _write_options(path, options)
            writer._write(file_format.header().encode("utf-8"))
    except OSError as error:
        os.close(fd)
        raise ResultFileError(f"cannot prepare --output {str(path)!r}: {error}.") from None
    except BaseException:
        os.close(fd)
        raise
    return writer


def _recordable(options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` as the sidecar records them: without the None values, as JSON gives them back (tuples as lists)."""
    return json.loads(json.dumps({name: value for name, value in (options or {}).items() if value is not None}))


def _check_output_path(path: Path) -> None:
    """Refuse an output whose folder is missing, or that exists and is not a regular file."""
    if not path.parent.is_dir():
        raise ResultFileError(f"The folder of --output {str(path)!r} does not exist.")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"
        raise ResultFileError(
            f"--output {str(path)!r} is {kind}; results need a regular file, new or written by this command."
        )


def _import_parquet():
    """pyarrow and its Parquet module, or a ResultFileError naming the extras that provide them."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ResultFileError(
            f"Parquet output needs the `pyarrow` package ({error}); install it with `pip install pyarrow`, or with "
            "the evaluation extra: `pip install 'streetclip[eval]'`. JSON Lines and CSV need nothing more."
        ) from None
    return pa, pq


def parquet_schema(key: str, grouped: bool):
    """The Parquet schema of `streetclip locate` records: the key, member `paths` for groups, `answers` as a list of
    structs with ANSWER_FIELDS (null for a failed input) and `error` (null for a geolocated one)."""
    pa, _ = _import_parquet()
    answer = pa.struct(
        [
            (field, pa.string() if field in ("label", "country", "country_code", "region", "city") else pa.float64())
            for field in ANSWER_FIELDS
        ]
    )
    paths = [("paths", pa.list_(pa.string()))] if grouped else []
    return pa.schema([(key, pa.string()), *paths, ("answers", pa.list_(answer)), ("error", pa.string())])


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetRecordWriter:
    """Writes records to a Parquet file through complete part files, merged into it by `close`.

    Records gather in memory and go to OUTPUT.parts/part-NNNNNN.parquet (written as .tmp, then renamed, so that a
    part is whole or absent) every FSYNC_INTERVAL_S or PARQUET_PART_ROWS records; a kill loses at most those
    unwritten records, which the rerun does again. `close` merges OUTPUT and the parts into OUTPUT.parts/merged.tmp,
    renames it over OUTPUT and removes the folder; a part left behind by a kill between those two steps holds only
    keys that OUTPUT holds, and the next `open` deletes it. The lock is on the parts folder, which lives exactly as
    long as a run. `recorded` holds the keys of OUTPUT and of the parts, as {key: succeeded}.
    """

    def __init__(self, path: Path, key: str, grouped: bool, lock_fd: int, parts: Path):
        self.path = path
        self.key = key
        self.grouped = grouped
        self.schema = parquet_schema(key, grouped)
        self.lock_fd: int | None = lock_fd
        self.parts = parts
        self.name = f"--output {str(path)!r}"
        self.recorded: dict[str, bool] = _StoredKeys()
        self.rows: list[dict[str, Any]] = []
        self.next_part = 0
        self.last_flush = time.monotonic()
        self.failed = False

    @classmethod
    def open(cls, path: Path, key: str, grouped: bool, options: dict[str, Any], overwrite: bool):
        """Lock `path`'s parts folder, check the options and columns of what is there, and read its keys."""
        _import_parquet()
        parts = path.with_name(path.name + ".parts")
        created = not parts.exists()
        try:
            parts.mkdir(exist_ok=True)
            fd = os.open(parts, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise ResultFileError(
                f"cannot open --output {str(path)!r} for writing: {str(parts)!r}: {error.strerror or error}."
            ) from None
        try:
            _lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        try:
            if not parts.is_dir() or os.stat(parts).st_ino != os.fstat(fd).st_ino:
                raise ResultFileError(
                    f"another run has just finished writing {str(path)!r}; rerun the command to resume it."
                )
            writer = cls(path, key, grouped, fd, parts)
            if overwrite:
                path.unlink(missing_ok=True)
                for leftover in parts.iterdir():
                    leftover.unlink()
            for temporary in parts.glob("*.tmp"):
                temporary.unlink()  # cut off by a kill while being written
            if path.exists() or any(parts.glob("part-*.parquet")):
                _check_options(path, options)
                writer._read_recorded()
            else:
                _write_options(path, options)
        except BaseException as error:
            if created:
                shutil.rmtree(parts, ignore_errors=True)  # a run refused at the start leaves nothing behind
            os.close(fd)
            if isinstance(error, OSError):
                raise ResultFileError(f"cannot prepare --output {str(path)!r}: {error}.") from None
            raise
        return writer

    def _read_keys(self, file: Path) -> dict[str, bool]:
        """{key: succeeded} of one Parquet file this command wrote, after checking its columns."""
        _, pq = _import_parquet()
        try:
            schema = pq.read_schema(file)
            if not schema.equals(self.schema, check_metadata=False):
                raise ResultFileError(
                    f"{str(file)!r} has the columns {schema.names}, but this run writes {self.schema.names} (the "
                    "options --group_by and --dataset's id column decide them). Rerun with the options that wrote "
                    "it, or write to a new file."
                )
            table = pq.read_table(file, columns=[self.key, "error"])
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
            if isinstance(error, ResultFileError):
                raise
            raise ResultFileError(
                f"{str(file)!r} is not a Parquet file this command wrote ({error}). Write to a new --output file."
            ) from None
        keys = table.column(self.key).to_pylist()
        return dict(zip(keys, (error is None for error in table.column("error").to_pylist()), strict=True))

    def _read_recorded(self) -> None:
        merged = self._read_keys(self.path) if self.path.exists() else {}
        self.recorded.update(merged)
        for part in sorted(self.parts.glob("part-*.parquet")):
            keys = self._read_keys(part)
            self.next_part = max(self.next_part, int(part.stem.removeprefix("part-")) + 1)
            if keys and all(key in merged for key in keys):
                part.unlink()  # merged into the file by a run killed before it removed its parts
                continue
            repeated = [key for key in keys if key in self.recorded]
            if repeated:
                raise ResultFileError(
                    f"{str(part)!r} repeats {len(repeated)} record(s) that {str(self.path)!r} or another part holds "
                    f"(e.g. {repeated[0]!r}); it was not written by this command's runs. Move it away to resume."
                )
            self.recorded.update(keys)

    def write(self, record: dict[str, Any]) -> None:
        """Add one record; it reaches the disk with the next part (see the class)."""
        self.rows.append(record)
        if len(self.rows) >= PARQUET_PART_ROWS or time.monotonic() - self.last_flush >= FSYNC_INTERVAL_S:
            self.flush()

    def _table(self, records: list[dict[str, Any]]):
        pa, _ = _import_parquet()
        columns: dict[str, list] = {self.key: [storable(record[self.key]) for record in records]}
        if self.grouped:
            columns["paths"] = [[storable(path) for path in record["paths"]] for record in records]
        columns["answers"] = [
            [{field: answer.get(field) for field in ANSWER_FIELDS} for answer in record["answers"]]
            if "answers" in record
            else None
            for record in records
        ]
        columns["error"] = [storable(record["error"]) if "error" in record else None for record in records]
        return pa.Table.from_pydict(columns, schema=self.schema)

    def flush(self) -> None:
        """Write the records gathered so far as the next part file, whole or not at all."""
        self.last_flush = time.monotonic()
        if not self.rows:
            return
        _, pq = _import_parquet()
        part = self.parts / f"part-{self.next_part:06d}.parquet"
        temporary = part.with_name(part.name + ".tmp")
        try:
            pq.write_table(self._table(self.rows), temporary)
            _fsync(temporary)
            os.replace(temporary, part)
        except OSError as error:
            self.failed = True
            temporary.unlink(missing_ok=True)
            raise ResultFileError(
                f"cannot write to {self.name}: {error.strerror or error}; the records written before are kept in "
                f"{str(self.parts)!r}. Rerun the same command to resume once the cause is fixed."
            ) from None
        self.next_part += 1
        self.rows = []

    def _merge(self) -> None:
        """Replace the file by one holding its row groups and then every part's, and remove the parts."""
        _, pq = _import_parquet()
        sources = ([self.path] if self.path.exists() else []) + sorted(self.parts.glob("part-*.parquet"))
        if sources != [self.path]:
            temporary = self.parts / "merged.tmp"
            with pq.ParquetWriter(temporary, self.schema) as merged:
                for source in sources:
                    file = pq.ParquetFile(source)
                    for group in range(file.num_row_groups):
                        merged.write_table(file.read_row_group(group))
            _fsync(temporary)
            os.replace(temporary, self.path)
            _fsync(self.path.parent)
        shutil.rmtree(self.parts)

    def close(self) -> None:
        """Write the last records, merge everything into the file and release the lock; after a failed write, only
        release it (the parts stay for the rerun)."""
        if self.lock_fd is None:
            return
        try:
            if not self.failed:
                self.flush()
                try:
                    self._merge()
                except OSError as error:
                    raise ResultFileError(
                        f"cannot write to {self.name}: {error.strerror or error}; the records are kept in "
                        f"{str(self.parts)!r}. Rerun the same command to merge them once the cause is fixed."
                    ) from None
        finally:
            os.close(self.lock_fd)
            self.lock_fd = None

    def __enter__(self) -> "ParquetRecordWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


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
    "REGION_FIELDS",
    "DECISION_FIELDS",
    "ParquetRecordWriter",
    "RecordWriter",
    "ResultFileError",
    "open_records",
    "options_path",
    "parquet_schema",
    "spreadsheet_safe",
]
