"""ONNX graphs of a geolocation model in transformers.js's Hub layout (`save_onnx_folder`), which onnxruntime(-web) and
transformers.js run without PyTorch; `OnnxRuntimeModel` runs one where the PyTorch model would (`--backend`)."""

from __future__ import annotations

import ast
import copy
import importlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..configuration_streetclip import StreetCLIPConfig
from ..modeling_streetclip import GeolocationOutput, StreetCLIPForGeolocation


if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnxruntime

    from ..processing_streetclip import StreetCLIPProcessor


ONNX_FOLDER = "onnx"
GRAPH_FILE = "model.onnx"
QUANTIZED_GRAPH_FILE = "model_quantized.onnx"
INPUT_NAME = "pixel_values"
# ONNX Runtime (Python and web) and transformers.js run opset 18 graphs; LayerNormalization needs at least 17.
OPSET_VERSION = 18
ONNX_EXTRA = 'pip install "streetclip[onnx]"'
# The packages the export needs: onnxscript is what torch's exporter builds graphs with.
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
# A graph is one protobuf file, as the browser fetches it; protobuf cannot hold more than 2 GiB.
MAX_GRAPH_BYTES = 2**31


@dataclass(frozen=True)
class OnnxGraphs:
    """The graphs `export_onnx` wrote."""

    model: Path
    quantized: Path


def require_onnx(packages: tuple[str, ...] = ONNX_PACKAGES, purpose: str = "The ONNX export") -> None:
    """Raise an `ImportError` naming the extra to install when one of `packages` (by default the export's) is
    missing. (Not `requires_backends`: it knows none of them, and names no extra.)"""
    missing = []
    for name in packages:
        try:  # an import, not `find_spec`: a package that is installed but cannot load is missing too
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{purpose} needs {', '.join(missing)} (not installed); install the extra: {ONNX_EXTRA}")


def output_names(model: StreetCLIPForGeolocation) -> tuple[str, ...]:
    """The graph's outputs for `model`: `region_logits` only when its candidate table has a region level."""
    region = ("region_logits",) if model.uses_regions else ()
    return ("image_embeds", "country_logits", *region, "city_logits", "logits")


class _GraphModule(nn.Module):
    """The forward the graph records: pixels in, the outputs of `output_names` out (decisions are `rank_answers`')."""

    def __init__(self, model: StreetCLIPForGeolocation):
        super().__init__()
        self.model, self.names = model, output_names(model)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values)
        return tuple(outputs[name] for name in self.names)


def export_onnx(model: StreetCLIPForGeolocation, onnx_dir: str | Path) -> OnnxGraphs:
    """Write `model.onnx` (the vision tower and every head, float32, any batch) and `model_quantized.onnx` (int8 weights
    in the vision encoder's linear layers, as `quantization.Int8DynamicConfig` has them) into `onnx_dir`, and check both
    with `onnx.checker`. The graph's `logits` are the log joint probability of every candidate city."""
    require_onnx()
    import onnx

    # Refuse a model the graph cannot be exported from, naming what to load instead.
    if model.candidate_places is None:
        raise ValueError("This model has no candidate places, so it has no heads to export; call `set_candidates`.")
    if getattr(model, "is_quantized", False):
        raise ValueError(
            "This model is quantized with PyTorch's int8 layers, which ONNX cannot hold; export the float32 model "
            "(the export writes an int8 graph of its own, model_quantized.onnx)."
        )
    if model.dtype != torch.float32:
        raise ValueError(
            f"This model computes in {model.dtype}; export it in float32 (load with dtype=torch.float32): the graph "
            "is float32, and its int8 twin is quantized from it."
        )
    onnx_dir = Path(onnx_dir)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    module = _GraphModule(model).eval()
    size = model.config.vision_config.image_size
    example = torch.zeros(2, 3, size, size, dtype=torch.float32)  # two, so that the batch axis is not fixed to 1
    # Quiet: torchvision's ops are missing by design (not a dependency), and torch's pytree warns of its own API.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
            # The dynamo exporter, not TorchScript's: half the nodes, static head sizes, module paths that pick what
            # to quantize.
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=OPSET_VERSION,
                input_names=[INPUT_NAME],
                output_names=list(module.names),
                dynamic_shapes=({0: torch.export.Dim("batch_size", min=1)},),
                external_data=False,
                verbose=False,
            )
    finally:
        registration.setLevel(level)
    graph = program.model_proto
    quantized_nodes = _encoder_linear_nodes(graph)
    # The exporter's notes (stack traces with this machine's paths) are a third of a small graph's bytes.
    for value in (*graph.graph.node, *graph.graph.input, *graph.graph.output, *graph.graph.value_info):
        del value.metadata_props[:]
    if graph.ByteSize() >= MAX_GRAPH_BYTES:
        raise ValueError(
            f"The graph of this model takes {graph.ByteSize() / 2**30:.1f} GiB, more than one ONNX file can hold "
            "(2 GiB); the export writes single-file graphs, as browsers load them."
        )
    paths = OnnxGraphs(onnx_dir / GRAPH_FILE, onnx_dir / QUANTIZED_GRAPH_FILE)
    onnx.save_model(graph, paths.model)
    onnx.checker.check_model(str(paths.model), full_check=True)
    _quantize(paths.model, paths.quantized, quantized_nodes)
    onnx.checker.check_model(str(paths.quantized), full_check=True)
    return paths


