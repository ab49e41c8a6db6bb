"""Data sets by path (`save_to_disk`, image or data-file folders) or Hub id, read alike by training, the benchmark,
gallery builds and `locate --dataset`: one split, columns found by the same names, images encoded (for the workers)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers.utils import logging

from ..gallery_store import names_a_missing_folder
from . import UsageError, import_optional


if TYPE_CHECKING:
    import datasets

    from ..images import ImageInput


logger = logging.get_logger(__name__)

# Column names recognised without being named, case-insensitively, first match wins (IM2GPS: IMG_ID; WebDataset: __key__).
ID_COLUMNS = ("img_id", "image_id", "id", "key", "__key__", "file_name", "filename")
IMAGE_COLUMNS = ("image", "img", "photo", "jpg")
# The record field of a dataset row whose ids do not come from a column (file names, row numbers).
DEFAULT_ID_FIELD = "id"
_DATASETS_EXTRAS = "the training or evaluation extra, `pip install 'streetclip[train]'` or `'streetclip[eval]'`"


def open_dataset(
    source: str | Path, split: str, streaming: bool = False
) -> tuple[datasets.Dataset | datasets.IterableDataset, str | None]:
    """One split of the data set at `source`, and its name (None for a `Dataset` saved without splits). A single split
    is read whatever `split` says (an image folder's is `train`); `streaming` gives an `IterableDataset`."""
    datasets = import_optional("datasets", "Reading data sets", _DATASETS_EXTRAS)
    source = str(source)
    if names_a_missing_folder(source):
        raise FileNotFoundError(f"No data set folder at {source!r}; give an existing folder or a Hub id (ORG/NAME).")
    saved_files = (datasets.config.DATASET_STATE_JSON_FILENAME, datasets.config.DATASETDICT_JSON_FILENAME)
    if any(Path(source, name).is_file() for name in saved_files):  # written by `save_to_disk`
        loaded = datasets.load_from_disk(source)
    else:
        loaded = datasets.load_dataset(source, streaming=streaming)
    chosen = None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in loaded and len(loaded) > 1:
            raise ValueError(f"{source!r} has no split {split!r}; its splits are {sorted(loaded)}.")
        if (chosen := split if split in loaded else next(iter(loaded))) != split:
            logger.info(f"{source!r} has no split {split!r}; reading its only split, {chosen!r}.")
        loaded = loaded[chosen]
    if streaming and isinstance(loaded, datasets.Dataset):
        loaded = loaded.to_iterable_dataset()
    return loaded, chosen


def find_column(
    columns: Sequence[str], requested: str | None, usual: Sequence[str], role: str, source: str, required: bool = True
) -> str | None:
    """The column to read for `role`: the requested one, which must exist, else the first of its usual names. A name
    several columns share (`LAT` twice, `LAT` and `lat`) is refused: one would be read, the other silently ignored."""
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"The {source} has no {role} column {requested!r}; its columns are {list(columns)}.")
        matches = [requested]
    elif not (matches := next(filter(None, ([c for c in columns if c.lower() == name] for name in usual)), [])):
        if required:
            raise ValueError(
                f"The {source} has no {role} column under a usual name ({', '.join(usual)}); its columns are "
                f"{list(columns)}. Name the {role} column."
            )
        return None
    positions = [position for position, column in enumerate(columns, start=1) if column in matches]
    if len(positions) > 1:
        names = ", ".join(f"{columns[position - 1]!r} (column {position})" for position in positions)
        raise ValueError(
            f"The {source} has {len(positions)} columns that could be its {role}: {names}. Rename or remove all but "
            "one, or name the one to read."
        )
    return matches[0]


def find_image_column(dataset: datasets.Dataset | datasets.IterableDataset, requested: str | None, source: str) -> str:
    """The image column of `dataset` (`requested`, else one of IMAGE_COLUMNS), an `Image` feature where declared."""
    import datasets

    column = find_column(dataset.column_names or [], requested, IMAGE_COLUMNS, "image", source)
    feature = (dataset.features or {}).get(column)
    if feature is not None and not isinstance(feature, datasets.Image):
        raise ValueError(
            f"Column {column!r} of the {source} holds {feature!r}, not images; name the image column, or cast it "
            "with `dataset.cast_column(column, datasets.Image())`."
        )
    return column


