"""Gallery indexes at scale, on synthetic galleries of unit rows (dimension 768); eval/README.md has the figures.

- default: clustered and uniform galleries; per index (`Flat`, the size's default, lean `IVF,PQ{m}`): build time,
  size, ms per query at batch 64, recall@10 against `Flat` and, when clustered, "same centre@10".
- `--build`: no model; clustered rows written as `streetclip index build`'s shards and joined by its own last step,
  then searched in a fresh process: each step's time and peak resident memory, index size, latency and recall@10.
- `--throughput`: images/s of `streetclip index build` over JPEGs (tiny model and ViT-B/16), start-up subtracted.
- `--pipeline`: at ViT-L/14-336 (random weights), the gallery decision's share of the pipeline's time per image.
"""

import argparse
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import faiss
import numpy as np
from timing import (
    build_rate,
    interleaved_medians,
    machine_line,
    random_points,
    save_small_streetclip,
    write_photo_folder,
)

from modeling_streetclip.gallery_index import recommended_index, trained_index


CLUSTERS = 10_000
CENTRE_WEIGHT, NOISE_WEIGHT = 0.8, 0.6  # 0.8^2 + 0.6^2 = 1: cosine ~0.8 to the centre before renormalising
QUERY_BATCH = 64
RECALL_AT = 10
# Rows drawn and added per step, to bound the temporary float64-free memory of generation (256 MB at 768-d).
CHUNK_ROWS = 1 << 16


