"""The FAISS index of a gallery: which index suits its size or a memory budget, checking a factory string before any
photo is embedded, how many inverted lists a search probes, and training on a sample. faiss is imported where used."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .gallery_vote import is_count


AUTO_INDEX = "auto"
# Exact search, the only index whose results are exact; fast enough up to EXACT_SEARCH_MAX_ROWS rows.
DEFAULT_INDEX = "Flat"
EXACT_SEARCH_MAX_ROWS = 100_000
# Probing 1/64 of the lists reached recall@10 >= 0.9 on the clustered benchmark (eval/speed/bench_gallery_index.py).
PROBED_LIST_FRACTION = 1 / 64
# Beyond about a million rows, fewer lists are probed, so that a query scans about this many rows at any size.
SCANNED_ROWS_PER_QUERY = 20_000
# k-means wants >= 39 points per centroid (64 gives slack); PQ's 256-centroid sub-quantizers want 2**16 points.
TRAIN_POINTS_PER_LIST = 64
MIN_TRAIN_POINTS = 2**16
TRAIN_SAMPLE_SEED = 0  # a rebuild gives the same index
IVF_ID_BYTES = 8  # an IVF index stores each row's 64-bit id beside its code
# PQ code sizes (bytes per row) `index_for_memory` tries, most accurate first; usable where they divide the dimension.
PQ_CODE_SIZES = (384, 256, 192, 128, 96, 64, 48, 32, 16, 8)


@dataclass(frozen=True)
class IndexChoice:
    """A FAISS factory string, the lists a search probes and the rows that train it (None: none), its bytes in memory."""

    factory: str
    nprobe: int | None
    train_size: int | None
    memory_bytes: int


def probed_lists(lists: int, num_rows: int) -> int:
    """PROBED_LIST_FRACTION of the lists, fewer where they hold more than SCANNED_ROWS_PER_QUERY of `num_rows`."""
    return max(1, round(min(lists * PROBED_LIST_FRACTION, lists * SCANNED_ROWS_PER_QUERY / max(num_rows, 1))))


def training_rows(lists: int | None, num_rows: int) -> int:
    """TRAIN_POINTS_PER_LIST per list, at least MIN_TRAIN_POINTS, at most all rows."""
    return min(num_rows, max(TRAIN_POINTS_PER_LIST * (lists or 1), MIN_TRAIN_POINTS))


def _ivf_choice(num_rows: int, dim: int, codes: str, code_bytes: int) -> IndexChoice:
    """`IVF{lists},{codes}` with the power of two nearest sqrt(rows) lists, at most one per 39 rows."""
    lists = max(1, min(2 ** round(math.log2(max(1.0, math.sqrt(num_rows)))), num_rows // 39))
    memory = num_rows * (code_bytes + IVF_ID_BYTES) + lists * dim * 4
    return IndexChoice(f"IVF{lists},{codes}", probed_lists(lists, num_rows), training_rows(lists, num_rows), memory)


def recommended_index(num_rows: int, dim: int) -> IndexChoice:
    """The documented default: `Flat` up to EXACT_SEARCH_MAX_ROWS rows, `IVF{lists},SQ8` beyond (a byte a dimension)."""
    if num_rows <= EXACT_SEARCH_MAX_ROWS:
        return IndexChoice(DEFAULT_INDEX, None, None, num_rows * dim * 4)
    return _ivf_choice(num_rows, dim, "SQ8", dim)


# The choice autofaiss makes, written here: autofaiss 2.18 requires numpy<2, and this package needs numpy>=2.4.
def index_for_memory(num_rows: int, dim: int, max_bytes: int) -> IndexChoice:
    """The most accurate index of `num_rows` x `dim` floats in `max_bytes`: Flat (small), IVF SQ8, SQ4, then PQ."""
    if num_rows < 1 or dim < 1:
        raise ValueError(f"index_for_memory needs at least one row and one dimension, got {num_rows} x {dim}.")
    candidates = [recommended_index(num_rows, dim)] if num_rows <= EXACT_SEARCH_MAX_ROWS else []
    candidates += [_ivf_choice(num_rows, dim, "SQ8", dim), _ivf_choice(num_rows, dim, "SQ4", math.ceil(dim / 2))]
    candidates += [_ivf_choice(num_rows, dim, f"PQ{m}", m) for m in PQ_CODE_SIZES if m < dim / 2 and dim % m == 0]
    for choice in candidates:
        if choice.memory_bytes <= max_bytes:
            return choice
    raise ValueError(
        f"No index holds {num_rows:,} rows of {dim} dimensions in {max_bytes:,} bytes; the smallest, "
        f"{candidates[-1].factory!r}, needs about {candidates[-1].memory_bytes:,}."
    )


def faiss_reason(error: Exception) -> str:
    """FAISS' own reason, without its C++ trace."""
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__


