"""Loading what the commands and eval/benchmark.py run: the model and its image processor, a gallery checked against
them, and a model folder's fingerprint; every problem is a `UsageError` naming the option."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import UsageError


if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from ..gallery_store import GeoGallery
    from ..modeling_streetclip import StreetCLIPForGeolocation
    from ..processing_streetclip import StreetCLIPProcessor


# The files of a model folder that shape answers (configs, candidate tables, weights; see `model_fingerprint`).
FINGERPRINTED_SUFFIXES = (".json", ".safetensors", ".bin")


def quantization_config_for(quantize: str | None, device: str, dtype: str, backend: str = "torch") -> Any:
    """The quantization config `--quantize` names, if `--device` and `--dtype` allow it (None for ONNX Runtime)."""
    if quantize is None and backend == "torch":
        return None
    option = f"--quantize {quantize}" if backend == "torch" else f"--backend {backend}"
    if device == "cuda":
        raise UsageError(
            f"{option} runs on the CPU; drop --device cuda, or use --backend torch --dtype bfloat16 there."
        )
    if dtype != "float32":
        raise UsageError(f"{option} computes in float32; drop --dtype {dtype}.")
    from ..quantization import Int8DynamicConfig

    return Int8DynamicConfig() if backend == "torch" else None


def graph_file_for(backend: str, quantize: str | None) -> str | None:
    """The graph of MODEL/onnx/ that `--backend onnxruntime` runs (the int8 one with `--quantize`); None for torch."""
    if backend == "torch":
        return None
    from .export import GRAPH_FILE, QUANTIZED_GRAPH_FILE

    return GRAPH_FILE if quantize is None else QUANTIZED_GRAPH_FILE


def load_model(
    name: str,
    device: str,
    dtype: torch.dtype | str,
    countries: list[str] | None,
    quantization_config: Any = None,
    graph: str | None = None,
    vision_only: bool | str = "auto",
) -> tuple[StreetCLIPForGeolocation, StreetCLIPProcessor]:
    """The model on `device` and its processor, restricted to `countries` and quantized when asked; with a `graph`
    file of `onnx/`, the model that runs it in ONNX Runtime. `vision_only=False` keeps the text tower."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    from ..modeling_streetclip import StreetCLIPForGeolocation
    from ..processing_streetclip import StreetCLIPProcessor

    # Unreadable files (OSError, ValueError, SafetensorError), a malformed candidate table (StrictDataclassError,
    # TypeError, KeyError), heads that do not match it (RuntimeError), no quantization route (ImportError).
    bad = (OSError, ValueError, ImportError, TypeError, KeyError, RuntimeError, SafetensorError, StrictDataclassError)
    _check_model_reachable(name)
    try:
        processor = StreetCLIPProcessor.from_pretrained(name)
        if graph is not None:
            from .export import OnnxRuntimeModel

            model = OnnxRuntimeModel.from_export(name, graph)
        else:
            options = {"dtype": dtype, "vision_only": vision_only, "quantization_config": quantization_config}
            model = StreetCLIPForGeolocation.from_pretrained(name, **options)
    except bad as error:
        raise UsageError(f"cannot load --model {name!r}: {error}") from None
    _check_image_processor(processor.image_processor, model.config.vision_config.image_size, name)
    if countries is not None:
        try:
            model.restrict_countries(countries)
        except ValueError as error:
            raise UsageError(f"--countries: {error}") from None
    return model.to(device), processor


def _check_model_reachable(name: str) -> None:
    """Stop at once when --model is neither a folder nor cached and the Hub cannot be reached (the loaders would retry
    file after file for minutes, then blame the files); what the Hub answers is left to the loaders."""
    if os.path.isdir(name):
        return
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import httpx

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        raise UsageError(
            f"cannot load --model {name!r}: there is no folder by that name, and it is not a Hub id (ORG/NAME)."
        ) from None
    if isinstance(cached, str):
        return
    advice = (
        "Give --model a local folder that holds a saved model (e.g. written by `save_pretrained`), or run once where "
        "the Hub can be reached to fill the cache"
    )
    if constants.is_offline_mode():
        raise UsageError(
            f"cannot load --model {name!r}: it is not a local folder nor in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and offline mode (HF_HUB_OFFLINE) keeps the Hub from being asked. {advice}."
        )
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except httpx.TransportError as error:
        raise UsageError(
            f"cannot load --model {name!r}: the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({error}), "
            f"and the model is not in its cache ({constants.HF_HUB_CACHE}). {advice}."
        ) from None
    except HfHubHTTPError:
        pass


