"""Benchmark rows from a metadata CSV (IM2GPS style) or a `datasets` dataset: id, true coordinates (or why they cannot
be scored) and image of each input; a file that is not one benchmark is refused, naming the line, before any model."""

import codecs
import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from torch.utils.data import Subset
from transformers.utils import logging

from ..geodesy import CoordinateProblem, coordinate_problem
from ..images import ImageInput
from .sources import ID_COLUMNS, EncodedImages, find_column, find_image_column, open_dataset, row_ids


logger = logging.get_logger(__name__)

# Column names recognised without being named, compared case-insensitively, first match wins (IM2GPS: IMG_ID,LAT,LON).
CSV_ID_COLUMNS = (*ID_COLUMNS, "image", "path")
LATITUDE_COLUMNS = ("lat", "latitude")
LONGITUDE_COLUMNS = ("lon", "lng", "long", "longitude")
# A byte-order mark (spreadsheet exports start with one) is dropped, so that it does not rename the first column.
DEFAULT_CSV_ENCODING = "utf-8"


@dataclass
class BenchmarkRow:
    """One input of a benchmark: its true coordinates, or `error` saying why they cannot be scored."""

    id: str
    latitude: float | None
    longitude: float | None
    error: str | None = None


@dataclass
class Benchmark:
    """The rows of a benchmark and their images; `images[i]` belongs to `rows[i]` and is read only when indexed."""

    name: str
    rows: list[BenchmarkRow]
    images: Sequence[ImageInput]
    split: str | None = None

    def scorable(self) -> tuple[list[int], Subset]:
        """Positions of the rows whose coordinates can be scored, and their images: the inputs worth a model run."""
        positions = [position for position, row in enumerate(self.rows) if row.error is None]
        return positions, Subset(self.images, positions)


@dataclass(frozen=True)
class ColumnNames:
    """The columns to read; one left as None is found by its usual names."""

    id: str | None = None
    image: str | None = None
    latitude: str | None = None
    longitude: str | None = None


def load_benchmark(
    data: str,
    image_dir: str | Path | None = None,
    split: str = "test",
    columns: ColumnNames = ColumnNames(),
    limit: int | None = None,
    encoding: str = DEFAULT_CSV_ENCODING,
    allow_outside_image_dir: bool = False,
) -> Benchmark:
    """The first `limit` rows (all when None) of a metadata CSV whose images lie in `image_dir`, or of the `split` of a
    `datasets` dataset (a Hub id or a local folder)."""
    if Path(data).suffix.lower() == ".csv":
        if image_dir is None:
            raise ValueError(f"The metadata CSV {data!r} names image files; give the folder that holds them.")
        if columns.image is not None:
            raise ValueError(
                f"An image column ({columns.image!r}) is for datasets; the metadata CSV {data!r} names its images by "
                "file name in its id column."
            )
        return load_metadata_csv(Path(data), Path(image_dir), columns, limit, encoding, allow_outside_image_dir)
    if image_dir is not None:
        raise ValueError(
            f"An image folder ({str(image_dir)!r}) goes with a metadata CSV only; the dataset {data!r} holds its "
            "images in its image column."
        )
    return load_benchmark_dataset(data, split, columns, limit)


def load_metadata_csv(
    csv_path: Path, image_dir: Path, columns: ColumnNames, limit: int | None, encoding: str, allow_outside: bool
) -> Benchmark:
    """Rows of an IM2GPS-style metadata CSV, whose ids are the images' file names in `image_dir`."""
    if not csv_path.is_file():
        raise FileNotFoundError(f"Metadata CSV not found: {str(csv_path)!r}.")
    if not image_dir.is_dir():
        raise NotADirectoryError(f"Image folder not found: {str(image_dir)!r}.")
    source = f"metadata CSV {str(csv_path)!r}"
    header, records = read_csv_records(csv_path, encoding, limit)
    id_column = find_column(header, columns.id, CSV_ID_COLUMNS, "image id", source)
    latitude_column = find_column(header, columns.latitude, LATITUDE_COLUMNS, "latitude", source)
    longitude_column = find_column(header, columns.longitude, LONGITUDE_COLUMNS, "longitude", source)
    positions = [header.index(column) for column in (id_column, latitude_column, longitude_column)]
    rows, outside = [], []
    for line, fields in records:
        row_id, latitude, longitude = (fields[index] if index < len(fields) else None for index in positions)
        row_id = (row_id or "").strip()
        missing = BenchmarkRow(row_id, None, None, f"the image id (column {id_column!r}) is missing")
        rows.append(checked_row(row_id, latitude, longitude, latitude_column, longitude_column) if row_id else missing)
        if PurePath(row_id).is_absolute() or ".." in PurePath(row_id).parts:
            outside.append((row_id, line))
    if outside and not allow_outside:
        raise ValueError(
            f"The {source} names {len(outside)} image(s) outside the image folder {str(image_dir)!r}, first "
            f"{outside[0][0]!r} on line {outside[0][1]}; ids are file names inside that folder. If the file is "
            "trusted and the paths are meant, allow them with --allow_outside_image_dir."
        )
    # As opened: pathlib drops the "." parts and doubled slashes that would spell one image two ways.
    images = [image_dir / row.id for row in rows]
    check_rows(rows, [f"line {line}" for line, _ in records], source, latitude_column, longitude_column, images)
    return Benchmark(name=csv_path.stem, rows=rows, images=images)