def inverted_lists(faiss_index) -> int | None:
    """How many inverted lists `faiss_index` searches (plain, pre-transformed or refined), None without any."""
    import faiss

    try:
        return faiss.extract_index_ivf(faiss_index).nlist
    except RuntimeError:
        return None


def check_nprobe(nprobe: Any, lists: int | None, index: str, name: str = "nprobe") -> None:
    """Refuse an `nprobe` (named `name`) other than None or an integer from 1 to `lists` (None: the index has none)."""
    if nprobe is None:
        return
    if not is_count(nprobe):
        raise ValueError(f"{name} must be an integer >= 1, got {nprobe!r}.")
    if lists is None:
        raise ValueError(
            f"{name}={nprobe} does not apply to the index {index!r}: it has no inverted lists to probe (exact search "
            "scans every row). nprobe goes with an IVF index such as 'IVF1024,SQ8'; leave it unset otherwise."
        )
    if nprobe > lists:
        raise ValueError(f"{name} must be at most the {lists} inverted lists of the index {index!r}, got {nprobe}.")


def check_factory(factory: str, dim: int) -> int | None:
    """Refuse a factory string FAISS cannot build for `dim`-d rows, or whose index refuses rows added without ids (as
    `datasets` adds them), before any photo is embedded; returns its inverted lists (None: none)."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(
            f"index {factory!r} is not a FAISS factory string for {dim}-d embeddings ({faiss_reason(error)}); e.g. "
            f"'Flat', 'IVF1024,SQ8', 'IVF1024,PQ64' (PQ's code count must divide {dim}), or {AUTO_INDEX!r}."
        ) from None
    # An IDMap fails only after embedding; other refusals show on a row added to an index trained as built.
    problem = None
    if isinstance(faiss.downcast_index(index), faiss.IndexIDMap):
        problem = "an IDMap takes rows only with ids of its own (add_with_ids), while a gallery numbers them itself"
    elif index.is_trained:
        try:
            index.add(np.zeros((1, dim), dtype=np.float32))
        except RuntimeError as error:
            problem = f"it refuses rows ({faiss_reason(error)})"
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
    """An empty inner-product index `factory` for `num_rows` rows of `dim` floats, trained where needed on `train_size`
    random rows (default `training_rows`) read by `read_rows(sorted positions)`, and the lists it probes."""
    from transformers.utils import requires_backends

    requires_backends(trained_index, "faiss")
    import faiss

    lists = check_factory(factory, dim)
    check_nprobe(nprobe, lists, factory)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    # Polysemous training serves only polysemous search, which galleries never use, and is slow.
    for part in map(faiss.downcast_index, [index] + ([faiss.extract_index_ivf(index)] if lists else [])):
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
    if not index.is_trained:
        # Not `add_faiss_index(train_size=)`, which trains on the first rows: rows in place order cut recall.
        wanted = min(train_size or training_rows(lists, num_rows), num_rows)
        sample = np.sort(np.random.default_rng(TRAIN_SAMPLE_SEED).choice(num_rows, size=wanted, replace=False))
        try:
            index.train(np.ascontiguousarray(read_rows(sample), dtype=np.float32))
        except RuntimeError as error:
            raise ValueError(
                f"Cannot train the index {factory!r} on {wanted:,} of {num_rows:,} rows ({faiss_reason(error)}); "
                "choose an index with fewer lists (IVF{n} needs at least 39 rows per list), or 'Flat'."
            ) from None
    if lists is not None:  # else nprobe is None: check_nprobe refused any other
        nprobe = nprobe or probed_lists(lists, num_rows)
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    return index, nprobe


__all__ = ["IndexChoice", "check_factory", "check_nprobe", "index_for_memory", "recommended_index", "trained_index"]
