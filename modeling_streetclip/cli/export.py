"""`streetclip export MODEL --output DIR`: the model as ONNX graphs in transformers.js's layout (the export itself is
`app.export`); torch and the ONNX packages are imported only once it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..app import EXIT_OK, UsageError
from ..app.arguments import add_verbose_argument


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to the `streetclip` parser."""
    export = commands.add_parser(
        "export",
        help="write the model as ONNX graphs (float32 and int8) for onnxruntime, onnxruntime-web and transformers.js",
        description=(
            "Export MODEL's vision tower and candidate heads to ONNX, in the layout transformers.js loads from a Hub "
            "repository: DIR/onnx/model.onnx (float32) and DIR/onnx/model_quantized.onnx (int8 weights in the vision "
            "encoder, activations quantized at run time), beside config.json (the candidate table and id2label) "
            "and the processor files (preprocessor_config.json, processor_config.json, tokenizer). Both graphs take "
            "pixel_values of shape (batch, 3, size, size), any batch, and give image_embeds, country_logits, "
            "region_logits (with a region level), city_logits and logits, the log joint probability of every "
            "candidate city; they run without PyTorch and without the text tower. A plain CLIP checkpoint gets "
            "heads for the paper's candidate countries first, as `streetclip locate` builds them."
        ),
        epilog=(
            'Needs the [onnx] extra: pip install "streetclip[onnx]". Exit status: 0 when both graphs were written '
            "and checked, 2 on usage errors (the extra missing, a model that cannot be loaded, an --output that is "
            "a file or already holds graphs without --overwrite, a write that failed), 130 when interrupted."
        ),
    )
    export.add_argument("model", metavar="MODEL", help="Hub repo or local folder, as for `streetclip locate`")
    export.add_argument("--output", required=True, type=Path, metavar="DIR", help="the folder to write")
    export.add_argument("--overwrite", action="store_true", help="replace the graphs of an earlier export in DIR/onnx")
    add_verbose_argument(export)
    export.set_defaults(run=export_command)


def export_command(args: argparse.Namespace) -> int:
    """Run `streetclip export`."""
    import torch

    from ..app.export import GRAPH_FILE, ONNX_FOLDER, QUANTIZED_GRAPH_FILE, require_onnx, save_onnx_folder
    from ..app.loading import load_model

    try:
        require_onnx()
    except ImportError as error:
        raise UsageError(str(error)) from None
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {str(args.output)!r} is a file; name a folder (new, or one to add the graphs to).")
    graphs = [args.output / ONNX_FOLDER / name for name in (GRAPH_FILE, QUANTIZED_GRAPH_FILE)]
    if (existing := [str(path) for path in graphs if path.exists()]) and not args.overwrite:
        raise UsageError(
            f"--output {str(args.output)!r} already holds {', '.join(existing)}; pass --overwrite to replace them, or "
            "name another folder."
        )
    model, processor = load_model(args.model, "cpu", torch.float32, countries=None)
    try:
        graphs = save_onnx_folder(model, processor, args.output)
    except OSError as error:
        raise UsageError(f"cannot write --output {str(args.output)!r}: {error}") from None
    for path in (graphs.model, graphs.quantized):
        print(f"{path}\t{path.stat().st_size / 2**20:.1f} MiB")
    return EXIT_OK
