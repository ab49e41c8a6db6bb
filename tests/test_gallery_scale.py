"""Galleries at scale: `streetclip index build` on two processes (torchrun on the CPU, gloo), killed and resumed on one
process or two, against a build on one; streamed sources (a Hub-style data folder, WebDataset tar shards); the
chunks each process embeds.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app import EXIT_SOME_FAILED, gallery_build
from modeling_streetclip.app.gallery_build import SHARD_NAME, SHARDS_FOLDER, _pending_chunks, _RowPlan, build_gallery
from modeling_streetclip.cli import main
from modeling_streetclip.gallery_index import SCANNED_ROWS_PER_QUERY, recommended_index
from modeling_streetclip.gallery_store import BAD_ROWS_FILE, GeoGallery, image_embeddings
from modeling_streetclip.testing_utils import PLACES, place_photo, write_geo_imagefolder


REPO = Path(__file__).resolve().parents[1]
# Run as the script of every process: `streetclip`, logging the rows each batch embeds to EMBED_LOG/{rank}-{pid}.txt;
# the process of rank KILL_RANK kills itself (SIGKILL: no cleanup of any kind) once it has written two shards.
LOGGED_BUILD = """
import os, signal, sys
from pathlib import Path

from modeling_streetclip.app import gallery_build
from modeling_streetclip.cli import main

log = Path(os.environ["EMBED_LOG"]) / f"{os.environ.get('RANK', '0')}-{os.getpid()}.txt"
real_batches, real_flush = gallery_build.embedded_batches, gallery_build.ShardWriter.flush
flushes = 0


def logged_batches(*args, **kwargs):
    for batch, embeds in real_batches(*args, **kwargs):
        with log.open("a") as stream:
            stream.write("".join(f"{row}\\n" for row in batch.decoded))
        yield batch, embeds


def flush_or_die(self):
    global flushes
    flushes += bool(self.rows)
    real_flush(self)
    if flushes == 2 and os.environ.get("KILL_RANK") == os.environ.get("RANK"):
        os.kill(os.getpid(), signal.SIGKILL)


gallery_build.embedded_batches = logged_batches
gallery_build.ShardWriter.flush = flush_or_die
sys.exit(main())
"""


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The synthetic geo set as an image folder: 24 good rows and 3 bad ones."""
    return write_geo_imagefolder(tmp_path_factory.mktemp("photos") / "data", photos_per_city=2, seed=0, bad_rows=True)


@pytest.fixture(scope="module")
def model_and_processor(small_streetclip_dir):
    return (
        StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True),
        StreetCLIPProcessor.from_pretrained(small_streetclip_dir),
    )


@pytest.fixture(scope="module")
def one_process(model_and_processor, photos, tmp_path_factory) -> Path:
    """A gallery built on this one process, the reference."""
    folder = tmp_path_factory.mktemp("one-process") / "g"
    build_gallery(*model_and_processor, str(photos), folder, batch_size=2, progress=False)
    return folder


def assert_same_gallery(folder: Path, reference: Path) -> None:
    """The same rows in the same order, the same bad rows, and embeddings within 1e-5."""
    gallery, expected = GeoGallery.load(folder), GeoGallery.load(reference)
    assert gallery.dataset["source_row"] == expected.dataset["source_row"]
    assert gallery.dataset["image_path"] == expected.dataset["image_path"]
    np.testing.assert_allclose(
        np.asarray(gallery.dataset["embedding"]), np.asarray(expected.dataset["embedding"]), atol=1e-5
    )
    assert (folder / BAD_ROWS_FILE).read_text() == (reference / BAD_ROWS_FILE).read_text()


def logged_rows(folder: Path) -> list[int]:
    return [int(line) for path in folder.glob("*.txt") for line in path.read_text().split()]


def logging_batches(real, log: Path):
    """`embedded_batches` that also appends the rows each batch embeds to `log/0.txt`."""

    def logged(*args, **kwargs):
        for batch, embeds in real(*args, **kwargs):
            with (log / "0.txt").open("a") as stream:
                stream.write("".join(f"{row}\n" for row in batch.decoded))
            yield batch, embeds

    return logged


def shard_rows(folder: Path) -> set[int]:
    """The source rows the shards in `folder` hold, by their names."""
    matches = [SHARD_NAME.fullmatch(path.name) for path in (folder / SHARDS_FOLDER).iterdir()]
    return {row for match in matches if match for row in range(int(match[1]), int(match[2]))}


