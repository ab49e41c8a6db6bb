"""`streetclip export` and `modeling_streetclip.app.export`: ONNX graphs in transformers.js's layout that give the
PyTorch model's outputs without PyTorch, an int8 twin, and the errors of a command line that cannot run."""

import json
import logging
import logging.handlers
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import count_processor_loads
from transformers import AutoConfig, AutoProcessor, pipeline

from modeling_streetclip import StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app.gallery_build import build_gallery
from modeling_streetclip.candidates import CandidatePlaces
from modeling_streetclip.cli import main
from modeling_streetclip.decisions import DECISIONS, GALLERY_DECISIONS, rank_answers
from modeling_streetclip.images import load_rgb_image
from modeling_streetclip.pixels import normalized_pixels, resized_pixels
from modeling_streetclip.testing_utils import SMALL_COUNTRIES, TINY_IMAGE_SIZE, write_geo_imagefolder


onnx = pytest.importorskip("onnx", reason='the ONNX export needs the [onnx] extra: pip install "streetclip[onnx]"')
ort = pytest.importorskip(
    "onnxruntime", reason='the ONNX export needs the [onnx] extra: pip install "streetclip[onnx]"'
)

from modeling_streetclip.app.export import (  # noqa: E402  (after the skip: it needs the extra)
    GRAPH_FILE,
    ONNX_EXTRA,
    ONNX_FOLDER,
    QUANTIZED_GRAPH_FILE,
    OnnxRuntimeModel,
    export_onnx,
    graph_outputs,
    output_names,
    save_onnx_folder,
)


# The float32 graph and the eager model run the same float32 arithmetic in other kernels and summation orders: on the
# tiny models they differ by about 2e-6 in logits. 1e-4 leaves room for other CPUs' kernels and is still a hundred
# times finer than the 1e-2 that separates answers worth telling apart.
FLOAT32_TOLERANCE = 1e-4