def _check_image_processor(image_processor, image_size: int, name: str) -> None:
    """Refuse an image processor config that cannot give the model `image_size` square pixels, naming file and value."""
    files = [os.path.join(name, file) for file in ("processor_config.json", "preprocessor_config.json")]
    source = next((repr(file) for file in files if os.path.isfile(file)), f"the image processor config of {name!r}")
    sizes = {"size": image_processor.size or {}}
    if image_processor.do_center_crop:
        sizes["crop_size"] = image_processor.crop_size or {}
    for field, size in sizes.items():
        for key in ("height", "width", "shortest_edge", "longest_edge"):
            if (value := size.get(key)) is not None and (type(value) is not int or value < 1):  # (True is no size)
                raise UsageError(
                    f"cannot use --model {name!r}: {source} has {field}.{key} = {value!r}; image sizes are positive "
                    "integers of pixels."
                )
    final = (
        sizes.get("crop_size", sizes["size"]) if image_processor.do_resize or image_processor.do_center_crop else {}
    )
    if (shape := (final.get("height"), final.get("width"))) != (image_size, image_size):
        given = f"{shape[0]} x {shape[1]} pixels" if None not in shape else "images of varying shape"
        raise UsageError(
            f"cannot use --model {name!r}: {source} gives {given}, but the model takes {image_size} x {image_size} "
            "(set crop_size, with do_center_crop, to that size)."
        )


def load_gallery(name: str, model, image_processor, model_name: str) -> GeoGallery:
    """The gallery `--gallery` names (a folder or a Hub dataset repo), checked against the loaded model."""
    from ..gallery_store import GalleryModelError, GeoGallery

    try:
        gallery = GeoGallery.load(name)
        gallery.check_model(model, image_processor, model_name)
    except (OSError, ValueError, ImportError, GalleryModelError) as error:
        raise UsageError(f"--gallery {name!r}: {error}") from None
    return gallery


def load_on_every_process(
    accelerator: Accelerator,
    name: str,
    dtype: str,
    gallery: str | None = None,
    countries: list[str] | None = None,
    quantization_config: Any = None,
    graph: str | None = None,
) -> tuple[StreetCLIPForGeolocation, Any, GeoGallery | None]:
    """The model, its image processor and the `gallery` (or None) on every process's device (the CPU for int8 and
    for an ONNX `graph`); the main process loads first, so that a download happens once, and shows the only bars."""
    import torch
    from transformers.utils import logging as transformers_logging

    from .distributed import on_every_process

    if not accelerator.is_main_process:
        transformers_logging.disable_progress_bar()
    device = "cpu" if quantization_config is not None or graph is not None else accelerator.device

    def load() -> tuple[StreetCLIPForGeolocation, Any, GeoGallery | None]:
        model, processor = load_model(name, device, getattr(torch, dtype), countries, quantization_config, graph)
        image_processor = processor.image_processor
        return model, image_processor, None if gallery is None else load_gallery(gallery, model, image_processor, name)

    return on_every_process(accelerator, load, main_process_first=True)


def model_fingerprint(folder: str) -> str:
    """A short SHA-256 of the names and contents of a model folder's FINGERPRINTED_SUFFIXES files; the weights are
    read whole, since their headers alone are the same for another seed or training step."""
    digest = hashlib.sha256()
    try:
        for file in sorted(entry for entry in Path(folder).iterdir() if entry.suffix in FINGERPRINTED_SUFFIXES):
            if file.is_file():
                with file.open("rb") as stream:
                    digest.update(file.name.encode("utf-8", "surrogateescape") + b"\0")
                    digest.update(hashlib.file_digest(stream, "sha256").digest())
    except OSError as error:
        raise UsageError(f"cannot read --model {folder!r}: {error}") from None
    return digest.hexdigest()[:16]
