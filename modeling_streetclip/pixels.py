"""Pixel values in two halves: the image processor's resize and crop where photos are decoded, its rescale and
normalisation where the model runs.

Resized and cropped, a photo is still 8-bit: 0.34 MB at 336 px, against 1.35 MB once the processor has turned it
into float32. Carrying those bytes from DataLoader workers to the device was what held a GPU pipeline back (in
bfloat16 a ViT-L/14-336 answers about a thousand photos a second), and normalising on the device is one gather.
`normalized_pixels(image_processor, resized_pixels(image_processor, image))` equals
`image_processor(images=image)["pixel_values"]` bit for bit for CLIP's processor (the tests hold it to that), so the
answers are the same as before the split.

A photo of any shape answers within bounded memory: CLIP's processor scales the short edge to its input size before it
crops the centre, so a strip passes through its aspect ratio times the crop's pixels (a one-pixel-wide PNG of a few
hundred bytes can ask for gigabytes). Where that exceeds `MAX_RESIZED_CROPS` crops, the kept centre is cut from the
photo first and only it is resized.
"""

import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension


# Up to this many crops' worth of resized pixels (every photo, and panoramas up to 20:1 at CLIP's square crop) the
# processor resizes the whole photo, as it always did, so those answers stay bit-identical; beyond, the centre first.
MAX_RESIZED_CROPS = 20


def resized_pixels(image_processor, images) -> torch.Tensor:
    """`image_processor`'s output for `images` without its rescale and normalisation: a `(batch, channels, height,
    width)` tensor, uint8 for 8-bit images (RGB photos). PIL images too elongated to resize whole are cut to their
    kept centre first (`central_region`)."""
    images = images if isinstance(images, (list, tuple)) else [images]
    images = [central_region(image_processor, image) if isinstance(image, Image.Image) else image for image in images]
    return image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]


def central_region(image_processor, image: Image.Image) -> Image.Image:
    """`image` as it is, unless resizing its short edge whole would exceed `MAX_RESIZED_CROPS` crops of pixels: then
    only the region that the processor's resize-then-crop keeps, resized as the processor would resize it.

    Along the long side the region spans the crop (at least the short edge's length, so that the processor finds the
    short edge at its size and leaves it); the short side is kept whole for the processor to crop as before. Pillow
    resizes a fractional box of the photo at the whole photo's scale, sampling beyond the box as a whole resize does,
    so the pixels match the PIL backend's whole resize to within its 8-bit rounding.
    """
    # `.get` and `[]` read both the processor's SizeDict and a plain dict assigned to it.
    size, crop = image_processor.size, image_processor.crop_size
    shortest_edge = size.get("shortest_edge")
    resizes_short_edge = shortest_edge and not size.get("longest_edge")
    if not (image_processor.do_resize and image_processor.do_center_crop and resizes_short_edge):
        return image
    crop_height, crop_width = crop["height"], crop["width"]
    width, height = image.size
    # A zero-copy stand-in of the photo's shape, for the processor's own rounding of the resized size.
    shape = np.broadcast_to(np.uint8(0), (1, height, width))
    resized_height, resized_width = get_resize_output_image_size(
        shape, shortest_edge, default_to_square=False, input_data_format=ChannelDimension.FIRST
    )
    if resized_height * resized_width <= MAX_RESIZED_CROPS * crop_height * crop_width:
        return image
    wide = resized_width > resized_height
    long_side, resized_long, crop_long = (
        (width, resized_width, crop_width) if wide else (height, resized_height, crop_height)
    )
    kept = max(crop_long, shortest_edge)
    if kept >= resized_long:  # nothing to cut: the crop spans the whole strip (the processor pads it)
        return image
    # Placed so that the processor's centre crop of the region takes the very pixels it took of the whole.
    start = (resized_long - crop_long) // 2 - (kept - crop_long) // 2
    low, high = start * long_side / resized_long, (start + kept) * long_side / resized_long
    box = (low, 0, high, height) if wide else (0, low, width, high)
    output_size = (kept, resized_height) if wide else (resized_width, kept)
    return image.resize(output_size, Image.Resampling(image_processor.resample), box=box)


def normalized_pixels(image_processor, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Finish what `resized_pixels` left out, on `pixels`' device, and cast to `dtype` (the model's).

    8-bit pixels go through a table of each channel's 256 values, computed as the processor computes them (rescaled
    in float64, normalised in float32): exact, and free of float64 on the device (MPS has none). Other pixels are
    computed in float32, within a rounding of the processor's values.
    """
    if pixels.dtype == torch.uint8:
        table = _normalized(image_processor, torch.arange(256, dtype=torch.float64).expand(pixels.shape[-3], 1, 256))
        offsets = torch.arange(pixels.shape[-3], device=pixels.device).view(-1, 1, 1) * 256
        return table.to(pixels.device).flatten().take(pixels.long() + offsets).to(dtype)
    return _normalized(image_processor, pixels.to(torch.float32)).to(dtype)


def _normalized(image_processor, values: torch.Tensor) -> torch.Tensor:
    """The processor's rescale (when it rescales) and normalisation (when it normalises) of `(..., channels, height,
    width)` values, returned in float32."""
    if image_processor.do_rescale:
        values = values * image_processor.rescale_factor
    values = values.to(torch.float32)
    if image_processor.do_normalize:
        mean, std = (
            torch.tensor(statistic, dtype=torch.float32, device=values.device).view(-1, 1, 1)
            for statistic in (image_processor.image_mean, image_processor.image_std)
        )
        values = (values - mean) / std
    return values


__all__ = ["MAX_RESIZED_CROPS", "central_region", "normalized_pixels", "resized_pixels"]