def launch(*argv, script: Path, log: Path, kill_rank: str = "", cwd: Path) -> subprocess.CompletedProcess:
    """Two processes under torchrun (a free port: `--standalone`) running `script`."""
    log.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBED_LOG": str(log), "KILL_RANK": kill_rank}
    return subprocess.run(
        command + [str(arg) for arg in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_build_on_two_processes_killed_mid_way_resumes_on_one_or_two_as_a_build_on_one(
    small_streetclip_dir, photos, one_process, tmp_path, monkeypatch
):
    script = tmp_path / "logged_build.py"
    script.write_text(LOGGED_BUILD)
    killed = tmp_path / "killed"
    args = ["index", "build", photos, "--model", small_streetclip_dir, "--output", killed]
    args += ["--batch_size", 2, "--shard_size", 2, "--num_workers", 0]
    result = launch(*args, script=script, log=tmp_path / "log-killed", kill_rank="1", cwd=tmp_path)

    assert result.returncode != 0 and "SIGKILL" in result.stderr, result.stderr[-3000:]
    good = set(GeoGallery.load(one_process).dataset["source_row"])
    done = shard_rows(killed)
    assert 4 <= len(done) < len(good)  # the killed process's two shards, and what the other wrote
    assert not (killed / "gallery.json").exists()

    for processes in (1, 2):
        output = tmp_path / f"rerun-{processes}"
        shutil.copytree(killed, output)
        rerun = [*args[:6], output, *args[7:]]
        log = tmp_path / f"log-{processes}"
        if processes == 1:
            log.mkdir()
            monkeypatch.setattr(
                gallery_build, "embedded_batches", logging_batches(gallery_build.embedded_batches, log)
            )
            assert main([str(arg) for arg in rerun]) == EXIT_SOME_FAILED
        else:  # streamed: the rows of each process are found in one pass over the source, without its length
            result = launch(*rerun, "--streaming", script=script, log=log, cwd=tmp_path)
            assert result.returncode == 1 and "exitcode  : 2" not in result.stderr, result.stderr[-3000:]
            assert result.stderr.count(f"{len(good)} photos in the gallery") == 1
        embedded = logged_rows(log)
        # Every good row the killed run left unwritten is embedded once, and no other.
        assert sorted(embedded) == sorted(good - done)
        assert_same_gallery(output, one_process)


@pytest.mark.slow
def test_a_process_that_owns_no_rows_joins_a_two_process_build_with_decoding_workers(
    small_streetclip_dir, photos, one_process, tmp_path
):
    # One chunk of the default shard size holds every row: the second process owns none, and once crashed on it
    # (an empty dataset cannot be streamed) while the first waited for it forever.
    script = tmp_path / "logged_build.py"
    script.write_text(LOGGED_BUILD)
    output, log = tmp_path / "g", tmp_path / "log"
    args = ["index", "build", photos, "--model", small_streetclip_dir, "--output", output, "--num_workers", 1]
    result = launch(*args, script=script, log=log, cwd=tmp_path)

    assert result.returncode == EXIT_SOME_FAILED, result.stderr[-3000:]
    assert [path.name.split("-")[0] for path in log.glob("*.txt")] == ["0"]
    assert sorted(logged_rows(log)) == sorted(GeoGallery.load(one_process).dataset["source_row"])
    assert_same_gallery(output, one_process)


def test_every_pending_row_goes_to_one_process_in_chunks_that_line_up_across_reruns():
    # Shards of an earlier run hold rows 0-4 and 8-10 of 23; chunks of 4 end on multiples of 4.
    chunks, tail = _pending_chunks([(0, 4), (8, 10)], 23, 4)
    assert (chunks, tail) == ([(4, 8), (10, 12), (12, 16), (16, 20), (20, 23)], None)
    plans = [_RowPlan(chunks, tail, rank, 2, 4) for rank in range(2)]
    assert list(plans[0].own_rows()) == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22]
    for row in range(30):
        assert sum(plan.owns(row) for plan in plans) == (4 <= row < 8 or 10 <= row < 23)
    # A stream of unknown length: the gaps, then chunks from the end of the last shard on, taken in turn.
    chunks, tail = _pending_chunks([(0, 4), (8, 10)], None, 4)
    assert (chunks, tail) == ([(4, 8)], 10)
    plans = [_RowPlan(chunks, tail, rank, 2, 4) for rank in range(2)]
    assert [row for row in range(24) if plans[1].owns(row)] == [10, 11, 12, 13, 18, 19, 20, 21]
    assert [row for row in range(24) if plans[0].owns(row)] == [4, 5, 6, 7, 14, 15, 16, 17, 22, 23]


def test_the_default_index_for_five_million_rows_fits_4_gib_and_scans_a_bounded_number_of_rows():
    choice = recommended_index(5_000_000, 768)
    assert (choice.factory, choice.nprobe) == ("IVF2048,SQ8", 8)
    assert choice.memory_bytes <= 4 * 2**30
    assert choice.nprobe * 5_000_000 / 2048 <= 1.05 * SCANNED_ROWS_PER_QUERY
    assert recommended_index(1_000_000, 768).nprobe == 16  # a million rows: 1/64 of the lists, as measured


@pytest.mark.slow
def test_the_scale_benchmark_builds_through_the_build_s_own_join_and_prints_its_figures(tmp_path):
    command = [sys.executable, str(REPO / "eval/speed/bench_gallery_index.py"), "--build", "--rows", "3000"]
    command += ["--queries", "64", "--threads", "1", "--workdir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "joined (dataset written, Flat trained and filled" in result.stdout
    assert re.search(r"ms/query at batch 64 \(target <= 5\); peak resident memory \d+\.\d+ GiB", result.stdout)
    assert "recall@10 1.000 (target >= 0.9)" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the gallery is deleted


def write_webdataset(folder: Path, samples_per_shard: int) -> list[dict]:
    """Two WebDataset tar shards of the synthetic geo set, `{key}.jpg` and `{key}.json` (its coordinates and country)
    per sample; in the second shard one sample has no coordinates and one a latitude of 120. Returns the metadata."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = []
    for shard in range(2):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for number in range(samples_per_shard):
                country, city = number % len(PLACES), number % 2
                name, latitude, longitude = list(PLACES.values())[country][city]
                meta = {"latitude": latitude, "longitude": longitude, "country": list(PLACES)[country]}
                if shard == 1 and number == 1:
                    meta = {"country": meta["country"]}
                elif shard == 1 and number == 2:
                    meta["latitude"] = 120.0
                jpeg = io.BytesIO()
                place_photo(country, city, rng).save(jpeg, format="JPEG")
                key = f"s{shard}-{number:03d}"
                for extension, data in (("jpg", jpeg.getvalue()), ("json", json.dumps(meta).encode())):
                    member = tarfile.TarInfo(f"{key}.{extension}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
                written.append({"key": key, **meta, "jpeg": jpeg.getvalue()})
    return written


def test_webdataset_tar_shards_stream_into_the_gallery_of_the_same_shards_loaded_whole(model_and_processor, tmp_path):
    model, processor = model_and_processor
    samples = write_webdataset(tmp_path / "shards", samples_per_shard=5)
    options = {"latitude_column": "json.latitude", "longitude_column": "json.longitude", "progress": False}
    options |= {"batch_size": 3, "shard_size": 4}
    streamed = build_gallery(model, processor, str(tmp_path / "shards"), tmp_path / "s", streaming=True, **options)
    loaded = build_gallery(model, processor, str(tmp_path / "shards"), tmp_path / "l", **options)

    good = [sample["key"] for sample in samples if "latitude" in sample and sample["latitude"] <= 90]
    assert streamed.gallery.dataset["__key__"] == loaded.gallery.dataset["__key__"] == good
    reasons = {samples[row["source_row"]]["key"]: row["error"] for row in streamed.bad_rows}
    assert reasons.keys() == {"s1-001", "s1-002"}
    assert "(column 'json.longitude') None is missing" in reasons["s1-001"]
    assert "latitude (column 'json.latitude') 120.0 is outside [-90, 90]" in reasons["s1-002"]
    assert streamed.bad_rows == loaded.bad_rows
    embeddings = np.asarray(streamed.gallery.dataset["embedding"])
    np.testing.assert_allclose(embeddings, np.asarray(loaded.gallery.dataset["embedding"]), atol=1e-6)
    first = processor.image_processor(images=Image.open(io.BytesIO(samples[0]["jpeg"])), return_tensors="pt")
    np.testing.assert_allclose(embeddings[0], image_embeddings(model, first["pixel_values"])[0].numpy(), atol=1e-5)
    assert streamed.gallery.dataset["json"][0]["country"] == samples[0]["country"]  # the other fields stay


def test_index_build_streams_webdataset_shards_given_the_coordinates_inside_each_sample_s_json(
    small_streetclip_dir, tmp_path, capsys
):
    write_webdataset(tmp_path / "shards", samples_per_shard=3)
    args = ["index", "build", tmp_path / "shards", "--model", small_streetclip_dir, "--output", tmp_path / "g"]
    args += ["--streaming", "--latitude_column", "json.latitude", "--longitude_column", "json.longitude"]
    assert main([str(arg) for arg in [*args, "--num_workers", "0"]]) == EXIT_SOME_FAILED
    assert "4 photos in the gallery" in capsys.readouterr().err
    assert len((tmp_path / "g" / BAD_ROWS_FILE).read_text().splitlines()) == 2
