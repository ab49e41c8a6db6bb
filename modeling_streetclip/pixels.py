"""Pixel values in two halves: the image processor's resize and crop where photos are decoded, its rescale and
normalisation where the model runs.

Resized and cropped, a photo is still 8-bit: 0.34 MB at 336 px, against 1.35 MB once the processor has turned it
into float32. Carrying those bytes from DataLoader workers to the device was what held a GPU pipeline back (in
bfloat16 a ViT-L/14-336 answers about a thousand photos a second), and normalising on the device is one gather.
`normalized_pixels(image_processor, resized_pixels(image_processor, image))` equals
`image_processor(images=image)["pixel_values"]` bit for bit for CLIP's processor (the tests hold it to that), so the
answers are the same as before the split.
"""

import torch


def resized_pixels(image_processor, images) -> torch.Tensor:
    """`image_processor`'s output for `images` without its rescale and normalisation: a `(batch, channels, height,
    width)` tensor, uint8 for 8-bit images (RGB photos)."""
    return image_processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]


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


__all__ = ["normalized_pixels", "resized_pixels"]
