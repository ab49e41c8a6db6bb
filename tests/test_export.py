"""`torch.export` of `StreetCLIPForGeolocation`: its forward has no data-dependent shapes, so the exported program
gives the eager model's outputs, at any batch size. The ONNX export builds on this."""

import pytest
import torch

from modeling_streetclip import StreetCLIPForGeolocation
from modeling_streetclip.testing_utils import TINY_IMAGE_SIZE


def pixels(batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


@pytest.mark.parametrize("folder", ["small_streetclip_dir", "region_streetclip_dir"], ids=["two_levels", "regions"])
def test_the_exported_program_gives_the_eager_outputs_at_any_batch_size(request, folder):
    model = StreetCLIPForGeolocation.from_pretrained(request.getfixturevalue(folder), vision_only=True).eval()
    exported = torch.export.export(model, (pixels(2, seed=0),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for batch_size in (1, 5):
        with torch.no_grad():
            expected = model(pixels(batch_size, seed=batch_size))
            outputs = exported.module()(pixels(batch_size, seed=batch_size))
        assert outputs.keys() == expected.keys() and "logits" in outputs
        for name, value in expected.items():
            torch.testing.assert_close(outputs[name], value, rtol=1e-5, atol=1e-5, msg=name)


def test_export_with_the_default_settings_succeeds_for_a_model_with_its_text_tower(small_streetclip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir).eval()
    exported = torch.export.export(model, (pixels(2, seed=0),))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(pixels(2, seed=0)).logits, model(pixels(2, seed=0)).logits)
