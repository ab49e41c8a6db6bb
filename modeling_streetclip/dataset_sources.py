"""Open one split of a data set named by a path or a Hub id, the same way for training and for the benchmark runner.

A source is a folder written by `save_to_disk` (a `Dataset` or a `DatasetDict`), any other local folder that
`datasets.load_dataset` reads (an image folder with a `metadata.csv`, a folder of Parquet or CSV files), or a Hub id.
An image folder's only split is `train`, whatever it holds, so a source with a single split is read whatever split
was asked for. `datasets` comes with the `[train]` and `[eval]` extras, not with inference, so it is imported only
when a data set is opened.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from transformers.utils import logging


if TYPE_CHECKING:
    import datasets


logger = logging.get_logger(__name__)


def _import_datasets():
    """The `datasets` module, or an ImportError that names the extras providing it."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"Reading data sets needs the `datasets` package ({error}); install it with the training or evaluation "
            "extra: `pip install 'streetclip[train]'` or `pip install 'streetclip[eval]'`."
        ) from None
    return datasets


def _is_saved_dataset(path: str | Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    datasets = _import_datasets()
    folder = Path(path)
    return (folder / datasets.config.DATASET_STATE_JSON_FILENAME).is_file() or (
        folder / datasets.config.DATASETDICT_JSON_FILENAME
    ).is_file()


def _names_a_missing_folder(source: str) -> bool:
    """Whether `source` can only be a local path (absolute, `./`, `../`, `~`, or more parts than ORG/NAME) and
    nothing is there: `datasets` would report it as a malformed Hub id."""
    path = Path(source).expanduser()
    local = path.is_absolute() or source.startswith((".", "~")) or len(path.parts) > 2
    return local and not path.exists()


def open_dataset(
    source: str | Path, split: str, streaming: bool = False
) -> tuple[datasets.Dataset | datasets.IterableDataset, str | None]:
    """One split of the data set at `source` and the name of the split it is, None for a `Dataset` saved without
    splits.

    `split` is read when the source has it; a source with a single split is read whatever `split` says (logged when
    the names differ); a source with several splits but not `split` is refused, naming its splits. `streaming` gives
    an `IterableDataset` that reads rows as they are used, also for a folder written by `save_to_disk`.
    """
    datasets = _import_datasets()
    source = str(source)
    if _names_a_missing_folder(source):
        raise FileNotFoundError(
            f"No data set folder at {source!r}; give an existing folder, or a Hub id such as ORG/NAME."
        )
    if _is_saved_dataset(source):
        loaded = datasets.load_from_disk(source)
    else:
        loaded = datasets.load_dataset(source, streaming=streaming)
    chosen = None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split in loaded:
            chosen = split
        elif len(loaded) == 1:
            chosen = next(iter(loaded))
            logger.warning(f"{source!r} has no split {split!r}; reading its only split, {chosen!r}.")
        else:
            raise ValueError(f"{source!r} has no split {split!r}; its splits are {sorted(loaded)}.")
        loaded = loaded[chosen]
    if streaming and isinstance(loaded, datasets.Dataset):
        loaded = loaded.to_iterable_dataset()
    return loaded, chosen


__all__ = ["open_dataset"]
