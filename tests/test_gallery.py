"""Retrieval galleries: building (resumable, bad rows recorded), saving and loading (folders and Hub repos), searching
against a brute-force NumPy search, the model check, the `"gallery"` and `"hybrid"` decisions against hand-written
references, the `streetclip index build` command, and an end-to-end check that a gallery of training photos beats
zero-shot at street level.
"""

import csv
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import faiss
import numpy as np
import pytest
import torch
from builders import kernel_vote, place_in_hub_cache, run_as_hub_user, run_pretrain_here
from PIL import Image
from transformers import CLIPModel, pipeline

import modeling_streetclip
from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, batch, gallery_build
from modeling_streetclip.app.gallery_build import SHARDS_FOLDER, build_gallery
from modeling_streetclip.candidates import CandidatePlaces
from modeling_streetclip.cli import main
from modeling_streetclip.decisions import place_probabilities, rank_gallery_places, rank_places
from modeling_streetclip.gallery_index import check_factory, index_for_memory, recommended_index, trained_index
from modeling_streetclip.gallery_store import (
    BAD_ROWS_FILE,
    FINGERPRINT_MIN_COSINE,
    GALLERY_FILE,
    PROBE_IMAGES,
    GalleryFileError,
    GalleryModelError,
    GeoGallery,
    image_embeddings,
    model_fingerprint,
)
from modeling_streetclip.gallery_vote import VoteSettings, hybrid_scale, nearest_city_rows
from modeling_streetclip.geodesy import CONFIDENCE_RADII_KM, EARTH_RADIUS_KM, great_circle_km
from modeling_streetclip.testing_utils import (
    PLACES,
    SMALL_COUNTRIES,
    place_photo,
    save_tiny_clip_checkpoint,
    write_geo_imagefolder,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
# Degrees of longitude per km on the equator, where hand-made neighbours are laid out so that distances are exact.
DEGREES_PER_KM = 180 / (math.pi * EARTH_RADIUS_KM)
GOOD_ROWS = 2 * 2 * len(PLACES)  # write_geo_imagefolder(photos_per_city=2)
BAD_ROWS = 3  # its bad_rows: an unreadable file, no coordinates, swapped coordinates


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The synthetic geo set as an image folder: 24 good rows, then 3 bad ones."""
    return write_geo_imagefolder(tmp_path_factory.mktemp("photos") / "data", photos_per_city=2, seed=0, bad_rows=True)


@pytest.fixture(scope="module")
def model_and_processor(small_streetclip_dir):
    return (
        StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True),
        StreetCLIPProcessor.from_pretrained(small_streetclip_dir),
    )


@pytest.fixture(scope="module")
def built(model_and_processor, photos, tmp_path_factory):
    model, processor = model_and_processor
    return build_gallery(
        model, processor, str(photos), tmp_path_factory.mktemp("gallery") / "g", batch_size=5, progress=False
    )


def metadata(folder: Path) -> dict[str, dict]:
    with open(folder / "metadata.csv", encoding="utf-8") as stream:
        return {row["file_name"]: row for row in csv.DictReader(stream)}


def query_photos(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [place_photo(index % len(PLACES), index % 2, rng) for index in range(count)]


def equator(km: float) -> float:
    """The longitude of a point `km` east of (0, 0) along the equator."""
    return km * DEGREES_PER_KM


# ---------------------------------------------------------------------------------------------------------------------
# The decisions, on hand-made neighbours.


def reference_vote(similarities, longitudes_km, settings: VoteSettings, scale=None) -> list[tuple[int, float]]:
    """The documented kernel vote written out with loops, for neighbours on the equator (positions in km)."""
    n = len(similarities)
    scale = scale if scale is not None else [1.0] * n
    best = max(s for s, c in zip(similarities, scale, strict=True) if c > 0)
    weights = [c * math.exp((s - best) / settings.temperature) for s, c in zip(similarities, scale, strict=True)]
    supports = []
    for j in range(n):
        support = 0.0
        for i in range(n):
            distance = abs(longitudes_km[i] - longitudes_km[j])
            if distance < settings.radius_km:
                support += weights[i] * (1 - (distance / settings.radius_km) ** 2)
        supports.append(support / sum(weights))
    order = sorted((j for j in range(n) if weights[j] > 0), key=lambda j: (-supports[j], -similarities[j]))
    answers = []
    for j in order:
        if all(abs(longitudes_km[j] - longitudes_km[a]) >= settings.radius_km for a in answers):
            answers.append(j)
    return [(j, supports[j]) for j in answers]


def assert_same_votes(votes: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [position for position, _ in votes] == [position for position, _ in expected]
    assert [score for _, score in votes] == pytest.approx([score for _, score in expected], rel=1e-9)


def test_kernel_vote_lets_a_group_of_agreeing_photos_outvote_the_single_nearest_one():
    settings = VoteSettings(radius_km=10.0, temperature=0.05)
    # Neighbour 0 is the most similar but alone, 500 km away; 1-3 are nearly as similar and within 4 km of each other.
    similarities = [0.90, 0.88, 0.87, 0.87]
    positions_km = [500.0, 2.0, 0.0, 4.0]
    votes = kernel_vote(similarities, [0.0] * 4, [equator(km) for km in positions_km], settings, top_k=2)
    assert_same_votes(votes, reference_vote(similarities, positions_km, settings)[:2])
    assert [position for position, _ in votes] == [1, 0]
    # The middle of the group wins, and the lone best match comes second as a distinct place.
    assert votes[0][0] != int(np.argmax(similarities))


def test_kernel_vote_keeps_top_k_answers_a_radius_apart_and_returns_fewer_when_the_places_run_out():
    settings = VoteSettings(radius_km=10.0)
    positions_km = [0.0, 3.0, 50.0, 52.0]
    votes = kernel_vote([0.9, 0.89, 0.8, 0.79], [0.0] * 4, [equator(km) for km in positions_km], settings, top_k=5)
    chosen = [positions_km[position] for position, _ in votes]
    assert len(votes) == 2  # two places among four photos
    assert abs(chosen[0] - chosen[1]) >= settings.radius_km
    assert_same_votes(votes, reference_vote([0.9, 0.89, 0.8, 0.79], positions_km, settings))


def test_kernel_vote_breaks_equal_support_by_similarity_and_ignores_missing_neighbours():
    settings = VoteSettings()
    # Two photos at one spot support each other equally; the more similar one is the answer. -inf marks a neighbour
    # that the index did not return.
    votes = kernel_vote([0.7, 0.8, -np.inf], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], settings, top_k=3)
    assert_same_votes(votes, [(1, 1.0)])


def test_hybrid_keeps_the_top_countries_neighbours_scaled_by_their_probability_and_can_overturn_the_gallery_vote():
    settings = VoteSettings(radius_km=10.0, temperature=0.05, hybrid_countries=1)
    # Photos 0-1 in country 0 are the most similar; 2-3 in country 1 less so, but zero-shot is sure of country 1.
    similarities = [0.90, 0.89, 0.84, 0.84]
    positions_km = [0.0, 1.0, 1000.0, 1001.0]
    countries = [0, 0, 1, 1]
    probabilities = [0.1, 0.85, 0.05]
    scale = hybrid_scale(countries, probabilities, settings.hybrid_countries)
    assert scale.tolist() == [0.0, 0.0, 0.85, 0.85]
    longitudes = [equator(km) for km in positions_km]
    gallery = kernel_vote(similarities, [0.0] * 4, longitudes, settings)
    hybrid = kernel_vote(similarities, [0.0] * 4, longitudes, settings, scale=scale)
    assert gallery[0][0] in (0, 1) and hybrid[0][0] in (2, 3)
    assert_same_votes(hybrid, reference_vote(similarities, positions_km, settings, scale.tolist())[:1])
    # With two countries allowed, both groups vote, each weighted by its country's probability.
    two = hybrid_scale(countries, probabilities, 2)
    assert two.tolist() == [0.1, 0.1, 0.85, 0.85]


def test_hybrid_lets_every_neighbour_vote_when_none_lies_in_the_top_countries():
    scale = hybrid_scale([2, 2, 0], [0.05, 0.9, 0.05], hybrid_countries=1)
    assert scale.tolist() == [0.05, 0.05, 0.05]


@pytest.mark.parametrize(
    "settings",
    [
        {"num_neighbors": 0},
        {"radius_km": 0},
        {"radius_km": float("inf")},
        {"temperature": -1},
        {"hybrid_countries": 1.5},
    ],
)
def test_vote_settings_refuse_values_that_cannot_vote(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        VoteSettings(**settings)


def test_nearest_city_rows_match_a_brute_force_great_circle_search():
    places = CandidatePlaces.from_records(
        [
            {"country": country, "city": city, "latitude": latitude, "longitude": longitude}
            for country, cities in PLACES.items()
            for city, latitude, longitude in cities
        ]
    )
    rng = np.random.default_rng(0)
    latitudes, longitudes = rng.uniform(-80, 80, 200), rng.uniform(-180, 180, 200)
    distances = great_circle_km(
        latitudes[:, None], longitudes[:, None], np.array(places.city_latitudes), np.array(places.city_longitudes)
    )
    assert nearest_city_rows(places, latitudes, longitudes).tolist() == distances.argmin(axis=1).tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Index choice.


def test_recommended_index_is_exact_for_small_galleries_and_ivf_sq8_within_a_gib_for_a_million_rows():
    small = recommended_index(50_000, 768)
    assert (small.factory, small.nprobe, small.train_size) == ("Flat", None, None)
    large = recommended_index(1_000_000, 768)
    assert large.factory == "IVF1024,SQ8" and large.nprobe == 16
    assert large.memory_bytes <= 2**30
    assert large.train_size == 65_536


def test_index_for_memory_picks_the_most_accurate_index_that_fits_and_refuses_a_budget_nothing_fits():
    assert index_for_memory(50_000, 768, 2**30).factory == "Flat"
    assert index_for_memory(1_000_000, 768, 2**30).factory == "IVF1024,SQ8"
    assert index_for_memory(1_000_000, 768, 500 * 2**20).factory == "IVF1024,SQ4"
    lean = index_for_memory(1_000_000, 768, 120 * 2**20)
    assert lean.factory == "IVF1024,PQ96" and lean.memory_bytes <= 120 * 2**20
    assert index_for_memory(1_000_000, 512, 120 * 2**20).factory == "IVF1024,PQ64"  # 96 does not divide 512
    with pytest.raises(ValueError, match="needs about"):
        index_for_memory(1_000_000, 768, 2**20)


def test_trained_index_is_trained_probed_and_spared_the_polysemous_training_that_search_never_uses():
    import faiss

    rows = np.random.default_rng(0).standard_normal((2_000, 16), dtype=np.float32)
    index, nprobe = trained_index("IVF8,PQ4", 16, len(rows), lambda positions: rows[positions])
    assert index.is_trained and index.ntotal == 0 and nprobe == 1
    assert not faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training
    flat, no_lists = trained_index("Flat", 16, len(rows), lambda positions: rows[positions])
    assert no_lists is None and flat.is_trained
    with pytest.raises(ValueError, match="'IVF8,PQ5' is not a FAISS factory string for 16-d embeddings"):
        trained_index("IVF8,PQ5", 16, len(rows), lambda positions: rows[positions])


# ---------------------------------------------------------------------------------------------------------------------
# Building, saving, loading, searching.


def test_a_built_gallery_reloads_and_searches_as_a_brute_force_numpy_search(built, model_and_processor, photos):
    model, processor = model_and_processor
    gallery = GeoGallery.load(built.gallery.folder)
    assert len(gallery) == GOOD_ROWS and gallery.info.index == "Flat"
    rows = gallery.dataset.with_format("numpy")[:]
    # Each row holds its photo's embedding, coordinates and labels.
    by_name = metadata(photos)
    names = [Path(path).name for path in rows["image_path"]]
    images = [Image.open(photos / name) for name in names]
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(rows["embedding"], image_embeddings(model, pixel_values).numpy(), atol=1e-5)
    np.testing.assert_allclose(rows["latitude"], [float(by_name[name]["latitude"]) for name in names])
    assert list(gallery.dataset["city"]) == [by_name[name]["city"] or None for name in names]
    # Queries answer as brute force does: the same similarities, and rows whose similarity is what search says.
    queries = image_embeddings(
        model, processor.image_processor(images=query_photos(6, seed=5), return_tensors="pt")["pixel_values"]
    ).numpy()
    similarities, found = gallery.search(queries, k=5)
    brute = queries @ rows["embedding"].T
    np.testing.assert_allclose(similarities, -np.sort(-brute, axis=1)[:, :5], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(brute, found, axis=1), similarities, atol=1e-5)


def test_bad_rows_are_recorded_with_their_reason_and_skipped(built):
    folder = built.gallery.folder
    recorded = [json.loads(line) for line in (folder / BAD_ROWS_FILE).read_text().splitlines()]
    reasons = {Path(row["image_path"]).name: row["error"] for row in recorded}
    assert set(reasons) == {"broken.png", "no-coordinates.png", "swapped.png"}
    assert "not an image format Pillow can read" in reasons["broken.png"]
    assert "missing" in reasons["no-coordinates.png"]
    assert "look swapped" in reasons["swapped.png"]
    assert built.bad_rows == recorded
    info = json.loads((folder / GALLERY_FILE).read_text())
    assert (info["num_rows"], info["num_bad_rows"]) == (GOOD_ROWS, BAD_ROWS)
    assert not (folder / SHARDS_FOLDER).exists() and not (folder / "build.json").exists()


def test_a_build_killed_mid_way_resumes_and_embeds_every_row_exactly_once(
    model_and_processor, photos, tmp_path, monkeypatch
):
    model, processor = model_and_processor
    folder = tmp_path / "g"
    embedded: list[int] = []
    real = batch.image_embeddings

    def killed_at_the_third_batch(model, pixel_values):
        if len(embedded) == 2:
            raise KeyboardInterrupt  # as Ctrl-C, or a kill, between two batches
        embedded.append(len(pixel_values))
        return real(model, pixel_values)

    monkeypatch.setattr(batch, "image_embeddings", killed_at_the_third_batch)
    options = {"batch_size": 4, "shard_size": 4, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        build_gallery(model, processor, str(photos), folder, **options)
    shards = sorted(path.name for path in (folder / SHARDS_FOLDER).iterdir())
    assert shards == ["rows-000000000000-000000000004.arrow", "rows-000000000004-000000000008.arrow"]
    assert not (folder / GALLERY_FILE).exists()
    # A shard that a kill cut off while it was written is left under its temporary name, and is embedded again.
    (folder / SHARDS_FOLDER / "rows-000000000008-000000000012.arrow.tmp").write_bytes(b"half a shard")

    first_run = list(embedded)
    embedded.clear()
    monkeypatch.setattr(
        batch, "image_embeddings", lambda model, pixels: embedded.append(len(pixels)) or real(model, pixels)
    )
    result = build_gallery(model, processor, str(photos), folder, **options)
    assert result.resumed_rows == 8
    assert sum(first_run) + sum(embedded) == GOOD_ROWS
    assert result.embedded_rows == sum(embedded) == GOOD_ROWS - 8
    assert sorted(result.gallery.dataset["source_row"]) == list(range(GOOD_ROWS))
    assert len(result.bad_rows) == BAD_ROWS


def test_locating_and_gallery_building_embed_through_the_batch_engine_s_one_loop(
    model_and_processor, photos, tmp_path, monkeypatch
):
    model, processor = model_and_processor
    calls = []
    real = batch.embedded_batches

    def recorded(model, image_processor, loader, **options):
        calls.append(len(calls))
        yield from real(model, image_processor, loader, **options)

    monkeypatch.setattr(batch, "embedded_batches", recorded)
    monkeypatch.setattr(gallery_build, "embedded_batches", recorded)
    images = [str(photos / "France-0-0.png"), str(photos / "broken.png")]
    records = list(batch.geolocate_images(model, processor.image_processor, images, return_embeddings=True))
    build_gallery(model, processor, str(photos), tmp_path / "g", progress=False)
    assert len(calls) == 2
    # The loop's embeddings are the forward pass's, so the answers are the pipeline's.
    pixel_values = processor.image_processor(images=Image.open(images[0]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(records[0].image_embeds, model(pixel_values=pixel_values).image_embeds[0])
    assert records[1].answers is None and "not an image format Pillow can read" in records[1].error


def test_a_missing_faiss_or_datasets_is_named_before_anything_is_embedded_or_read(
    built, model_and_processor, photos, tmp_path, monkeypatch
):
    from transformers.utils import import_utils

    model, processor = model_and_processor
    for backend in ("faiss", "datasets"):
        with monkeypatch.context() as patch:
            patch.setitem(import_utils.BACKENDS_MAPPING, backend, (lambda: False, f"{{0}} requires {backend}. "))
            with pytest.raises(ImportError, match=f"build_gallery requires {backend}"):
                build_gallery(model, processor, str(photos), tmp_path / "g", progress=False)
            assert not (tmp_path / "g").exists()
            with pytest.raises(ImportError, match=f"GeoGallery requires {backend}"):
                GeoGallery.load(built.gallery.folder)


def test_a_build_stopped_while_saving_its_index_leaves_no_partial_file_and_finishes_when_rerun(
    model_and_processor, photos, tmp_path, monkeypatch
):
    model, processor = model_and_processor
    folder = tmp_path / "g"

    def half_written(index, path):
        Path(path).write_bytes(b"half an index")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(faiss, "write_index", half_written)
        with pytest.raises(KeyboardInterrupt):
            build_gallery(model, processor, str(photos), folder, progress=False)
    assert not list(folder.glob("*.tmp")) and not (folder / "index.faiss").exists()
    assert not (folder / GALLERY_FILE).exists()  # the shards stay: nothing is embedded again
    result = build_gallery(model, processor, str(photos), folder, progress=False)
    assert (result.embedded_rows, result.resumed_rows) == (0, GOOD_ROWS + BAD_ROWS)
    assert len(GeoGallery.load(folder)) == GOOD_ROWS


def test_a_streamed_build_with_workers_writes_the_rows_of_a_loaded_one_in_the_same_order(
    built, model_and_processor, photos, tmp_path
):
    model, processor = model_and_processor
    streamed = build_gallery(
        model, processor, str(photos), tmp_path / "g", streaming=True, batch_size=3, num_workers=2, progress=False
    )
    assert streamed.gallery.dataset["source_row"] == built.gallery.dataset["source_row"]
    np.testing.assert_allclose(
        np.asarray(streamed.gallery.dataset["embedding"]), np.asarray(built.gallery.dataset["embedding"]), atol=1e-6
    )
    assert streamed.bad_rows == built.bad_rows


def test_a_stream_without_declared_types_keeps_labels_whose_types_settle_in_a_later_shard(
    model_and_processor, photos, tmp_path
):
    names = sorted(metadata(photos))[:6]
    notes = [None, None, "kerb", None, "tram", None]  # the first shard holds no text, the second some
    counts = [1, 2, 3, 4, 5.5, 6]  # integers until the third shard

    def rows():
        for name, note, count in zip(names, notes, counts, strict=True):
            row = metadata(photos)[name]
            yield {"image": str(photos / name), "latitude": row["latitude"], "longitude": row["longitude"]} | {
                "note": note,
                "count": count,
            }

    data = datasets.IterableDataset.from_generator(rows)
    assert data.features is None
    model, processor = model_and_processor
    result = build_gallery(model, processor, data, tmp_path / "g", shard_size=2, batch_size=2, progress=False)
    assert result.gallery.dataset["note"] == notes and result.gallery.dataset["count"] == counts


def test_an_unfinished_build_is_not_resumed_with_other_data_or_another_model(
    model_and_processor, photos, tmp_path, tiny_clip_dir
):
    model, processor = model_and_processor
    folder = tmp_path / "g"
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after_first_shard(model, processor, photos, folder)
    other_photos = write_geo_imagefolder(tmp_path / "other-photos", photos_per_city=1, seed=3)
    with pytest.raises(ValueError, match=f"holds an unfinished build of other data \\(source was '{photos}', now"):
        build_gallery(model, processor, str(other_photos), folder, progress=False)
    other = CLIPModel.from_pretrained(save_tiny_clip_checkpoint(tmp_path / "other", seed=1))
    with pytest.raises(GalleryModelError, match="resume with that model, or pass --overwrite"):
        build_gallery(other, processor, str(photos), folder, progress=False)
    # --overwrite starts afresh, with any model.
    fresh = build_gallery(other, processor, str(photos), folder, overwrite=True, progress=False)
    assert fresh.resumed_rows == 0 and len(fresh.gallery) == GOOD_ROWS


def _interrupt_after_first_shard(model, processor, photos, folder):
    """Run a build that stops (KeyboardInterrupt) once its first shard is written."""
    real = gallery_build.ShardWriter.flush

    def flush_then_stop(self):
        real(self)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gallery_build.ShardWriter, "flush", flush_then_stop)
        build_gallery(model, processor, str(photos), folder, batch_size=4, shard_size=4, progress=False)


def test_an_ivf_index_is_trained_saved_with_its_probes_and_searched(model_and_processor, photos, tmp_path):
    model, processor = model_and_processor
    result = build_gallery(model, processor, str(photos), tmp_path / "g", index="IVF2,SQ8", nprobe=2, progress=False)
    gallery = GeoGallery.load(result.gallery.folder)
    assert (gallery.info.index, gallery.info.nprobe) == ("IVF2,SQ8", 2)
    assert gallery.faiss_index.nprobe == 2 and gallery.faiss_index.ntotal == GOOD_ROWS
    assert GeoGallery.load(result.gallery.folder, nprobe=1).faiss_index.nprobe == 1
    embeddings = np.asarray(gallery.dataset["embedding"], dtype=np.float32)
    similarities, rows = gallery.search(embeddings[:3], k=4)
    assert (rows >= 0).all()
    # SQ8 keeps similarities to about 1e-2; with every list probed, the best row found is within that of the truth.
    assert similarities[:, 0] == pytest.approx((embeddings[:3] @ embeddings.T).max(axis=1), abs=1e-2)


def test_a_gallery_from_another_model_is_refused_and_the_same_model_in_bfloat16_is_not(
    built, small_streetclip_dir, tiny_clip_dir, tmp_path
):
    other_dir = save_tiny_clip_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(GalleryModelError, match="was built with the model .* not with .*other"):
        pipeline("geolocation", model=str(other_dir), gallery=str(built.gallery.folder))
    bfloat16 = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True, dtype=torch.bfloat16)
    processor = StreetCLIPProcessor.from_pretrained(small_streetclip_dir)
    agreement = modeling_streetclip.gallery_store.fingerprint_agreement(
        built.gallery.info.model_fingerprint, model_fingerprint(bfloat16, processor.image_processor)
    )
    assert agreement >= FINGERPRINT_MIN_COSINE
    built.gallery.check_model(bfloat16, processor.image_processor)


def test_a_missing_or_damaged_gallery_is_refused_naming_the_folder(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="No gallery folder at"):
        GeoGallery.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no gallery.json"):
        GeoGallery.load(tmp_path / "empty")


def gallery_copy(built, tmp_path: Path, **gallery_json) -> Path:
    """A copy of the built gallery, with `gallery_json` replacing fields of its gallery.json."""
    folder = Path(shutil.copytree(built.gallery.folder, tmp_path / "copy"))
    if gallery_json:
        info = json.loads((folder / GALLERY_FILE).read_text()) | gallery_json
        (folder / GALLERY_FILE).write_text(json.dumps(info))
    return folder


def locate_with_gallery(model_dir: Path, gallery: Path, image: Path, output: Path, *extra: str) -> int:
    return main(
        ["locate", str(image), "--model", str(model_dir), "--gallery", str(gallery), "--output", str(output)]
        + ["--num_workers", "0", *extra]
    )


def flip_a_header_byte(data: bytes) -> bytes:
    # Bytes 8-15 of a FAISS file hold its row count, which the stored codes then contradict.
    return data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]


@pytest.mark.parametrize(
    "damage",
    [lambda data: data[: len(data) // 2], lambda data: b"", flip_a_header_byte],
    ids=["truncated", "empty", "bit-flipped"],
)
def test_a_damaged_index_file_is_refused_naming_it_and_locate_exits_2(
    built, small_streetclip_dir, photos, tmp_path, capsys, damage
):
    folder = gallery_copy(built, tmp_path)
    index = folder / "index.faiss"
    index.write_bytes(damage(index.read_bytes()))
    with pytest.raises(GalleryFileError, match=r"index\.faiss' is damaged or was edited: FAISS cannot read it"):
        GeoGallery.load(folder)
    output = tmp_path / "answers.jsonl"
    assert locate_with_gallery(small_streetclip_dir, folder, photos / "France-0-0.png", output) == EXIT_USAGE
    assert f"--gallery {str(folder)!r}: {str(index)!r} is damaged" in capsys.readouterr().err


@pytest.mark.slow
def test_the_benchmark_exits_2_naming_a_damaged_index_file(built, small_streetclip_dir, photos, tmp_path, capsys):
    import benchmark

    folder = gallery_copy(built, tmp_path)
    (folder / "index.faiss").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(
            ["--model", str(small_streetclip_dir), "--data", str(photos), "--output_dir", str(tmp_path / "results")]
            + ["--gallery", str(folder), "--num_workers", "0", "--device", "cpu"]
        )
    assert exit_info.value.code == EXIT_USAGE
    assert "index.faiss' is damaged or was edited" in capsys.readouterr().err


def test_nprobe_applies_only_to_an_index_with_inverted_lists_with_one_rule_everywhere(
    built, model_and_processor, small_streetclip_dir, photos, tmp_path, capsys
):
    folder = built.gallery.folder  # built with index Flat, exact search
    with pytest.raises(ValueError, match="nprobe=4 does not apply to the index 'Flat': it has no inverted lists"):
        GeoGallery.load(folder, nprobe=4)
    with pytest.raises(ValueError, match="nprobe must be an integer >= 1, got 0"):
        GeoGallery.load(folder, nprobe=0)
    model, processor = model_and_processor
    with pytest.raises(ValueError, match="nprobe=4 does not apply to the index 'Flat'"):
        build_gallery(model, processor, str(photos), tmp_path / "flat", index="Flat", nprobe=4, progress=False)
    assert not (tmp_path / "flat").exists()  # refused before any photo is embedded
    # A gallery.json that no build wrote: a file error naming it, and a usage error from locate.
    for nprobe, message in ((-5, "nprobe must be null or an integer >= 1, got -5"), (4, "does not apply")):
        copy = gallery_copy(built, tmp_path / str(nprobe), nprobe=nprobe)
        with pytest.raises(GalleryFileError, match=f"gallery.json' is damaged or was edited: .*{message}"):
            GeoGallery.load(copy)
        output = tmp_path / f"answers{nprobe}.jsonl"
        assert locate_with_gallery(small_streetclip_dir, copy, photos / "France-0-0.png", output) == EXIT_USAGE
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("latitude", [float("nan"), float("inf"), 235.0])
def test_gallery_coordinates_that_are_not_a_point_on_earth_are_refused_on_load(built, tmp_path, latitude):
    folder = gallery_copy(built, tmp_path)
    dataset = datasets.load_from_disk(str(folder / "dataset"))
    edited = dataset.map(
        lambda row, position: {"latitude": latitude if position == 3 else row["latitude"]}, with_indices=True
    )
    edited.save_to_disk(str(tmp_path / "edited"))
    shutil.rmtree(folder / "dataset")
    shutil.move(tmp_path / "edited", folder / "dataset")
    with pytest.raises(
        GalleryFileError,
        match=r"dataset' is damaged or was edited: 1 of its 24 rows have coordinates "
        r"that are not a point on Earth \(row 3: latitude",
    ):
        GeoGallery.load(folder)


@pytest.mark.parametrize("fingerprint", [0.0, float("nan")], ids=["zeros", "nan"])
def test_a_fingerprint_that_is_no_model_s_embeddings_is_refused_and_never_agrees(
    built, model_and_processor, tmp_path, fingerprint
):
    recorded = np.full_like(np.asarray(built.gallery.info.model_fingerprint), fingerprint)
    # Such a gallery would otherwise pass the model check of any model: refused on load.
    folder = gallery_copy(built, tmp_path, model_fingerprint=recorded.tolist())
    with pytest.raises(GalleryFileError, match="model_fingerprint is not a model's embeddings of the probe images"):
        GeoGallery.load(folder)
    model, processor = model_and_processor
    actual = model_fingerprint(model, processor.image_processor)
    assert modeling_streetclip.gallery_store.fingerprint_agreement(recorded, actual) == -1.0


def test_an_embedding_dim_that_disagrees_with_the_gallery_is_refused_on_load_and_in_search(built, tmp_path):
    dim = built.gallery.info.embedding_dim
    with pytest.raises(GalleryFileError, match=f"its vectors have {dim} numbers, while embedding_dim is 64"):
        GeoGallery.load(gallery_copy(built, tmp_path / "a", embedding_dim=64))
    # Fingerprint edited to agree: the embeddings stored in the dataset still tell.
    unit = np.eye(PROBE_IMAGES, 64).tolist()
    with pytest.raises(GalleryFileError, match=f"embedding_dim is 64, while the embeddings in dataset/ have {dim}"):
        GeoGallery.load(gallery_copy(built, tmp_path / "b", embedding_dim=64, model_fingerprint=unit))
    with pytest.raises(GalleryModelError, match=f"holds {dim}-d embeddings .* these queries have 64 dimensions"):
        built.gallery.search(np.zeros((2, 64), dtype=np.float32), k=3)


@pytest.mark.parametrize("factory", ["IDMap,Flat", "IDMap2,Flat", "IDMap,IVF4,Flat"])
def test_an_index_that_cannot_add_rows_is_refused_before_embedding(factory):
    with pytest.raises(ValueError, match=f"index {factory!r} cannot hold a gallery: an IDMap takes rows only"):
        check_factory(factory, 16)
    assert check_factory("IVF4,SQ8", 16) == 4 and check_factory("Flat", 16) is None


def test_a_photo_listed_twice_goes_into_the_gallery_once_and_is_recorded_as_a_bad_row(
    model_and_processor, photos, tmp_path, caplog
):
    source = Path(shutil.copytree(photos, tmp_path / "photos"))
    lines = (source / "metadata.csv").read_text().splitlines()
    (source / "metadata.csv").write_text("\n".join([*lines, lines[1], lines[2]]) + "\n")
    model, processor = model_and_processor
    with caplog.at_level("WARNING"):
        result = build_gallery(model, processor, str(source), tmp_path / "g", progress=False)
    assert len(result.gallery) == GOOD_ROWS
    repeats = [row for row in result.bad_rows if "repeats the image file" in row["error"]]
    first = lines[1].split(",")[0]
    assert [row["source_row"] for row in repeats] == [GOOD_ROWS + BAD_ROWS, GOOD_ROWS + BAD_ROWS + 1]
    assert repeats[0]["error"].endswith(f"{first}' of source row 0; each photo goes into the gallery once")
    assert "2 rows of" in caplog.text and "repeat the image file of an earlier row" in caplog.text
    assert len(set(result.gallery.dataset["image_path"])) == GOOD_ROWS


def test_repeated_ids_are_recorded_but_stored_images_that_share_a_name_are_distinct_photos(
    model_and_processor, tmp_path
):
    def png(photo: Image.Image) -> bytes:
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        return buffer.getvalue()

    rng = np.random.default_rng(3)
    photos = [{"bytes": png(place_photo(index, 0, rng)), "path": "image.png"} for index in range(3)]
    data = datasets.Dataset.from_dict(
        {"image": photos, "latitude": [48.8, 35.6, -1.3], "longitude": [2.3, 139.6, 36.8], "id": ["a", "b", "a"]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "latitude": datasets.Value("float64"),
                "longitude": datasets.Value("float64"),
                "id": datasets.Value("string"),
            }
        ),
    )
    model, processor = model_and_processor
    with_ids = build_gallery(model, processor, data, tmp_path / "ids", progress=False)
    assert len(with_ids.gallery) == 2
    assert [row["error"] for row in with_ids.bad_rows] == [
        "repeats the id (column 'id') 'a' of source row 0; each photo goes into the gallery once"
    ]
    # Without ids, a stored image's path is only a name: three photos called image.png stay three.
    without_ids = build_gallery(model, processor, data.remove_columns("id"), tmp_path / "names", progress=False)
    assert len(without_ids.gallery) == 3 and not without_ids.bad_rows


def test_a_gallery_loads_from_a_hub_dataset_repo_and_pushes_as_one(built, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    place_in_hub_cache(built.gallery.folder, cache, "someone/photos", repo_type="dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    loaded = GeoGallery.load("someone/photos")
    assert len(loaded) == GOOD_ROWS and loaded.info.model == built.gallery.info.model

    calls = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)

        def upload_folder(self, **kwargs):
            calls["upload_folder"] = kwargs
            return "https://huggingface.co/datasets/someone/photos/commit/0"

    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    assert built.gallery.push_to_hub("someone/photos", private=True).endswith("/commit/0")
    assert calls["create_repo"] == ("someone/photos", {"repo_type": "dataset", "private": True, "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_type"] == "dataset" and upload["folder_path"] == built.gallery.folder
    assert set(upload["allow_patterns"]) == {"gallery.json", "index.faiss", "bad_rows.jsonl", "dataset/*"}


def readme_gallery_snippet() -> str:
    """The README's Python block that builds a gallery, as printed."""
    blocks = (REPO_ROOT / "README.md").read_text(encoding="utf-8").split("```python\n")[1:]
    (snippet,) = [block.split("```")[0] for block in blocks if "build_gallery(" in block]
    return snippet


def test_readme_gallery_snippet_runs_as_printed(model_and_processor, small_streetclip_dir, tmp_path, monkeypatch):
    """With the README's names in place (its earlier blocks' `model` and `processor`, the folder they save, photos),
    the block builds a gallery, answers from it and pushes it, the upload recorded instead of sent."""
    write_geo_imagefolder(tmp_path / "geo_photos", photos_per_city=1, seed=3)
    StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir).save_pretrained(tmp_path / "streetclip-with-heads")
    StreetCLIPProcessor.from_pretrained(small_streetclip_dir).save_pretrained(tmp_path / "streetclip-with-heads")
    place_photo(0, 0, np.random.default_rng(4)).save(tmp_path / "photo.jpg")
    pushed = []
    monkeypatch.setattr(GeoGallery, "push_to_hub", lambda gallery, repo_id: pushed.append((gallery.folder, repo_id)))
    monkeypatch.chdir(tmp_path)
    model, processor = model_and_processor
    namespace = {"model": model, "processor": processor, "pipeline": pipeline}
    exec(readme_gallery_snippet(), namespace)
    assert len(namespace["gallery"]) == 2 * len(PLACES)
    answers = namespace["geolocate"]("photo.jpg", decision="hybrid", top_k=3)
    assert answers and all({"gallery_row", "similarity", "latitude", "longitude"} <= set(answer) for answer in answers)
    assert pushed == [(namespace["gallery"].folder, "ORG/my-gallery")]


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline with a gallery.


