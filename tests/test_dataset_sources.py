"""Specification of `modeling_streetclip.app.sources.open_dataset`, which training and the benchmark runner
both open their data sets with."""

import logging
import sys

import datasets
import pytest
from PIL import Image

from modeling_streetclip.app.sources import EncodedImages, encoded_image, open_dataset


def _table(n: int = 3) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"lat": [float(row) for row in range(n)], "lon": [0.0] * n})


@pytest.fixture
def image_folder(tmp_path):
    """An image folder as training documents it: images and a metadata.csv, one of them in a subfolder."""
    folder = tmp_path / "geo"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        Image.new("RGB", (4, 4), "red").save(folder / name)
    (folder / "metadata.csv").write_text("file_name,latitude,longitude\na.png,1,2\nb.png,3,4\nsub/c.png,5,6\n")
    return folder


def test_image_folder_is_read_from_its_only_split_whatever_split_is_asked(image_folder, caplog):
    with caplog.at_level(logging.INFO, logger="modeling_streetclip"):
        dataset, split = open_dataset(image_folder, "test")
    assert split == "train" and len(dataset) == 3
    assert dataset.column_names == ["image", "latitude", "longitude"]
    # Every evaluation folder would say so: an info message, which commands show with --verbose only.
    (record,) = [record for record in caplog.records if "has no split" in record.message]
    assert record.levelno == logging.INFO
    assert "has no split 'test'; reading its only split, 'train'" in record.message


def test_a_row_without_an_image_is_handed_out_as_none(tmp_path):
    photo = tmp_path / "a.png"
    Image.new("RGB", (4, 4), "red").save(photo)
    dataset = datasets.Dataset.from_dict({"image": [str(photo), None]}).cast_column("image", datasets.Image())

    images = EncodedImages(dataset, "image")

    assert isinstance(images[0], bytes | str) and images[1] is None
    assert encoded_image(None) is None


def test_saved_dataset_dict_gives_the_split_asked_for_and_refuses_a_missing_one(tmp_path):
    datasets.DatasetDict({"test": _table(2), "train": _table(5)}).save_to_disk(tmp_path / "saved")
    dataset, split = open_dataset(tmp_path / "saved", "test")
    assert (split, len(dataset)) == ("test", 2)
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['test', 'train'\]"):
        open_dataset(tmp_path / "saved", "validation")


def test_dataset_saved_without_splits_has_no_split_name(tmp_path):
    _table().save_to_disk(tmp_path / "saved")
    dataset, split = open_dataset(str(tmp_path / "saved"), "test")
    assert split is None and dataset["lat"] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("layout", ["dataset", "dataset_dict", "image_folder"])
def test_streaming_gives_an_iterable_dataset_for_every_kind_of_folder(layout, tmp_path, image_folder):
    if layout == "dataset":
        _table().save_to_disk(tmp_path / "saved")
    elif layout == "dataset_dict":
        datasets.DatasetDict({"train": _table()}).save_to_disk(tmp_path / "saved")
    source = image_folder if layout == "image_folder" else tmp_path / "saved"
    dataset, _ = open_dataset(source, "train", streaming=True)
    assert isinstance(dataset, datasets.IterableDataset)
    assert len(list(dataset)) == 3


def test_missing_datasets_package_names_the_extras_that_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"streetclip\[train\]'.*streetclip\[eval\]'"):
        open_dataset(tmp_path, "test")


@pytest.mark.parametrize("source", ["./missing", "../missing", "/nowhere/data", "~/no/such/data", "a/b/c"])
def test_a_path_to_a_missing_folder_is_not_taken_for_a_hub_id(source):
    with pytest.raises(FileNotFoundError, match=f"No data set folder at {source!r}"):
        open_dataset(source, "test")
