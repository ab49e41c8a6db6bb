"""Training data: geo-tagged images in, captioned and tokenised rows out, images decoded in DataLoader workers.

Sources are anything `datasets` loads: a Hub id or local dataset (OSV-5M's columns `country`, `region`, `city`, with
ISO codes for countries) or an image folder with a `metadata.csv` (`file_name,latitude,longitude[,city,region,
country]`). Missing place labels are filled from the coordinates by the nearest GeoNames place; captions come from
`modeling_streetclip.captions.CaptionMix` in a batched `datasets.map`, which also tokenises. Images stay encoded
until the collator, which runs in the DataLoader workers.

Bad rows never stop an epoch: rows with missing or out-of-range coordinates (or that no caption template fits) are
dropped before training, and images that cannot be read are dropped from their batch; both are counted and logged.
"""

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import datasets
import numpy as np
import torch
from accelerate.logging import get_logger
from geocoding import reverse_geocoder
from PIL import Image

from modeling_streetclip.app.sources import open_dataset
from modeling_streetclip.captions import CaptionMix
from modeling_streetclip.countries import resolve_country_code
from modeling_streetclip.geodesy import coordinate_problem, valid_coordinates
from modeling_streetclip.geonames import geonames_country_names
from modeling_streetclip.images import ImageLoadError, load_rgb_image
from modeling_streetclip.pixels import normalized_pixels, resized_pixels


logger = get_logger(__name__)
# The collator runs in DataLoader workers, which may be spawned without accelerate's process state.
worker_logger = logging.getLogger(__name__)

PLACE_FIELDS = ("city", "region", "country")
# The columns that the caption map writes, typed explicitly; every other source column except the image is dropped
# from the cache. Left to itself, `datasets` keeps a source column's type wherever the new values cast to it, so one
# text cell ("abc") in a CSV's latitude column would keep the cleaned coordinates as text, which the collator cannot
# turn into a tensor.
MAPPED_FEATURES = datasets.Features(
    {
        "latitude": datasets.Value("float64"),
        "longitude": datasets.Value("float64"),
        **{name: datasets.Value("string") for name in (*PLACE_FIELDS, "country_code", "caption")},
        "caption_key": datasets.Value("int64"),
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "row_id": datasets.Value("int64"),
        "skip_reason": datasets.Value("string"),
    }
)


def load_geo_dataset(
    source: str, split: str, image_column: str, streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """One split of a Hub or local data set, or of an image folder, with its images left encoded.

    A source with a single split uses it whatever `split` says, since an image folder's only split is `train`
    (`modeling_streetclip.app.sources.open_dataset`, which the benchmark runner also reads data sets with).
    """
    dataset, _ = open_dataset(source, split, streaming=streaming)
    if dataset.column_names is not None and image_column not in dataset.column_names:
        raise ValueError(
            f"{source!r} has no image column {image_column!r}; its columns are {dataset.column_names}. "
            "Name the image column with --image_column."
        )
    # Decoding belongs to the DataLoader workers, where an unreadable image can be skipped instead of crashing.
    return dataset.cast_column(image_column, datasets.Image(decode=False))


class PlaceCaptioner:
    """The batched `datasets.map` function: cleans coordinates, fills missing place labels from them, draws a
    caption per row and tokenises it.

    Every country is named by its ISO code: `country_names` (e.g. the candidate list's spelling) where it has the
    code, else GeoNames' current name, so that captions and the country probe prompts name a country the same way
    and an OSV-5M code becomes a name.
    """

    def __init__(
        self,
        caption_mix: CaptionMix,
        tokenizer,
        max_length: int,
        country_names: Mapping[str, str],
        latitude_column: str = "latitude",
        longitude_column: str = "longitude",
        label_columns: Mapping[str, str] | None = None,
    ):
        self.caption_mix = caption_mix
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.country_names = {**geonames_country_names(), **country_names}
        self.latitude_column = latitude_column
        self.longitude_column = longitude_column
        self.label_columns = dict(label_columns or {field: field for field in PLACE_FIELDS})

    def __call__(self, batch: Mapping[str, list], row_ids: list[int]) -> dict[str, list]:
        size = len(row_ids)
        for column in (self.latitude_column, self.longitude_column):
            if column not in batch:
                raise ValueError(
                    f"The data has no {column!r} column; its columns are {sorted(batch)}. Name the coordinate "
                    "columns with --latitude_column and --longitude_column."
                )
        latitudes = np.array([_as_float(value) for value in batch[self.latitude_column]], dtype=np.float64)
        longitudes = np.array([_as_float(value) for value in batch[self.longitude_column]], dtype=np.float64)
        valid = valid_coordinates(latitudes, longitudes)
        given = {
            field: [_as_label(value) for value in batch.get(column, [None] * size)]
            for field, column in self.label_columns.items()
        }
        # Geocoding every valid row costs microseconds per row and also supplies a country code where the given
        # country name is unknown to GeoNames.
        geocoded = reverse_geocoder().lookup(latitudes[valid], longitudes[valid])
        geocoded_rows = np.cumsum(valid) - 1
        places = {field: [""] * size for field in PLACE_FIELDS}
        codes = [""] * size
        for row in np.flatnonzero(valid):
            position = geocoded_rows[row]
            codes[row] = _country_code(given["country"][row]) or geocoded.country_code[position]
            places["city"][row] = given["city"][row] or geocoded.city[position]
            places["region"][row] = given["region"][row] or geocoded.region[position]
            places["country"][row] = (
                self.country_names.get(codes[row]) or given["country"][row] or geocoded.country[position]
            )
        captions = self.caption_mix.captions(places, row_ids)
        skip_reasons = [
            _skip_reason(latitude, longitude, caption)
            for latitude, longitude, caption in zip(latitudes, longitudes, captions, strict=True)
        ]
        captions = [caption or "" for caption in captions]
        tokens = self.tokenizer(captions, truncation=True, max_length=self.max_length)
        return {
            "latitude": latitudes.tolist(),
            "longitude": longitudes.tolist(),
            **places,
            "country_code": codes,
            "caption": captions,
            "caption_key": [caption_key(caption) for caption in captions],
            "input_ids": tokens["input_ids"],
            "row_id": list(row_ids),
            "skip_reason": skip_reasons,
        }


def caption_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    captioner: PlaceCaptioner,
    image_column: str,
    num_proc: int | None = None,
    description: str = "data",
) -> datasets.Dataset | datasets.IterableDataset:
    """Apply the caption map; a map-style data set also loses its bad rows here, with their count logged.

    Row ids are positions in the source, taken before any shuffling, so a row keeps its caption in every epoch.
    """
    remove = [column for column in dataset.column_names or [] if column != image_column]
    if isinstance(dataset, datasets.IterableDataset):
        # Streamed rows are only seen in the workers; the collator drops and counts the bad ones there.
        return dataset.map(captioner, batched=True, with_indices=True, remove_columns=remove or None)
    dataset = dataset.map(
        captioner,
        batched=True,
        with_indices=True,
        remove_columns=remove,
        features=datasets.Features({image_column: dataset.features[image_column], **MAPPED_FEATURES}),
        num_proc=num_proc,
        desc=f"Captioning {description}",
    )
    reasons = Counter(reason for reason in dataset["skip_reason"] if reason)
    if reasons:
        details = ", ".join(f"{count} with {reason}" for reason, count in reasons.most_common())
        logger.warning(f"Skipping {sum(reasons.values())} of {len(dataset)} rows of the {description}: {details}.")
        dataset = dataset.filter(
            lambda reasons: [not reason for reason in reasons], batched=True, input_columns="skip_reason"
        )
    return dataset


