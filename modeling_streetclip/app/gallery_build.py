"""Building a gallery: geo-tagged photos in; their embeddings, coordinates and labels out, resumable after a kill.

Rows are embedded by the batch engine's loop (`batch.embedded_batches`) into shards keyed by rows
(`shards/rows-{start}-{end}.arrow`), which the main process joins into the gallery (README, "Several processes").
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm
from transformers.utils import logging, requires_backends

from ..gallery_index import AUTO_INDEX, DEFAULT_INDEX, check_factory, check_nprobe, recommended_index, trained_index
from ..gallery_store import (
    BAD_ROWS_FILE,
    DATASET_FOLDER,
    EMBEDDING_COLUMN,
    FINGERPRINT_MIN_COSINE,
    GALLERY_FILE,
    INDEX_FILE,
    GalleryInfo,
    GalleryModelError,
    GeoGallery,
    fingerprint_agreement,
    model_fingerprint,
    stored_embeddings,
)
from ..gallery_vote import VoteSettings
from ..geodesy import coordinate_problem, coordinate_value
from . import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE
from .batch import PixelBatch, collate_pixels, embedded_batches, load_pixels
from .distributed import on_every_process, on_main_process
from .files import atomic_write, remove, write_json


if TYPE_CHECKING:
    import datasets
    import pyarrow as pa
    from accelerate import Accelerator


logger = logging.get_logger(__name__)

SHARDS_FOLDER, SHARD_NAME, BUILD_FILE = "shards", re.compile(r"rows-(\d+)-(\d+)\.arrow"), "build.json"
# A source column of one of these names (other than the coordinates read) is refused.
GALLERY_COLUMNS = ("source_row", EMBEDDING_COLUMN, "latitude", "longitude", "image_path")
ERROR_COLUMN = "error"
# Errors of a build step on the main process that every process of a launch raises with it.
BUILD_ERRORS = (OSError, ValueError, ImportError)
_AFRESH = "pass --overwrite to start afresh"


@dataclass
class GalleryBuild:
    """What `build_gallery` did; under a launcher, `gallery` and `bad_rows` are the main process's (None and [])."""

    gallery: GeoGallery | None
    embedded_rows: int
    resumed_rows: int
    bad_rows: list[dict[str, Any]]


@dataclass(frozen=True)
class _Columns:
    """The source columns a build reads; `features` None: undeclared; `id` None: a row is known by its image file."""

    image: str
    latitude: str
    longitude: str
    labels: tuple[str, ...]
    features: datasets.Features | None
    id: str | None


