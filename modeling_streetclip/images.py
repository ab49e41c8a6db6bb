"""Image loading for geolocation inputs: every file problem becomes an error that names the file.

Photos come in every PIL mode and with EXIF orientations; a file with the wrong content must not crash a batch run
with a bare traceback. Two kinds of image are refused before they cost memory: one beyond Pillow's
decompression-bomb limit (before it is decoded), and one whose aspect ratio exceeds `MAX_ASPECT_RATIO` (before the
image processor resizes it).
"""

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


ImageInput = str | os.PathLike | bytes | Image.Image

# CLIP's image processor scales the short edge to its input size S (336 px for StreetCLIP) before cropping, so an
# image of aspect ratio r becomes S x (r * S) pixels, 12 bytes each once in float32: a 1 x 20,000 px PNG of 490 bytes
# would take 27 GB at S = 336. Bounding r bounds that at 12 * S * S * r bytes (27 MB at S = 336 and r = 20) while
# every photo, wide panoramas (about 2:1 to 10:1) included, passes. As Pillow's MAX_IMAGE_PIXELS, it is read at each
# call: raise it for trusted images of a more extreme shape.
MAX_ASPECT_RATIO = 20.0
# "scheme://" at the start: a URL, which this loader does not fetch (inference never needs the network).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ImageLoadError(ValueError):
    """An input that cannot be turned into an RGB image; the message names the input and the reason."""


def looks_like_url(text: str) -> bool:
    """Whether `text` starts as a URL does (`scheme://`), so that callers keep it as written instead of treating it
    as a relative path."""
    return bool(_URL.match(text))


def load_rgb_image(image: ImageInput) -> Image.Image:
    """Open a path or an encoded file's bytes (or take a PIL image), apply its EXIF orientation and convert it to
    8-bit RGB.

    Bytes are how a `datasets` image column stores its files, so a dataset's images decode here, with these errors,
    in whichever worker calls this. URLs are refused with a message that says so: download the file first.
    """
    if isinstance(image, Image.Image):
        _check_shape(image.size, "The PIL image")
        return to_rgb(ImageOps.exif_transpose(image), "The PIL image")
    if isinstance(image, bytes):
        source, name, size = io.BytesIO(image), f"Image file of {len(image)} bytes", len(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            if looks_like_url(os.fspath(image)):
                raise ImageLoadError(
                    f"Image URLs are not fetched: {os.fspath(image)!r}. Download the file and pass its path, its "
                    "bytes or a PIL image."
                )
            raise FileNotFoundError(f"Image file not found: {str(path)!r}.")
        source, name, size = path, f"Image file {str(path)!r}", path.stat().st_size
    else:
        raise TypeError(
            f"Expected an image path or a PIL.Image.Image, got {type(image).__name__}: {image!r} (an encoded image's "
            "bytes work too)."
        )
    if size == 0:
        raise ImageLoadError(f"{name} is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; refuse the whole range instead of decoding it.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as opened:
                _check_shape(opened.size, name)  # from the header, before decoding and long before resizing
                opened.load()
                return to_rgb(ImageOps.exif_transpose(opened), name)
    except ImageLoadError:
        raise  # it names the file already; the ValueError clause below would wrap it again
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageLoadError(
            f"{name} is too large to decode safely ({error}). Raise PIL.Image.MAX_IMAGE_PIXELS if you trust it."
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name} is not an image format Pillow can read.") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{name} is truncated or corrupt: {error}.") from None


def _check_shape(size: tuple[int, int], name: str) -> None:
    """Refuse an image without pixels, or one whose aspect ratio exceeds MAX_ASPECT_RATIO (see there why)."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name} has no pixels ({width} x {height}).")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageLoadError(
            f"{name} is {width} x {height} px, an aspect ratio of {ratio:,.1f}:1: resizing its short edge to the "
            f"model's input size would take more memory than any photo needs (at most {MAX_ASPECT_RATIO:g}:1 is "
            "accepted). Crop it, or raise modeling_streetclip.images.MAX_ASPECT_RATIO if you trust it."
        )


def to_rgb(image: Image.Image, name: str = "The image") -> Image.Image:
    """8-bit RGB from any PIL mode: transparency over white, 16-bit scaled, 32-bit and float stretched to 0..255.

    A float image with NaN or infinite pixels is refused (an `ImageLoadError` naming `name`): stretching its range
    would turn the whole image black and still give an answer.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(pixels.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("I", "F"):
        # 32-bit integer and float images have no fixed white point: stretch their range.
        pixels = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(pixels)
        if not finite.all():
            raise ImageLoadError(
                f"{name} has {pixels.size - int(finite.sum()):,} NaN or infinite pixels of {pixels.size:,}; a float "
                "image needs finite values to be shown as RGB."
            )
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(scaled.round().astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
