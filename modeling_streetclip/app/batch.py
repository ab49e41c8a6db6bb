"""The batch engine: photos decoded in DataLoader workers and embedded in batches (`embedded_batches`, which gallery
building shares), one result per input, on one process or many; a bad file becomes its input's error."""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..decisions import rank_answers
from ..gallery_store import GeoGallery, image_embeddings
from ..images import ImageInput, ImageLoadError, load_rgb_image
from ..modeling_streetclip import StreetCLIPForGeolocation
from ..pixels import normalized_pixels, resized_pixels
from . import DEFAULT_BATCH_SIZE


if TYPE_CHECKING:
    from accelerate import Accelerator


class PixelBatch(NamedTuple):
    """A collated batch: every item's index in order (`gather_for_metrics` cuts Accelerate's padding off by position),
    the decoded items' indices with their 8-bit pixels stacked, the others' errors, and each item's other fields."""

    order: list[int]
    decoded: list[int]
    pixel_values: torch.Tensor | None
    errors: dict[int, str]
    fields: list[Any]


def collate_pixels(items: list[tuple[int, torch.Tensor | None, str | None, Any]]) -> PixelBatch:
    """Collate `(index, resized pixels or None, error or None, fields)` items, as `embedded_batches` reads them."""
    good = [(index, pixels) for index, pixels, _, _ in items if pixels is not None]
    return PixelBatch(
        order=[item[0] for item in items],
        decoded=[index for index, _ in good],
        pixel_values=torch.stack([pixels for _, pixels in good]) if good else None,
        errors={index: error for index, _, error, _ in items if error is not None},
        fields=[item[3] for item in items],
    )


def embedded_batches(
    model, image_processor, loader: Iterable[PixelBatch], locate: bool = False
) -> Iterator[tuple[PixelBatch, Any]]:
    """Each batch of `loader` with the normalised image embeddings of its decoded items (None: none decoded), or with
    `locate` the model's outputs (`forward`, which an ONNX graph may run)."""
    for batch in loader:
        result = None
        if batch.pixel_values is not None:
            pixel_values = batch.pixel_values.to(model.device, non_blocking=True)
            pixel_values = normalized_pixels(image_processor, pixel_values, model.dtype)
            result = model(pixel_values=pixel_values) if locate else image_embeddings(model, pixel_values)
        yield batch, result


@dataclass
class GeolocationRecord:
    """The result for one input: its answers (best first) or the reason it failed."""

    index: int
    input: Any
    answers: list[dict[str, Any]] | None = None
    error: str | None = None
    image_embeds: torch.Tensor | None = None


def load_pixels(image: ImageInput, image_processor) -> tuple[torch.Tensor | None, str | None]:
    """The resized 8-bit pixels of `image` (as `collate_pixels` takes them), or why it cannot be read."""
    try:
        rgb = load_rgb_image(image)
    # OSError: any failure to look up or read the file (missing, a folder, no permission, a name too long).
    except (OSError, ImageLoadError, TypeError) as error:
        return None, str(error)
    return resized_pixels(image_processor, rgb)[0], None


class _PreprocessedImages(Dataset):
    """Loads and resizes one input per item; a bad input yields its error message instead of pixels."""

    def __init__(self, inputs: Sequence[ImageInput], image_processor):
        self.inputs, self.image_processor = inputs, image_processor

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None, None]:
        if self.inputs[index] is None:  # a dataset row without an image
            return index, None, "no image: the row's image is empty (None).", None
        return index, *load_pixels(self.inputs[index], self.image_processor), None


@torch.no_grad()
def geolocate_images(
    model: StreetCLIPForGeolocation,
    image_processor,
    inputs: Sequence[ImageInput],
    top_k: int = 1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_workers: int = 0,
    return_embeddings: bool = False,
    accelerator: "Accelerator | None" = None,
    decision: str | None = None,
    gallery: GeoGallery | None = None,
) -> Iterator[GeolocationRecord]:
    """Yield one `GeolocationRecord` per input, in input order, as soon as its batch is done.

    Answers are ranked by `decisions.rank_answers` under `decision`; `return_embeddings` keeps each image's normalised
    embedding, to pool views. With an `accelerator` of N processes, every process calls this with the same `inputs`,
    runs batch i when i mod N is its rank, and yields the records of all inputs, gathered batch by batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    loader = DataLoader(
        _PreprocessedImages(inputs, image_processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_pixels,
        pin_memory=model.device.type == "cuda",
    )
    if accelerator is not None:
        # The model's own device decides where pixels go (a quantized model stays on the CPU beside a GPU).
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
    try:
        for batch, outputs in embedded_batches(model, image_processor, loader, locate=True):
            records = _batch_records(model, inputs, batch, outputs, top_k, return_embeddings, decision, gallery)
            if accelerator is None:
                yield from records
                continue
            # Inputs stay behind (a dataset's are encoded images): every process holds them already.
            mine = [replace(record, input=None) for record in records]
            for record in accelerator.gather_for_metrics(mine, use_gather_object=True):
                yield replace(record, input=inputs[record.index])
    finally:
        if accelerator is not None:
            loader.end()  # a run stopped early (a failed write) must not leave the loader in Accelerate's shared state


def _batch_records(
    model, inputs, batch, outputs, top_k, return_embeddings, decision, gallery
) -> list[GeolocationRecord]:
    """The records of one batch, in its order: answers for the decoded images, errors for the others."""
    records = {index: GeolocationRecord(index, inputs[index], error=error) for index, error in batch.errors.items()}
    if outputs is not None:
        answers_per_image = rank_answers(model, outputs, top_k=top_k, decision=decision, gallery=gallery)
        for position, (index, answers) in enumerate(zip(batch.decoded, answers_per_image, strict=True)):
            embeds = outputs.image_embeds[position].float().cpu() if return_embeddings else None
            records[index] = GeolocationRecord(index, inputs[index], answers=answers, image_embeds=embeds)
    return [records[index] for index in batch.order]


@torch.no_grad()
def pooled_answers(
    model: StreetCLIPForGeolocation,
    image_embeds: torch.Tensor,
    top_k: int = 1,
    decision: str | None = None,
    gallery: GeoGallery | None = None,
) -> list[dict[str, Any]]:
    """Answers for one place seen in several views: the decision on the mean of their normalised embeddings (as
    `return_embeddings=True` keeps them), renormalised."""
    pooled = F.normalize(image_embeds.mean(dim=0, keepdim=True), dim=-1)
    outputs = model.locate_embeddings(pooled.to(device=model.device, dtype=model.dtype))
    return rank_answers(model, outputs, top_k=top_k, decision=decision, gallery=gallery)[0]


__all__ = [
    "GeolocationRecord",
    "collate_pixels",
    "embedded_batches",
    "geolocate_images",
    "load_pixels",
    "pooled_answers",
]
