"""The split preprocessing (8-bit resize and crop in the loader, normalisation where the model runs) gives exactly the
image processor's pixel values, so splitting it changed no answer."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessor, pipeline

from modeling_streetclip import StreetCLIPForGeolocation
from modeling_streetclip.images import load_rgb_image
from modeling_streetclip.pixels import normalized_pixels, resized_pixels


VIT_L_PROCESSOR = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}


def photos() -> list[Image.Image]:
    """Photos of several shapes and modes, as `load_rgb_image` hands them over (RGB)."""
    rng = np.random.default_rng(0)
    shapes = [(480, 640, 3), (641, 479, 3), (37, 700, 3), (336, 336, 3), (20, 20, 3)]
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in shapes]
    images.append(Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8), mode="L"))
    images.append(Image.fromarray(rng.integers(0, 256, (300, 400, 4), dtype=np.uint8), mode="RGBA"))
    return [load_rgb_image(image) for image in images]


@pytest.mark.parametrize(
    "settings",
    [
        VIT_L_PROCESSOR,
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        {**VIT_L_PROCESSOR, "do_normalize": False},
        {**VIT_L_PROCESSOR, "do_rescale": False},
        {**VIT_L_PROCESSOR, "image_mean": 0.5, "image_std": 0.25},
        {**VIT_L_PROCESSOR, "rescale_factor": 1 / 127.5, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0]},
    ],
    ids=["vit-l", "tiny", "no-normalize", "no-rescale", "scalar-statistics", "other-rescale"],
)
def test_split_preprocessing_equals_the_image_processor_bit_for_bit(settings):
    image_processor = CLIPImageProcessor(**settings)
    images = photos()
    expected = image_processor(images=images, return_tensors="pt")["pixel_values"]
    resized = resized_pixels(image_processor, images)
    assert resized.dtype == torch.uint8 and resized.shape == expected.shape
    assert torch.equal(normalized_pixels(image_processor, resized), expected)
    assert torch.equal(normalized_pixels(image_processor, resized, torch.bfloat16), expected.to(torch.bfloat16))


def test_pixels_that_are_not_8_bit_are_normalised_in_float32():
    image_processor = CLIPImageProcessor(**VIT_L_PROCESSOR)
    images = photos()[:2]
    expected = image_processor(images=images, return_tensors="pt")["pixel_values"]
    normalized = normalized_pixels(image_processor, resized_pixels(image_processor, images).to(torch.float32))
    assert normalized.dtype == torch.float32
    torch.testing.assert_close(normalized, expected, rtol=0, atol=1e-6)


def test_the_pipeline_carries_8_bit_pixels_and_answers_as_the_processor_s_pixel_values_do(small_streetclip_dir):
    geolocate = pipeline("geolocation", model=str(small_streetclip_dir))
    images = photos()
    carried = geolocate.preprocess(images[0])["pixel_values"]
    assert carried.dtype == torch.uint8  # a quarter of float32's bytes through the DataLoader and to the device
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    image_processor = AutoImageProcessor.from_pretrained(small_streetclip_dir)
    with torch.no_grad():
        outputs = model(pixel_values=image_processor(images=images, return_tensors="pt")["pixel_values"])
    expected = model.rank_places(outputs, top_k=3)
    answers = geolocate(images, top_k=3, batch_size=3)
    for image, image_answers in enumerate(answers):
        assert [answer["city"] for answer in image_answers] == [
            model.candidate_places.city_names[row] for row in expected.city_rows[image].tolist()
        ]
