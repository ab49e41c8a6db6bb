"""Benchmark rows for the runner: an id, the true coordinates and the image of each input, from a metadata CSV
(IM2GPS style) or a `datasets` dataset.

Benchmark files are messy: the widely copied ISNs IM2GPS metadata have their LAT and LON columns swapped, rows lose
values, images go missing. A row whose coordinates cannot be scored carries the reason instead of stopping the run,
and a dataset's images stay encoded until a DataLoader worker decodes them.
"""

import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
from transformers.utils import logging

from modeling_streetclip.images import ImageInput


logger = logging.get_logger(__name__)

# Column names recognised without being named, compared case-insensitively, first match wins. IM2GPS and IM2GPS3K
# metadata use IMG_ID, LAT, LON; other benchmarks write the names out.
ID_COLUMNS = ("img_id", "image_id", "id", "key", "file_name", "filename")
CSV_ID_COLUMNS = (*ID_COLUMNS, "image", "path")
IMAGE_COLUMNS = ("image", "img", "photo", "jpg")
LATITUDE_COLUMNS = ("lat", "latitude")
LONGITUDE_COLUMNS = ("lon", "lng", "long", "longitude")
# How a row's error ends when its columns look swapped; the file-level warning counts these rows.
SWAPPED_COLUMNS = "latitude and longitude look swapped"


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

    def scorable(self) -> tuple[list[int], Sequence[ImageInput]]:
        """Positions of the rows whose coordinates can be scored, and their images: the inputs worth a model run."""
        positions = [position for position, row in enumerate(self.rows) if row.error is None]
        return positions, _Selection(self.images, positions)


class _Selection(Sequence):
    """Some items of a sequence, in the given order, without reading the others (images decode only when used)."""

    def __init__(self, items: Sequence, positions: list[int]):
        self.items = items
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        return self.items[self.positions[index]]


class _DatasetImages(Sequence):
    """A dataset's image column as encoded bytes (or a path where it stores no bytes), so that decoding, and its
    errors, happen in `load_rgb_image` inside the DataLoader workers rather than when the main process indexes."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        self.column = column
        self.encoded = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> ImageInput:
        image = self.encoded[index][self.column]
        return image["bytes"] if image["bytes"] is not None else image["path"]


@dataclass(frozen=True)
class ColumnNames:
    """The columns to read; a column left as None is found by its usual names, compared case-insensitively."""

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
) -> Benchmark:
    """Read the first `limit` rows (all when None) of a metadata CSV, whose images lie in `image_dir`, or of a
    `datasets` dataset (a Hub id or a local folder; `split` chooses among its splits)."""
    if Path(data).suffix.lower() == ".csv":
        if image_dir is None:
            raise ValueError(f"The metadata CSV {data!r} names image files; give the folder that holds them.")
        if columns.image is not None:
            raise ValueError(
                f"An image column ({columns.image!r}) is for datasets; the metadata CSV {data!r} names its images by "
                "file name in its id column."
            )
        return load_metadata_csv(data, image_dir, columns, limit)
    if image_dir is not None:
        raise ValueError(
            f"An image folder ({str(image_dir)!r}) goes with a metadata CSV only; the dataset {data!r} holds its "
            "images in its image column."
        )
    return load_benchmark_dataset(data, split, columns, limit)


def load_metadata_csv(
    csv_path: str | Path, image_dir: str | Path, columns: ColumnNames = ColumnNames(), limit: int | None = None
) -> Benchmark:
    """Rows of an IM2GPS-style metadata CSV (`IMG_ID,LAT,LON`): the id is the image's file name in `image_dir`."""
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Metadata CSV not found: {str(csv_path)!r}.")
    if not image_dir.is_dir():
        raise NotADirectoryError(f"Image folder not found: {str(image_dir)!r}.")
    source = f"metadata CSV {str(csv_path)!r}"
    # utf-8-sig: spreadsheet programs start their CSV exports with a byte-order mark, which would rename IMG_ID.
    with csv_path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        available = reader.fieldnames or []
        id_column = find_column(available, columns.id, CSV_ID_COLUMNS, "image id", source)
        latitude_column = find_column(available, columns.latitude, LATITUDE_COLUMNS, "latitude", source)
        longitude_column = find_column(available, columns.longitude, LONGITUDE_COLUMNS, "longitude", source)
        records = list(itertools.islice(reader, limit))
    rows = [
        checked_row(
            (record[id_column] or "").strip(),
            record[latitude_column],
            record[longitude_column],
            latitude_column,
            longitude_column,
        )
        for record in records
    ]
    warn_if_columns_look_swapped(rows, source, latitude_column, longitude_column)
    return Benchmark(name=csv_path.stem, rows=rows, images=[image_dir / row.id for row in rows])


