"""Geolocation by retrieval: a gallery of geo-tagged photo embeddings, searched with FAISS and checked against the
model that searches it. A gallery folder (or Hub dataset repo) holds `dataset/` (`save_to_disk`: unit float32
`embedding`, `latitude`, `longitude`, `source_row`, `image_path`, the source's columns), `index.faiss` (inner product),
`gallery.json` (`GalleryInfo`) and `bad_rows.jsonl`. `app.gallery_build` builds one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .gallery_index import check_nprobe, faiss_reason, inverted_lists
from .gallery_vote import VoteSettings, is_count
from .geodesy import coordinate_problem, valid_coordinates


# torch, transformers and datasets are imported where used: `streetclip --help` shows these defaults at once.
if TYPE_CHECKING:
    import datasets
    import torch


GALLERY_FILE, DATASET_FOLDER, INDEX_FILE, BAD_ROWS_FILE = "gallery.json", "dataset", "index.faiss", "bad_rows.jsonl"
EMBEDDING_COLUMN = "embedding"
FORMAT_VERSION = 1
# The same weights in bfloat16, float16 or int8 agree above this on every probe; another checkpoint lands far below.
FINGERPRINT_MIN_COSINE = 0.99
# Fixed probe images: seeded random blocks (8 x 8 scaled to 64 px), which any processor's resizing keeps recognisable.
PROBE_IMAGES, PROBE_BLOCKS, PROBE_SIZE = 4, 8, 64
# Recorded probe embeddings are unit vectors in float32; one further from norm 1 was not written by a build.
FINGERPRINT_NORM_TOLERANCE = 1e-3


class GalleryModelError(ValueError):
    """A gallery used with a model other than the one its embeddings come from."""


class GalleryFileError(ValueError):
    """A gallery file that is damaged, truncated, or contradicts the rest of its folder; the message names it."""


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings in the model's dtype, as `StreetCLIPForGeolocation.forward` computes them."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values.to(device=model.device, dtype=model.dtype))
    return F.normalize(features.pooler_output, dim=-1)


def stored_embeddings(image_embeds: torch.Tensor) -> np.ndarray:
    """Image embeddings as galleries store them: float32, renormalised (bfloat16 ones are unit only to rounding)."""
    import torch.nn.functional as F

    return F.normalize(image_embeds.float(), dim=-1).cpu().numpy()


def model_fingerprint(model, image_processor) -> np.ndarray:
    """The model's embeddings of the probe images, `(PROBE_IMAGES, dim)`: a gallery records these, not a name."""
    from PIL import Image

    rng = np.random.default_rng(20230101)
    blocks = [rng.integers(0, 256, (PROBE_BLOCKS, PROBE_BLOCKS, 3), dtype=np.uint8) for _ in range(PROBE_IMAGES)]
    probes = [Image.fromarray(block).resize((PROBE_SIZE, PROBE_SIZE), Image.Resampling.NEAREST) for block in blocks]
    pixel_values = image_processor(images=probes, return_tensors="pt")["pixel_values"]
    return stored_embeddings(image_embeddings(model, pixel_values))


def fingerprint_problem(fingerprint: Any, dim: int) -> str | None:
    """Why `fingerprint` is not PROBE_IMAGES finite unit vectors of `dim` numbers, None when it is."""
    try:
        values = np.asarray(fingerprint, dtype=np.float64)
    except (TypeError, ValueError):
        return "it is not a table of numbers"
    if values.ndim != 2 or len(values) != PROBE_IMAGES:
        return f"its shape is {values.shape}, not ({PROBE_IMAGES}, {dim})"
    if values.shape[1] != dim:
        return f"its vectors have {values.shape[1]} numbers, while embedding_dim is {dim}"
    if not np.isfinite(values).all():
        return "it holds NaN or infinite values"
    norms = np.linalg.norm(values, axis=-1)
    if np.abs(norms - 1.0).max() > FINGERPRINT_NORM_TOLERANCE:
        return f"its vectors are not unit vectors (norms {np.round(norms, 4).tolist()})"
    return None


