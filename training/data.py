"""Training data: geo-tagged images in, captioned and tokenised rows out, images decoded in DataLoader workers.

Missing place labels come from the coordinates (nearest GeoNames place). Bad rows never stop an epoch: rows without
valid coordinates or a fitting caption template are dropped before training, unreadable images from their batch.
"""

import hashlib
import logging
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

from modeling_streetclip.app.sources import encoded_image, open_dataset
from modeling_streetclip.captions import CaptionMix
from modeling_streetclip.countries import country_code_or_empty
from modeling_streetclip.geodesy import coordinate_problem, coordinate_value, valid_coordinates
from modeling_streetclip.geonames import geonames_country_names
from modeling_streetclip.images import ImageLoadError, load_rgb_image
from modeling_streetclip.pixels import normalized_pixels, resized_pixels


logger = get_logger(__name__)

PLACE_FIELDS = ("city", "region", "country")
# The columns the caption map writes, typed: left to itself, `datasets` would keep a CSV's latitude column as text
# when one cell is text, and the collator could not make a tensor of the cleaned coordinates.
MAPPED_FEATURES = datasets.Features(
    latitude=datasets.Value("float64"),
    longitude=datasets.Value("float64"),
    **{name: datasets.Value("string") for name in (*PLACE_FIELDS, "country_code", "caption")},
    caption_key=datasets.Value("int64"),
    input_ids=datasets.Sequence(datasets.Value("int32")),
    row_id=datasets.Value("int64"),
    skip_reason=datasets.Value("string"),
)
GeoDataset = datasets.Dataset | datasets.IterableDataset
# Called per row; an unknown name (the coordinates decide then) costs a search for close matches.
_country_code = cache(country_code_or_empty)


def load_geo_dataset(source: str, split: str, image_column: str, streaming: bool = False) -> GeoDataset:
    """One split of a Hub or local data set, or of an image folder (a single split is used whatever `split` says),
    with its images left encoded for the DataLoader workers."""
    dataset, _ = open_dataset(source, split, streaming=streaming)
    if dataset.column_names is not None and image_column not in dataset.column_names:
        raise ValueError(
            f"{source!r} has no image column {image_column!r}; its columns are {dataset.column_names}. "
            "Name the image column with --image_column."
        )
    return dataset.cast_column(image_column, datasets.Image(decode=False))


class PlaceCaptioner:
    """The batched `datasets.map` function: cleans coordinates, fills missing place labels from them, draws a
    caption per row and tokenises it. A country is named through its ISO code, by `country_names` (the candidate
    list's spelling) or else GeoNames, so that captions and country prompts agree and an OSV-5M code becomes a name.
    `columns` maps "latitude", "longitude" and the place fields to the data's column names, if others."""

    def __init__(
        self,
        caption_mix: CaptionMix,
        tokenizer,
        max_length: int,
        country_names: Mapping[str, str],
        columns: Mapping[str, str] | None = None,
    ):
        self.caption_mix = caption_mix
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.country_names = geonames_country_names() | {code: name for code, name in country_names.items() if code}
        self.columns = {field: field for field in ("latitude", "longitude", *PLACE_FIELDS)} | dict(columns or {})

    def __call__(self, batch: Mapping[str, list], row_ids: list[int]) -> dict[str, list]:
        size = len(row_ids)
        for field in ("latitude", "longitude"):
            if self.columns[field] not in batch:
                raise ValueError(
                    f"The data has no {self.columns[field]!r} column; its columns are {sorted(batch)}. Name the "
                    "coordinate columns with --latitude_column and --longitude_column."
                )
        latitudes, longitudes = (
            np.array([coordinate_value(value) for value in batch[self.columns[field]]], dtype=np.float64)
            for field in ("latitude", "longitude")
        )
        valid = valid_coordinates(latitudes, longitudes)
        labels = {field: batch.get(self.columns[field], [None] * size) for field in PLACE_FIELDS}
        # Missing labels (None, NaN from an empty CSV cell, blank text) are "".
        given = {field: [v.strip() if isinstance(v, str) else "" for v in values] for field, values in labels.items()}
        # Every valid row, labelled or not: it costs microseconds and gives a code where GeoNames lacks the name.
        geocoded = reverse_geocoder().lookup(latitudes[valid], longitudes[valid])
        places = {field: [""] * size for field in PLACE_FIELDS}
        codes = [""] * size
        for position, row in enumerate(np.flatnonzero(valid)):
            codes[row] = _country_code(given["country"][row]) or geocoded.country_code[position]
            places["city"][row] = given["city"][row] or geocoded.city[position]
            places["region"][row] = given["region"][row] or geocoded.region[position]
            country = given["country"][row] or geocoded.country[position]
            places["country"][row] = self.country_names.get(codes[row]) or country
        captions = self.caption_mix.captions(places, row_ids)
        skip_reasons = list(map(_skip_reason, latitudes, longitudes, captions))
        captions = [caption or "" for caption in captions]
        return {
            "latitude": latitudes.tolist(),
            "longitude": longitudes.tolist(),
            **places,
            "country_code": codes,
            "caption": captions,
            "caption_key": [caption_key(caption) for caption in captions],
            "input_ids": self.tokenizer(captions, truncation=True, max_length=self.max_length)["input_ids"],
            "row_id": list(row_ids),
            "skip_reason": skip_reasons,
        }


def caption_dataset(
    dataset: GeoDataset,
    captioner: PlaceCaptioner,
    image_column: str,
    num_proc: int | None = None,
    description: str = "data",
) -> GeoDataset:
    """Apply the caption map; a map-style data set also loses its bad rows here, with their count logged. Row ids are
    positions in the source, so a row keeps its caption in every epoch."""
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
    """Decodes and preprocesses a batch's images in the DataLoader worker and pads its captions, dropping rows whose
    image cannot be read (or that the caption map marked bad) and counting them as `skipped_rows`."""

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
                kept.append(row)
            except (FileNotFoundError, ImageLoadError) as error:
                # A DataLoader worker may be spawned without accelerate's process state, which its logger needs.
                logging.getLogger(__name__).warning(f"Skipping row {row['row_id']}: {error}")
        if kept:
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


def caption_key(caption: str) -> int:
    """A 64-bit id of a caption, equal in every process (unlike `hash`), to find identical captions in a batch
    gathered across processes."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "little", signed=True)


def decode_image(value: Mapping | str | Image.Image | None) -> Image.Image:
    """An RGB image from a `datasets` image value left encoded, a path or a PIL image; an empty cell is an
    `ImageLoadError`, like an unreadable file."""
    image = encoded_image(value)
    if image is None:
        raise ImageLoadError("The row has no image (its image cell is empty).")
    return load_rgb_image(image)


def _skip_reason(latitude: float, longitude: float, caption: str | None) -> str:
    if (problem := coordinate_problem(latitude, longitude)) is not None:
        return problem.value
    return "" if caption is not None else "no caption template fits its place labels"
