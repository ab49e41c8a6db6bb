"""Int8 inference (`modeling_streetclip.quantization`): the vision tower quantized, the heads not, the same answers
as float32 on a model that has learned something, through every entry point a user has.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import pipeline

import modeling_streetclip.quantization as quantization
from modeling_streetclip import StreetCLIPForGeolocation
from modeling_streetclip.cli import main
from modeling_streetclip.quantization import Int8DtypeError, Int8DynamicConfig
from modeling_streetclip.testing_utils import (
    SMALL_COUNTRIES,
    TINY_IMAGE_SIZE,
    random_photo,
    write_geo_imagefolder,
)


DynamicInt8Linear = torch.ao.nn.quantized.dynamic.Linear


def pixels(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


def assert_only_the_vision_tower_is_int8(model: StreetCLIPForGeolocation) -> None:
    """Every linear layer of the vision encoder is int8; heads, projection and text tower are float32 Linear."""
    encoder_linears = [module for module in model.vision_model.modules() if isinstance(module, nn.Linear)]
    quantized = [module for module in model.vision_model.modules() if isinstance(module, DynamicInt8Linear)]
    assert not encoder_linears
    assert len(quantized) == 6 * model.config.vision_config.num_hidden_layers  # q, k, v, out, fc1, fc2
    full_precision = [model.country_head, model.city_head, model.visual_projection]
    if model.text_model is not None:
        full_precision += [model.text_projection, *model.text_model.modules()]
    for module in full_precision:
        assert not isinstance(module, DynamicInt8Linear)
        for parameter in module.parameters(recurse=False):
            assert parameter.dtype == torch.float32


def test_pipeline_model_kwargs_load_an_int8_vision_tower_with_float32_heads_that_answers(small_streetclip_dir):
    geolocate = pipeline(
        "geolocation", model=str(small_streetclip_dir), model_kwargs={"quantization_config": Int8DynamicConfig()}
    )
    assert_only_the_vision_tower_is_int8(geolocate.model)
    answers = geolocate([random_photo(0), random_photo(1)], top_k=2)
    assert [len(image_answers) for image_answers in answers] == [2, 2]
    assert answers[0][0]["country"] in SMALL_COUNTRIES and 0 < answers[0][0]["score"] <= 1


def test_heads_built_from_a_plain_clip_checkpoint_are_the_float32_ones(tiny_clip_dir):
    """The text tower is not quantized, so heads built at load are exactly float32's."""
    settings = {"candidate_countries": SMALL_COUNTRIES, "cities_per_country": 3}
    reference = StreetCLIPForGeolocation.from_pretrained(tiny_clip_dir, **settings)
    model = StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, quantization_config=Int8DynamicConfig(), **settings
    )
    assert_only_the_vision_tower_is_int8(model)
    assert torch.equal(model.country_head.weight, reference.country_head.weight)
    assert torch.equal(model.city_head.weight, reference.city_head.weight)
    with torch.no_grad():
        embeds = model(pixels()).image_embeds
        expected = reference(pixels()).image_embeds
    assert not torch.equal(embeds, expected)  # the vision tower did change
    assert torch.nn.functional.cosine_similarity(embeds, expected).min() > 0.9


def test_vision_only_load_and_restricted_countries_work_on_the_quantized_model(small_streetclip_dir):
    model = StreetCLIPForGeolocation.from_pretrained(
        small_streetclip_dir, vision_only=True, quantization_config=Int8DynamicConfig()
    )
    assert model.text_model is None and model.is_quantized
    model.restrict_countries(["JP", "Kenya"])
    assert_only_the_vision_tower_is_int8(model)
    with torch.no_grad():
        countries = model(pixels()).predicted_country.tolist()
    assert {model.candidate_places.country_names[row] for row in countries} <= {"Japan", "Kenya"}


def test_saving_a_quantized_model_is_refused_before_anything_is_written(small_streetclip_dir, tmp_path):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, quantization_config=Int8DynamicConfig())
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"dtype": torch.bfloat16}, Int8DtypeError, "computes in float32, got dtype=torch.bfloat16"),
        ({"device_map": "cuda"}, ValueError, "runs on the CPU only"),
    ],
)
def test_loading_int8_in_another_dtype_or_on_a_gpu_is_refused(small_streetclip_dir, kwargs, error, message):
    with pytest.raises(error, match=message):
        StreetCLIPForGeolocation.from_pretrained(
            small_streetclip_dir, quantization_config=Int8DynamicConfig(), **kwargs
        )


def test_a_pipeline_asked_for_int8_in_bfloat16_refuses_instead_of_falling_back_to_float32(small_streetclip_dir):
    with pytest.raises(Int8DtypeError, match="computes in float32, got dtype=torch.bfloat16"):
        pipeline(
            "geolocation",
            model=str(small_streetclip_dir),
            model_kwargs={"quantization_config": Int8DynamicConfig()},
            dtype=torch.bfloat16,
        )


