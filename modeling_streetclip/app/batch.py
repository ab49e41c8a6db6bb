"""Geolocate many image files: decoding in DataLoader workers, the model in batches, one result per input, on one
process or many.

A collection of photos always holds a few bad files; each one becomes an error record for that input while the rest
of the run goes on. The CLI and the benchmark runner both stream their records from here. Under `accelerate launch`
or `torchrun`, Accelerate's sharded DataLoader hands each process every N-th batch and `gather_for_metrics` gives
every process all N batches of each step, in input order, so callers see the same records as on one process.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..decisions import rank_answers
from ..gallery_store import GeoGallery
from ..images import ImageInput, ImageLoadError, load_rgb_image
from ..modeling_streetclip import StreetCLIPForGeolocation
from ..pixels import normalized_pixels, resized_pixels
from . import DEFAULT_BATCH_SIZE


if TYPE_CHECKING:
    from accelerate import Accelerator


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
        image = self.inputs[index]
        if image is None:  # a dataset row without an image
            return index, None, "no image: the row's image is empty (None)."
        try:
            image = load_rgb_image(image)
        # OSError: any failure to look up or read the file (missing, a folder, no permission, a name too long).
        except (OSError, ImageLoadError, TypeError) as error:
            return index, None, str(error)
        return index, resized_pixels(self.image_processor, image)[0], None


def _collate(items: list[tuple[int, torch.Tensor | None, str | None]]):
    """A batch: its indices in the sampler's order (Accelerate pads a last batch with indices from the start, and
    `gather_for_metrics` cuts the padding off by position), those of the decoded images with their pixels stacked,
    and the errors of the others."""
    good = [(index, pixels) for index, pixels, _ in items if pixels is not None]
    pixel_values = torch.stack([pixels for _, pixels in good]) if good else None
    errors = {index: error for index, _, error in items if error is not None}
    return [index for index, _, _ in items], [index for index, _ in good], pixel_values, errors


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

    Answers have the pipeline's format (see `GeolocationPipeline`), ordered by the `decision` rule. `num_workers=0`
    decodes in this process, as a library call should unless asked; commands pass `DEFAULT_NUM_WORKERS`.
    `return_embeddings` keeps each image's normalised embedding, for callers that pool views of one place. The
    decisions `"gallery"` and `"hybrid"` search `gallery` (see `modeling_streetclip.gallery_vote`); without a
    `decision`, the default rule is `decisions.default_decision(gallery)`.

    With an `accelerator` of several processes, every process must call this with the same `inputs`: each runs the
    model on its share of the batches only (`Accelerator.prepare_data_loader`: batch i goes to process i mod N, the
    last ones padded so that all have as many), and every process yields the records of all inputs, gathered batch
    by batch with `gather_for_metrics`, which drops the padding. Batches are the ones a single process forms, so the
    answers are the same.
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
    if accelerator is None:
        for batch in loader:
            yield from _batch_records(
                model, image_processor, inputs, batch, top_k, return_embeddings, decision, gallery
            )
        return
    # The model's own device decides where pixels go (a quantized model stays on the CPU beside a GPU).
    loader = accelerator.prepare_data_loader(loader, device_placement=False)
    try:
        for batch in loader:
            # Inputs stay behind (a dataset's are encoded images): every process holds them already.
            mine = [
                replace(record, input=None)
                for record in _batch_records(
                    model, image_processor, inputs, batch, top_k, return_embeddings, decision, gallery
                )
            ]
            for record in accelerator.gather_for_metrics(mine, use_gather_object=True):
                yield replace(record, input=inputs[record.index])
    finally:
        loader.end()  # a run stopped early (a failed write) must not leave the loader in Accelerate's shared state


def _batch_records(
    model: StreetCLIPForGeolocation,
    image_processor,
    inputs: Sequence[ImageInput],
    batch: tuple[list[int], list[int], torch.Tensor | None, dict[int, str]],
    top_k: int,
    return_embeddings: bool,
    decision: str | None,
    gallery: GeoGallery | None = None,
) -> list[GeolocationRecord]:
    """The records of one collated batch, in its order: answers for the decoded images, errors for the others."""
    order, indices, pixel_values, errors = batch
    records = {index: GeolocationRecord(index, inputs[index], error=error) for index, error in errors.items()}
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.device, non_blocking=True)
        outputs = model(pixel_values=normalized_pixels(image_processor, pixel_values, model.dtype))
        answers_per_image = rank_answers(model, outputs, top_k, decision, gallery)
        for position, (index, answers) in enumerate(zip(indices, answers_per_image, strict=True)):
            embeds = outputs.image_embeds[position].float().cpu() if return_embeddings else None
            records[index] = GeolocationRecord(index, inputs[index], answers=answers, image_embeds=embeds)
    return [records[index] for index in order]


@torch.no_grad()
def pooled_answers(
    model: StreetCLIPForGeolocation,
    image_embeds: torch.Tensor,
    top_k: int = 1,
    decision: str | None = None,
    gallery: GeoGallery | None = None,
) -> list[dict[str, Any]]:
    """Answers for one place seen in several views: the hierarchical decision on the mean of their normalised
    embeddings (as `return_embeddings=True` keeps them), renormalised."""
    pooled = F.normalize(image_embeds.mean(dim=0, keepdim=True), dim=-1)
    outputs = model.locate_embeddings(pooled.to(device=model.device, dtype=model.dtype))
    return rank_answers(model, outputs, top_k, decision, gallery)[0]


__all__ = [
    "GeolocationRecord",
    "geolocate_images",
    "pooled_answers",
]
