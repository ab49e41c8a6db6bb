"""Image loading: images that would cost unbounded memory, float images with holes and URLs are refused with an error
that names the input and the reason, before they reach the image processor."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from modeling_streetclip import ImageLoadError, images, load_rgb_image
from modeling_streetclip.testing_utils import random_photo


SLIVERS = {"1xN": (1, 200_000), "Nx1": (200_000, 1)}


@pytest.mark.parametrize("shape", list(SLIVERS))
@pytest.mark.parametrize("given_as", ["path", "bytes", "PIL image"])
def test_an_image_of_extreme_aspect_ratio_is_refused_naming_it_and_the_reason(tmp_path, shape, given_as):
    path = tmp_path / "sliver.png"
    Image.new("RGB", SLIVERS[shape], (90, 120, 60)).save(path)
    source = {"path": path, "bytes": path.read_bytes(), "PIL image": Image.open(path)}[given_as]

    with pytest.raises(ImageLoadError, match=r"an aspect ratio of 200,000\.0:1") as raised:
        load_rgb_image(source)

    assert "at most 20:1 is accepted" in str(raised.value) and "MAX_ASPECT_RATIO" in str(raised.value)
    if given_as == "path":
        assert str(path) in str(raised.value)


def test_wide_panoramas_pass_and_the_budget_can_be_raised_for_trusted_images(monkeypatch):
    panorama = random_photo(0, (400, 40))  # 10:1
    assert load_rgb_image(panorama).size == (400, 40)
    sliver = Image.new("RGB", (1, 50), (0, 0, 0))
    with pytest.raises(ImageLoadError, match="aspect ratio"):
        load_rgb_image(sliver)

    monkeypatch.setattr(images, "MAX_ASPECT_RATIO", 50.0)

    assert load_rgb_image(sliver).size == (1, 50)


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

    with pytest.raises(ImageLoadError, match="Image URLs are not fetched: 'https://example.com/x.jpg'"):
        geolocate("https://example.com/x.jpg")


# Runs `streetclip locate` twice in one process whose address space is capped: over a model folder whose image
# processor resizes to 32 px, then to 336 px (both crop to the tiny model's input). The cap is what the imports mapped
# (torch's builds differ in that) plus 1 GiB: the command needs about 0.5 GiB more, while, before the aspect-ratio
# budget, resizing the 1 x 200,000 px PNG asked for 2.4 GB (32 px) or 27 GB (336 px) and killed the run with a
# MemoryError and no record.
LIMITED_RUN = """
import json, resource, sys
import modeling_streetclip.cli.batch_geolocation
from modeling_streetclip.cli import main
mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + 2**30, mapped + 2**30))
statuses = [main(["locate", *sys.argv[2:], "--model", model, "--workers", "0", "--output", model + ".jsonl"])
            for model in json.loads(sys.argv[1])]
print(json.dumps(statuses))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; RLIMIT_AS caps the address space on Linux"
)
def test_slivers_get_error_records_under_a_memory_limit_at_32_and_336_px(tmp_path, small_streetclip_dir):
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

    assert result.returncode == 0 and json.loads(result.stdout) == [1, 1], result.stderr[-3000:]
    for model in models:
        records = [json.loads(line) for line in Path(model + ".jsonl").read_text().splitlines()]
        assert [record["path"] for record in records] == [str(path) for path in inputs]
        for record, sliver in zip(records[:2], SLIVERS, strict=True):
            assert f"{sliver}.png" in record["error"] and "aspect ratio of 200,000.0:1" in record["error"]
        assert "answers" in records[-1]
