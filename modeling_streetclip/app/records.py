"""Result files of `streetclip locate`: JSON Lines, CSV or Parquet, resumable after a kill at any moment.

A record is its key (`path`; `group` and member `paths`; a dataset's id column), then `answers` (best first) or
`error`; a JSON Lines or CSV record counts once its closing newline is written.
"""

from __future__ import annotations

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
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock, Timeout

from ..geodesy import CONFIDENCE_RADII_KM
from . import import_optional
from .files import atomic_write, write_json


_TEXT_FIELDS = ("label", "country", "country_code", "region", "city")
_SCORE_FIELDS = ("latitude", "longitude", "score", "country_score", "region_score", "joint_probability")
# The answer fields of the pipeline contract (see `GeolocationPipeline`), in CSV column order.
ANSWER_FIELDS = (*_TEXT_FIELDS, *_SCORE_FIELDS, "within_km", "radius_km", "calibrated", "expected_distance_km")
# Answer fields only a model with a region level, or only the expected-distance decision, fills.
REGION_FIELDS = ("region", "region_score")
DECISION_FIELDS = ("expected_distance_km",)
# fsync guards against a crashed machine, at a cost per call that a run cannot pay per record.
FSYNC_INTERVAL_S = 10.0
# A Parquet part is written every FSYNC_INTERVAL_S, or sooner after this many records (a row group fast to read).
PARQUET_PART_ROWS = 10_000
# No record this command writes comes near this; a longer line is a killed run's tail, or not a record at all.
MAX_RECORD_BYTES = 64 * 1024 * 1024
# First characters that make a spreadsheet evaluate a cell (OWASP, "CSV Injection"), and the mark that escapes them.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_TEXT_MARK = "'"
# How a recorded option that is no command-line option of its own is named in messages.
_OPTION_LABELS = {"model_weights": "the fingerprint of --model's weights"}
_NEW_FILE = "Write to a new --output file."


logger = logging.getLogger(__name__)


class ResultFileError(ValueError):
    """An output file this run cannot write or resume; the message names the file and what would be accepted."""


def spreadsheet_safe(value: Any) -> Any:
    """A CSV cell that spreadsheets show as text instead of evaluating (OWASP's defence against CSV injection): an
    apostrophe before a formula start or an apostrophe, dropped again on reading."""
    if isinstance(value, str) and value.startswith((*_FORMULA_STARTS, _TEXT_MARK)):
        return _TEXT_MARK + value
    return value


def storable(text: str) -> str:
    """`text` as valid UTF-8, alike in every format: a file name's bytes that are not (surrogate escapes in Python)
    become backslash escapes (`\\xff`), the spelling resume finds an input by."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _storable_record(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with its key, member paths and error `storable` (answers hold candidate names, valid already)."""
    stored = {field: storable(value) if isinstance(value, str) else value for field, value in record.items()}
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
    """The complete lines of a binary stream, one at a time within MAX_RECORD_BYTES; `end` is the byte offset after
    the last one handed out, `exhausted` says that nothing complete follows it."""

    def __init__(self, stream: BinaryIO, path: Path):
        self.stream, self.path, self.end, self.exhausted = stream, path, 0, False

    def __iter__(self) -> Iterator[str]:
        while line := self.stream.readline(MAX_RECORD_BYTES):
            if not line.endswith(b"\n"):
                blocks = iter(lambda: self.stream.read(1024 * 1024), b"")
                if len(line) == MAX_RECORD_BYTES and any(b"\n" in block for block in blocks):
                    raise ResultFileError(
                        f"{str(self.path)!r} has a line of over {MAX_RECORD_BYTES:,} bytes after byte {self.end:,}; "
                        f"no record this command writes is that long. {_NEW_FILE}"
                    )
                break
            self.end += len(line)
            yield line.decode("utf-8", "surrogateescape")  # older files may hold a name's raw bytes
        self.exhausted = True


class _JsonLines:
    """One JSON object per line; `json.dumps` escapes newlines and non-ASCII, so a record never spans lines."""

    header = ""

    def __init__(self, key: str):
        self.key = key

    def format(self, record: dict[str, Any]) -> str:
        return json.dumps(record) + "\n"

    def read(self, lines: _Lines) -> tuple[dict[str, bool], int]:
        """The records of `lines` as {key: succeeded}, and the byte offset where the complete records end."""
        recorded = _StoredKeys()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ResultFileError(
                    f"{str(lines.path)!r} line {number} is not a JSON record ({error}); resume needs a file this "
                    f"command wrote. {_NEW_FILE}"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get(self.key), str):
                raise ResultFileError(
                    f"{str(lines.path)!r} line {number} has no {self.key!r} field: it was written by another kind of "
                    "run (with or without --group_by, from files or from a --dataset with another id column). "
                    + _NEW_FILE
                )
            recorded[storable(record[self.key])] = "error" not in record
        return recorded, lines.end


