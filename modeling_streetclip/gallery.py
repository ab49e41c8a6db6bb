"""Geolocation by retrieval: a gallery of geo-tagged photo embeddings searched with FAISS, and the two decisions that
turn the nearest photos into answers.

Zero-shot StreetCLIP can never come closer than its nearest candidate city. A gallery can: the answer is the place of
a photo like the query. A gallery is a folder (or a Hub dataset repo holding one):

- `dataset/`: a `datasets.Dataset` written by `save_to_disk`, one row per photo: `embedding` (the L2-normalised image
  embedding of the model's vision tower, float32), `latitude`, `longitude`, `source_row` (its row in the data it was
  built from), `image_path` (where the source stored the file, if it did) and every other column of the source
  (labels such as `city` or `country`, kept as they were);
- `index.faiss`: the FAISS index over `embedding`, attached and saved with `datasets`' own `add_faiss_index` and
  `save_faiss_index`, searched by inner product (cosine, since the embeddings are normalised);
- `gallery.json`: the model it was built with (its name, and its embeddings of a few fixed probe images, which any
  user of the gallery must reproduce: see `check_model`), the index factory string, the counts, and the default
  vote settings;
- `bad_rows.jsonl`: the source rows that were skipped, each with the reason.

Building (`streetclip index build`, `modeling_streetclip.app.gallery_build.build_gallery`) belongs to the
application, which a folder saved for `trust_remote_code` does not carry; this module loads, searches and decides.

The decisions (`decision=` in the pipeline, `--decision` of the commands):

- `"gallery"`, a kernel vote on the sphere. The `k = num_neighbors` nearest photos i, with cosine similarity s_i to
  the query, weigh w_i = exp((s_i - s_1) / temperature), s_1 being the best similarity. Each neighbour j gathers the
  support S_j = sum_i w_i K(d_ij), where d_ij is the great-circle distance and K the Epanechnikov kernel
  K(d) = 1 - (d / radius_km)^2 for d < radius_km, 0 beyond. The answer is the neighbour with the largest support
  (ties to the more similar); its `score` is S_j / sum_i w_i, the share of the neighbours' weight that supports it
  (a probability in [0, 1], as image-classification clients read `score`).
  A lone best match is thus outvoted by a group of nearly as good matches that agree on a place, and within that
  group the photo nearest its middle wins. Further answers are the next best neighbours at least `radius_km` from
  every answer before them, so that `top_k` answers are distinct places (fewer come back when the k neighbours hold
  fewer, and never more than k).
- `"hybrid"`, the vote restricted and weighted by the zero-shot country posterior p(country): only neighbours in the
  `hybrid_countries` most probable countries vote, each weight multiplied by its country's probability. A
  neighbour's country is that of its nearest candidate city. When no neighbour lies in those countries, all vote,
  still weighted by p(country), so that the answer still comes from the gallery.

Every answer has the pipeline's fields; its `latitude` and `longitude` are the chosen photo's, `city` and `country`
those of the candidate city nearest to it (never looked up by name), and `gallery_row` and `similarity` name the
photo.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .geodesy import coordinate_problem, great_circle_km, unit_vectors, valid_coordinates


# torch, datasets and faiss are imported where they are used, so that the
# `streetclip` command can show this module's defaults in --help at once.
if TYPE_CHECKING:
    import datasets
    import torch

    from .candidates import CandidatePlaces


# Files and columns of a gallery folder (see the module docstring).
GALLERY_FILE = "gallery.json"
DATASET_FOLDER = "dataset"
INDEX_FILE = "index.faiss"
BAD_ROWS_FILE = "bad_rows.jsonl"
EMBEDDING_COLUMN = "embedding"
FORMAT_VERSION = 1
# `index="auto"`, `--index auto`: the documented default for the gallery's size (`recommended_index`).
AUTO_INDEX = "auto"
# Exact search: every query scans every row. Right up to about 100,000 rows (a few ms per query on two cores), and
# the only index whose results are exact; `recommended_index` chooses for larger galleries.
DEFAULT_INDEX = "Flat"
# Rows per inverted list that `recommended_index` aims at: nlist ~ sqrt(rows) keeps both the coarse search (nlist
# centroids) and the scan of the probed lists short, and trains in seconds to minutes on a CPU.
ROWS_PER_LIST_SQRT = 1.0
# Probing 1/64 of the lists (16 of 1024) reached recall@10 >= 0.9 against exact search on the clustered benchmark
# (eval/speed/bench_gallery_index.py); fewer lists lose neighbours that sit near a list boundary.
PROBED_LIST_FRACTION = 1 / 64
# faiss warns below 39 training points per centroid; 64 gives k-means some slack at little cost, and 2**16 points
# (at least) train PQ's 256-centroid sub-quantizers.
TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_POINTS = 2**16
# Seed of the sample an index is trained on, so that a rebuild gives the same index.
TRAIN_SAMPLE_SEED = 0
# Bytes per row that an IVF index adds to its codes: the 64-bit id of each row in its list.
IVF_ID_BYTES = 8
# Below this many rows exact search is fast enough that compression buys nothing but lost neighbours.
EXACT_SEARCH_MAX_ROWS = 100_000
# PQ code sizes (bytes per row) that `index_for_memory` tries, largest (most accurate) first; each must divide the
# embedding size (768 for ViT-L/14, 512 for ViT-B) to be usable.
PQ_CODE_SIZES = (384, 256, 192, 128, 96, 64, 48, 32, 16, 8)
# A gallery's probe embeddings and the user's model's must agree to this cosine, for every probe image. The same
# weights in bfloat16, float16 or int8 agree to better than 0.99 (tests/test_gallery.py); another checkpoint, even a
# short fine-tune of the same one, lands far below.
FINGERPRINT_MIN_COSINE = 0.99
# Fixed probe images: random blocks, so that resizing by any image processor keeps them recognisable.
PROBE_IMAGES = 4
PROBE_BLOCKS = 8
PROBE_SIZE = 64
# Probe embeddings are L2-normalised in float32; a recorded one whose norm is further from 1 was not written by a build.
FINGERPRINT_NORM_TOLERANCE = 1e-3


def import_faiss():
    """The `faiss` module, or an ImportError naming the extra that provides it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            f"Galleries need FAISS ({error}); install it with the gallery extra: `pip install 'streetclip[gallery]'` "
            "(faiss-cpu and datasets)."
        ) from None
    return faiss