def test_pipeline_gallery_answers_carry_the_photo_its_nearest_candidate_city_and_distinct_places(
    built, small_streetclip_dir, photos
):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir), gallery=str(built.gallery.folder))
    image = str(photos / "Japan-1-0.png")
    default, explicit = geolocate(image, top_k=3), geolocate(image, top_k=3, decision="gallery")
    assert default == explicit  # with a gallery, "gallery" is the default rule
    places = geolocate.model.candidate_places
    gallery = built.gallery
    for answer in explicit:
        row = gallery.dataset[answer["gallery_row"]]
        assert (answer["latitude"], answer["longitude"]) == (row["latitude"], row["longitude"])
        city = int(nearest_city_rows(places, [answer["latitude"]], [answer["longitude"]])[0])
        assert (answer["city"], answer["country"]) == (
            places.city_names[city],
            places.country_names[places.city_countries[city]],
        )
        assert {"score", "country_score", "joint_probability", "similarity"} <= answer.keys()
    coordinates = [(answer["latitude"], answer["longitude"]) for answer in explicit]
    for first in range(len(coordinates)):
        for second in range(first + 1, len(coordinates)):
            assert great_circle_km(*coordinates[first], *coordinates[second]) >= gallery.settings.radius_km
    hybrid = geolocate([image, image], top_k=2, decision="hybrid", batch_size=2)
    assert hybrid[0] == hybrid[1] and hybrid[0][0].keys() == explicit[0].keys()
    assert geolocate(image, decision="greedy")[0].keys().isdisjoint({"gallery_row", "similarity"})