def save_onnx_folder(
    model: StreetCLIPForGeolocation, processor: StreetCLIPProcessor, folder: str | Path
) -> OnnxGraphs:
    """Write the folder transformers.js loads: config.json (candidate table, `id2label`), the processor files (with
    preprocessor_config.json, which transformers.js and the web page read) and the graphs in `onnx/` (`export_onnx`)."""
    folder = Path(folder)
    graphs = export_onnx(model, folder / ONNX_FOLDER)
    model.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return graphs


def graph_outputs(session: onnxruntime.InferenceSession, pixel_values: np.ndarray) -> GeolocationOutput:
    """Run an exported graph on `pixel_values` (float32): its outputs as the model's `GeolocationOutput`."""
    names = [output.name for output in session.get_outputs()]
    outputs = session.run(names, {INPUT_NAME: pixel_values})
    return GeolocationOutput(**{name: torch.from_numpy(value) for name, value in zip(names, outputs, strict=True)})


class OnnxRuntimeModel(StreetCLIPForGeolocation):
    """The model with its forward run by an exported graph in ONNX Runtime: the batch engine, the pipeline and the
    gallery take it for the PyTorch model. It keeps that model's candidate table; the graph holds the weights."""

    def __init__(self, config: StreetCLIPConfig, graph: str | Path):
        require_onnx(("onnxruntime",), "Running an ONNX graph")
        import onnxruntime

        config = copy.deepcopy(config)
        config.vision_config.num_hidden_layers = config.text_config.num_hidden_layers = 0
        super().__init__(config, vision_only=True)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads PyTorch would compute with
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        sizes = {output.name: output.shape[-1] for output in self.session.get_outputs()}
        places = self.candidate_places
        expected = {"image_embeds": config.projection_dim, "country_logits": places.num_countries}
        expected |= {"region_logits": places.num_regions} if self.uses_regions else {}
        expected |= {"city_logits": places.num_cities, "logits": places.num_cities}
        if sizes != expected:
            raise ValueError(
                f"The graph {str(graph)!r} gives outputs of sizes {sizes}, but the config.json beside it describes "
                f"{expected}: they come from different models. Export the graph again with `streetclip export`."
            )

    @classmethod
    def from_export(cls, name_or_path: str | Path, graph_file: str = GRAPH_FILE) -> OnnxRuntimeModel:
        """The graph `onnx/{graph_file}` of a folder or Hub repo written by `streetclip export`, with its config."""
        from transformers.utils import cached_file

        try:
            graph = cached_file(str(name_or_path), f"{ONNX_FOLDER}/{graph_file}")
        except OSError:
            raise FileNotFoundError(
                f"{Path(name_or_path, ONNX_FOLDER, graph_file)} does not exist: ONNX Runtime runs the graphs that "
                f"`streetclip export {name_or_path} --output DIR` writes into DIR; give that DIR as the model."
            ) from None
        return cls(StreetCLIPConfig.from_pretrained(name_or_path), graph)

    def restrict_countries(self, countries: list[str]) -> None:
        raise ValueError(
            "the ONNX graph scores every candidate country; restrict them with the PyTorch model (--backend torch)."
        )

    def locate_embeddings(self, image_embeds: torch.Tensor) -> GeolocationOutput:
        raise ValueError("the ONNX graph takes pixels, not embeddings such as pooled views; use the PyTorch model.")

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> GeolocationOutput:
        return graph_outputs(self.session, pixel_values.detach().float().cpu().numpy())

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(pooler_output=self(pixel_values).image_embeds)


def _encoder_linear_nodes(graph: onnx.ModelProto) -> list[str]:
    """The MatMul nodes of the vision encoder's linear layers, by the module path the exporter records on each."""
    initializers = {initializer.name for initializer in graph.graph.initializer}
    names = []
    for node in graph.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers:
            metadata = {entry.key: entry.value for entry in node.metadata_props}
            scopes = ast.literal_eval(metadata.get("pkg.torch.onnx.name_scopes", "[]"))
            if any(scope.endswith(".vision_model.encoder") for scope in scopes):
                names.append(node.name)
    return names


def _quantize(source: Path, target: Path, nodes: list[str]) -> None:
    """Int8 weights for `nodes` of the graph at `source`, activations quantized at run time, written to `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not nodes:
        raise ValueError(f"{source} has no vision encoder layers to quantize; it was not exported by `export_onnx`.")

    def advice(record: logging.LogRecord) -> bool:  # `quant_pre_process` fails on these graphs; MatMuls need no shapes
        return "pre-processing before quantization" not in record.getMessage()

    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(
            source,
            target,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            extra_options={"MatMulConstBOnly": True},
            use_external_data_format=False,
        )
    finally:
        logging.getLogger().removeFilter(advice)
