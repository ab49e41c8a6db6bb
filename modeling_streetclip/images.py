"""Image loading: every PIL mode and EXIF orientation to RGB, every file problem an error that names the file."""

import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


ImageInput = str | os.PathLike | bytes | Image.Image

# A URL, which this loader does not fetch (inference never needs the network).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ImageLoadError(ValueError):
    """An input that cannot be turned into an RGB image; the message names the input and the reason."""


def looks_like_url(text: str) -> bool:
    """Whether `text` starts as a URL does (`scheme://`), so that callers keep it as written, not as a path."""
    return bool(_URL.match(text))


def load_rgb_image(image: ImageInput) -> Image.Image:
    """A path, an encoded file's bytes or a PIL image as 8-bit RGB in its EXIF orientation; URLs and decompression
    bombs are refused."""
    if isinstance(image, Image.Image):
        _check_shape(image.size, "The PIL image")
        return to_rgb(ImageOps.exif_transpose(image), "The PIL image")
    if isinstance(image, bytes):
        source, name, size = io.BytesIO(image), f"Image file of {len(image)} bytes", len(image)
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            is_file = path.is_file()
        except OSError as error:  # a name longer than the file system allows, for one
            raise ImageLoadError(f"Image file {str(path)!r} cannot be looked up: {error.strerror or error}.") from None
        if not is_file:
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
                _check_shape(opened.size, name)  # from the header, before decoding
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
    width, height = size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{name} has no pixels ({width} x {height}).")


def to_rgb(image: Image.Image, name: str = "The image") -> Image.Image:
    """8-bit RGB from any PIL mode; float images with NaN or infinite pixels are refused (they would turn black)."""
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
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