def test_top_k_is_capped_at_the_answers_a_gallery_can_give(built, small_streetclip_dir, photos):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir), gallery=built.gallery)
    image = str(photos / "Japan-1-0.png")
    # Each answer is a distinct neighbour: never more than num_neighbors, and no table sized by top_k.
    answers = geolocate(image, top_k=10**6)
    assert answers == geolocate(image, top_k=built.gallery.settings.num_neighbors)
    inputs = geolocate.image_processor(images=[Image.open(image)], return_tensors="pt")
    with torch.no_grad():
        outputs = geolocate.model(**inputs)
    ranked = rank_gallery_places(geolocate.model, outputs, built.gallery, "gallery", top_k=10**6)
    assert ranked.city_rows.shape == (1, built.gallery.settings.num_neighbors)


@pytest.mark.parametrize("decision", ["gallery", "hybrid"])
def test_gallery_scores_are_vote_shares_that_image_classification_clients_read(
    built, small_streetclip_dir, photos, decision
):
    from huggingface_hub import ImageClassificationOutputElement

    geolocate = pipeline("geolocation", model=str(small_streetclip_dir), gallery=built.gallery)
    for answers in geolocate(
        [str(photos / "Japan-1-0.png"), str(photos / "Kenya-0-1.png")], top_k=3, decision=decision
    ):
        parsed = ImageClassificationOutputElement.parse_obj_as_list(json.dumps(answers))
        assert [element.score for element in parsed] == [answer["score"] for answer in answers]
        assert all(0.0 <= element.score <= 1.0 for element in parsed)
        assert all(element.label for element in parsed)