class _Csv:
    """A header, then a row per record: the key, member paths (a JSON list) for groups, `top_k` rank-suffixed answer
    columns and `error`. Rows end in CRLF (RFC 4180), so the csv module quotes a field holding a CR or LF."""

    def __init__(self, key: str, top_k: int):
        self.key, self.top_k = key, top_k
        answers = [f"{field}_{rank}" for rank in range(1, top_k + 1) for field in ANSWER_FIELDS]
        self.columns = [key, *(["paths"] if key == "group" else []), *answers, "error"]
        self.header = self._row(self.columns)

    def _row(self, values: list[Any]) -> str:
        line = io.StringIO()
        # `within_km` is a dict keyed by radius: a JSON object in its cell.
        csv.writer(line).writerow([spreadsheet_safe(json.dumps(v) if isinstance(v, dict) else v) for v in values])
        return line.getvalue()

    def format(self, record: dict[str, Any]) -> str:
        values = [record[self.key]] + ([json.dumps(record["paths"])] if self.key == "group" else [])
        answers = record.get("answers", [])
        for rank in range(self.top_k):
            answer = answers[rank] if rank < len(answers) else {}
            values += [answer.get(field, "") for field in ANSWER_FIELDS]
        return self._row([*values, record.get("error", "")])

    def read(self, lines: _Lines) -> tuple[dict[str, bool], int]:
        reader, path = csv.reader(lines, strict=True), str(lines.path)
        recorded, complete = _StoredKeys(), 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                if lines.exhausted:
                    break  # a quoted field cut off by the kill: the partial record ends the file
                raise ResultFileError(f"{path!r} row {reader.line_num} is malformed CSV ({error}).") from None
            if reader.line_num == 1 and row != self.columns:
                raise ResultFileError(
                    f"{path!r} has the columns {row}, but this run writes {self.columns} (the options --top_k, "
                    "--group_by and --dataset's id column decide them). Rerun with the options that wrote it, or write "
                    "to a new file."
                )
            if len(row) != len(self.columns):
                raise ResultFileError(
                    f"{path!r} row {reader.line_num} has {len(row)} fields where the header has {len(self.columns)}; "
                    f"resume needs a file this command wrote. {_NEW_FILE}"
                )
            if reader.line_num > 1:
                cell = row[0]
                recorded[storable(cell[1:] if cell.startswith(_TEXT_MARK) else cell)] = row[-1] == ""
            complete = lines.end
        return recorded, complete


def options_path(path: Path) -> Path:
    """The sidecar file that records the options which wrote `path`: `path` + ".options.json"."""
    return path.with_name(path.name + ".options.json")


def lock_path(path: Path) -> Path:
    """The file a run holds locked while it writes `path`: `path` + ".lock" (left in place, as lock files are)."""
    return path.with_name(path.name + ".lock")


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

    def shown(value: Any, name: str) -> str:
        if value is None:  # "not recorded": an option an earlier version did not record
            return "not recorded" if name in _OPTION_LABELS else "not given"
        return repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."

    changes = "; ".join(
        f"{_OPTION_LABELS.get(name, '--' + name)} was {shown(recorded.get(name), name)}, now "
        f"{shown(options.get(name), name)}"
        for name in sorted(recorded.keys() | options.keys())
        if recorded.get(name) != options.get(name)
    )
    if changes:
        raise ResultFileError(
            f"{str(path)!r} was written with other options ({changes}). Rerun with the options that wrote it to "
            f"resume, {advice}."
        )


def _write_options(path: Path, options: dict[str, Any]) -> None:
    write_json(options_path(path), {"written_by": "streetclip locate", "options": options})


class _Writer(AbstractContextManager):
    """What both writers share: the keys recorded before, as {key: succeeded}, the lock, `with`, and the message of a
    failed write."""

    def __init__(self, path: Path | None, lock: FileLock | None = None):
        self.path, self.lock = path, lock
        self.name = "standard output" if path is None else f"--output {str(path)!r}"
        self.recorded: dict[str, bool] = _StoredKeys()
        self.failed = False  # a write failed, or the file was refused: closing writes nothing more

    def _write_error(self, error: OSError, kept: str = "") -> ResultFileError:
        return ResultFileError(f"cannot write to {self.name}: {error.strerror or error}{kept}.")

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __exit__(self, *exc_info) -> None:
        self.close()


