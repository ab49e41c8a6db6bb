"""The FAISS index of a gallery: which index fits a gallery's size or a memory budget, checking a factory string
before any photo is embedded, how many inverted lists a search probes, and training an index on a sample.

Galleries (`gallery_store`) and their building (`app.gallery_build`) use it; faiss is imported only when an index is
made or read, so that the `streetclip` command can show this module's defaults in --help at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


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


__all__ = [
    "AUTO_INDEX",
    "DEFAULT_INDEX",
    "IndexChoice",
    "check_factory",
    "check_nprobe",
    "import_faiss",
    "index_for_memory",
    "inverted_lists",
    "ivf_choice",
    "probed_lists",
    "recommended_index",
    "set_nprobe",
    "trained_index",
    "training_rows",
]