def read_csv_records(
    csv_path: Path, encoding: str = DEFAULT_CSV_ENCODING, limit: int | None = None
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header of a CSV and its first `limit` records (all when None), each with the line it starts on. Text not in
    `encoding` and a quote run over a line break (an open quote would swallow the rows after it) are refused."""
    source = f"metadata CSV {str(csv_path)!r}"
    raw = csv_path.read_bytes()
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise ValueError(f"Unknown text encoding {encoding!r} for the {source}; e.g. utf-8 or latin-1.") from None
    try:
        text = raw.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"The {source} is not {encoding} text: byte {raw[error.start]:#04x} on line {line} cannot be decoded. "
            "Save it as UTF-8, or name its encoding (--encoding, e.g. latin-1 or cp1252)."
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if any("\n" in field or "\r" in field for field in fields):
                raise ValueError(
                    f"The {source} has a quoted field that runs from line {start} over a line break to line "
                    f"{reader.line_num}: is a quote left open? Metadata fields hold no line breaks; close the quote."
                )
            if fields and header is None:
                header = fields
            elif fields:
                records.append((start, fields))
                if limit is not None and len(records) >= limit:
                    break
            start = reader.line_num + 1
    except csv.Error as error:
        raise ValueError(
            f"The {source} is not valid CSV in the record starting on line {start}: {error} (is a quote left open?)."
        ) from None
    if header is None:
        raise ValueError(f"The {source} is empty; expected a header such as IMG_ID,LAT,LON and a row per image.")
    return header, records


def load_benchmark_dataset(data: str, split: str, columns: ColumnNames, limit: int | None) -> Benchmark:
    """Rows of a `datasets` dataset with an `Image` column and latitude and longitude columns (ids: see `row_ids`)."""
    dataset, split = open_dataset(data, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    source = f"dataset {data!r}" + (f" (split {split!r})" if split else "")
    images = EncodedImages(dataset, find_image_column(dataset, columns.image, source))
    latitude_column = find_column(dataset.column_names, columns.latitude, LATITUDE_COLUMNS, "latitude", source)
    longitude_column = find_column(dataset.column_names, columns.longitude, LONGITUDE_COLUMNS, "longitude", source)
    ids = row_ids(dataset, images, columns.id, data, source)
    rows = [
        checked_row(row_id, latitude, longitude, latitude_column, longitude_column)
        for row_id, latitude, longitude in zip(ids, dataset[latitude_column], dataset[longitude_column], strict=True)
    ]
    check_rows(rows, [f"row {row}" for row in range(len(rows))], source, latitude_column, longitude_column)
    name = Path(data).name if Path(data).exists() else data
    return Benchmark(name=name, rows=rows, images=images, split=split)


def checked_row(
    row_id: str, latitude: object, longitude: object, latitude_column: str, longitude_column: str
) -> BenchmarkRow:
    """A row with its coordinates as floats, or an error naming the value missing, not finite or out of range."""
    values = {}
    for role, column, value in (("latitude", latitude_column, latitude), ("longitude", longitude_column, longitude)):
        text = str(value).strip() if value is not None else ""
        if not text:
            return BenchmarkRow(row_id, None, None, f"{role} (column {column!r}) is missing")
        try:
            if "_" in text:  # float() reads Python's digit grouping, 2_3 as 23, which no coordinate is written in
                raise ValueError(text)
            values[role] = float(text)
        except ValueError:
            return BenchmarkRow(row_id, None, None, f"{role} (column {column!r}) {text!r} is not a number")
        if not math.isfinite(values[role]):
            return BenchmarkRow(row_id, None, None, f"{role} (column {column!r}) {text!r} is not a finite number")
    lat, lon = values["latitude"], values["longitude"]
    problem = coordinate_problem(lat, lon)
    names = f"latitude (column {latitude_column!r})", f"longitude (column {longitude_column!r})"
    return BenchmarkRow(row_id, lat, lon, None if problem is None else problem.describe(lat, lon, *names))


def check_rows(
    rows: Sequence[BenchmarkRow],
    places: Sequence[str],
    source: str,
    latitude_column: str,
    longitude_column: str,
    images: Sequence[object] | None = None,
) -> None:
    """Refuse an image listed twice (it would count twice, and predictions.csv rows could not be told apart;
    `places[i]` says where `rows[i]` is: "line 3", "row 2"; `images[i]`, by default its id, names its image, as a path
    two ids may spell alike); warn once when rows look swapped."""
    first: dict[object, tuple[str, str]] = {}  # each image's first row: its id and place
    keys = [row.id for row in rows] if images is None else images
    repeated = [
        (first[key], row.id, place)
        for row, place, key in zip(rows, places, keys, strict=True)
        if row.id and first.setdefault(key, (row.id, place))[1] != place
    ]
    if repeated:
        (first_id, first_place), row_id, again = repeated[0]
        spelled = "" if row_id == first_id else f" as {row_id!r}"
        more = f" ({len(repeated) - 1} more rows repeat an earlier image)" if len(repeated) > 1 else ""
        raise ValueError(
            f"The {source} lists the image id {first_id!r} twice, on {first_place} and{spelled} on {again}{more}. "
            "Each image is scored once: remove the repeated rows."
        )
    swapped = sum(
        row.latitude is not None and coordinate_problem(row.latitude, row.longitude) is CoordinateProblem.LOOK_SWAPPED
        for row in rows
    )
    if swapped:  # those of its rows whose swap stays in range would be scored wrongly
        logger.warning(
            f"{swapped} of {len(rows)} rows of the {source} have a latitude outside [-90, 90] and a longitude inside "
            f"it: the columns look swapped, as in the widely copied ISNs IM2GPS metadata. If the whole file is "
            f"swapped, read latitude from {longitude_column!r} and longitude from {latitude_column!r}."
        )