class RecordWriter(_Writer):
    """Appends whole records to an output file (an open descriptor) or standard output; a failed write cuts the file
    back to its last complete record and raises `ResultFileError`, leaving it resumable."""

    def __init__(self, file_format: _JsonLines | _Csv, path: Path | None = None, fd: int | None = None, lock=None):
        super().__init__(path, lock)
        self.file_format, self.fd = file_format, fd
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
            with suppress(OSError):  # else the next run's resume cuts the partial line off
                os.ftruncate(self.fd, self.size)  # cut off the part of the record that made it
            kept = f"; the {self.size:,} bytes of complete records before it are kept. Rerun the same command to "
            raise self._write_error(error, kept + "resume once the cause is fixed") from None
        self.size += len(data)

    def close(self) -> None:
        """Flush the records to disk and release the file and its lock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            if self.unsynced:
                os.fsync(fd)
        except OSError as error:
            raise self._write_error(error) from None
        finally:
            os.close(fd)
            super().close()

    def resume(self, options: dict[str, Any], overwrite: bool) -> None:
        """Empty the file (`overwrite`) or check its options and read its keys, cutting off a partial last record."""
        if overwrite:
            os.ftruncate(self.fd, 0)
            self.size = 0
        checked = self.size > 0
        if checked:
            _check_options(self.path, options)
        with os.fdopen(os.dup(self.fd), "rb") as stream:  # a duplicate shares the offset, which appends ignore
            stream.seek(0)
            self.recorded, complete = self.file_format.read(_Lines(stream, self.path))
        if complete < self.size:
            logger.warning(
                f"streetclip locate: {str(self.path)!r} ends in an incomplete record ({self.size - complete:,} bytes "
                f"after the last complete one, at byte {complete:,}), as a killed run leaves it; it is cut off and "
                "its input done again."
            )
            os.ftruncate(self.fd, complete)
            self.size = complete
        if complete == 0:
            if not checked:
                _write_options(self.path, options)
            self._write(self.file_format.header.encode("utf-8"))


def open_records(
    path: Path | None,
    grouped: bool,
    top_k: int,
    options: dict[str, Any] | None = None,
    overwrite: bool = False,
    key: str | None = None,
) -> RecordWriter | ParquetRecordWriter:
    """A writer that adds to `path` (locked), resuming what a run with the same `options` wrote there (standard output
    when `path` is None: JSON Lines, no resume); `overwrite` empties it instead. `key` names the records' key field.
    Options that are None are not recorded: an option added later, None meaning the old behaviour, keeps files
    resumable."""
    key = key or ("group" if grouped else "path")
    suffix = ".jsonl" if path is None else path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".parquet"):
        raise ResultFileError(
            f"Cannot tell the format of --output {str(path)!r} from its extension; use .jsonl (JSON Lines), .csv or "
            ".parquet."
        )
    file_format = _Csv(key, top_k) if suffix == ".csv" else _JsonLines(key)
    if path is None:
        return RecordWriter(file_format)
    if suffix == ".parquet":
        install = "`pip install pyarrow` or `pip install 'streetclip[eval]'` (JSON Lines and CSV need nothing more)"
        import_optional("pyarrow.parquet", "Parquet output", install, ResultFileError)
    # As the sidecar records them: without the None values, as JSON gives them back (tuples as lists).
    options = json.loads(json.dumps({name: value for name, value in (options or {}).items() if value is not None}))
    if not path.parent.is_dir():
        raise ResultFileError(f"The folder of --output {str(path)!r} does not exist.")
    mode = path.stat().st_mode if path.exists() else stat.S_IFREG
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a device, pipe or socket)"
        raise ResultFileError(
            f"--output {str(path)!r} is {kind}; results need a regular file, new or written by this command."
        )
    lock = FileLock(lock_path(path), timeout=0)  # the system drops the lock of a killed process
    try:
        lock.acquire()
    except Timeout:
        if not os.path.exists(lock.lock_file):  # filelock takes a lock file it cannot create for one held
            raise ResultFileError(
                f"cannot create the lock file {lock.lock_file!r} beside --output {str(path)!r}; write to a folder "
                "that takes new files."
            ) from None
        raise ResultFileError(
            f"another run is writing {str(path)!r}; wait for it to finish, or write to another --output file."
        ) from None
    except OSError as error:
        raise ResultFileError(f"cannot lock --output {str(path)!r}: {error.strerror or error}.") from None
    try:
        if suffix == ".parquet":
            writer = ParquetRecordWriter(path, key, grouped, lock)
        else:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
            writer = RecordWriter(file_format, path, fd, lock)
    except OSError as error:
        lock.release()
        raise ResultFileError(f"cannot open --output {str(path)!r} for writing: {error.strerror or error}.") from None
    try:
        writer.resume(options, overwrite)
    except BaseException as error:
        writer.failed = True  # refused: release the file, write nothing
        writer.close()
        if isinstance(error, OSError):
            raise ResultFileError(f"cannot prepare --output {str(path)!r}: {error}.") from None
        raise
    return writer


class ParquetRecordWriter(_Writer):
    """Writes records to OUTPUT.parts/part-NNNNNN.parquet every FSYNC_INTERVAL_S or PARQUET_PART_ROWS records (a kill
    loses at most those), merged into OUTPUT by `close`; a part a kill left after the merge is deleted on resume."""

    def __init__(self, path: Path, key: str, grouped: bool, lock: FileLock):
        import pyarrow as pa

        super().__init__(path, lock)
        self.key, self.parts = key, path.with_name(path.name + ".parts")
        types = {"within_km": pa.struct([(str(radius), pa.float64()) for radius in CONFIDENCE_RADII_KM])}
        types |= {"calibrated": pa.bool_()} | dict.fromkeys(_TEXT_FIELDS, pa.string())
        answer = pa.struct([(field, types.get(field, pa.float64())) for field in ANSWER_FIELDS])
        paths = [("paths", pa.list_(pa.string()))] if grouped else []
        self.schema = pa.schema([(key, pa.string()), *paths, ("answers", pa.list_(answer)), ("error", pa.string())])
        self.rows: list[dict[str, Any]] = []
        self.next_part, self.last_flush = 0, time.monotonic()

    def _parts(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def resume(self, options: dict[str, Any], overwrite: bool) -> None:
        """Empty the file and its parts (`overwrite`), or check its options and read the keys of file and parts."""
        if overwrite:
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.parts, ignore_errors=True)
        if not (self.path.exists() or self._parts()):
            _write_options(self.path, options)
            return
        _check_options(self.path, options)
        merged = self._read_keys(self.path) if self.path.exists() else {}
        self.recorded.update(merged)
        for part in self._parts():
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

    def _read_keys(self, file: Path) -> dict[str, bool]:
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(file)
            same = schema.equals(self.schema, check_metadata=False)
            table = pq.read_table(file, columns=[self.key, "error"]) if same else None
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
            raise ResultFileError(
                f"{str(file)!r} is not a Parquet file this command wrote ({error}). {_NEW_FILE}"
            ) from None
        if table is None:
            raise ResultFileError(
                f"{str(file)!r} has the columns {schema.names}, but this run writes {self.schema.names} (the options "
                "--group_by and --dataset's id column decide them). Rerun with the options that wrote it, or write to "
                "a new file."
            )
        keys = table.column(self.key).to_pylist()
        return dict(zip(keys, (error is None for error in table.column("error").to_pylist()), strict=True))

    def write(self, record: dict[str, Any]) -> None:
        """Add one record; it reaches the disk with the next part (see the class)."""
        self.rows.append(record)
        if len(self.rows) >= PARQUET_PART_ROWS or time.monotonic() - self.last_flush >= FSYNC_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Write the records gathered so far as the next part file, whole or not at all."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.last_flush = time.monotonic()
        if not self.rows:
            return
        try:
            self.parts.mkdir(exist_ok=True)
            with atomic_write(self.parts / f"part-{self.next_part:06d}.parquet") as temporary:
                # Absent answer fields (a region level, a decision's) are null; a gallery's extra ones are left out.
                table = pa.Table.from_pylist([_storable_record(row) for row in self.rows], schema=self.schema)
                pq.write_table(table, temporary)
        except OSError as error:
            self.failed = True
            kept = f"; the records written before are kept in {str(self.parts)!r}. Rerun the same command to resume"
            raise self._write_error(error, kept + " once the cause is fixed") from None
        self.next_part += 1
        self.rows = []

    def close(self) -> None:
        """Write the last records, merge file and parts into the file and release the lock (only that after a
        failure); the merged file holds the file's row groups and then every part's."""
        import pyarrow.parquet as pq

        if self.lock is None:
            return
        try:
            if not self.failed:
                self.flush()
                sources = ([self.path] if self.path.exists() else []) + self._parts()
                try:
                    if sources != [self.path]:
                        with atomic_write(self.path) as temporary, pq.ParquetWriter(temporary, self.schema) as merged:
                            for source in map(pq.ParquetFile, sources):
                                for group in range(source.num_row_groups):
                                    merged.write_table(source.read_row_group(group))
                    shutil.rmtree(self.parts, ignore_errors=True)
                except OSError as error:
                    kept = f"; the records are kept in {str(self.parts)!r}. Rerun the same command to merge them once "
                    raise self._write_error(error, kept + "the cause is fixed") from None
        finally:
            super().close()


__all__ = [
    "ANSWER_FIELDS",
    "REGION_FIELDS",
    "DECISION_FIELDS",
    "ParquetRecordWriter",
    "RecordWriter",
    "ResultFileError",
    "lock_path",
    "open_records",
    "options_path",
    "spreadsheet_safe",
]