HUB_USER_SCRIPT = """
import json, sys
from transformers import pipeline

repo_id, gallery, image = sys.argv[1:]
geolocate = pipeline("geolocation", model=repo_id, trust_remote_code=True, gallery=gallery)
print(json.dumps({"answers": geolocate(image, top_k=2, decision="hybrid"), "class": type(geolocate).__module__}))
"""


@pytest.mark.slow
def test_a_saved_pipeline_folder_searches_galleries_for_users_without_the_package(
    built, small_streetclip_dir, photos, tmp_path
):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir), gallery=str(built.gallery.folder))
    repo = tmp_path / "repo"
    geolocate.save_pretrained(repo)
    # The search and the decisions travel with the folder; building galleries needs the package.
    assert {"gallery_store.py", "gallery_vote.py", "gallery_index.py", "decisions.py"} <= {
        path.name for path in repo.iterdir()
    }
    assert not (repo / "gallery_build.py").exists()
    image = str(photos / "Kenya-0-1.png")
    remote = run_as_hub_user(
        HUB_USER_SCRIPT, ["org/model", str(built.gallery.folder), image], {"org/model": repo}, tmp_path
    )
    assert remote["class"].startswith("transformers_modules.")
    assert remote["answers"] == geolocate(image, top_k=2, decision="hybrid")