def fingerprint_agreement(recorded: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """The smallest cosine between two models' embeddings of one probe image; -1 unless both are sound and alike."""
    dim = np.shape(actual)[-1]
    if fingerprint_problem(recorded, dim) or fingerprint_problem(actual, dim):
        return -1.0
    return float((np.asarray(recorded) * np.asarray(actual)).sum(axis=-1).min())


def damaged_file(path: Path, problem: str) -> GalleryFileError:
    """The error for a gallery file that no build wrote as it is, naming it and saying how to get a sound one."""
    return GalleryFileError(
        f"{str(path)!r} is damaged or was edited: {problem.rstrip('.')}. Build the gallery again (`streetclip index "
        "build DATA --model MODEL --output FOLDER --overwrite`), or download it again."
    )


@dataclass
class GalleryInfo:
    """The contents of `gallery.json`."""

    model: str
    model_fingerprint: list[list[float]]
    embedding_dim: int
    index: str
    nprobe: int | None
    num_rows: int
    num_bad_rows: int
    source: str
    vote: dict[str, Any]
    format_version: int = FORMAT_VERSION

    @classmethod
    def read(cls, folder: Path) -> GalleryInfo:
        path = folder / GALLERY_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a gallery: it has no {GALLERY_FILE}. Build one with `streetclip index build "
                "DATA --model MODEL --output FOLDER` (an unfinished build resumes when run again)."
            )
        try:
            info = cls(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as error:
            raise GalleryFileError(f"{str(path)!r} is not a gallery description this version reads: {error}") from None
        if info.format_version != FORMAT_VERSION:
            raise GalleryFileError(
                f"{str(path)!r} has format_version {info.format_version!r}; this version reads {FORMAT_VERSION}."
            )
        if problems := info.problems():
            raise damaged_file(path, "; ".join(problems))
        return info

    def problems(self) -> list[str]:
        """What in this description no build writes, each naming the field and what is accepted."""
        problems = [
            f"{name} must be text, got {getattr(self, name)!r}"
            for name in ("model", "index", "source")
            if not isinstance(getattr(self, name), str)
        ]
        for name, minimum in (("embedding_dim", 1), ("num_rows", 1), ("num_bad_rows", 0)):
            if not is_count(getattr(self, name), minimum):
                problems.append(f"{name} must be an integer >= {minimum}, got {getattr(self, name)!r}")
        if self.nprobe is not None and not is_count(self.nprobe):
            problems.append(f"nprobe must be null or an integer >= 1, got {self.nprobe!r}")
        if is_count(self.embedding_dim) and (
            problem := fingerprint_problem(self.model_fingerprint, self.embedding_dim)
        ):
            problems.append(f"model_fingerprint is not a model's embeddings of the probe images: {problem}")
        try:
            VoteSettings.from_dict(self.vote)
        except (ValueError, TypeError, AttributeError) as error:
            problems.append(f"vote: {error}")
        return problems


def names_a_missing_folder(source: str) -> bool:
    """Whether `source` can only be a local path (absolute, `.`, `~`, more parts than ORG/NAME) and nothing is there."""
    path = Path(source).expanduser()
    local = path.is_absolute() or source.startswith((".", "~")) or len(path.parts) > 2
    return local and not path.exists()


class GeoGallery:
    """A gallery of geo-tagged photo embeddings with its FAISS index (see the module docstring)."""

    def __init__(self, folder: Path, dataset: datasets.Dataset, info: GalleryInfo, settings: VoteSettings):
        """Refuses a `dataset` that contradicts `info` (row count, columns, embedding size) or a point off Earth."""
        self.folder, self.dataset, self.info, self.settings = folder, dataset, info, settings
        path = folder / DATASET_FOLDER
        if len(dataset) != info.num_rows:
            raise damaged_file(
                path,
                f"it holds {len(dataset)} rows while {GALLERY_FILE} counts {info.num_rows} (edited, or two builds)",
            )
        missing = [name for name in (EMBEDDING_COLUMN, "latitude", "longitude") if name not in dataset.column_names]
        if missing:
            raise damaged_file(path, f"it has no column {missing[0]!r}")
        if (length := getattr(dataset.features[EMBEDDING_COLUMN], "length", None)) != info.embedding_dim:
            raise damaged_file(
                folder / GALLERY_FILE,
                f"embedding_dim is {info.embedding_dim}, while the embeddings in {DATASET_FOLDER}/ have {length} numbers",
            )
        # Through Arrow: `datasets`' numpy format hands float64 columns over as float32 (metres off).
        coordinates = dataset.with_format("arrow", columns=["latitude", "longitude"])[:]
        self.latitudes = coordinates["latitude"].to_numpy().astype(np.float64)
        self.longitudes = coordinates["longitude"].to_numpy().astype(np.float64)
        if len(bad := np.flatnonzero(~valid_coordinates(self.latitudes, self.longitudes))):
            latitude, longitude = float(self.latitudes[bad[0]]), float(self.longitudes[bad[0]])
            raise damaged_file(
                path,
                f"{len(bad):,} of its {len(self):,} rows have coordinates that are not a point on Earth (row {bad[0]}: "
                f"{coordinate_problem(latitude, longitude).describe(latitude, longitude)})",
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f"GeoGallery({str(self.folder)!r}, rows={len(self)}, model={self.info.model!r}, index={self.info.index!r})"
        )

    @property
    def faiss_index(self):
        """The FAISS index object (to tune search parameters beyond `nprobe`)."""
        return self.dataset.get_index(EMBEDDING_COLUMN).faiss_index

    @classmethod
    def load(
        cls,
        path_or_repo: str | os.PathLike,
        nprobe: int | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **vote_settings,
    ) -> GeoGallery:
        """A gallery from its folder or a Hub dataset repo (ORG/NAME). `nprobe` overrides the inverted lists an IVF
        index probes; `vote_settings` override the gallery's `VoteSettings` (`num_neighbors=32`, `radius_km=5`)."""
        from transformers.utils import requires_backends

        requires_backends(cls, ["datasets", "faiss"])
        import datasets
        import faiss

        name = os.fspath(path_or_repo)
        folder = Path(name).expanduser()
        if names_a_missing_folder(name) or folder.is_file():
            raise FileNotFoundError(f"No gallery folder at {name!r}; give a gallery folder or a Hub id ORG/NAME.")
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, repo_type="dataset", revision=revision, token=token))
        info = GalleryInfo.read(folder)
        settings = replace(VoteSettings.from_dict(info.vote), **vote_settings)
        gallery = cls(folder, datasets.load_from_disk(str(folder / DATASET_FOLDER)), info, settings)
        index_path = folder / INDEX_FILE
        if not index_path.is_file():
            raise damaged_file(index_path, "it is missing")
        try:
            gallery.dataset.load_faiss_index(EMBEDDING_COLUMN, str(index_path))
        except (RuntimeError, MemoryError) as error:
            raise damaged_file(index_path, f"FAISS cannot read it ({faiss_reason(error)})") from None
        except ValueError as error:  # datasets refuses an index whose size differs from the dataset's
            raise damaged_file(index_path, str(error)) from None
        if gallery.faiss_index.d != info.embedding_dim:
            raise damaged_file(
                index_path,
                f"it holds {gallery.faiss_index.d}-d vectors, while {GALLERY_FILE} says {info.embedding_dim}",
            )
        lists = inverted_lists(gallery.faiss_index)
        try:
            check_nprobe(info.nprobe, lists, info.index)
        except ValueError as error:
            raise damaged_file(folder / GALLERY_FILE, str(error)) from None
        check_nprobe(nprobe, lists, info.index)
        if nprobe := nprobe or info.nprobe:  # both are None or >= 1 here
            faiss.ParameterSpace().set_index_parameter(gallery.faiss_index, "nprobe", nprobe)
        return gallery

    def search(self, embeddings: npt.ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest rows of each L2-normalised embedding: `(similarities, rows)`, each `(num_queries,
        min(k, len(self)))`, best first; rows are -1 (similarity -inf) where the index returns fewer."""
        queries = np.asarray(embeddings, dtype=np.float32)
        if queries.shape[-1] != self.info.embedding_dim:
            raise GalleryModelError(
                f"The gallery {str(self.folder)!r} holds {self.info.embedding_dim}-d embeddings of the model "
                f"{self.info.model!r}; these queries have {queries.shape[-1]} dimensions. Search it with that model's "
                "embeddings (see check_model)."
            )
        queries = np.ascontiguousarray(queries.reshape(-1, self.info.embedding_dim))
        scores, rows = self.dataset.search_batch(EMBEDDING_COLUMN, queries, k=min(k, len(self)))
        return np.where(rows >= 0, scores, -np.inf), rows

    def check_model(self, model, image_processor, model_name: str | None = None) -> None:
        """Refuse a model whose embeddings differ from those the gallery holds (other precisions and names pass)."""
        actual = model_fingerprint(model, image_processor)
        agreement = fingerprint_agreement(self.info.model_fingerprint, actual)
        if agreement < FINGERPRINT_MIN_COSINE:
            name = model_name or getattr(model, "name_or_path", "") or "this model"
            dims = (
                f"its embeddings have {actual.shape[-1]} dimensions, the gallery's {self.info.embedding_dim}"
                if actual.shape[-1] != self.info.embedding_dim
                else f"they embed the same probe images differently (cosine {agreement:.3f} < "
                f"{FINGERPRINT_MIN_COSINE})"
            )
            raise GalleryModelError(
                f"The gallery {str(self.folder)!r} was built with the model {self.info.model!r}, not with "
                f"{name!r}: {dims}, so its neighbours would be meaningless. Use the gallery with the model that built "
                f"it, or build one with this model: `streetclip index build DATA --model {name} --output FOLDER`."
            )

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | bool | None = None, revision: str | None = None
    ) -> str:
        """Upload the gallery folder as a Hub dataset repo (created if needed); returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=self.folder,
            revision=revision,
            allow_patterns=[GALLERY_FILE, INDEX_FILE, BAD_ROWS_FILE, f"{DATASET_FOLDER}/*"],
            commit_message=f"Gallery of {len(self):,} photos embedded by {self.info.model}",
        )
        return str(commit)


__all__ = ["GalleryFileError", "GalleryInfo", "GalleryModelError", "GeoGallery", "model_fingerprint"]