def build_gallery(
    model,
    processor,
    data: str | os.PathLike | datasets.Dataset | datasets.IterableDataset,
    output_dir: str | os.PathLike,
    model_name: str | None = None,
    index: str = DEFAULT_INDEX,
    nprobe: int | None = None,
    train_size: int | None = None,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    latitude_column: str = "latitude",
    longitude_column: str = "longitude",
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    shard_size: int = DEFAULT_SHARD_SIZE,
    settings: VoteSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> GalleryBuild:
    """Embed every photo of `data` with `model` and write a gallery to `output_dir` (layout: `gallery_store`),
    resuming an unfinished build there.

    Args:
        model, processor: a `StreetCLIPForGeolocation` or any CLIP model with `get_image_features`, on its device,
            and its processor or image processor.
        data: a `datasets` dataset (streamed or not), or a source `sources.open_dataset` opens (a `save_to_disk`
            folder, an image folder with `metadata.csv`, a folder of CSV or Parquet files, a Hub id).
        output_dir: new or empty, or holding an unfinished build of the same source and model.
        model_name: recorded in `gallery.json` (default: the model's `name_or_path`).
        index, nprobe, train_size: a FAISS factory string (`"Flat"`: exact; `"IVF1024,SQ8"`: compressed) or `"auto"`
            (`recommended_index`), the lists an IVF index probes, the rows that train it (see `trained_index`).
        split, streaming, image_column, latitude_column, longitude_column: what to read of the source.
        batch_size, num_workers, shard_size: images per forward pass, DataLoader processes decoding them (0: this
            one), and source rows per shard (a kill loses at most one shard of work).
        settings: the vote settings stored as the gallery's defaults (default: `VoteSettings()`).
        overwrite: delete a gallery or an unfinished build in `output_dir` first.
        progress: show a tqdm bar on standard error.
        accelerator: under a launcher, every process calls with the same arguments and embeds its own chunks of
            rows; the main process writes the gallery.
    """
    # Checked first: a missing faiss would otherwise stop the build once every photo is embedded.
    requires_backends(build_gallery, ["datasets", "faiss"])
    import datasets

    if batch_size < 1 or shard_size < 1 or num_workers < 0:
        raise ValueError(
            f"batch_size and shard_size must be >= 1 and num_workers >= 0, got {batch_size}, {shard_size} and "
            f"{num_workers}."
        )
    folder = Path(output_dir)
    image_processor = getattr(processor, "image_processor", processor)
    fingerprint = model_fingerprint(model, image_processor)
    dim = fingerprint.shape[-1]
    if index != AUTO_INDEX:
        check_nprobe(nprobe, check_factory(index, dim), index)
    if isinstance(data, (str, os.PathLike)):
        from .sources import open_dataset

        source_name = os.fspath(data)
        data, split = open_dataset(data, split, streaming=streaming)
    else:  # a dataset passed as an object: named by the folder or Hub files it came from, else by its class
        files = getattr(data, "cache_files", None) or []
        info_name = getattr(getattr(data, "info", None), "dataset_name", None)
        source_name = str(Path(files[0]["filename"]).parent) if files else info_name or type(data).__name__
    if isinstance(data, datasets.Dataset):
        total = len(data)
    else:  # a streamed dataset's length, where its metadata records it
        splits = getattr(getattr(data, "info", None), "splits", None) or {}
        known = splits.get(str(getattr(data, "split", None)))
        total = (known.num_examples or None) if known is not None else None
    if index == AUTO_INDEX and total is not None and recommended_index(total, dim).nprobe is None:
        # Bad rows only shrink a gallery: a source small enough for exact search gives an exact index.
        check_nprobe(nprobe, None, f"{AUTO_INDEX} ({recommended_index(total, dim).factory} for {total:,} rows)")
    columns = _find_columns(data, image_column, latitude_column, longitude_column, source_name)
    options = {
        "model": model_name or getattr(model, "name_or_path", "") or type(model).__name__,
        "source": source_name,
        "split": split,
        **{f"{role}_column": getattr(columns, role) for role in ("image", "latitude", "longitude")},
    }

    def start() -> list[tuple[int, int]]:
        _start_or_resume(folder, overwrite, options, fingerprint)
        return [(start, end) for start, end, _ in _shards(folder)]

    covered = on_main_process(accelerator, start, errors=BUILD_ERRORS)
    rank, processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    plan = _RowPlan(*_pending_chunks(covered, total, shard_size), rank, processes, shard_size)
    numbers = plan.own_rows() if isinstance(data, datasets.Dataset) else None

    def embed(data) -> int:
        """Embed this process's rows into shards; the number of rows embedded (a process may own none)."""
        if not plan.has_rows:
            return 0
        # Images reach the workers still encoded, where an unreadable one is its row's error.
        if data.features is not None:
            data = data.cast_column(columns.image, datasets.Image(decode=False))
        data = data.select(numbers).to_iterable_dataset() if numbers is not None else data.skip(plan.first_row)
        rows = _SourceRows(data, plan, numbers, batch_size, image_processor, columns)
        # Workers yield whole batches (batch_size=None), each of consecutive rows, in turn: source order is kept.
        pin = model.device.type == "cuda"
        loader = DataLoader(rows, batch_size=None, num_workers=num_workers, collate_fn=collate_pixels, pin_memory=pin)
        writer, embedded = ShardWriter(folder / SHARDS_FOLDER, dim, columns.features), 0
        show = progress and (accelerator is None or accelerator.is_main_process)
        own_total = None if numbers is None else len(numbers)
        with tqdm(
            total=own_total, unit="img", desc="streetclip index build", file=sys.stderr, disable=not show
        ) as bar:
            for batch, embeds in embedded_batches(model, image_processor, loader):
                writer.add(batch, embeds)
                embedded += len(batch.decoded)
                if len(writer.rows) >= shard_size:
                    writer.flush()
                bar.update(len(batch.order))
            writer.flush()
        return embedded

    if accelerator is None:
        embedded = embed(data)
    else:
        from accelerate.utils import gather_object

        # An error on one process stops every process, instead of leaving the others waiting in the gather.
        embedded = sum(gather_object([on_every_process(accelerator, lambda: embed(data), errors=BUILD_ERRORS)]))
    settings = settings or VoteSettings()
    finished: list = [None, []]  # set on the main process only: the gallery is not sent to the others

    def finish() -> None:
        finished[:] = join_shards(
            folder, options, fingerprint, settings, index, nprobe, train_size, total, columns.id, columns.features
        )

    on_main_process(accelerator, finish, errors=BUILD_ERRORS)
    return GalleryBuild(finished[0], embedded, sum(end - start for start, end in covered), finished[1])


def _find_columns(
    data, image_column: str | None, latitude_column: str, longitude_column: str, source: str
) -> _Columns:
    """The columns to read; a streamed source that does not declare its columns is checked on its first row."""
    import datasets

    from .sources import ID_COLUMNS, find_column, find_image_column

    names = data.column_names
    if names is None:
        names = list(next(iter(data.take(1))).keys())
    declared = [name for name, feature in (data.features or {}).items() if isinstance(feature, datasets.Image)]
    if image_column is None and len(declared) == 1:
        image = declared[0]  # the one column of images, whatever its name (a CSV's IMG_ID, say)
    else:
        image = find_image_column(data, image_column, source) if data.column_names else image_column or "image"
    for role, name in (("image", image), ("latitude", latitude_column), ("longitude", longitude_column)):
        column = name if name in names else name.split(".")[0]  # `json.latitude`: a field of the column `json`
        find_column(names, column, (), role, f"data {source!r}")  # it exists, and no other column shares its name
    used = {image, latitude_column, longitude_column}
    clashes = [name for name in names if name in (*GALLERY_COLUMNS, ERROR_COLUMN) and name not in used]
    if clashes:
        raise ValueError(
            f"The data {source!r} has columns named {clashes}, which a gallery uses for its own; rename them "
            "(`dataset.rename_column`) before building."
        )
    labels = tuple(name for name in names if name not in used)
    features = None if data.features is None else datasets.Features({name: data.features[name] for name in labels})
    id_column = find_column(labels, None, ID_COLUMNS, "id", f"data {source!r}", required=False)
    return _Columns(image, latitude_column, longitude_column, labels, features, id_column)


def _start_or_resume(folder: Path, overwrite: bool, options: dict[str, Any], fingerprint: np.ndarray) -> None:
    """Start a build in `folder` (new or empty; `overwrite` deletes a gallery's or build's own files there), recording
    its options in `build.json`, or resume the build there, refusing other options or another model, naming them."""
    path = folder / BUILD_FILE
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"The gallery output {str(folder)!r} is a file; give a folder.")
    if overwrite and folder.is_dir():
        for name in (GALLERY_FILE, DATASET_FOLDER, INDEX_FILE, BAD_ROWS_FILE, SHARDS_FOLDER, BUILD_FILE):
            remove(folder / name)
    if (folder / GALLERY_FILE).exists():
        raise FileExistsError(
            f"{str(folder)!r} already holds a complete gallery; pass --overwrite (overwrite=True) to build it again, "
            "or give another folder."
        )
    others = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    if not path.exists():
        if others:
            raise FileExistsError(
                f"{str(folder)!r} holds other files ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); "
                "a gallery needs a new or empty folder."
            )
        (folder / SHARDS_FOLDER).mkdir(parents=True)
        write_json(path, {"options": options, "model_fingerprint": fingerprint.tolist()})
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
        recorded_options, recorded_fingerprint = recorded["options"], recorded["model_fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"cannot read the unfinished build's options from {str(path)!r} ({error}); {_AFRESH}."
        ) from None
    if fingerprint_agreement(recorded_fingerprint, fingerprint) < FINGERPRINT_MIN_COSINE:
        raise GalleryModelError(
            f"{str(folder)!r} holds an unfinished build embedded by the model {recorded_options.get('model')!r}, "
            f"whose embeddings differ from those of {options['model']!r}; resume with that model, or {_AFRESH}."
        )
    differing = [
        f"{name} was {recorded_options.get(name)!r}, now {options.get(name)!r}"
        for name in sorted(options.keys() - {"model"})
        if recorded_options.get(name) != options.get(name)
    ]
    if differing:
        raise ValueError(
            f"{str(folder)!r} holds an unfinished build of other data ({'; '.join(differing)}); rerun with the "
            f"options that started it to resume, or {_AFRESH}."
        )
    (folder / SHARDS_FOLDER).mkdir(exist_ok=True)


