"""Image loading for geolocation inputs: every file problem becomes an error that names the file.

Photos come in every PIL mode and with EXIF orientations; a file with the wrong content must not crash a batch run
with a bare traceback, and an image beyond Pillow's decompression-bomb limit must be refused before it is decoded.
"""

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


ImageInput = str | os.PathLike | bytes | Image.Image


class ImageLoadError(ValueError):
    """An input that cannot be turned into an RGB image; the message names the input and the reason."""


def load_rgb_image(image: ImageInput) -> Image.Image:
    """Open a path or an encoded file's bytes (or take a PIL image), apply its EXIF orientation and convert it to
    8-bit RGB.

    Bytes are how a `datasets` image column stores its files, so a dataset's images decode here, with these errors,
    in whichever worker calls this.
    """
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, bytes):
        source, name, size = io.BytesIO(image), f"of {len(image)} bytes", len(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"Image file not found: {str(path)!r}.")
        source, name, size = path, repr(str(path)), path.stat().st_size
    else:
        raise TypeError(
            f"Expected an image path or a PIL.Image.Image, got {type(image).__name__}: {image!r} (an encoded image's "
            "bytes work too)."
        )
    if size == 0:
        raise ImageLoadError(f"Image file {name} is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; refuse the whole range instead of decoding it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                opened.load()
                return to_rgb(ImageOps.exif_transpose(opened))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(
            f"Image file {name} is too large to decode safely ({error}). Raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust it."
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"Image file {name} is not an image format Pillow can read.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"Image file {name} is truncated or corrupt: {error}.") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: transparency over white, 16-bit scaled, 32-bit and float stretched to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(pixels.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit integer and float images have no fixed white point: stretch their range.
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