def load_benchmark_dataset(
    data: str, split: str = "test", columns: ColumnNames = ColumnNames(), limit: int | None = None
) -> Benchmark:
    """Rows of a `datasets` dataset with an `Image` column and latitude and longitude columns; ids come from an id
    column where one is found, else they are row numbers."""
    dataset, split = _open_dataset(data, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    source = f"dataset {data!r}" + (f" (split {split!r})" if split else "")
    available = dataset.column_names
    image_column = find_column(available, columns.image, IMAGE_COLUMNS, "image", source)
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(
            f"Column {image_column!r} of the {source} holds {dataset.features[image_column]!r}, not images; name the "
            "image column, or cast it with `dataset.cast_column(column, datasets.Image())`."
        )
    latitude_column = find_column(available, columns.latitude, LATITUDE_COLUMNS, "latitude", source)
    longitude_column = find_column(available, columns.longitude, LONGITUDE_COLUMNS, "longitude", source)
    id_column = find_column(available, columns.id, ID_COLUMNS, "id", source, required=False)
    ids = [str(value) for value in dataset[id_column]] if id_column else [str(row) for row in range(len(dataset))]
    rows = [
        checked_row(row_id, latitude, longitude, latitude_column, longitude_column)
        for row_id, latitude, longitude in zip(ids, dataset[latitude_column], dataset[longitude_column], strict=True)
    ]
    warn_if_columns_look_swapped(rows, source, latitude_column, longitude_column)
    name = Path(data).name if Path(data).exists() else data
    return Benchmark(name=name, rows=rows, images=_DatasetImages(dataset, image_column), split=split)


def _open_dataset(data: str, split: str) -> tuple[datasets.Dataset, str | None]:
    """The dataset and the split it came from: a folder written by `save_to_disk`, else anything `load_dataset`
    reads (a Hub id, a local data folder). A dataset saved without splits has no split to report."""
    folder = Path(data)
    saved = (folder / datasets.config.DATASET_STATE_JSON_FILENAME).is_file() or (
        folder / datasets.config.DATASETDICT_JSON_FILENAME
    ).is_file()
    if not saved:
        return datasets.load_dataset(data, split=split), split
    loaded = datasets.load_from_disk(data)
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded, None
    if split not in loaded:
        raise ValueError(f"The dataset saved in {data!r} has no split {split!r}; it has {sorted(loaded)}.")
    return loaded[split], split


def find_column(
    columns: Sequence[str], requested: str | None, usual: Sequence[str], role: str, source: str, required: bool = True
) -> str | None:
    """The column to read for `role`: the requested one, which must exist, else the first of its usual names."""
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"The {source} has no {role} column {requested!r}; its columns are {list(columns)}.")
        return requested
    by_lower_name = {column.lower(): column for column in columns}
    found = next((by_lower_name[name] for name in usual if name in by_lower_name), None)
    if found is None and required:
        raise ValueError(
            f"The {source} has no {role} column under a usual name ({', '.join(usual)}); its columns are "
            f"{list(columns)}. Name the {role} column."
        )
    return found


def checked_row(
    row_id: str, latitude: object, longitude: object, latitude_column: str, longitude_column: str
) -> BenchmarkRow:
    """A row with its coordinates as floats, or with an error naming the value that is missing, not a number, not
    finite, out of range, or where latitude and longitude look swapped."""
    values = {}
    for role, column, value in (("latitude", latitude_column, latitude), ("longitude", longitude_column, longitude)):
        text = str(value).strip() if value is not None else ""
        if not text:
            return BenchmarkRow(row_id, None, None, f"{role} (column {column!r}) is missing")
        try:
            values[role] = float(text)
        except ValueError:
            return BenchmarkRow(row_id, None, None, f"{role} (column {column!r}) {text!r} is not a number")
        if not math.isfinite(values[role]):
            return BenchmarkRow(row_id, None, None, f"{role} (column {column!r}) {text!r} is not a finite number")
    lat, lon = values["latitude"], values["longitude"]
    error = None
    if abs(lat) > 90 and abs(lon) <= 90:
        error = (
            f"latitude (column {latitude_column!r}) {lat!r} is outside [-90, 90] but longitude (column "
            f"{longitude_column!r}) {lon!r} is inside it: {SWAPPED_COLUMNS}"
        )
    elif abs(lat) > 90:
        error = f"latitude (column {latitude_column!r}) {lat!r} is outside [-90, 90]"
    elif abs(lon) > 180:
        error = f"longitude (column {longitude_column!r}) {lon!r} is outside [-180, 180]"
    return BenchmarkRow(row_id, lat, lon, error)


def warn_if_columns_look_swapped(
    rows: Sequence[BenchmarkRow], source: str, latitude_column: str, longitude_column: str
) -> None:
    """Say once per file when rows look swapped: a swapped file also has rows whose swap stays in range, which would
    be scored at the wrong place without a word."""
    swapped = sum(row.error is not None and row.error.endswith(SWAPPED_COLUMNS) for row in rows)
    if swapped:
        logger.warning(
            f"{swapped} of {len(rows)} rows of the {source} have a latitude outside [-90, 90] and a longitude inside "
            f"it: the columns look swapped, as in the widely copied ISNs IM2GPS metadata. If the whole file is "
            f"swapped, read latitude from {longitude_column!r} and longitude from {latitude_column!r}."
        )
