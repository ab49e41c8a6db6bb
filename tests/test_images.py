"""Image loading: every image that decodes within Pillow's limit loads, whatever its shape, and answers within bounded
memory; float images with holes, URLs and paths the file system cannot look up are refused with an error that names
the input and the reason, before they reach the image processor."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from modeling_streetclip import ImageLoadError, load_rgb_image
from modeling_streetclip.testing_utils import random_photo


SLIVERS = {"1xN": (1, 200_000), "Nx1": (200_000, 1)}


@pytest.mark.parametrize("shape", list(SLIVERS))
@pytest.mark.parametrize("given_as", ["path", "bytes", "PIL image"])
def test_an_image_of_extreme_aspect_ratio_loads_as_it_is(tmp_path, shape, given_as):
    path = tmp_path / "sliver.png"
    Image.new("RGB", SLIVERS[shape], (90, 120, 60)).save(path)
    source = {"path": path, "bytes": path.read_bytes(), "PIL image": Image.open(path)}[given_as]

    assert load_rgb_image(source).size == SLIVERS[shape]


@pytest.mark.parametrize("size", [(2000, 60), (1, 5000)], ids=["panorama-2000x60", "sliver-1x5000"])
def test_a_panorama_and_a_sliver_answer_through_the_pipeline(tmp_path, small_streetclip_dir, size):
    path = tmp_path / "strip.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir))

    answers = geolocate(str(path), top_k=2)

    assert len(answers) == 2 and all(0 <= answer["score"] <= 1 for answer in answers)


def test_a_file_name_longer_than_the_file_system_allows_is_an_image_load_error(tmp_path):
    path = tmp_path / ("x" * 300 + ".jpg")  # over the 255 bytes a name may have on Linux and macOS file systems

    with pytest.raises(ImageLoadError, match="cannot be looked up: File name too long") as raised:
        load_rgb_image(path)

    assert str(path) in str(raised.value)


def test_an_image_without_pixels_is_refused():
    with pytest.raises(ImageLoadError, match=r"The PIL image has no pixels \(0 x 5\)"):
        load_rgb_image(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize("hole", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_nan_or_infinite_pixels_is_refused_rather_than_turned_black(tmp_path, hole):
    pixels = np.random.default_rng(0).random((16, 24), dtype=np.float32)
    pixels[3, 5] = hole
    path = tmp_path / "scan.tif"
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == "F"

    with pytest.raises(ImageLoadError, match="has 1 NaN or infinite pixels of 384") as raised:
        load_rgb_image(path)

    assert str(path) in str(raised.value)
    pixels[3, 5] = 0.5
    assert load_rgb_image(Image.fromarray(pixels)).mode == "RGB"  # the same image without its hole loads


@pytest.mark.parametrize("url", ["https://example.com/street.jpg", "http://127.0.0.1:8000/x.png", "s3://bucket/a.jpg"])
def test_a_url_is_refused_saying_that_urls_are_not_fetched(url):
    with pytest.raises(ImageLoadError, match="Image URLs are not fetched") as raised:
        load_rgb_image(url)
    assert repr(url) in str(raised.value)


def test_the_pipeline_says_urls_are_not_fetched_instead_of_not_found(small_streetclip_dir):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir))

    # The pipeline fetches http(s) URLs, as transformers' pipelines do (tests/test_pipeline.py); no other scheme.
    with pytest.raises(ImageLoadError, match="Image URLs are not fetched: 's3://bucket/x.jpg'"):
        geolocate("s3://bucket/x.jpg")


# Runs `streetclip locate` twice in one process whose address space is capped: over a model folder whose image
# processor resizes to 32 px, then to 336 px (both crop to the tiny model's input). The cap is what the imports mapped
# (torch's builds differ in that) plus 1 GiB; resizing a 1 x 200,000 px PNG whole would ask for gigabytes.
LIMITED_RUN = """
import json, resource, sys
import modeling_streetclip.app.batch
from modeling_streetclip.cli import main
mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, mapped + 2**30))
statuses = [main(["locate", *sys.argv[2:], "--model", model, "--num_workers", "0", "--output", model + ".jsonl"])
            for model in json.loads(sys.argv[1])]
print(json.dumps(statuses))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; RLIMIT_AS caps the address space on Linux"
)
def test_slivers_answer_under_a_memory_limit_at_32_and_336_px(tmp_path, small_streetclip_dir):
    models = []
    for size in (32, 336):
        folder = tmp_path / f"model-{size}px"
        shutil.copytree(small_streetclip_dir, folder)
        config_path = folder / "preprocessor_config.json"
        config = json.loads(config_path.read_text())
        config["size"] = {"shortest_edge": size}
        config_path.write_text(json.dumps(config))
        models.append(str(folder))
    inputs = []
    for name, size in SLIVERS.items():
        inputs.append(tmp_path / f"{name}.png")
        Image.new("RGB", size, (90, 120, 60)).save(inputs[-1])
    inputs.append(tmp_path / "photo.png")
    random_photo(0).save(inputs[-1])

    result = subprocess.run(
        [sys.executable, "-c", LIMITED_RUN, json.dumps(models), *inputs],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0 and json.loads(result.stdout) == [0, 0], result.stderr[-3000:]
    for model in models:
        records = [json.loads(line) for line in Path(model + ".jsonl").read_text().splitlines()]
        assert [record["path"] for record in records] == [str(path) for path in inputs]
        assert all("answers" in record for record in records), records