class EncodedImages(Sequence):
    """A dataset's image column as encoded bytes (or paths): decoding and its errors happen in the DataLoader workers."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        import datasets

        self.column = column
        self.encoded = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> ImageInput:
        return encoded_image(self.encoded[index][self.column])

    def select(self, rows: Sequence[int]) -> EncodedImages:
        """The images of `rows` only, in that order (`Dataset.select`: an index mapping, nothing is copied)."""
        selected = copy.copy(self)
        selected.encoded = self.encoded.select(rows)
        return selected


def encoded_image(value: Mapping | ImageInput | None) -> ImageInput | None:
    """What `load_rgb_image` reads for one image cell: an undecoded `Image` value's bytes, else its path; a path or a
    PIL image as it is (None: no image)."""
    if not isinstance(value, Mapping):
        return value
    return value["bytes"] if value["bytes"] is not None else value["path"]


def row_ids(
    dataset: datasets.Dataset, images: EncodedImages, requested: str | None, data: str | Path, source: str
) -> list[str]:
    """An id per row, as text: the `requested` column, else one of ID_COLUMNS, else the images' file names (relative
    to an image folder `data`) when unique, else row numbers."""
    import pyarrow.compute as pc

    column = find_column(dataset.column_names, requested, ID_COLUMNS, "id", source, required=False)
    if column is not None:
        return [str(value) for value in dataset[column]]
    # Else the path or file name each image was stored under (read without the bytes), when every row has its own.
    if all(paths := pc.struct_field(images.encoded.with_format("arrow")[images.column], "path").to_pylist()):
        root = Path(data).resolve() if Path(data).is_dir() else None
        ids = []
        for stored in map(Path, paths):
            inside = root is not None and stored.is_absolute() and stored.resolve().is_relative_to(root)
            ids.append(stored.resolve().relative_to(root).as_posix() if inside else stored.name)
        if len(set(ids)) == len(ids):
            return ids
    return [str(row) for row in range(len(dataset))]


def open_csv_with_images(
    csv_path: str | Path, image_dir: str | Path, image_column: str | None = None
) -> datasets.Dataset:
    """A CSV file whose rows name image files in `image_dir` (IM2GPS: `IMG_ID,LAT,LON`) as a dataset whose image column
    (`image_column`, else the first of ID_COLUMNS, IMAGE_COLUMNS and `path`) holds them undecoded."""
    datasets = import_optional("datasets", "Reading data sets", _DATASETS_EXTRAS)
    csv_path, image_dir = Path(csv_path), Path(image_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {str(csv_path)!r}.")
    if not image_dir.is_dir():
        raise NotADirectoryError(f"Image folder not found: {str(image_dir)!r}.")
    dataset = datasets.Dataset.from_csv(str(csv_path))
    source = f"CSV {str(csv_path)!r}"
    column = find_column(dataset.column_names, image_column, (*ID_COLUMNS, *IMAGE_COLUMNS, "path"), "image", source)
    paths = [None if name is None else str(image_dir / str(name)) for name in dataset[column]]
    dataset = dataset.remove_columns(column).add_column(column, paths)
    return dataset.cast_column(column, datasets.Image(decode=False))


@dataclass
class DatasetSource:
    """The dataset `streetclip locate --dataset` reads, and its columns; every problem is a `UsageError`."""

    dataset: Any  # datasets.Dataset, or an IterableDataset when streamed
    image_column: str
    id_column: str | None
    name: str
    data: str

    @classmethod
    def open(cls, data: str, split: str, streaming: bool, image_column: str | None, id_column: str | None):
        """Open the `split` of `data` and find its image and id columns."""
        try:
            dataset, chosen = open_dataset(data, split, streaming=streaming)
            name = f"--dataset {data!r}" + (f" (split {chosen!r})" if chosen else "")
            image_column = find_image_column(dataset, image_column, name)
            id_column = find_column(dataset.column_names or [], id_column, ID_COLUMNS, "id", name, required=False)
        except (OSError, ValueError, ImportError) as error:
            raise UsageError(f"cannot read --dataset {data!r}: {error}") from None
        source = cls(dataset, image_column, id_column, name, data)
        if source.key_field in ("answers", "error"):
            raise UsageError(
                f"the id column {source.key_field!r} of {name} has the name of a record field; rename it, or name "
                "another column with --id_column."
            )
        return source

    @property
    def key_field(self) -> str:
        return self.id_column or DEFAULT_ID_FIELD

    def keys(self) -> list[str]:
        """The id of every row of a map-style dataset (see `row_ids`), each unique."""
        ids, first_rows = row_ids(self.dataset, self.images(), self.id_column, self.data, self.name), {}
        return [self._check_unique(first_rows, key, row) for row, key in enumerate(ids)]

    def images(self, rows: Sequence[int] | None = None) -> EncodedImages:
        images = EncodedImages(self.dataset, self.image_column)
        return images if rows is None else images.select(rows)

    def stream(self) -> Iterator[tuple[str, ImageInput | None]]:
        """(id, encoded image) of every row of a streamed dataset; the ids are the id column's, else row numbers."""
        import datasets

        first_rows: dict[str, int] = {}
        examples = self.dataset.cast_column(self.image_column, datasets.Image(decode=False))
        for row, example in enumerate(examples):
            key = self._check_unique(first_rows, str(example[self.id_column]) if self.id_column else str(row), row)
            yield key, encoded_image(example[self.image_column])

    def _check_unique(self, first_rows: dict[str, int], key: str, row: int) -> str:
        if first_rows.setdefault(key, row) != row:
            raise UsageError(
                f"{self.name} has the id {key!r} on rows {first_rows[key]} and {row}; records are resumed by id, so "
                "each must be unique. Name a unique column with --id_column."
            )
        return key