@pytest.mark.parametrize("levels", [["country", "city"], ["country", "region", "city"]])
def test_place_probabilities_are_those_rank_places_gives_its_own_answers(tiny_clip_dir, model_and_processor, levels):
    _, processor = model_and_processor
    model = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=SMALL_COUNTRIES, cities_per_country=8, levels=levels
    )
    pixel_values = processor.image_processor(images=query_photos(3, seed=9), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    for decision in ("greedy", "joint"):
        ranked = rank_places(model, outputs, top_k=4, decision=decision)
        probabilities = place_probabilities(model, outputs, ranked.city_rows)
        for name in ("country_scores", "region_scores", "joint_probabilities"):
            torch.testing.assert_close(probabilities[name], getattr(ranked, name).float(), rtol=1e-5, atol=1e-7)


def test_pipeline_refuses_a_gallery_decision_without_a_gallery(small_streetclip_dir, photos):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir))
    with pytest.raises(ValueError, match="decision='hybrid' votes among the nearest photos of a gallery"):
        geolocate(str(photos / "Japan-1-0.png"), decision="hybrid")
    with pytest.raises(ValueError, match="Unknown decision rule 'nearest'"):
        geolocate(str(photos / "Japan-1-0.png"), decision="nearest")


# ---------------------------------------------------------------------------------------------------------------------
# The command.