def unit_rows(rng: np.random.Generator, count: int, dim: int) -> np.ndarray:
    rows = rng.standard_normal((count, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def gallery_rows(
    kind: str, count: int, dim: int, rng: np.random.Generator, centres: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """`count` rows of the `kind` gallery (see the module docstring), float32, unit length, and the centre of each
    row of a clustered gallery (None for a uniform one)."""
    rows = np.empty((count, dim), dtype=np.float32)
    labels = rng.integers(0, len(centres), count) if kind == "clustered" else None
    for start in range(0, count, CHUNK_ROWS):
        size = min(CHUNK_ROWS, count - start)
        chunk = unit_rows(rng, size, dim)
        if labels is not None:
            chunk = CENTRE_WEIGHT * centres[labels[start : start + size]] + NOISE_WEIGHT * chunk
            chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        rows[start : start + size] = chunk
    return rows, labels


def clustered_chunks(count: int, dim: int, seed: int = 0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """The clustered gallery as `(first row, rows, centres)` in chunks of CHUNK_ROWS, each drawn from its own seed,
    so that the exact search draws them again instead of keeping them."""
    centres = unit_rows(np.random.default_rng(seed), CLUSTERS, dim)
    for start in range(0, count, CHUNK_ROWS):
        rows, labels = gallery_rows(
            "clustered", min(CHUNK_ROWS, count - start), dim, np.random.default_rng([seed, start]), centres
        )
        yield start, rows, labels


def peak_memory_gib(reset: bool = False) -> float:
    """This process's peak resident memory (VmHWM; `getrusage` elsewhere), then with `reset` starts a new peak."""
    status = Path("/proc/self/status")
    if not status.exists():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # no reset outside Linux
    peak = int(status.read_text().split("VmHWM:")[1].split()[0]) / 2**20  # kB
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak restarts from the current resident memory
    return peak


def build_through_gallery_build(folder: Path, rows: int, dim: int) -> dict:
    """Write the clustered rows as the build's shards (DEFAULT_SHARD_SIZE rows each) and join them as the build does."""
    import torch

    from modeling_streetclip.app import DEFAULT_SHARD_SIZE
    from modeling_streetclip.app.batch import PixelBatch
    from modeling_streetclip.app.gallery_build import SHARDS_FOLDER, ShardWriter, join_shards
    from modeling_streetclip.gallery_store import INDEX_FILE, PROBE_IMAGES
    from modeling_streetclip.gallery_vote import VoteSettings

    begin = time.perf_counter()
    writer = ShardWriter(folder / SHARDS_FOLDER, dim, None)
    writer.shards.mkdir(parents=True)
    for start, chunk, _ in clustered_chunks(rows, dim):
        for offset in range(0, len(chunk), DEFAULT_SHARD_SIZE):
            part = chunk[offset : offset + DEFAULT_SHARD_SIZE]
            order = list(range(start + offset, start + offset + len(part)))
            writer.add(PixelBatch(order, order, None, {}, [(0.0, 0.0, None, {})] * len(part)), torch.from_numpy(part))
            writer.flush()
    shards_s, shards_peak_gib = time.perf_counter() - begin, peak_memory_gib(reset=True)
    fingerprint = unit_rows(np.random.default_rng(1), PROBE_IMAGES, dim)
    options = {"model": "synthetic", "source": f"{rows:,} synthetic clustered rows"}
    gallery, _ = join_shards(folder, options, fingerprint, VoteSettings())
    return {
        "shards_s": shards_s,
        "shards_peak_gib": shards_peak_gib,
        "join_s": time.perf_counter() - begin - shards_s,
        "index": gallery.info.index,
        "nprobe": gallery.info.nprobe,
        "index_gib": (folder / INDEX_FILE).stat().st_size / 2**30,
        "peak_gib": peak_memory_gib(),
    }


def search_gallery(folder: Path, queries: np.ndarray) -> dict:
    """Load the gallery in this (fresh) process and search it in batches."""
    from modeling_streetclip.gallery_store import GeoGallery

    begin = time.perf_counter()
    gallery = GeoGallery.load(folder)
    load_s = time.perf_counter() - begin
    found, per_query_s = search_in_batches(gallery, queries, RECALL_AT)
    return {"found": found, "load_s": load_s, "per_query_s": per_query_s, "peak_gib": peak_memory_gib()}


def exact_search(queries: np.ndarray, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact `RECALL_AT` nearest rows of every query, by brute force over the regenerated chunks, and every row's
    centre."""
    best_scores = np.full((len(queries), RECALL_AT), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), RECALL_AT), dtype=np.int64)
    labels = np.empty(rows, dtype=np.int64)
    for start, chunk, chunk_labels in clustered_chunks(rows, dim):
        labels[start : start + len(chunk)] = chunk_labels
        scores = np.concatenate([best_scores, queries @ chunk.T], axis=1)
        candidates = np.concatenate(
            [best_rows, np.broadcast_to(np.arange(start, start + len(chunk)), (len(queries), len(chunk)))], axis=1
        )
        top = np.argpartition(-scores, RECALL_AT, axis=1)[:, :RECALL_AT]
        best_scores, best_rows = np.take_along_axis(scores, top, 1), np.take_along_axis(candidates, top, 1)
    return best_rows, labels


def measure_build(args: argparse.Namespace) -> None:
    """`--build`: the default index through the build's own path at `--rows`, each step's memory its own process's."""
    centres = unit_rows(np.random.default_rng(0), CLUSTERS, args.dim)
    queries, query_labels = gallery_rows(
        "clustered", args.queries, args.dim, np.random.default_rng([0, 2**40]), centres
    )
    print(
        f"\nbuild: {args.rows:,} clustered rows x {args.dim} through gallery_build.join_shards, {args.queries:,} queries"
    )
    spawn = multiprocessing.get_context("spawn")  # a fresh process: its peak memory is its own
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        folder = Path(workdir) / "gallery"
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            built = pool.submit(build_through_gallery_build, folder, args.rows, args.dim).result()
        print(
            f"  build: shards written in {built['shards_s']:.0f} s (peak resident memory {built['shards_peak_gib']:.2f} "
            f"GiB, the generation's), joined (dataset written, {built['index']} trained and filled, nprobe "
            f"{built['nprobe']}) in {built['join_s']:.0f} s, peak resident memory {built['peak_gib']:.2f} GiB (target "
            f"<= 8); index {built['index_gib']:.3f} GiB (target <= 4)",
            flush=True,
        )
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            searched = pool.submit(search_gallery, folder, queries).result()
    print(
        f"  search (GeoGallery.load in a fresh process, loaded in {searched['load_s']:.0f} s): "
        f"{searched['per_query_s'] * 1e3:.3f} ms/query at batch {QUERY_BATCH} (target <= 5); peak resident memory "
        f"{searched['peak_gib']:.2f} GiB",
        flush=True,
    )
    begin = time.perf_counter()
    sample = min(args.recall_queries, args.queries)
    exact, labels = exact_search(queries[:sample], args.rows, args.dim)
    found = searched["found"][:sample]
    print(
        f"  recall@{RECALL_AT} {recall(found, exact):.3f} (target >= 0.9), same centre@{RECALL_AT} "
        f"{same_centre(labels, found, query_labels[:sample]):.3f}, over {sample:,} queries; exact search by brute "
        f"force in {time.perf_counter() - begin:.0f} s"
    )


def measure_throughput(args: argparse.Namespace) -> None:
    """`--throughput`: images/s of `streetclip index build` at each model size, on one process and on several."""
    from modeling_streetclip.testing_utils import VIT_B_16, save_random_clip, save_tiny_clip_checkpoint

    scales = {
        "tiny": (save_tiny_clip_checkpoint, 1024),
        "vit-b-16": (lambda path: save_random_clip(path, VIT_B_16), 64),
    }
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    configs = list(dict.fromkeys([(1, cores), (1, 1), (cores, 1)]))
    short = args.batch_size * max(processes for processes, _ in configs)  # a batch per process
    print(f"\n{machine_line()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        root = Path(workdir)
        for scale, (save_clip, images) in scales.items():
            model = save_small_streetclip(save_clip(root / scale / "clip"), root / scale / "streetclip")
            folders = {count: write_photo_folder(root / scale / str(count), count) for count in {images, short}}
            options = ("--batch_size", args.batch_size, "--num_workers", 1, "--device", "cpu")
            for processes, threads in configs:
                run = (folders[images], folders[short], model, root / scale / "gallery", *options)
                _, rate = build_rate(*run, processes=processes, threads=threads)
                print(
                    f"  index build, {scale}, {processes} process(es) x {threads} thread(s), 1 worker each: "
                    f"{rate:.1f} img/s ({images} images, batch {args.batch_size})",
                    flush=True,
                )


def search_in_batches(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """The ids of the `k` nearest rows of every query, searched `QUERY_BATCH` at a time, and the seconds per query
    (the median batch, so that one slow batch on a shared machine does not decide)."""
    found, seconds = [], []
    for start in range(0, len(queries), QUERY_BATCH):
        batch = queries[start : start + QUERY_BATCH]
        begin = time.perf_counter()
        _, ids = index.search(batch, k)
        seconds.append((time.perf_counter() - begin) / len(batch))
        found.append(ids)
    return np.concatenate(found), statistics.median(seconds)


def build(factory: str, rows: np.ndarray) -> tuple[object, int | None, float]:
    """The index `factory` over `rows`, trained and added as a gallery does, its probed lists and its build seconds."""
    begin = time.perf_counter()
    index, nprobe = trained_index(factory, rows.shape[1], len(rows), lambda positions: rows[positions])
    for start in range(0, len(rows), CHUNK_ROWS):
        index.add(rows[start : start + CHUNK_ROWS])
    return index, nprobe, time.perf_counter() - begin


def index_bytes(factory: str, index, rows: np.ndarray) -> int:
    if factory == "Flat":
        return rows.nbytes  # an IndexFlat holds exactly the rows
    return faiss.serialize_index(index).nbytes


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact `RECALL_AT` nearest rows that the index found among its own."""
    return float(np.mean([len(set(a) & set(b)) / RECALL_AT for a, b in zip(found, exact, strict=True)]))


def same_centre(labels: np.ndarray, found: np.ndarray, query_labels: np.ndarray) -> float:
    """Share of the rows found that belong to their query's centre: of a place, what geolocation needs."""
    return float(np.mean(labels[found] == query_labels[:, None]))


def measure_gallery(kind: str, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    centres = unit_rows(rng, CLUSTERS, args.dim) if kind == "clustered" else None
    begin = time.perf_counter()
    rows, labels = gallery_rows(kind, args.rows, args.dim, rng, centres)
    queries, query_labels = gallery_rows(kind, args.queries, args.dim, rng, centres)
    print(
        f"\n{kind}: {args.rows:,} rows x {args.dim}, {args.queries:,} queries (generated in "
        f"{time.perf_counter() - begin:.0f} s)"
    )
    default = recommended_index(args.rows, args.dim).factory
    lists = default.split(",")[0] if default != "Flat" else "IVF1024"
    factories = ["Flat", *([default] if default != "Flat" else []), *(f"{lists},{lean}" for lean in args.lean)]
    exact = None
    for factory in factories:
        index, nprobe, build_s = build(factory, rows)
        found, per_query_s = search_in_batches(index, queries, RECALL_AT)
        if exact is None:
            exact = found  # Flat comes first: exact search is the reference
        memory = index_bytes(factory, index, rows)
        probes = f", nprobe {nprobe}" if nprobe else ""
        same = "" if labels is None else f"   same centre@{RECALL_AT} {same_centre(labels, found, query_labels):.3f}"
        print(
            f"  {factory:<16} build {build_s:7.1f} s   memory {memory / 2**30:6.3f} GiB   "
            f"{per_query_s * 1e3:7.3f} ms/query at batch {QUERY_BATCH}   recall@{RECALL_AT} "
            f"{recall(found, exact):.3f}{same}{probes}"
        )
        del index


def measure_pipeline_share(args: argparse.Namespace) -> None:
    """Per-image time of the pipeline (greedy) and of the gallery decision on a 1M-row clustered gallery."""
    import datasets
    import pyarrow as pa
    import torch
    from transformers import pipeline

    from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
    from modeling_streetclip.decisions import rank_gallery_places
    from modeling_streetclip.gallery_store import EMBEDDING_COLUMN, GalleryInfo, GeoGallery
    from modeling_streetclip.gallery_vote import VoteSettings
    from modeling_streetclip.testing_utils import random_photo, save_random_vit_l

    rng = np.random.default_rng(1)
    rows, _ = gallery_rows("clustered", args.rows, args.dim, rng, unit_rows(rng, CLUSTERS, args.dim))
    latitudes, longitudes = random_points(rng, args.rows).T
    embeddings = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), args.dim)
    table = pa.table({"embedding": embeddings, "latitude": latitudes, "longitude": longitudes})
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table))
    begin = time.perf_counter()
    factory = recommended_index(args.rows, args.dim).factory
    index, nprobe = trained_index(factory, args.dim, args.rows, lambda positions: rows[positions])
    dataset.add_faiss_index(EMBEDDING_COLUMN, custom_index=index, batch_size=CHUNK_ROWS)
    print(
        f"\npipeline share: gallery of {args.rows:,} clustered rows, {factory} (nprobe {nprobe}) built in "
        f"{time.perf_counter() - begin:.0f} s"
    )
    info = GalleryInfo("synthetic", [], args.dim, factory, nprobe, args.rows, 0, "synthetic", {})
    gallery = GeoGallery(Path("synthetic"), dataset, info, VoteSettings())

    with tempfile.TemporaryDirectory() as workdir:
        plain = save_random_vit_l(Path(workdir) / "vit-l")
        model = StreetCLIPForGeolocation.from_pretrained(plain)  # the paper's 193 countries, heads built here
        geolocate = pipeline("geolocation", model=model, processor=StreetCLIPProcessor.from_pretrained(plain))
        images = [random_photo(seed, (640, 480)) for seed in range(args.batch_size)]
        pixel_values = geolocate.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values)
        methods = {
            "pipeline": lambda: geolocate(images, batch_size=len(images)),
            "gallery": lambda: rank_gallery_places(model, outputs, gallery, "gallery"),
        }
        medians = interleaved_medians(methods, args.rounds)  # after a warm-up each: the city heads the images need
    pipeline_image, gallery_image = medians["pipeline"] / len(images), medians["gallery"] / len(images)
    print(
        f"  per image at batch {args.batch_size}: pipeline (greedy) {pipeline_image * 1e3:.1f} ms, gallery decision "
        f"{gallery_image * 1e3:.2f} ms = {100 * gallery_image / pipeline_image:.1f}% of the pipeline (target <= 15%)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1_000)
    parser.add_argument("--galleries", nargs="*", choices=["clustered", "uniform"], default=["clustered", "uniform"])
    parser.add_argument("--lean", nargs="*", default=["PQ64", "PQ96"], help="PQ code sizes tried as lean options")
    parser.add_argument("--pipeline", action="store_true", help="also measure the gallery's share at ViT-L/14-336")
    parser.add_argument("--build", action="store_true", help="the default index through the build's own path")
    parser.add_argument("--throughput", action="store_true", help="images/s of `streetclip index build` over JPEGs")
    parser.add_argument("--recall_queries", type=int, default=500, help="--build: queries searched exactly too")
    parser.add_argument("--workdir", help="folder for --build's gallery (default: the system's temporary folder)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per call (--pipeline, --throughput)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds of --pipeline (medians are reported)")
    parser.add_argument("--threads", type=int, help="faiss' OpenMP threads (fewer avoids busy waiting when shared)")
    args = parser.parse_args()
    import torch

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads; torch {torch.get_num_threads()}")
    if args.build or args.throughput:
        if args.build:
            measure_build(args)
        if args.throughput:
            measure_throughput(args)
        return
    for kind in args.galleries:
        measure_gallery(kind, args)
    if args.pipeline:
        measure_pipeline_share(args)


if __name__ == "__main__":
    main()