def pixels(batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


def run_graph(path: Path, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return {name: value.numpy() for name, value in graph_outputs(session, pixel_values.numpy()).items()}


@pytest.fixture(
    scope="module", params=["small_streetclip_dir", "region_streetclip_dir"], ids=["two_levels", "regions"]
)
def exported(request, tmp_path_factory) -> tuple[StreetCLIPForGeolocation, Path]:
    """A saved model, loaded as the command loads it, and the folder `save_onnx_folder` wrote for it."""
    source = request.getfixturevalue(request.param)
    model = StreetCLIPForGeolocation.from_pretrained(source, vision_only=True)
    folder = tmp_path_factory.mktemp("onnx-export")
    save_onnx_folder(model, StreetCLIPProcessor.from_pretrained(source), folder)
    return model, folder


# The graphs


def test_graph_gives_the_pytorch_outputs_at_any_batch_size(exported):
    model, folder = exported
    graph = onnx.load(folder / ONNX_FOLDER / GRAPH_FILE)
    onnx.checker.check_model(graph, full_check=True)
    assert [value.name for value in graph.graph.input] == ["pixel_values"]
    assert [value.name for value in graph.graph.output] == list(output_names(model))
    assert ("region_logits" in output_names(model)) == model.uses_regions
    for batch_size in (1, 4):
        outputs = run_graph(folder / ONNX_FOLDER / GRAPH_FILE, pixels(batch_size, seed=batch_size))
        with torch.no_grad():
            expected = model(pixels(batch_size, seed=batch_size))
        for name, value in outputs.items():
            assert value.shape == tuple(expected[name].shape), name
            np.testing.assert_allclose(value, expected[name].numpy(), rtol=0, atol=FLOAT32_TOLERANCE, err_msg=name)
        # `logits` are log joint probabilities: their softmax is the joint ranking the pipeline gives.
        np.testing.assert_allclose(np.exp(outputs["logits"]).sum(axis=1), 1.0, atol=1e-5)


def test_int8_graph_quantizes_the_vision_encoder_linear_layers_and_keeps_the_heads_float32(exported):
    model, folder = exported
    quantized = onnx.load(folder / ONNX_FOLDER / QUANTIZED_GRAPH_FILE)
    onnx.checker.check_model(quantized, full_check=True)
    operators = [node.op_type for node in quantized.graph.node]
    # q, k, v, out, fc1 and fc2 of every layer; attention's two products of activations stay float32.
    assert operators.count("MatMulInteger") == 6 * model.config.vision_config.num_hidden_layers
    weights = {item.name: onnx.numpy_helper.to_array(item) for item in quantized.graph.initializer}
    heads = {"country_head", "city_head", "visual_projection"} | ({"region_head"} if model.uses_regions else set())
    for head in heads:
        # The quantizer turns the heads' Gemm into a MatMul with the weight transposed; float32 either way.
        (weight,) = [value for name, value in weights.items() if name.startswith(f"model.{head}.weight")]
        expected = getattr(model, head).weight.detach().numpy()
        np.testing.assert_array_equal(weight if weight.shape == expected.shape else weight.T, expected)
    assert (folder / ONNX_FOLDER / QUANTIZED_GRAPH_FILE).stat().st_size < (
        folder / ONNX_FOLDER / GRAPH_FILE
    ).stat().st_size

    outputs = run_graph(folder / ONNX_FOLDER / QUANTIZED_GRAPH_FILE, pixels(4, seed=0))
    with torch.no_grad():
        expected = model(pixels(4, seed=0))
    assert [value.shape for value in outputs.values()] == [tuple(expected[name].shape) for name in outputs]
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(outputs["image_embeds"]), expected.image_embeds)
    assert cosine.min() > 0.99


@pytest.mark.slow
def test_int8_graph_first_answers_agree_with_the_float32_graphs_on_a_trained_model(trained_geo_model, tmp_path):
    """204 held-out photos of the synthetic geo set, ranked by the package's own rule on each graph's outputs: the
    int8 graph's first country agrees with the float32 graph's on at least 98%, and the float32 graph answers as
    PyTorch does."""
    model = StreetCLIPForGeolocation.from_pretrained(trained_geo_model, vision_only=True)
    processor = StreetCLIPProcessor.from_pretrained(trained_geo_model)
    save_onnx_folder(model, processor, tmp_path / "onnx")
    paths = sorted(write_geo_imagefolder(tmp_path / "eval", photos_per_city=17, seed=1).glob("*.png"))
    images = [load_rgb_image(path) for path in paths]
    pixel_values = normalized_pixels(processor.image_processor, resized_pixels(processor.image_processor, images))
    answers = {
        name: rank_answers(
            model, graph_outputs(ort.InferenceSession(tmp_path / "onnx" / ONNX_FOLDER / name), pixel_values.numpy())
        )
        for name in (GRAPH_FILE, QUANTIZED_GRAPH_FILE)
    }
    with torch.no_grad():
        reference = rank_answers(model, model(pixel_values))
    truth = [path.name.split("-")[0] for path in paths]
    accuracy = np.mean([answer[0]["country"] == country for answer, country in zip(reference, truth, strict=True)])
    agreement = np.mean(
        [
            ours[0]["country"] == theirs[0]["country"]
            for ours, theirs in zip(answers[QUANTIZED_GRAPH_FILE], answers[GRAPH_FILE], strict=True)
        ]
    )
    print(f"{len(paths)} photos: float32 country accuracy {accuracy:.3f}, int8 graph agreement {agreement:.3f}")
    assert len(paths) >= 200
    assert accuracy >= 0.8, "the model did not learn the geo set, so agreement would mean nothing"
    assert [answer[0]["label"] for answer in answers[GRAPH_FILE]] == [answer[0]["label"] for answer in reference]
    assert agreement >= 0.98


def test_graphs_hold_no_text_tower_and_no_paths_of_this_machine(exported):
    _, folder = exported
    for name in (GRAPH_FILE, QUANTIZED_GRAPH_FILE):
        graph = onnx.load(folder / ONNX_FOLDER / name)
        assert not [item.name for item in graph.graph.initializer if "text" in item.name]
        assert not [node.name for node in graph.graph.node if node.metadata_props]
        assert str(Path(__file__).parents[1]).encode() not in (folder / ONNX_FOLDER / name).read_bytes()


# The folder


def test_folder_has_transformers_js_layout_and_its_config_and_processor_load_with_transformers(exported):
    model, folder = exported
    assert {path.name for path in (folder / ONNX_FOLDER).iterdir()} == {GRAPH_FILE, QUANTIZED_GRAPH_FILE}
    assert {"config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json"} <= {
        path.name for path in folder.iterdir()
    }
    assert not list(folder.glob("*.safetensors"))  # the weights are in the graphs
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, StreetCLIPConfig)
    assert config.candidate_places == model.config.candidate_places
    assert config.id2label == model.config.id2label and len(config.id2label) == model.candidate_places.num_cities
    processor = AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, StreetCLIPProcessor)
    assert processor.image_processor.crop_size == {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert preprocessor["image_processor_type"] == "CLIPImageProcessor" and preprocessor["resample"] == 3


def test_a_model_with_its_text_tower_exports_the_same_graph(small_streetclip_dir, tmp_path):
    full = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    graphs = export_onnx(full, tmp_path)
    outputs = run_graph(graphs.model, pixels(2, seed=3))
    with torch.no_grad():
        expected = full(pixels(2, seed=3))
    np.testing.assert_allclose(outputs["logits"], expected.logits.numpy(), rtol=0, atol=FLOAT32_TOLERANCE)


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda model: model.to(torch.bfloat16), "computes in torch.bfloat16; export it in float32"),
        (lambda model: setattr(model, "is_quantized", True), "quantized with PyTorch's int8 layers"),
    ],
    ids=["bfloat16", "int8"],
)
def test_a_model_not_in_float32_is_refused_before_anything_is_written(
    small_streetclip_dir, tmp_path, prepare, message
):
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    prepare(model)
    with pytest.raises(ValueError, match=message):
        export_onnx(model, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


# The command


def run_export(capsys, *argv) -> tuple[int, str, str]:
    status = main(["export", *map(str, argv)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_command_writes_the_folder_and_prints_each_graph(small_streetclip_dir, tmp_path, capsys, monkeypatch):
    loads = count_processor_loads(monkeypatch)
    status, out, err = run_export(capsys, small_streetclip_dir, "--output", tmp_path / "web")
    assert status == 0, err
    assert loads == [str(small_streetclip_dir)]  # the processor it checked is the one it saves
    printed = [line.split("\t")[0] for line in out.splitlines()]
    assert printed == [str(tmp_path / "web" / ONNX_FOLDER / name) for name in (GRAPH_FILE, QUANTIZED_GRAPH_FILE)]
    outputs = run_graph(tmp_path / "web" / ONNX_FOLDER / GRAPH_FILE, pixels(2, seed=5))
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    with torch.no_grad():
        expected = model(pixels(2, seed=5))
    np.testing.assert_allclose(outputs["logits"], expected.logits.numpy(), rtol=0, atol=FLOAT32_TOLERANCE)
    assert AutoConfig.from_pretrained(tmp_path / "web").candidate_places["country_names"] == SMALL_COUNTRIES

    # A second export into the same folder needs --overwrite.
    status, _, err = run_export(capsys, small_streetclip_dir, "--output", tmp_path / "web")
    assert status == 2 and "--overwrite" in err
    before = (tmp_path / "web" / ONNX_FOLDER / GRAPH_FILE).stat().st_mtime_ns
    assert run_export(capsys, small_streetclip_dir, "--output", tmp_path / "web", "--overwrite")[0] == 0
    assert (tmp_path / "web" / ONNX_FOLDER / GRAPH_FILE).stat().st_mtime_ns != before


def test_command_prints_only_the_graphs_without_the_exporters_notes(small_streetclip_dir, tmp_path, capsys):
    """torch's exporter logged four "torchvision is not installed" lines and its pytree a FutureWarning at every
    export: noise about a package this one does not use."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    notes = logging.handlers.BufferingHandler(capacity=1000)  # torch's loggers do not propagate to pytest's
    registration.addHandler(notes)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            status, out, err = run_export(capsys, small_streetclip_dir, "--output", tmp_path / "web")
    finally:
        registration.removeHandler(notes)
    assert status == 0 and len(out.splitlines()) == 2, err
    assert [record.getMessage() for record in notes.buffer] == []
    assert [str(w.message) for w in caught if "treespec" in str(w.message)] == []


@pytest.mark.parametrize("package", ["onnx", "onnxruntime", "onnxscript"])
def test_command_without_the_extra_names_it_and_exits_2(small_streetclip_dir, tmp_path, capsys, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # importing it now raises ImportError
    status, out, err = run_export(capsys, small_streetclip_dir, "--output", tmp_path / "web")
    assert status == 2 and not out
    assert f"needs {package}" in err and ONNX_EXTRA in err
    assert not (tmp_path / "web").exists()


@pytest.mark.parametrize(
    ("model", "output", "message"),
    [
        ("missing", "new", "cannot load --model"),
        ("small", "file", "is a file"),
        ("not_a_model", "new", "cannot load --model"),
    ],
)
def test_command_with_unusable_input_says_why_and_exits_2(
    small_streetclip_dir, tmp_path, capsys, model, output, message
):
    models = {"missing": tmp_path / "missing", "small": small_streetclip_dir, "not_a_model": tmp_path}
    outputs = {"new": tmp_path / "web", "file": tmp_path / "file.txt"}
    (tmp_path / "file.txt").write_text("not a folder")
    status, out, err = run_export(capsys, models[model], "--output", outputs[output])
    assert status == 2 and not out
    assert message in err
    assert not (tmp_path / "web").exists()


# The ONNX Runtime backend


@pytest.fixture(scope="module")
def backend_files(small_streetclip_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """The small model's export folder (graphs, config and processor; no weights), photos, and a gallery built with
    the PyTorch model."""
    root = tmp_path_factory.mktemp("backend")
    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir, vision_only=True)
    processor = StreetCLIPProcessor.from_pretrained(small_streetclip_dir)
    save_onnx_folder(model, processor, root / "export")
    photos = write_geo_imagefolder(root / "photos", photos_per_city=1, seed=3)
    gallery_photos = write_geo_imagefolder(root / "gallery-photos", photos_per_city=2, seed=0)
    gallery = build_gallery(model, processor, str(gallery_photos), root / "gallery", batch_size=8, progress=False)
    return root / "export", photos, gallery.gallery.folder


def locate(capsys, model: Path, *options: str) -> tuple[int, list[dict], str]:
    """`streetclip locate` in-process: its status, its JSON Lines records and its standard error."""
    capsys.readouterr()
    status = main(["locate", "--model", str(model), "--num_workers", "0", "--batch_size", "5", *options])
    out, err = capsys.readouterr()
    return status, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize("decision", DECISIONS)
def test_locate_on_onnx_runtime_answers_as_on_pytorch_under_every_decision_rule(
    small_streetclip_dir, backend_files, capsys, decision
):
    export, photos, gallery = backend_files
    options = [str(photos), "--decision", decision, "--top_k", "3"]
    options += ["--gallery", str(gallery)] if decision in GALLERY_DECISIONS else []
    status, expected, _ = locate(capsys, small_streetclip_dir, *options)
    assert status == 0 and len(expected) == 12
    status, records, _ = locate(capsys, export, *options, "--backend", "onnxruntime")
    assert status == 0
    assert_close(records, expected)


def assert_close(actual, expected) -> None:
    """Equal records, but for numbers: probabilities within FLOAT32_TOLERANCE, kilometres as closely, relatively."""
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            assert_close(actual[key], value)
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for item, value in zip(actual, expected, strict=True):
            assert_close(item, value)
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, abs=FLOAT32_TOLERANCE, rel=1e-6)
    else:
        assert actual == expected


def test_locate_on_the_int8_graph_gives_the_answers_of_the_pipeline_on_it(backend_files, capsys):
    export, photos, _ = backend_files
    status, records, _ = locate(capsys, export, str(photos), "--backend", "onnxruntime", "--quantize", "int8")
    assert status == 0
    processor = StreetCLIPProcessor.from_pretrained(export)
    geolocator = pipeline(
        "geolocation", model=OnnxRuntimeModel.from_export(export, QUANTIZED_GRAPH_FILE), processor=processor
    )
    # In the same batches: int8 activations are quantized with the range of their whole batch.
    expected = geolocator([record["path"] for record in records], batch_size=5)
    assert [record["answers"] for record in records] == expected


@pytest.mark.parametrize("options", [[], ["--quantize", "int8"]], ids=["float32", "int8"])
def test_locate_without_the_graph_names_its_path_and_the_export_command(
    small_streetclip_dir, backend_files, capsys, options
):
    _, photos, _ = backend_files
    status, records, err = locate(capsys, small_streetclip_dir, str(photos), "--backend", "onnxruntime", *options)
    graph = QUANTIZED_GRAPH_FILE if options else GRAPH_FILE
    assert status == 2 and not records
    assert str(small_streetclip_dir / ONNX_FOLDER / graph) in err and "streetclip export" in err


def test_locate_without_onnxruntime_names_the_extra(backend_files, capsys, monkeypatch):
    export, photos, _ = backend_files
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importing it now raises ImportError
    status, records, err = locate(capsys, export, str(photos), "--backend", "onnxruntime")
    assert status == 2 and not records
    assert "needs onnxruntime" in err and ONNX_EXTRA in err


def test_a_graph_exported_for_another_candidate_table_is_refused(backend_files):
    export, _, _ = backend_files
    config = StreetCLIPConfig.from_pretrained(export)
    config.candidate_places = CandidatePlaces.from_dict(config.candidate_places).select([0])[0].to_dict()
    with pytest.raises(ValueError, match="come from different models. Export the graph again"):
        OnnxRuntimeModel(config, export / ONNX_FOLDER / GRAPH_FILE)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--group_by", "(.*)"], "--group_by pools embeddings"),
        (["--countries", "COUNTRIES"], "--countries: the ONNX graph scores every candidate country"),
        (["--dtype", "bfloat16"], "--backend onnxruntime computes in float32"),
    ],
)
def test_locate_on_onnx_runtime_refuses_what_the_graph_cannot_do(backend_files, capsys, tmp_path, options, message):
    export, photos, _ = backend_files
    (tmp_path / "countries.txt").write_text("France\n")
    options = [str(tmp_path / "countries.txt") if option == "COUNTRIES" else option for option in options]
    status, records, err = locate(capsys, export, str(photos), "--backend", "onnxruntime", *options)
    assert status == 2 and not records and message in err


# Publishing


def test_published_repo_holds_the_graphs_and_the_cards_onnxruntime_code_runs_on_them(
    small_streetclip_dir, tmp_path, monkeypatch, capsys
):
    import huggingface_hub
    import publish
    from huggingface_hub import ModelCard
    from PIL import Image
    from transformers import pipeline

    from modeling_streetclip.testing_utils import random_photo

    repo_id = "streetclip-tests/tiny-geolocation"
    folder = tmp_path / "repo"
    assert publish.main([str(small_streetclip_dir), repo_id, "--onnx", "--dry_run", str(folder)]) == 0
    assert {GRAPH_FILE, QUANTIZED_GRAPH_FILE} <= {path.name for path in (folder / ONNX_FOLDER).iterdir()}
    assert (folder / "preprocessor_config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "AutoModelForImageClassification" in json.loads((folder / "config.json").read_text())["auto_map"]

    card = ModelCard.load(folder / "README.md").text
    section = card[card.index("### ONNX") :]
    code = section[
        section.index("```python\n") + len("```python\n") : section.index("\n```", section.index("```python"))
    ]
    # The repository, as the Hub would serve it: its folder.
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(Path(repo) / name))
    monkeypatch.chdir(tmp_path)
    random_photo(0, size=(64, 48)).save(tmp_path / "photo.jpg")
    code = code.replace(f'"{repo_id}"', repr(str(folder)))

    def printed_labels(code: str) -> list[str]:
        capsys.readouterr()
        exec(compile(code, "card", "exec"), {})
        return [line.rsplit(" ", 1)[0] for line in capsys.readouterr().out.splitlines()]

    assert len(printed_labels(code)) == 3
    # On the float32 graph, the very answers of the pipeline (the int8 one may swap the near-ties of random weights).
    expected = pipeline("geolocation", model=str(small_streetclip_dir))(
        Image.open(tmp_path / "photo.jpg"), top_k=3, decision="joint"
    )
    labels = printed_labels(code.replace(QUANTIZED_GRAPH_FILE, GRAPH_FILE))
    assert labels == [answer["label"] for answer in expected]
    assert 'dtype: "q8"' in section and f'from_pretrained("{repo_id}"' in section


def test_publish_onnx_without_the_extra_says_what_to_install_before_loading(
    small_streetclip_dir, tmp_path, capsys, monkeypatch
):
    import publish

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setattr(publish, "StreetCLIPForGeolocation", None)  # loading would fail loudly
    assert publish.main([str(small_streetclip_dir), "org/name", "--onnx", "--dry_run", str(tmp_path / "repo")]) == 2
    assert ONNX_EXTRA in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
