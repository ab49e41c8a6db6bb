"""Pixel values in two halves, together bit for bit the image processor's: resize and crop where photos are decoded
(8-bit, a quarter of float32's bytes to carry), rescale and normalisation where the model runs."""

import numpy as np
import torch
from PIL import Image
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension


# Up to this many crops' worth of pixels (panoramas to 20:1) the whole photo is resized, as the processor does.
MAX_RESIZED_CROPS = 20


def resized_pixels(image_processor, images) -> torch.Tensor:
    """`image_processor`'s output for `images` without rescale and normalisation: uint8 for RGB photos."""
    images = images if isinstance(images, (list, tuple)) else [images]
    images = [central_region(image_processor, image) if isinstance(image, Image.Image) else image for image in images]
    return image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]


def central_region(image_processor, image: Image.Image) -> Image.Image:
    """`image`, or where resizing it whole would exceed `MAX_RESIZED_CROPS` crops, the region the processor's crop
    keeps, resized as the processor would (within 8-bit rounding)."""
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
    """Finish what `resized_pixels` left out, on `pixels`' device, in `dtype`; 8-bit pixels through an exact table of
    each channel's 256 values (MPS lacks float64)."""
    if pixels.dtype == torch.uint8:
        table = _normalized(image_processor, torch.arange(256, dtype=torch.float64).expand(pixels.shape[-3], 1, 256))
        offsets = torch.arange(pixels.shape[-3], device=pixels.device).view(-1, 1, 1) * 256
        return table.to(pixels.device).flatten().take(pixels.long() + offsets).to(dtype)
    return _normalized(image_processor, pixels.to(torch.float32)).to(dtype)


def _normalized(image_processor, values: torch.Tensor) -> torch.Tensor:
    """The processor's rescale and normalisation (each where it does them) of `(..., C, H, W)` values, in float32."""
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