def test_index_build_command_writes_a_gallery_names_skipped_rows_and_exits_1(
    small_streetclip_dir, photos, tmp_path, capsys
):
    output = tmp_path / "g"
    args = ["index", "build", str(photos), "--model", str(small_streetclip_dir), "--output", str(output)]
    assert main([*args, "--num_workers", "0", "--neighbors", "8", "--radius_km", "5"]) == EXIT_SOME_FAILED
    assert f"{GOOD_ROWS} photos in the gallery" in capsys.readouterr().err
    gallery = GeoGallery.load(output)
    assert (gallery.settings.num_neighbors, gallery.settings.radius_km) == (8, 5.0)
    assert main([*args, "--num_workers", "0"]) == EXIT_USAGE
    assert "already holds a complete gallery; pass --overwrite" in capsys.readouterr().err


def test_index_build_shows_only_its_own_bar_and_summary_unless_verbose(small_streetclip_dir, photos, tmp_path, capfd):
    # A folder datasets has not seen, so that reading it would show its file and split bars.
    source = shutil.copytree(photos, tmp_path / "photos")
    args = ["index", "build", str(source), "--model", str(small_streetclip_dir), "--num_workers", "0"]
    assert main([*args, "--output", str(tmp_path / "quiet")]) == EXIT_SOME_FAILED
    quiet = capfd.readouterr().err
    assert "streetclip index build: 100%" in quiet and f"{GOOD_ROWS} photos in the gallery" in quiet
    for noise in ("Loading weights", "Downloading data", "Generating train split", "Saving the dataset", "0/1"):
        assert noise not in quiet
    # Every line is the command's own: its bar (redrawn after carriage returns) and its summary.
    lines = [line.strip("\r") for line in quiet.split("\n") if line.strip()]
    assert all(line.startswith("streetclip index build: ") for line in lines), quiet
    assert main([*args, "--output", str(tmp_path / "verbose"), "--verbose"]) == EXIT_SOME_FAILED
    verbose = capfd.readouterr().err
    assert "Loading weights" in verbose