def _shards(folder: Path) -> list[tuple[int, int, Path]]:
    """The complete shards in `folder` as `(first row, end row, path)`, in row order; a killed write's temporary goes."""
    found: list[tuple[int, int, Path]] = []
    for path in sorted((folder / SHARDS_FOLDER).iterdir()):  # zero-padded names: in row order
        match = SHARD_NAME.fullmatch(path.name)
        if path.suffix == ".tmp":
            path.unlink()
        elif match is None:
            raise ValueError(f"{str(path)!r} is not a gallery shard; the shards folder holds only the build's own.")
        elif found and int(match[1]) < found[-1][1]:
            raise ValueError(
                f"The shards in {str(path.parent)!r} overlap ({path.name} starts at row {int(match[1])}, before the "
                f"end of {found[-1][2].name}); {_AFRESH}."
            )
        else:
            found.append((int(match[1]), int(match[2]), path))
    return found


def _pending_chunks(
    covered: list[tuple[int, int]], total: int | None, shard_size: int
) -> tuple[list[tuple[int, int]], int | None]:
    """The rows no shard covers, in chunks aligned to multiples of `shard_size` (alike across reruns), and the first
    row of a stream's open end (None when `total` is known)."""
    chunks, end = [], 0
    for start, stop in [*covered, (total, total)] if total is not None else covered:
        while end < start:
            chunks.append((end, min((end // shard_size + 1) * shard_size, start)))
            end = chunks[-1][1]
        end = stop
    return chunks, end if total is None else None


@dataclass(frozen=True)
class _RowPlan:
    """The rows a process embeds: chunks `rank`, `rank + processes`, ... of the pending ones, then of a stream's open
    end from `tail_start`."""

    chunks: list[tuple[int, int]]
    tail_start: int | None
    rank: int
    processes: int
    shard_size: int

    @property
    def first_row(self) -> int:
        return min([start for start, _ in self.chunks] + [self.tail_start] * (self.tail_start is not None))

    @property
    def has_rows(self) -> bool:
        """Whether this process may own a row: a pending chunk of its own, or a stream's open end."""
        return bool(self.chunks[self.rank :: self.processes]) or self.tail_start is not None

    def own_rows(self) -> range | list[int]:
        mine = self.chunks[self.rank :: self.processes]
        if len(mine) == 1:
            return range(*mine[0])  # `Dataset.select` reads a range of consecutive rows without an indices mapping
        return [row for start, end in mine for row in range(start, end)]

    def owns(self, row: int) -> bool:
        position = bisect.bisect_right(self.chunks, (row, float("inf"))) - 1
        if position >= 0 and row < self.chunks[position][1]:
            return position % self.processes == self.rank
        if self.tail_start is None or row < self.tail_start:
            return False
        return (len(self.chunks) + (row - self.tail_start) // self.shard_size) % self.processes == self.rank


@dataclass
class _SourceRows(IterableDataset):
    """The rows of `plan` (`rows` from `plan.first_row` on, or exactly the rows `numbers` names) in batches of
    consecutive rows, as the batch engine's items `(row, pixels, error, (latitude, longitude, image path, labels))`.
    Each of W workers reads every row (`IterableDataset.iter` does not split files) and prepares the batches b with
    b % W equal to its id; the DataLoader takes them in turn, keeping source order, which resuming needs."""

    rows: datasets.IterableDataset
    plan: _RowPlan
    numbers: Sequence[int] | None
    batch_size: int
    image_processor: Any
    columns: _Columns

    def __iter__(self) -> Iterator[list[tuple]]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        numbers = iter(self.numbers) if self.numbers is not None else itertools.count(self.plan.first_row)
        group: list[tuple[int, dict[str, Any]]] = []
        batches = 0
        for read in self.rows.iter(batch_size=self.batch_size):
            for values in zip(*read.values(), strict=True):
                row = next(numbers)
                if self.numbers is None and not self.plan.owns(row):
                    continue
                if group and (len(group) == self.batch_size or row != group[-1][0] + 1):
                    if batches % workers == worker_id:
                        yield [self._prepare(*item) for item in group]
                    group, batches = [], batches + 1
                group.append((row, dict(zip(read.keys(), values, strict=True))))
        if group and batches % workers == worker_id:
            yield [self._prepare(*item) for item in group]

    def _prepare(self, row_number: int, row: dict[str, Any]) -> tuple:
        """Coordinates first (a row without them is not worth decoding), then the image."""
        from .sources import encoded_image

        columns = self.columns
        given = _field(row, columns.latitude), _field(row, columns.longitude)
        latitude, longitude = coordinate_value(given[0]), coordinate_value(given[1])
        value = row[columns.image]
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        fields = (latitude, longitude, path, {name: row[name] for name in columns.labels})
        problem = coordinate_problem(latitude, longitude)
        if problem is not None:
            names = f"latitude (column {columns.latitude!r})", f"longitude (column {columns.longitude!r})"
            return row_number, None, problem.describe(*given, *names), fields
        if value is None:
            return row_number, None, f"Row {row_number} has no image (column {columns.image!r} is empty).", fields
        return row_number, *load_pixels(encoded_image(value), self.image_processor), fields


def _field(row: dict[str, Any], name: str) -> Any:
    """The value of column `name`, or for `a.b` of field `b` of the struct column `a` (a WebDataset sample's `json`)."""
    if name in row:
        return row[name]
    value = row
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class ShardWriter:
    """Collects embedded rows and writes them as one shard, whole or not at all."""

    def __init__(self, shards: Path, dim: int, label_features: datasets.Features | None):
        self.shards, self.dim, self.label_features = shards, dim, label_features
        self.rows: list[tuple[int, str | None, tuple]] = []
        self.embeddings: list[np.ndarray] = []

    def add(self, batch: PixelBatch, embeds: torch.Tensor | None) -> None:
        """Collect a batch of consecutive rows; collected rows they do not follow are written first."""
        if self.rows and batch.order and batch.order[0] != self.rows[-1][0] + 1:
            self.flush()
        vectors = np.full((len(batch.order), self.dim), np.nan, dtype=np.float32)
        if embeds is not None:
            vectors[[index not in batch.errors for index in batch.order]] = stored_embeddings(embeds)
        self.embeddings.append(vectors)
        self.rows += [
            (index, batch.errors.get(index), fields) for index, fields in zip(batch.order, batch.fields, strict=True)
        ]

    def flush(self) -> None:
        """Write the collected rows as one shard; nothing when none are collected."""
        if not self.rows:
            return
        import pyarrow as pa

        rows, errors, fields = zip(*self.rows, strict=True)
        latitudes, longitudes, paths, labels = zip(*fields, strict=True)
        if self.label_features is not None:
            labels = [self.label_features.encode_example(row) for row in labels]
        # Undeclared label types are inferred per shard; `join_shards` promotes them (null to text, int to float).
        schema = self.label_features.arrow_schema if self.label_features is not None else None
        labels = pa.Table.from_pylist(list(labels), schema=schema)
        vectors = np.concatenate(self.embeddings)
        missing = pa.array(np.isnan(vectors).any(axis=1))
        table = pa.table(
            {
                "source_row": pa.array(rows, pa.int64()),
                EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), self.dim, mask=missing),
                "latitude": pa.array(latitudes, pa.float64()),
                "longitude": pa.array(longitudes, pa.float64()),
                "image_path": pa.array(paths, pa.string()),
                **{name: labels.column(name) for name in labels.column_names},
                ERROR_COLUMN: pa.array(errors, pa.string()),
            }
        )
        path = self.shards / f"rows-{self.rows[0][0]:012d}-{self.rows[-1][0] + 1:012d}.arrow"
        with atomic_write(path) as temporary, pa.ipc.new_stream(str(temporary), table.schema) as stream:
            stream.write_table(table)
        self.rows, self.embeddings = [], []


def join_shards(
    folder: Path,
    options: dict[str, Any],
    fingerprint: np.ndarray,
    settings: VoteSettings,
    index: str = AUTO_INDEX,
    nprobe: int | None = None,
    train_size: int | None = None,
    total: int | None = None,
    id_column: str | None = None,
    label_features: datasets.Features | None = None,
) -> tuple[GeoGallery, list[dict[str, Any]]]:
    """Join the shards in `folder` into the gallery, index it, write `gallery.json`, then delete the shards (kept
    until then, so a kill loses nothing). Embeddings are read shard by shard, never memory-mapped, whose pages would
    all count as this process's memory."""
    import datasets
    import faiss
    import pyarrow as pa

    found = _shards(folder)
    if not found:
        raise ValueError(f"The data {options['source']!r} has no rows; a gallery needs at least one photo.")
    missing = _pending_chunks([(start, end) for start, end, _ in found], total, found[-1][1])[0]
    if missing:
        raise RuntimeError(f"The shards in {str(folder / SHARDS_FOLDER)!r} lack rows {missing[0]}; rerun to build.")

    def read(shard: int, mapped: bool = True) -> pa.Table:
        """A shard, memory-mapped (only the columns used are read), or read into memory freed with the table."""
        with pa.memory_map(str(found[shard][2])) if mapped else pa.OSFile(str(found[shard][2])) as source:
            return pa.ipc.open_stream(source).read_all()

    mapped = [read(shard) for shard in range(len(found))]
    small = ["source_row", "image_path", *([id_column] if id_column else []), ERROR_COLUMN]
    kept = pa.concat_tables([table.select(small) for table in mapped], promote_options="permissive").combine_chunks()
    errors = _record_repeats(kept, id_column, options["source"])
    failed = np.array([error is not None for error in errors])
    bad = np.flatnonzero(failed)
    bad_sources = kept.select(small[:2]).take(bad).to_pylist()
    bad_rows = [row | {ERROR_COLUMN: errors[at]} for at, row in zip(bad, bad_sources, strict=True)]
    if failed.all():
        raise ValueError(
            f"No row of {options['source']!r} could be embedded ({len(bad_rows)} skipped; first: "
            f"{bad_rows[0][ERROR_COLUMN]})."
        )
    dim, num_rows = fingerprint.shape[-1], int((~failed).sum())
    keeps = np.split(~failed, [end for _, end, _ in found[:-1]])  # each shard's rows that go into the gallery

    def good_rows(shard: int) -> pa.Table:
        return read(shard, mapped=False).filter(pa.array(keeps[shard])).drop_columns([ERROR_COLUMN])

    def embeddings(rows: pa.Table) -> np.ndarray:
        values = rows.column(EMBEDDING_COLUMN).combine_chunks().flatten()
        return values.to_numpy(zero_copy_only=False).reshape(-1, dim)

    schema = pa.unify_schemas([table.schema for table in mapped], promote_options="permissive")
    features = datasets.Features.from_arrow_schema(schema.remove(schema.get_field_index(ERROR_COLUMN)))
    features[EMBEDDING_COLUMN] = datasets.List(datasets.Value("float32"), length=dim)
    features.update(label_features or {})  # declared types (a ClassLabel's names) where Arrow keeps only integers
    factory = recommended_index(num_rows, dim).factory if index == AUTO_INDEX else index
    starts = np.concatenate([[0], np.cumsum([keep.sum() for keep in keeps])])

    def read_rows(positions: np.ndarray) -> np.ndarray:
        """The embeddings of the gallery rows at sorted `positions`, from the shards that hold them."""
        shard_of = np.searchsorted(starts, positions, side="right") - 1
        shards = np.unique(shard_of)
        return np.concatenate([embeddings(good_rows(s))[positions[shard_of == s] - starts[s]] for s in shards])

    faiss_index, nprobe = trained_index(factory, dim, num_rows, read_rows, nprobe, train_size)
    with atomic_write(folder / DATASET_FOLDER) as temporary:
        # The folder `save_to_disk` writes, written as the rows go (`save_to_disk` would memory-map them all).
        temporary.mkdir()
        data_file = "data-00000-of-00001.arrow"
        with datasets.arrow_writer.ArrowWriter(features=features, path=str(temporary / data_file)) as writer:
            for shard in range(len(found)):
                rows = good_rows(shard)
                writer.write_table(rows)
                faiss_index.add(embeddings(rows))
            writer.finalize()
        datasets.DatasetInfo(features=features).write_to_directory(str(temporary))
        state = {"_data_files": [{"filename": data_file}], "_fingerprint": os.urandom(8).hex(), "_split": None}
        state |= {"_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False}
        write_json(temporary / datasets.config.DATASET_STATE_JSON_FILENAME, state)
    with atomic_write(folder / INDEX_FILE) as temporary:
        faiss.write_index(faiss_index, str(temporary))
    del faiss_index  # read back below: one copy at a time
    with atomic_write(folder / BAD_ROWS_FILE) as temporary:
        lines = [json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in bad_rows]
        temporary.write_text("".join(lines), encoding="utf-8")
    info = GalleryInfo(
        model=options["model"],
        model_fingerprint=fingerprint.tolist(),
        embedding_dim=dim,
        index=factory,
        nprobe=nprobe,
        num_rows=num_rows,
        num_bad_rows=len(bad_rows),
        source=options["source"],
        vote=asdict(settings),
    )
    write_json(folder / GALLERY_FILE, asdict(info))  # last: its presence marks a complete gallery
    shutil.rmtree(folder / SHARDS_FOLDER)
    (folder / BUILD_FILE).unlink(missing_ok=True)
    # Loaded as a user loads it: `GeoGallery` copies its dataset, which must not hold the index yet.
    return GeoGallery.load(folder), bad_rows


def _record_repeats(table: pa.Table, id_column: str | None, source: str) -> list[str | None]:
    """Each row's error: its own, or that it repeats an earlier row's id, or without ids its image file on disk (a
    stored image's path is only a name: two photos of a Parquet file may share `image.jpg`)."""
    keys = table.column(id_column or "image_path").to_pylist()
    errors = table.column(ERROR_COLUMN).to_pylist()
    source_rows = table.column("source_row").to_pylist()
    what = f"id (column {id_column!r})" if id_column else "image file"
    first: dict[str, int] = {}
    repeats = 0
    for position, key in enumerate(keys):
        if errors[position] is None and key not in (None, "") and (id_column or os.path.isfile(key)):
            earlier = first.setdefault(str(key), position)
            if earlier != position:
                errors[position] = (
                    f"repeats the {what} {key!r} of source row {source_rows[earlier]}; each photo goes into the "
                    "gallery once"
                )
                repeats += 1
    if repeats:
        logger.warning(
            f"{repeats:,} rows of {source!r} repeat the {what} of an earlier row; each photo is kept once, the "
            f"repeats are listed in {BAD_ROWS_FILE}."
        )
    return errors


__all__ = ["GalleryBuild", "ShardWriter", "build_gallery", "join_shards"]