def import_datasets():
    """The `datasets` module, or an ImportError naming the extra that provides it."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"Galleries are `datasets` datasets ({error}); install the gallery extra: `pip install "
            "'streetclip[gallery]'`."
        ) from None
    return datasets


@dataclass(frozen=True)
class VoteSettings:
    """How the nearest gallery photos vote (see the module docstring for the rule). The defaults are reasoned, not
    tuned on a benchmark: tune them on held-out photos of your gallery's kind."""

    # Photos retrieved per image: enough that a group of agreeing matches can outvote one stray match, few enough
    # that weak matches from elsewhere carry little weight (and the vote costs microseconds).
    num_neighbors: int = 16
    # Photos closer than this support each other. The Epanechnikov kernel of radius 10 km has a standard deviation of
    # 10 / sqrt(5) = 4.5 km, close to the Gaussian kernel of sigma 4 km that Vo et al. found best for kNN on IM2GPS
    # ("Revisiting IM2GPS in the Deep Learning Era", ICCV 2017): photos of one district pool, those of a city's far
    # ends do not, and answers stay on a photo's spot.
    radius_km: float = 10.0
    # Similarity weights exp((s - s_best) / temperature): a neighbour 0.05 less similar weighs e times less. CLIP's
    # own 0.01 would let the single best match decide alone.
    temperature: float = 0.05
    # `"hybrid"`: the photos of this many most probable zero-shot countries vote. Three covers the confusions of
    # neighbouring countries that zero-shot makes most often.
    hybrid_countries: int = 3

    def __post_init__(self):
        for name in ("num_neighbors", "hybrid_countries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VoteSettings.{name} must be an integer >= 1, got {value!r}.")
        for name in ("radius_km", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"VoteSettings.{name} must be a finite number > 0, got {value!r}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> VoteSettings:
        """Settings from a dict (as `gallery.json` stores them); unknown names are refused, naming the known ones."""
        known = {field.name for field in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown vote settings {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------------------------
# The decisions, as pure functions of the neighbours.


def kernel_vote(
    similarities: npt.ArrayLike,
    latitudes: npt.ArrayLike,
    longitudes: npt.ArrayLike,
    settings: VoteSettings,
    top_k: int = 1,
    scale: npt.ArrayLike | None = None,
) -> list[tuple[int, float]]:
    """The `"gallery"` vote among one image's neighbours: `(position, score)` of up to `top_k` answers, best first.

    `similarities`, `latitudes` and `longitudes` describe the neighbours (any order); `scale` multiplies each
    neighbour's weight (the hybrid's country probabilities; 0 leaves a neighbour out). Positions index the inputs.
    See the module docstring for the rule.
    """
    similarities = np.asarray(similarities, dtype=np.float64)
    latitudes = np.asarray(latitudes, dtype=np.float64)
    longitudes = np.asarray(longitudes, dtype=np.float64)
    weights = np.ones_like(similarities) if scale is None else np.asarray(scale, dtype=np.float64).copy()
    voters = np.isfinite(similarities) & (weights > 0)
    if not voters.any():
        return []
    weights[voters] *= np.exp((similarities[voters] - similarities[voters].max()) / settings.temperature)
    weights[~voters] = 0.0
    distances = great_circle_km(latitudes[:, None], longitudes[:, None], latitudes[None, :], longitudes[None, :])
    kernel = np.clip(1.0 - (distances / settings.radius_km) ** 2, 0.0, None)
    # A share of the weight, so in [0, 1]; clipped against rounding, since clients read it as a probability.
    support = np.clip(kernel @ weights / weights.sum(), 0.0, 1.0)
    # Most support first, then most similar; neighbours that do not vote are not answers either.
    order = [position for position in np.lexsort((-similarities, -support)) if voters[position]]
    answers: list[int] = []
    for position in order:
        if all(distances[position, earlier] >= settings.radius_km for earlier in answers):
            answers.append(position)
            if len(answers) == top_k:
                break
    return [(int(position), float(support[position])) for position in answers]


def hybrid_scale(
    neighbor_countries: npt.ArrayLike, country_probabilities: npt.ArrayLike, hybrid_countries: int
) -> np.ndarray:
    """The `"hybrid"` weights of one image's neighbours: p(country) for neighbours in the `hybrid_countries` most
    probable countries, 0 for the others; p(country) for every neighbour when none lies in those countries.

    `neighbor_countries` holds each neighbour's country row, `country_probabilities` the zero-shot posterior over the
    candidate countries.
    """
    neighbor_countries = np.asarray(neighbor_countries, dtype=np.int64)
    probabilities = np.asarray(country_probabilities, dtype=np.float64)
    # Stable on ties, so that equal probabilities keep the table's order.
    top = np.argsort(-probabilities, kind="stable")[:hybrid_countries]
    scale = probabilities[neighbor_countries]
    restricted = np.where(np.isin(neighbor_countries, top), scale, 0.0)
    return restricted if restricted.any() else scale


def nearest_city_rows(places: CandidatePlaces, latitudes: npt.ArrayLike, longitudes: npt.ArrayLike) -> np.ndarray:
    """Row of the candidate city nearest (by great-circle distance) to each point: how answers and neighbours get a
    city and a country from their coordinates, never from a name."""
    cities = unit_vectors(places.city_latitudes, places.city_longitudes)
    return (unit_vectors(latitudes, longitudes) @ cities.T).argmax(axis=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Which model a gallery belongs to.


def probe_images() -> list:
    """The fixed probe images whose embeddings fingerprint a model (seeded random blocks, scaled up)."""
    from PIL import Image

    rng = np.random.default_rng(20230101)
    images = []
    for _ in range(PROBE_IMAGES):
        blocks = rng.integers(0, 256, size=(PROBE_BLOCKS, PROBE_BLOCKS, 3), dtype=np.uint8)
        images.append(Image.fromarray(blocks).resize((PROBE_SIZE, PROBE_SIZE), Image.Resampling.NEAREST))
    return images


def image_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings of the vision tower, exactly as `StreetCLIPForGeolocation.forward` scores them
    (and as any CLIP model gives them), without touching the probe heads."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixel_values.to(device=model.device, dtype=model.dtype))
    return F.normalize(getattr(features, "pooler_output", features).float(), dim=-1)


def model_fingerprint(model, image_processor) -> np.ndarray:
    """The model's embeddings of the probe images, shape `(PROBE_IMAGES, dim)`: what a gallery records of the model
    that built it, since names change (a local copy of a Hub repo) while embeddings do not."""
    pixel_values = image_processor(images=probe_images(), return_tensors="pt")["pixel_values"]
    return image_embeddings(model, pixel_values).cpu().numpy()


def fingerprint_agreement(recorded: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """The smallest cosine between the two models' embeddings of the same probe image; -1 when the sizes differ or
    either holds a vector that is not a unit vector (zeros or NaN would otherwise agree with anything)."""
    recorded = np.asarray(recorded, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if recorded.shape != actual.shape or recorded.ndim != 2:
        return -1.0
    if fingerprint_problem(recorded, recorded.shape[1]) or fingerprint_problem(actual, actual.shape[1]):
        return -1.0
    return float((recorded * actual).sum(axis=-1).min())


def fingerprint_problem(fingerprint: Any, dim: int) -> str | None:
    """Why `fingerprint` is not a model's embeddings of the probe images (PROBE_IMAGES finite unit vectors of `dim`
    numbers), or None when it is one."""
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


class GalleryModelError(ValueError):
    """A gallery used with a model other than the one its embeddings come from."""


class GalleryFileError(ValueError):
    """A gallery file that is damaged, truncated, or contradicts the rest of its folder; the message names it."""


# ---------------------------------------------------------------------------------------------------------------------
# Index choice.


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS index for a gallery: its factory string, how many inverted lists a search probes (None without lists),
    how many rows train it (None: none needed) and about how many bytes it takes in memory."""

    factory: str
    nprobe: int | None
    train_size: int | None
    memory_bytes: int


def _num_lists(num_rows: int) -> int:
    """Inverted lists for `num_rows`: the power of two nearest ROWS_PER_LIST_SQRT * sqrt(rows), at most one list per
    39 rows (faiss' minimum of training points per centroid)."""
    target = max(1.0, ROWS_PER_LIST_SQRT * math.sqrt(num_rows))
    lists = 2 ** round(math.log2(target))
    return max(1, min(lists, num_rows // 39))


def probed_lists(lists: int) -> int:
    """Inverted lists a search probes by default: PROBED_LIST_FRACTION of `lists`, at least one."""
    return max(1, round(lists * PROBED_LIST_FRACTION))


def training_rows(lists: int | None, num_rows: int) -> int:
    """Rows that train an index with `lists` inverted lists (None: codes only, such as PQ): TRAIN_POINTS_PER_LIST
    per list, at least MIN_TRAIN_POINTS, at most all."""
    return min(num_rows, max(TRAIN_POINTS_PER_LIST * (lists or 1), MIN_TRAIN_POINTS))


def ivf_choice(num_rows: int, dim: int, codes: str, code_bytes: int) -> IndexChoice:
    """The IVF index `IVF{nlist},{codes}` for `num_rows` rows of `dim` floats, whose codes take `code_bytes` each."""
    lists = _num_lists(num_rows)
    return IndexChoice(
        factory=f"IVF{lists},{codes}",
        nprobe=probed_lists(lists),
        train_size=training_rows(lists, num_rows),
        memory_bytes=num_rows * (code_bytes + IVF_ID_BYTES) + lists * dim * 4,
    )


def recommended_index(num_rows: int, dim: int) -> IndexChoice:
    """The documented default by size: exact search (`Flat`) up to EXACT_SEARCH_MAX_ROWS rows, `IVF{nlist},SQ8`
    beyond (one byte per dimension, about 0.73 GiB per million 768-d rows, recall@10 >= 0.9 on clustered data)."""
    if num_rows <= EXACT_SEARCH_MAX_ROWS:
        return IndexChoice(DEFAULT_INDEX, None, None, num_rows * dim * 4)
    return ivf_choice(num_rows, dim, "SQ8", dim)


def index_for_memory(num_rows: int, dim: int, max_bytes: int) -> IndexChoice:
    """The most accurate index for `num_rows` rows of `dim` floats that fits in `max_bytes`, as LAION's autofaiss
    chooses: exact search for small galleries, else IVF with 8-bit scalar codes, 4-bit ones, then product quantization
    with the largest code that fits (recall falls with the code: see README, "Limits").

    A budget too small even for 8-byte PQ codes is refused, naming the smallest that would do.
    """
    if num_rows < 1 or dim < 1:
        raise ValueError(f"index_for_memory needs at least one row and one dimension, got {num_rows} x {dim}.")
    candidates = []
    if num_rows <= EXACT_SEARCH_MAX_ROWS:
        candidates.append(IndexChoice(DEFAULT_INDEX, None, None, num_rows * dim * 4))
    candidates.append(ivf_choice(num_rows, dim, "SQ8", dim))
    candidates.append(ivf_choice(num_rows, dim, "SQ4", math.ceil(dim / 2)))
    candidates += [ivf_choice(num_rows, dim, f"PQ{m}", m) for m in PQ_CODE_SIZES if m < dim / 2 and dim % m == 0]
    for choice in candidates:
        if choice.memory_bytes <= max_bytes:
            return choice
    smallest = candidates[-1]
    raise ValueError(
        f"No index holds {num_rows:,} rows of {dim} dimensions in {max_bytes:,} bytes; the smallest, "
        f"{smallest.factory!r}, needs about {smallest.memory_bytes:,}."
    )


def inverted_lists(faiss_index) -> int | None:
    """How many inverted lists `faiss_index` searches (wherever it keeps them: plain, pre-transformed, refined), None
    for an index without them (exact search, HNSW)."""
    faiss = import_faiss()
    try:
        return faiss.extract_index_ivf(faiss_index).nlist
    except RuntimeError:
        return None


def check_nprobe(nprobe: Any, lists: int | None, index: str, name: str = "nprobe") -> None:
    """Refuse an `nprobe` that cannot apply to the index `index` with `lists` inverted lists (None: none), naming
    `name` (the option or file that gave it): it must be an integer from 1 to `lists`, and only an index with inverted
    lists has any to probe. None (the default) always passes."""
    if nprobe is None:
        return
    if not isinstance(nprobe, int) or isinstance(nprobe, bool) or nprobe < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {nprobe!r}.")
    if lists is None:
        raise ValueError(
            f"{name}={nprobe} does not apply to the index {index!r}: it has no inverted lists to probe (exact search "
            "scans every row). nprobe goes with an IVF index such as 'IVF1024,SQ8'; leave it unset otherwise."
        )
    if nprobe > lists:
        raise ValueError(f"{name} must be at most the {lists} inverted lists of the index {index!r}, got {nprobe}.")


def set_nprobe(faiss_index, nprobe: int) -> None:
    """Set how many inverted lists a search probes, wherever the index keeps them (plain, pre-transformed, refined)."""
    faiss = import_faiss()
    faiss.ParameterSpace().set_index_parameter(faiss_index, "nprobe", nprobe)


def check_factory(factory: str, dim: int) -> int | None:
    """Refuse a factory string FAISS cannot build for `dim`-d rows, or whose index refuses rows added without ids
    (as `datasets` adds them), naming it, before any photo is embedded; returns the index's inverted lists (None
    without any)."""
    faiss = import_faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"index {factory!r} is not a FAISS factory string for {dim}-d embeddings ({message}); e.g. 'Flat', "
            f"'IVF1024,SQ8', 'IVF1024,PQ64' (PQ's code count must divide {dim}), or {AUTO_INDEX!r}."
        ) from None
    # An IDMap takes rows only with ids of the caller's (`add_with_ids`); a gallery's rows are numbered by their
    # position, so such an index would fail only once every photo is embedded. An index ready as built shows any
    # other refusal by adding one row.
    problem = None
    if isinstance(faiss.downcast_index(index), faiss.IndexIDMap):
        problem = "an IDMap takes rows only with ids of its own (add_with_ids), while a gallery numbers them itself"
    elif index.is_trained:
        try:
            index.add(np.zeros((1, dim), dtype=np.float32))
        except RuntimeError as error:
            problem = f"it refuses rows ({str(error).strip().splitlines()[-1]})"
    if problem is not None:
        raise ValueError(
            f"index {factory!r} cannot hold a gallery: {problem}. Give an index without an IDMap prefix, e.g. "
            "'Flat' or 'IVF1024,SQ8'."
        )
    return inverted_lists(index)


def trained_index(
    factory: str,
    dim: int,
    num_rows: int,
    read_rows: Callable[[np.ndarray], np.ndarray],
    nprobe: int | None = None,
    train_size: int | None = None,
) -> tuple[Any, int | None]:
    """An empty FAISS index `factory` for `dim`-d rows compared by inner product, ready for the `num_rows` rows to be
    added, and the inverted lists it probes (None without lists).

    An index that needs training (IVF, PQ, SQ) is trained on `train_size` rows (default: `training_rows`) drawn at
    random with a fixed seed and read by `read_rows(sorted positions)`, so that a rebuild gives the same index; an
    IVF index probes `nprobe` lists (default: `probed_lists`; `check_nprobe` refuses it for an index without lists).
    Both galleries and eval/speed/bench_gallery_index.py build their indexes here.
    """
    faiss = import_faiss()
    lists = check_factory(factory, dim)
    check_nprobe(nprobe, lists, factory)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index) if lists is not None else None
    for part in (index, ivf):
        part = faiss.downcast_index(part) if part is not None else None
        # The factory asks PQ codes for polysemous training, which only polysemous search uses (galleries do not):
        # minutes of annealing for nothing (250 s of a 260 s PQ64 training on 20,000 rows here).
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    if not index.is_trained:
        wanted = min(train_size or training_rows(lists, num_rows), num_rows)
        sample = np.sort(np.random.default_rng(TRAIN_SAMPLE_SEED).choice(num_rows, size=wanted, replace=False))
        try:
            index.train(np.ascontiguousarray(read_rows(sample), dtype=np.float32))
        except RuntimeError as error:
            raise ValueError(
                f"Cannot train the index {factory!r} on {wanted:,} of {num_rows:,} rows "
                f"({str(error).strip().splitlines()[-1]}); choose an index with fewer lists (IVF{{n}} needs at least "
                "39 rows per list), or 'Flat'."
            ) from None
    nprobe = (nprobe or probed_lists(lists)) if lists is not None else None
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return index, nprobe


# ---------------------------------------------------------------------------------------------------------------------
# The gallery.


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
            values = json.loads(path.read_text(encoding="utf-8"))
            info = cls(**values)
        except (ValueError, TypeError) as error:
            raise GalleryFileError(f"{str(path)!r} is not a gallery description this version reads: {error}") from None
        if info.format_version != FORMAT_VERSION:
            raise GalleryFileError(
                f"{str(path)!r} has format_version {info.format_version!r}; this version reads {FORMAT_VERSION}."
            )
        problems = info.problems()
        if problems:
            raise damaged_file(path, "; ".join(problems))
        return info

    def problems(self) -> list[str]:
        """What in this description no build writes (each naming the field and what is accepted); empty when none."""
        problems = [
            f"{name} must be text, got {getattr(self, name)!r}"
            for name in ("model", "index", "source")
            if not isinstance(getattr(self, name), str)
        ]
        for name, minimum in (("embedding_dim", 1), ("num_rows", 1), ("num_bad_rows", 0)):
            if not _is_count(getattr(self, name), minimum):
                problems.append(f"{name} must be an integer >= {minimum}, got {getattr(self, name)!r}")
        if self.nprobe is not None and not _is_count(self.nprobe, 1):
            problems.append(f"nprobe must be null or an integer >= 1, got {self.nprobe!r}")
        if _is_count(self.embedding_dim, 1):
            problem = fingerprint_problem(self.model_fingerprint, self.embedding_dim)
            if problem is not None:
                problems.append(f"model_fingerprint is not a model's embeddings of the probe images: {problem}")
        try:
            VoteSettings.from_dict(self.vote)
        except (ValueError, TypeError, AttributeError) as error:
            problems.append(f"vote: {error}")
        return problems

    def write(self, folder: Path) -> None:
        """Write `gallery.json` atomically: its presence marks a complete gallery."""
        write_json_atomically(folder / GALLERY_FILE, asdict(self))


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def damaged_file(path: Path, problem: str) -> GalleryFileError:
    """The error for a gallery file that no build wrote as it is, naming it and saying how to get a sound one."""
    return GalleryFileError(
        f"{str(path)!r} is damaged or was edited: {problem.rstrip('.')}. Build the gallery again (`streetclip index "
        "build DATA --model MODEL --output FOLDER --overwrite`), or download it again."
    )


def write_json_atomically(path: Path, value: Any) -> None:
    """Write `value` as standard JSON (NaN and infinities refused) to `path` through a temporary file renamed over
    it, so that a kill leaves the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as stream:
        json.dump(value, stream, indent=2, allow_nan=False)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def names_a_missing_folder(source: str) -> bool:
    """Whether `source` can only be a local path (absolute, `./`, `../`, `~`, or more parts than ORG/NAME) and
    nothing is there: `datasets` would report it as a malformed Hub id."""
    path = Path(source).expanduser()
    local = path.is_absolute() or source.startswith((".", "~")) or len(path.parts) > 2
    return local and not path.exists()


def _check_rows(folder: Path, dataset: datasets.Dataset, info: GalleryInfo) -> None:
    """Refuse a `dataset/` that does not match `gallery.json` (its row count, its columns, its embeddings' size)."""
    path = folder / DATASET_FOLDER
    if len(dataset) != info.num_rows:
        raise damaged_file(
            path, f"it holds {len(dataset)} rows while {GALLERY_FILE} counts {info.num_rows} (edited, or two builds)"
        )
    missing = [name for name in (EMBEDDING_COLUMN, "latitude", "longitude") if name not in dataset.column_names]
    if missing:
        raise damaged_file(path, f"it has no column {missing[0]!r}")
    length = getattr(dataset.features[EMBEDDING_COLUMN], "length", None)
    if length != info.embedding_dim:
        raise damaged_file(
            folder / GALLERY_FILE,
            f"embedding_dim is {info.embedding_dim}, while the embeddings in {DATASET_FOLDER}/ have {length} numbers",
        )


class GeoGallery:
    """A gallery of geo-tagged photo embeddings with its FAISS index; see the module docstring.

    Example:

    ```python
    >>> from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
    >>> from modeling_streetclip.app.gallery_build import build_gallery
    >>> from transformers import pipeline
    >>> model = StreetCLIPForGeolocation.from_pretrained("geolocal/StreetCLIP")  # doctest: +SKIP
    >>> processor = StreetCLIPProcessor.from_pretrained("geolocal/StreetCLIP")  # doctest: +SKIP
    >>> build_gallery(model, processor, "my_photos/", "my-gallery")  # doctest: +SKIP
    >>> geolocate = pipeline("geolocation", model="geolocal/StreetCLIP", gallery="my-gallery")  # doctest: +SKIP
    >>> geolocate("photo.jpg", decision="hybrid")  # doctest: +SKIP
    ```
    """

    def __init__(self, folder: Path, dataset: datasets.Dataset, info: GalleryInfo, settings: VoteSettings):
        self.folder = folder
        self.dataset = dataset
        self.info = info
        self.settings = settings
        # Through Arrow: `datasets`' numpy format would hand float64 columns over as float32 (metres off).
        coordinates = dataset.with_format("arrow", columns=["latitude", "longitude"])[:]
        self.latitudes = coordinates["latitude"].to_numpy().astype(np.float64)
        self.longitudes = coordinates["longitude"].to_numpy().astype(np.float64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f"GeoGallery({str(self.folder)!r}, rows={len(self)}, model={self.info.model!r}, index={self.info.index!r})"
        )

    @property
    def faiss_index(self):
        """The FAISS index object itself (to tune search parameters beyond `nprobe`)."""
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
        """A gallery from its folder, or from a Hub dataset repo (ORG/NAME) that `push_to_hub` wrote.

        `nprobe` overrides how many inverted lists an IVF index probes (more: higher recall, slower search);
        `vote_settings` override the gallery's `VoteSettings` (`num_neighbors=32`, `radius_km=5`, ...).
        """
        datasets = import_datasets()
        import_faiss()
        name = os.fspath(path_or_repo)
        folder = Path(name).expanduser()
        if names_a_missing_folder(name) or folder.is_file():
            raise FileNotFoundError(f"No gallery folder at {name!r}; give a gallery folder or a Hub id ORG/NAME.")
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, repo_type="dataset", revision=revision, token=token))
        info = GalleryInfo.read(folder)
        settings = replace(VoteSettings.from_dict(info.vote), **vote_settings)
        dataset = datasets.load_from_disk(str(folder / DATASET_FOLDER))
        _check_rows(folder, dataset, info)
        index_path = folder / INDEX_FILE
        if not index_path.is_file():
            raise damaged_file(index_path, "it is missing")
        try:
            dataset.load_faiss_index(EMBEDDING_COLUMN, str(index_path))
        except (RuntimeError, MemoryError) as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise damaged_file(index_path, f"FAISS cannot read it ({reason})") from None
        except ValueError as error:  # datasets refuses an index whose size differs from the dataset's
            raise damaged_file(index_path, str(error)) from None
        gallery = cls(folder, dataset, info, settings)
        faiss_index = gallery.faiss_index
        if faiss_index.d != info.embedding_dim:
            raise damaged_file(
                index_path, f"it holds {faiss_index.d}-d vectors, while {GALLERY_FILE} says {info.embedding_dim}"
            )
        lists = inverted_lists(faiss_index)
        try:
            check_nprobe(info.nprobe, lists, info.index)
        except ValueError as error:
            raise damaged_file(folder / GALLERY_FILE, str(error)) from None
        check_nprobe(nprobe, lists, info.index)
        gallery._check_coordinates()
        nprobe = nprobe if nprobe is not None else info.nprobe
        if nprobe is not None:
            set_nprobe(faiss_index, nprobe)
        return gallery

    def _check_coordinates(self) -> None:
        """Refuse rows whose coordinates are not a point on Earth (a build records such rows as bad instead), naming
        the first and the count: their answers would carry NaN, infinities or impossible places."""
        bad = np.flatnonzero(~valid_coordinates(self.latitudes, self.longitudes))
        if len(bad):
            row = int(bad[0])
            latitude, longitude = float(self.latitudes[row]), float(self.longitudes[row])
            reason = coordinate_problem(latitude, longitude).describe(latitude, longitude)
            raise damaged_file(
                self.folder / DATASET_FOLDER,
                f"{len(bad):,} of its {len(self):,} rows have coordinates that are not a point on Earth (row {row}: "
                f"{reason})",
            )

    def search(self, embeddings: npt.ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest rows of each L2-normalised embedding: `(similarities, rows)`, each of shape
        `(num_queries, min(k, len(self)))`, best first; rows are -1 (similarity -inf) where the index returns fewer."""
        queries = np.asarray(embeddings, dtype=np.float32)
        if queries.shape[-1] != self.info.embedding_dim:
            raise GalleryModelError(
                f"The gallery {str(self.folder)!r} holds {self.info.embedding_dim}-d embeddings of the model "
                f"{self.info.model!r}; these queries have {queries.shape[-1]} dimensions. Search it with that model's "
                "embeddings (see check_model)."
            )
        queries = np.ascontiguousarray(queries.reshape(-1, self.info.embedding_dim))
        scores, rows = self.dataset.search_batch(EMBEDDING_COLUMN, queries, k=min(k, len(self)))
        scores = np.where(rows >= 0, scores, -np.inf)
        return scores, rows

    def check_model(self, model, image_processor, model_name: str | None = None) -> None:
        """Refuse a model whose embeddings are not those this gallery was built with, naming both models; a model
        that agrees (the same weights in another precision, a copy under another name) passes."""
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
        """Upload the gallery folder as a Hub dataset repo (created if needed); `GeoGallery.load(repo_id)` and
        `pipeline(..., gallery=repo_id)` read it back. Returns the commit URL."""
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


__all__ = [
    "AUTO_INDEX",
    "BAD_ROWS_FILE",
    "DEFAULT_INDEX",
    "GALLERY_FILE",
    "GalleryFileError",
    "GalleryInfo",
    "GalleryModelError",
    "GeoGallery",
    "IndexChoice",
    "VoteSettings",
    "check_factory",
    "check_nprobe",
    "hybrid_scale",
    "import_faiss",
    "index_for_memory",
    "inverted_lists",
    "kernel_vote",
    "model_fingerprint",
    "names_a_missing_folder",
    "nearest_city_rows",
    "probed_lists",
    "recommended_index",
    "trained_index",
    "training_rows",
]