def test_index_build_reads_a_csv_with_an_image_folder(small_streetclip_dir, photos, tmp_path, capsys):
    table = tmp_path / "photos.csv"
    rows = list(metadata(photos).values())[:5]
    with open(table, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["IMG_ID", "LAT", "LON"])
        writer.writerows([[row["file_name"], row["latitude"], row["longitude"]] for row in rows])
    output = tmp_path / "g"
    status = main(
        [
            "index",
            "build",
            str(table),
            "--image_dir",
            str(photos),
            "--model",
            str(small_streetclip_dir),
            "--output",
            str(output),
            "--latitude_column",
            "LAT",
            "--longitude_column",
            "LON",
            "--num_workers",
            "0",
        ]
    )
    assert status == EXIT_OK, capsys.readouterr().err
    gallery = GeoGallery.load(output)
    assert [Path(path).name for path in gallery.dataset["image_path"]] == [row["file_name"] for row in rows]
    assert gallery.dataset["latitude"] == pytest.approx([float(row["latitude"]) for row in rows])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--index", "IVF,Nonsense"], "is not a FAISS factory string for 16-d embeddings"),
        (["--image_dir", "."], "--image_dir goes with a CSV file only"),
        (["--image_column", "photo"], "has no image column 'photo'"),
        (["--index", "IDMap,Flat"], "index 'IDMap,Flat' cannot hold a gallery: an IDMap takes rows only with ids"),
        (["--index", "Flat", "--nprobe", "4"], "nprobe=4 does not apply to the index 'Flat'"),
        (["--index", "auto", "--nprobe", "4"], "nprobe=4 does not apply to the index 'auto (Flat for 27 rows)'"),
        (["--index", "IVF2,Flat", "--nprobe", "3"], "nprobe must be at most the 2 inverted lists"),
    ],
)
def test_index_build_refuses_a_bad_invocation_before_embedding_anything(
    small_streetclip_dir, photos, tmp_path, capsys, extra, message
):
    output = tmp_path / "g"
    args = ["index", "build", str(photos), "--model", str(small_streetclip_dir), "--output", str(output), *extra]
    assert main(args) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not (output / SHARDS_FOLDER).exists() or not any((output / SHARDS_FOLDER).iterdir())


def test_index_build_refuses_a_folder_that_holds_other_files(small_streetclip_dir, photos, tmp_path, capsys):
    output = tmp_path / "g"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    args = ["index", "build", str(photos), "--model", str(small_streetclip_dir), "--output", str(output)]
    assert main([*args, "--overwrite"]) == EXIT_USAGE
    assert "holds other files (notes.txt)" in capsys.readouterr().err
    assert (output / "notes.txt").read_text() == "mine"


def test_locate_with_a_gallery_records_the_photo_and_refuses_to_resume_with_another_gallery(
    built, small_streetclip_dir, photos, tmp_path, capsys
):
    output = tmp_path / "answers.jsonl"
    images = [str(photos / "France-0-0.png"), str(photos / "Canada-1-1.png")]
    args = ["locate", *images, "--model", str(small_streetclip_dir), "--num_workers", "0", "--output", str(output)]
    assert main([*args, "--gallery", str(built.gallery.folder), "--top_k", "2"]) == EXIT_OK
    records = [json.loads(line) for line in output.read_text().splitlines()]
    expected = pipeline("geolocation", model=str(small_streetclip_dir), gallery=built.gallery)(images, top_k=2)
    for record, answers in zip(records, expected, strict=True):
        for written, answer in zip(record["answers"], answers, strict=True):
            # The same answers as the pipeline's, to float noise (a batch of two against batches of one).
            assert written.keys() == answer.keys()
            assert written == {
                key: pytest.approx(value, rel=1e-5) if isinstance(value, (float, dict)) else value
                for key, value in answer.items()
            }
    options = json.loads(output.with_name(output.name + ".options.json").read_text())["options"]
    assert (options["decision"], options["gallery"]) == ("gallery", str(built.gallery.folder))
    capsys.readouterr()
    assert main([*args, "--top_k", "2"]) == EXIT_USAGE  # the same file, without the gallery
    assert "--gallery was" in capsys.readouterr().err
    assert main([*args, "--decision", "hybrid", "--overwrite"]) == EXIT_USAGE
    assert "--decision hybrid votes among the photos of a gallery; give it with --gallery" in capsys.readouterr().err


def test_benchmark_with_a_gallery_of_its_own_photos_finds_each_at_0_km(small_streetclip_dir, photos, tmp_path):
    import benchmark

    gallery = tmp_path / "g"
    build = ["index", "build", str(photos), "--model", str(small_streetclip_dir), "--output", str(gallery)]
    assert main([*build, "--num_workers", "0", "--neighbors", "1"]) == EXIT_SOME_FAILED
    output_dir = tmp_path / "results"
    benchmark.main(
        ["--model", str(small_streetclip_dir), "--data", str(photos), "--output_dir", str(output_dir)]
        + ["--gallery", str(gallery), "--num_workers", "0", "--device", "cpu"]
    )
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert (metrics["decision"], metrics["gallery"]) == ("gallery", str(gallery))
    assert metrics["num_evaluated"] == GOOD_ROWS and metrics["acc_1km"] == 1.0 and metrics["median_km"] == 0.0


@pytest.mark.slow
def test_streetclip_help_lists_index_and_shows_the_library_defaults():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'streetclip'; from modeling_streetclip.cli import main; "
            "sys.exit(main(['index', 'build', '--help']))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    defaults = VoteSettings()
    for option, value in (("--neighbors", defaults.num_neighbors), ("--radius_km", defaults.radius_km)):
        assert f"(default: {value})" in result.stdout.split(option, 1)[1]
    assert "torch" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Learnability: a gallery of training photos answers at street level, where zero-shot cannot.