@pytest.mark.parametrize(
    "cast", [lambda m: m.to(torch.bfloat16), lambda m: m.to(dtype=torch.float16), lambda m: m.bfloat16()]
)
def test_casting_an_int8_model_to_half_precision_is_refused_and_leaves_it_working(small_streetclip_dir, cast):
    model = StreetCLIPForGeolocation.from_pretrained(
        small_streetclip_dir, vision_only=True, quantization_config=Int8DynamicConfig()
    )
    with pytest.raises(ValueError, match=r"quantized \(streetclip_int8_dynamic\) and computes in torch.float32"):
        cast(model)
    assert_only_the_vision_tower_is_int8(model)
    assert model.to(torch.float32).to("cpu") is model
    with torch.no_grad():
        assert model(pixels()).logits.dtype == torch.float32


def test_config_round_trips_through_its_dict_and_refuses_unknown_settings():
    assert Int8DynamicConfig.from_dict(Int8DynamicConfig().to_dict()).to_dict() == {
        "quant_method": "streetclip_int8_dynamic"
    }
    with pytest.raises(TypeError, match="bits"):
        Int8DynamicConfig(bits=4)
    with pytest.raises(ValueError, match="got 'torchao'"):
        Int8DynamicConfig(quant_method="torchao")


def test_torch_without_int8_kernels_gets_a_clear_import_error(small_streetclip_dir, monkeypatch):
    monkeypatch.setattr(quantization, "INT8_ENGINES", ("no_such_engine",))
    with pytest.raises(ImportError, match=r"needs a quantized CPU back end \(no_such_engine\)"):
        StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, quantization_config=Int8DynamicConfig())


def test_torch_without_dynamic_quantization_gets_a_clear_import_error(monkeypatch):
    monkeypatch.delattr(torch.ao.quantization, "quantize_dynamic")
    with pytest.raises(ImportError, match="needs torch.ao.quantization.quantize_dynamic"):
        quantization.int8_engine()


def run_locate(capsys, *argv) -> tuple[int, list[dict], str]:
    status = main(["locate", *map(str, argv), "--num_workers", "0"])
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_cli_quantize_int8_answers_with_the_int8_model(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    quantized_models = []
    real_quantize = quantization.quantize_vision_tower
    monkeypatch.setattr(
        quantization, "quantize_vision_tower", lambda model: (real_quantize(model), quantized_models.append(model))
    )
    for seed in range(3):
        random_photo(seed).save(tmp_path / f"{seed}.png")
    status, records, _ = run_locate(capsys, tmp_path, "--model", small_streetclip_dir, "--quantize", "int8")
    assert status == 0 and len(records) == 3
    assert all(record["answers"][0]["country"] in SMALL_COUNTRIES for record in records)
    (model,) = quantized_models
    assert_only_the_vision_tower_is_int8(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "cuda"], "--quantize int8 runs on the CPU; drop --device cuda"),
        (["--dtype", "bfloat16"], "--quantize int8 computes in float32; drop --dtype bfloat16"),
    ],
)
def test_cli_quantize_with_a_gpu_or_half_precision_is_a_usage_error(
    capsys, tmp_path, small_streetclip_dir, options, message
):
    random_photo(0).save(tmp_path / "photo.png")
    status, records, err = run_locate(
        capsys, tmp_path / "photo.png", "--model", small_streetclip_dir, "--quantize", "int8", *options
    )
    assert status == 2 and not records
    assert message in err


def test_cli_quantize_without_int8_kernels_is_a_usage_error(capsys, monkeypatch, tmp_path, small_streetclip_dir):
    monkeypatch.setattr(quantization, "INT8_ENGINES", ("no_such_engine",))
    random_photo(0).save(tmp_path / "photo.png")
    status, records, err = run_locate(
        capsys, tmp_path / "photo.png", "--model", small_streetclip_dir, "--quantize", "int8"
    )
    assert status == 2 and not records
    assert "int8 quantization needs a quantized CPU back end" in err


@pytest.mark.slow
def test_int8_first_answers_agree_with_float32_on_a_trained_model(trained_geo_model, tmp_path):
    """204 held-out photos of the synthetic geo set: the first answer's country agrees on at least 98%."""
    folder = write_geo_imagefolder(tmp_path / "eval", photos_per_city=17, seed=1)
    paths = sorted(str(path) for path in folder.glob("*.png"))
    truth = [Path(path).name.split("-")[0] for path in paths]
    reference = pipeline("geolocation", model=str(trained_geo_model))(paths)
    int8 = pipeline(
        "geolocation", model=str(trained_geo_model), model_kwargs={"quantization_config": Int8DynamicConfig()}
    )
    assert_only_the_vision_tower_is_int8(int8.model)
    answers = int8(paths)
    accuracy = np.mean([answer[0]["country"] == country for answer, country in zip(reference, truth, strict=True)])
    agreement = np.mean(
        [ours[0]["country"] == theirs[0]["country"] for ours, theirs in zip(answers, reference, strict=True)]
    )
    print(f"{len(paths)} photos: float32 country accuracy {accuracy:.3f}, int8 agreement with float32 {agreement:.3f}")
    assert len(paths) >= 200
    assert accuracy >= 0.8, "the model did not learn the geo set, so agreement would mean nothing"
    assert agreement >= 0.98
