"""The split preprocessing (8-bit resize and crop in the loader, normalisation where the model runs) gives exactly the
image processor's pixel values, so splitting it changed no answer; a strip too long to resize whole is cut to its kept
centre first, with the same pixels to within a level."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessor, pipeline

from modeling_streetclip import StreetCLIPForGeolocation
from modeling_streetclip.decisions import rank_places
from modeling_streetclip.images import load_rgb_image
from modeling_streetclip.pixels import MAX_RESIZED_CROPS, central_region, normalized_pixels, resized_pixels


VIT_L_PROCESSOR = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}


def photos() -> list[Image.Image]:
    """Photos of several shapes and modes, as `load_rgb_image` hands them over (RGB)."""
    rng = np.random.default_rng(0)
    # (30, 600): a 20:1 panorama, at MAX_RESIZED_CROPS for CLIP's square crop, still resized whole.
    shapes = [(480, 640, 3), (641, 479, 3), (37, 700, 3), (30, 600, 3), (336, 336, 3), (20, 20, 3)]
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
    assert all(central_region(image_processor, image) is image for image in images)  # the processor's own path
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
    expected = rank_places(model, outputs, top_k=3)
    answers = geolocate(images, top_k=3, batch_size=3)
    for image, image_answers in enumerate(answers):
        assert [answer["city"] for answer in image_answers] == [
            model.candidate_places.city_names[row] for row in expected.city_rows[image].tolist()
        ]


def strip(shape: tuple[int, int], seed: int = 0) -> Image.Image:
    """A `(height, width)` photo with detail at every scale: noise over a smooth gradient."""
    rng = np.random.default_rng(seed)
    height, width = shape
    gradient = np.linspace(0, 200, max(shape))[: width if width >= height else height]
    gradient = gradient[None, :, None] if width >= height else gradient[:, None, None]
    pixels = gradient + rng.normal(0, 30, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


# Beyond MAX_RESIZED_CROPS, yet affordable to resize whole: upscaled, downscaled, wide, tall, and an odd short edge
# whose scale is not a round number.
ELONGATED = [(100, 3000), (3000, 100), (400, 12000), (37, 1000), (1000, 37), (7, 301)]


@pytest.mark.parametrize("shape", ELONGATED, ids=[f"{height}x{width}" for height, width in ELONGATED])
def test_a_strip_cut_to_its_centre_first_has_the_pixels_of_the_whole_resize_to_within_a_level(shape):
    """Within one 8-bit level, not bit for bit: Pillow computes each output pixel's sample position from the box's
    origin rather than the photo's, and its fixed-point filter weights can round the other way for a few pixels."""
    image_processor = CLIPImageProcessor(**VIT_L_PROCESSOR)
    image = strip(shape)
    assert central_region(image_processor, image).size == (336, 336)  # the centre is cut first
    whole = image_processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    cut_first = resized_pixels(image_processor, image)
    assert cut_first.shape == whole.shape == (1, 3, 336, 336)
    assert (cut_first.int() - whole.int()).abs().max().item() <= 1


@pytest.mark.parametrize(
    "settings",
    [
        VIT_L_PROCESSOR,
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}},
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 256, "width": 256}},
    ],
    ids=["vit-l", "tiny", "crop-inside-resize", "crop-beyond-resize"],
)
@pytest.mark.parametrize("shape", [(60, 2000), (5000, 1), (1, 5000), (1, 200_000)])
def test_a_strip_of_any_length_gives_one_crop_without_resizing_it_whole(settings, shape):
    image_processor = CLIPImageProcessor(**settings)
    image = strip(shape)
    region = central_region(image_processor, image)
    crop = image_processor.crop_size
    # What the processor resizes is now a few crops' worth of pixels, whatever the strip's length.
    assert region.width * region.height <= 4 * max(crop["height"], image_processor.size["shortest_edge"]) ** 2
    pixels = resized_pixels(image_processor, image)
    assert pixels.shape == (1, 3, crop["height"], crop["width"]) and pixels.dtype == torch.uint8
    if shape == (60, 2000):  # short enough to resize whole too, for comparison
        whole = image_processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")
        assert (pixels.int() - whole["pixel_values"].int()).abs().max().item() <= 1


def test_the_budget_is_a_number_of_crops_and_ordinary_photos_stay_under_it():
    image_processor = CLIPImageProcessor(**VIT_L_PROCESSOR)
    assert MAX_RESIZED_CROPS == 20
    at_budget, beyond = strip((30, 600)), strip((30, 601))
    assert central_region(image_processor, at_budget) is at_budget
    assert central_region(image_processor, beyond).size == (336, 336)
    # A plain dict assigned to the processor, as users do, is read as its SizeDict is.
    image_processor.size, image_processor.crop_size = {"shortest_edge": 32}, {"height": 32, "width": 32}
    assert central_region(image_processor, strip((1, 5000))).size == (32, 32)
