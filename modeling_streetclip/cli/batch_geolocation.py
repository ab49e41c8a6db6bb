"""Geolocate many image files: decoding in DataLoader workers, the model in batches, one result per input.

A collection of photos always holds a few bad files; each one becomes an error record for that input while the rest
of the run goes on. The CLI and the benchmark runner both stream their records from here.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..gazetteer import format_answers
from ..images import ImageInput, ImageLoadError, load_rgb_image
from ..modeling_streetclip import GeolocationOutput, StreetCLIPForGeolocation
from . import DEFAULT_BATCH_SIZE, DEFAULT_NUM_WORKERS


@dataclass
class GeolocationRecord:
    """The result for one input: its answers (best first) or the reason it failed."""

    index: int
    input: Any
    answers: list[dict[str, Any]] | None = None
    error: str | None = None
    image_embeds: torch.Tensor | None = None


class _PreprocessedImages(Dataset):
    """Loads and preprocesses one input per item; a bad input yields its error message instead of pixels."""

    def __init__(self, inputs: Sequence[ImageInput], image_processor):
        self.inputs = inputs
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_rgb_image(self.inputs[index])
        except (FileNotFoundError, IsADirectoryError, PermissionError, ImageLoadError, TypeError) as error:
            return index, None, str(error)
        return index, self.image_processor(images=image, return_tensors="pt")["pixel_values"][0], None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    pixel_values = torch.stack([pixels for _, pixels in good]) if good else None
    errors = {index: error for index, _, error in items if error is not None}
    return [index for index, _ in good], pixel_values, errors


@torch.no_grad()
def geolocate_images(
    model: StreetCLIPForGeolocation,
    image_processor,
    inputs: Sequence[ImageInput],
    top_k: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    return_embeddings: bool = False,
) -> Iterator[GeolocationRecord]:
    """Yield one `GeolocationRecord` per input, in input order, as soon as its batch is done.

    Answers have the pipeline's format (see `GeolocationPipeline`). `num_workers=0` decodes in this process, as a
    library call should unless asked; commands pass `DEFAULT_NUM_WORKERS`. `return_embeddings` keeps each image's
    normalised embedding, for callers that pool views of one place.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    loader = DataLoader(
        _PreprocessedImages(inputs, image_processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=model.device.type == "cuda",
    )
    for indices, pixel_values, errors in loader:
        records = {index: GeolocationRecord(index, inputs[index], error=error) for index, error in errors.items()}
        if pixel_values is not None:
            outputs = model(pixel_values=pixel_values.to(device=model.device, dtype=model.dtype))
            for position, (index, answers) in enumerate(
                zip(indices, ranked_answers(model, outputs, top_k), strict=True)
            ):
                embeds = outputs.image_embeds[position].float().cpu() if return_embeddings else None
                records[index] = GeolocationRecord(index, inputs[index], answers=answers, image_embeds=embeds)
        yield from (records[index] for index in sorted(records))


@torch.no_grad()
def pooled_answers(
    model: StreetCLIPForGeolocation, image_embeds: torch.Tensor, top_k: int = 1
) -> list[dict[str, Any]]:
    """Answers for one place seen in several views: the hierarchical decision on the mean of their normalised
    embeddings (as `return_embeddings=True` keeps them), renormalised."""
    pooled = F.normalize(image_embeds.mean(dim=0, keepdim=True), dim=-1)
    outputs = model.locate_embeddings(pooled.to(device=model.device, dtype=model.dtype))
    return ranked_answers(model, outputs, top_k)[0]


def ranked_answers(
    model: StreetCLIPForGeolocation, outputs: GeolocationOutput, top_k: int
) -> list[list[dict[str, Any]]]:
    """Each image's `top_k` answers in the pipeline's format, the paper's greedy decision first."""
    ranked = model.rank_places(outputs, top_k=top_k)
    return [format_answers(model.candidate_places, *image) for image in zip(*ranked, strict=True)]


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_NUM_WORKERS",
    "GeolocationRecord",
    "geolocate_images",
    "pooled_answers",
    "ranked_answers",
]