SPOTS_PER_CITY = 3
SPOT_DISTANCES_KM = (6.0, 7.5, 9.0)  # from the city centre: no candidate city lies within 1 km of a spot
SPOT_JITTER_KM = 0.1  # photos of one spot are taken within about this of it
SPOT_FRAMES = ([255, 255, 255], [0, 0, 0], [255, 0, 255])
FRAME_WIDTH = 4


def spot_photo(country: int, city: int, spot: int, rng: np.random.Generator) -> Image.Image:
    """A photo of the synthetic geo set (hue: country, stripes: city) in the frame of one of its city's spots."""
    pixels = np.asarray(place_photo(country, city, rng)).copy()
    for edge in (np.s_[:FRAME_WIDTH], np.s_[-FRAME_WIDTH:]):
        pixels[edge] = SPOT_FRAMES[spot]
        pixels[:, edge] = SPOT_FRAMES[spot]
    return Image.fromarray(pixels)


def write_spot_folder(folder: Path, photos_per_spot: int, seed: int) -> list[dict]:
    """An image folder of photos taken at three spots around each city of PLACES, labelled with city and country."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for country_index, (country, cities) in enumerate(PLACES.items()):
        for city_index, (city, latitude, longitude) in enumerate(cities):
            for spot in range(SPOTS_PER_CITY):
                angle = 2 * math.pi * spot / SPOTS_PER_CITY + country_index + city_index
                north, east = (SPOT_DISTANCES_KM[spot] * f(angle) for f in (math.sin, math.cos))
                spot_latitude = latitude + north * DEGREES_PER_KM
                spot_longitude = longitude + east * DEGREES_PER_KM / math.cos(math.radians(latitude))
                for number in range(photos_per_spot):
                    name = f"{country}-{city_index}-{spot}-{number}.png"
                    spot_photo(country_index, city_index, spot, rng).save(folder / name)
                    rows.append(
                        {
                            "file_name": name,
                            "latitude": spot_latitude + rng.normal(0, SPOT_JITTER_KM) * DEGREES_PER_KM,
                            "longitude": spot_longitude + rng.normal(0, SPOT_JITTER_KM) * DEGREES_PER_KM,
                            "city": city,
                            "region": "",
                            "country": country,
                        }
                    )
    with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


@pytest.mark.slow
def test_a_briefly_trained_model_with_a_gallery_of_training_photos_beats_zero_shot_at_1_km(tiny_clip_dir, tmp_path):
    """About 30 s: 20 training steps of the tiny model, a gallery of its 144 training photos, 72 held-out photos."""
    train_rows = write_spot_folder(tmp_path / "train", photos_per_spot=4, seed=0)
    held_out = write_spot_folder(tmp_path / "held-out", photos_per_spot=2, seed=1)
    (tmp_path / "countries.txt").write_text("\n".join(PLACES) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    # as tests/test_training.py runs the script: two caption templates, so that the tiny text tower learns countries
    paper, country = modeling_streetclip.StreetCLIPConfig().caption_template, "A Street View photo in {country}."
    result = run_pretrain_here(
        [
            "--model_name_or_path",
            str(tiny_clip_dir),
            "--train_data",
            str(tmp_path / "train"),
            "--countries",
            str(tmp_path / "countries.txt"),
            "--cities_per_country",
            "2",
            "--output_dir",
            str(run),
            "--per_device_train_batch_size",
            "16",
            "--learning_rate",
            "1e-3",
            "--max_steps",
            "20",
            "--checkpointing_steps",
            "1000",
            "--dataloader_num_workers",
            "0",
            "--report_to",
            "none",
            "--caption_templates",
            paper,
            country,
            "--caption_template_probabilities",
            "0.5",
            "0.5",
        ],
        tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = StreetCLIPForGeolocation.from_pretrained(run, vision_only=True)
    processor = StreetCLIPProcessor.from_pretrained(run)
    built = build_gallery(model, processor, str(tmp_path / "train"), tmp_path / "gallery", progress=False)
    assert len(built.gallery) == len(train_rows)

    truth = np.array([[row["latitude"], row["longitude"]] for row in held_out])
    places = model.candidate_places
    to_candidates = great_circle_km(
        truth[:, :1], truth[:, 1:], np.array(places.city_latitudes), np.array(places.city_longitudes)
    )
    assert to_candidates.min() > 1.0  # zero-shot answers a candidate city, so it cannot be right at 1 km

    geolocate = pipeline("geolocation", model=model, processor=processor, gallery=built.gallery)
    paths = [str(tmp_path / "held-out" / row["file_name"]) for row in held_out]
    accuracy = {}
    for decision in ("greedy", "gallery", "hybrid"):
        answers = [image[0] for image in geolocate(paths, decision=decision)]
        predicted = np.array([[answer["latitude"], answer["longitude"]] for answer in answers])
        accuracy[decision] = float(np.mean(great_circle_km(*truth.T, *predicted.T) <= 1.0))
    print(f"held-out accuracy at 1 km over {len(held_out)} photos of {len(held_out) // 2} spots: {accuracy}")
    # A random gallery photo is at the right spot with probability 1/36; 0.9 of 72 cannot come by chance.
    assert accuracy["greedy"] == 0.0
    assert accuracy["gallery"] >= 0.9
    assert accuracy["hybrid"] >= 0.5


@pytest.mark.parametrize("decision", ["gallery", "hybrid"])
def test_gallery_within_km_is_the_votes_share_within_each_radius_of_the_answer(built, model_and_processor, decision):
    model, processor = model_and_processor
    gallery = built.gallery
    pixel_values = processor.image_processor(images=query_photos(4, seed=5), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    ranked = rank_gallery_places(model, outputs, gallery, decision, top_k=3)
    similarities, rows = gallery.search(outputs.image_embeds.numpy(), gallery.settings.num_neighbors)
    countries = outputs.country_logits.softmax(dim=-1).numpy()
    for image in range(len(pixel_values)):
        latitudes, longitudes = gallery.latitudes[rows[image]], gallery.longitudes[rows[image]]
        scale = None
        if decision == "hybrid":
            neighbours = np.asarray(model.candidate_places.city_countries)[
                nearest_city_rows(model.candidate_places, latitudes, longitudes)
            ]
            scale = hybrid_scale(neighbours, countries[image], gallery.settings.hybrid_countries)
        # The vote's weights, as `kernel_vote` gives them: exp((s - best) / temperature), times the hybrid's scale.
        weights = np.exp((similarities[image] - similarities[image].max()) / gallery.settings.temperature)
        weights = weights * (1.0 if scale is None else scale)
        for rank, row in enumerate(ranked.gallery_rows[image].tolist()):
            if row < 0:
                continue
            distances = great_circle_km(gallery.latitudes[row], gallery.longitudes[row], latitudes, longitudes)
            expected = [weights[distances <= radius].sum() / weights.sum() for radius in CONFIDENCE_RADII_KM]
            torch.testing.assert_close(ranked.within_km[image, rank], torch.tensor(expected, dtype=torch.float64))
    assert (ranked.within_km.diff(dim=-1) >= 0).all() and not ranked.calibrated.any()