class GeoCollator:
    """Decodes and preprocesses the images of a batch in the DataLoader worker, pads the captions, and drops rows
    whose image cannot be read (or that the caption map marked bad), reporting their number as `skipped_rows`."""

    def __init__(self, image_processor, tokenizer, image_column: str, country_codes: Sequence[str]):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_column = image_column
        self.country_rows = {code: row for row, code in enumerate(country_codes)}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kept, images = [], []
        for row in rows:
            if row["skip_reason"]:
                continue
            try:
                images.append(decode_image(row[self.image_column]))
            except (FileNotFoundError, ImageLoadError) as error:
                worker_logger.warning(f"Skipping row {row['row_id']}: {error}")
                continue
            kept.append(row)
        if kept:
            # The processor's pixel values, with a strip's kept centre cut before it is resized.
            pixel_values = normalized_pixels(self.image_processor, resized_pixels(self.image_processor, images))
            tokens = self.tokenizer.pad({"input_ids": [row["input_ids"] for row in kept]}, return_tensors="pt")
        else:
            # A batch of only bad rows still has to reach the training step, which every process takes together.
            crop = self.image_processor.crop_size
            pixel_values = torch.empty(0, 3, crop["height"], crop["width"])
            tokens = {"input_ids": torch.empty(0, 1), "attention_mask": torch.empty(0, 1)}
        return {
            "pixel_values": pixel_values,
            "input_ids": tokens["input_ids"].long(),
            "attention_mask": tokens["attention_mask"].long(),
            "caption_keys": torch.tensor([row["caption_key"] for row in kept], dtype=torch.long),
            "row_ids": torch.tensor([row["row_id"] for row in kept], dtype=torch.long),
            "coordinates": torch.tensor(
                [[row["latitude"], row["longitude"]] for row in kept], dtype=torch.float64
            ).reshape(-1, 2),
            # -1 marks a true country outside the candidates: always a miss for country accuracy.
            "country_rows": torch.tensor(
                [self.country_rows.get(row["country_code"], -1) for row in kept], dtype=torch.long
            ),
            "skipped_rows": torch.tensor(len(rows) - len(kept), dtype=torch.long),
        }


def decode_image(value: Mapping | str | Image.Image | None) -> Image.Image:
    """An RGB image from a `datasets` image value (`{"bytes", "path"}` left encoded), a path or a PIL image; a row
    without one (an empty cell) is an `ImageLoadError`, a bad row like an unreadable file."""
    if isinstance(value, Mapping):
        value = value.get("path") if value.get("bytes") is None else value["bytes"]
    if value is None:
        raise ImageLoadError("The row has no image (its image cell is empty).")
    return load_rgb_image(value)


def caption_key(caption: str) -> int:
    """A stable 64-bit id of a caption, equal in every process (unlike `hash`), to find identical captions in a
    batch gathered across processes."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "little", signed=True)


def candidate_country_names(country_names: Sequence[str], country_codes: Sequence[str]) -> dict[str, str]:
    """ISO code to the candidate list's spelling of each country, for `PlaceCaptioner`."""
    return {code: name for name, code in zip(country_names, country_codes, strict=True) if code}


@cache
def _country_code(name: str) -> str:
    """ISO code of a country name or code, or "" for a name GeoNames does not know (the coordinates decide then)."""
    if not name:
        return ""
    try:
        return resolve_country_code(name)
    except ValueError:
        return ""


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _as_label(value) -> str:
    """A place name, or "" for a missing one (None, NaN from an empty CSV cell, blank text)."""
    return value.strip() if isinstance(value, str) else ""


def _skip_reason(latitude: float, longitude: float, caption: str | None) -> str:
    problem = coordinate_problem(latitude, longitude)
    if problem is not None:
        return problem.value
    if caption is None:
        return "no caption template fits its place labels"
    return ""
