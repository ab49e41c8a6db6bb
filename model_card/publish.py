"""Publish a StreetCLIP model to the Hub as a repository that works for people who never install this package.

    python model_card/publish.py MODEL REPO_ID [--metrics [NAME=]FILE ...] [--license L] [--private]
        [--revision R] [--commit_message M] [--space SPACE_ID] [--onnx] [--web_space SPACE_ID] [--dry_run DIR]

MODEL is a folder saved by `StreetCLIPForGeolocation` (such as the output of `training/pretrain.py`) or a plain CLIP
checkpoint, a folder or a Hub id such as `geolocal/StreetCLIP`, which is converted: probe heads are built for the
paper's candidates. The repository gets safetensors weights with their heads and candidate table, the image processor
and tokenizer, the code files that `trust_remote_code=True` runs, and README.md: the card, filled from MODEL's
`training_args.json` and the `--metrics` files of `eval/benchmark.py`. `--space SPACE_ID` also publishes the Gradio
demo of `model_card/space/` as that Space, serving REPO_ID, and the card links to it. `--onnx` adds the ONNX graphs of
`streetclip export` (`onnx/model.onnx`, `onnx/model_quantized.onnx`, for transformers.js and onnxruntime), and
`--web_space SPACE_ID` publishes the in-browser page of `model_card/web/` as a static Space that loads them from
REPO_ID. `--dry_run DIR` writes exactly that folder to DIR (and the Spaces' to DIR-space and DIR-web) and uploads
nothing. MODEL itself is only read, never written.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

from card import base_model_of, build_model_card, hub_repo_id, read_benchmark_result, read_training_args
from huggingface_hub import HfApi, ModelCard, SpaceCard
from transformers import AutoConfig
from transformers.utils import logging

from modeling_streetclip import GeolocationPipeline, StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app import world_map
from modeling_streetclip.app.export import require_onnx, save_onnx_folder


logger = logging.get_logger(__name__)

# The Gradio demo: its app and requirements are published as they are, its README with the model filled in.
SPACE_DIR = Path(__file__).with_name("space")
SPACE_FILES = ("app.py", "requirements.txt")
# The in-browser page: its files as they are, and the runtime files of its locked onnxruntime-web (`npm ci`), at the
# paths the page imports them from; settings.json, written here, points it at the model repository.
WEB_DIR = Path(__file__).with_name("web")
WEB_FILES = ("index.html", "app.js", "decisions.js", "map.js", "preprocess.js", "style.css")
WEB_RUNTIME_FILES = tuple(
    f"node_modules/onnxruntime-web/dist/{name}"
    for name in ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
)
# A quarter of the float32 graph's download, and the agreement of its first answers is measured (README, "ONNX").
WEB_GRAPH = "onnx/model_quantized.onnx"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="A saved StreetCLIPForGeolocation folder, or a plain CLIP folder or Hub id.")
    parser.add_argument("repo_id", help="The Hub repository to publish to, as NAMESPACE/NAME.")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=[],
        metavar="[NAME=]FILE",
        help="metrics.json files of eval/benchmark.py, one evaluation row each; NAME= labels a row.",
    )
    parser.add_argument(
        "--license",
        help="License of the weights; by default the one the base model's Hub card declares, which they inherit.",
    )
    parser.add_argument(
        "--private", action="store_true", default=None, help="Create the repository private (else the Hub default)."
    )
    parser.add_argument("--revision", help="Branch to upload to, created if missing (default: main).")
    parser.add_argument("--commit_message", default="Upload StreetCLIP geolocation model", help="The commit message.")
    parser.add_argument(
        "--space",
        metavar="SPACE_ID",
        help="Also publish the Gradio demo (model_card/space/) as this Space, NAMESPACE/NAME, serving REPO_ID.",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="Also write the ONNX graphs of `streetclip export` (onnx/, for transformers.js and onnxruntime); needs "
        'the [onnx] extra: pip install "streetclip[onnx]".',
    )
    parser.add_argument(
        "--web_space",
        metavar="SPACE_ID",
        help="Also publish the in-browser page (model_card/web/) as this static Space, NAMESPACE/NAME, running "
        "REPO_ID's int8 graph in the visitor's browser; needs --onnx.",
    )
    parser.add_argument(
        "--dry_run",
        type=Path,
        metavar="DIR",
        help="Write the repository folder here (and with --space or --web_space, the Spaces' to DIR-space and "
        "DIR-web); upload nothing.",
    )
    args = parser.parse_args(argv)
    if hub_repo_id(args.repo_id) is None:
        parser.error(f"REPO_ID must be a Hub repository id NAMESPACE/NAME, got {args.repo_id!r}.")
    if args.space is not None and hub_repo_id(args.space) is None:
        parser.error(f"--space must be a Hub repository id NAMESPACE/NAME, got {args.space!r}.")
    if args.space is not None and args.revision is not None:
        parser.error(
            "--space serves the main branch of REPO_ID, not --revision; publish the model to main, or the Space "
            "without --space once the model is there."
        )
    if args.web_space is not None and hub_repo_id(args.web_space) is None:
        parser.error(f"--web_space must be a Hub repository id NAMESPACE/NAME, got {args.web_space!r}.")
    if args.web_space is not None and not args.onnx:
        parser.error("--web_space needs --onnx: the page runs the ONNX graph that --onnx adds to REPO_ID.")
    if args.dry_run is not None:
        folders = [args.dry_run] + ([space_dry_run(args.dry_run)] if args.space else [])
        folders += [web_space_dry_run(args.dry_run)] if args.web_space else []
        for folder in folders:
            if folder.exists() and any(folder.iterdir()):
                parser.error(f"--dry_run writes {str(folder)!r}, which is not empty; name a new or empty folder.")
    return args


def space_dry_run(dry_run: Path) -> Path:
    """Where `--dry_run DIR` writes the Space's folder: beside DIR, never inside it (that would upload it with the
    model)."""
    return dry_run.with_name(f"{dry_run.name}-space")


def web_space_dry_run(dry_run: Path) -> Path:
    """Where `--dry_run DIR` writes the web Space's folder: beside DIR, as the demo Space's."""
    return dry_run.with_name(f"{dry_run.name}-web")


def split_metrics_argument(argument: str) -> tuple[str | None, str]:
    """`NAME=FILE` as `(NAME, FILE)`, and a bare `FILE` (even one whose path holds `=`) as `(None, FILE)`."""
    name, separator, path = argument.partition("=")
    if not separator or Path(argument).is_file() or "/" in name:
        return None, argument
    return name, path


def base_model_license(base_model: str | None) -> str | None:
    """The license the base model's Hub card declares, which derived weights inherit; `None` where unknown."""
    if base_model is None:
        return None
    try:
        return ModelCard.load(base_model).data.license
    except OSError as error:  # huggingface_hub's HTTP, offline and missing-file errors
        logger.warning(f"Could not read the license of the base model {base_model!r} from its Hub card: {error}")
        return None


def write_repo_folder(
    model: StreetCLIPForGeolocation, processor: StreetCLIPProcessor, folder: Path, card: ModelCard, onnx: bool = False
) -> None:
    """Write everything the repository holds into `folder`: the folder `GeolocationPipeline.save_pretrained` writes
    (weights, config, processor and the code for `trust_remote_code=True`), with `onnx` the ONNX graphs and the
    preprocessor_config.json that transformers.js reads, and the card."""
    GeolocationPipeline(model=model, processor=processor).save_pretrained(folder)
    if onnx:
        save_onnx_folder(model, processor, folder)
    card.save(folder / "README.md")


def write_space_folder(folder: Path, repo_id: str) -> None:
    """Write the demo Space into `folder`: the app and its requirements as they are, and the README with `repo_id`
    as its model (`models:` metadata, which the app serves and the Hub uses to link the Space and the model).

    On the Space the `streetclip` package is not installed; the app then runs the model repository's own code, the
    files `write_repo_folder` copies there for `trust_remote_code=True`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPACE_FILES:
        shutil.copyfile(SPACE_DIR / name, folder / name)
    # The app's map, which the Space cannot import from the package.
    shutil.copyfile(world_map.__file__, folder / "world_map.py")
    card = SpaceCard.load(SPACE_DIR / "README.md")
    card.data.models = [repo_id]
    card.save(folder / "README.md")


def check_web_runtime() -> None:
    """Raise a FileNotFoundError that says how to install them when the page's runtime files are missing."""
    missing = [name for name in WEB_RUNTIME_FILES if not (WEB_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The page's runtime files are not installed ({', '.join(missing)}); run `npm ci --prefix {WEB_DIR}` first."
        )


def write_web_space_folder(folder: Path, repo_id: str, revision: str | None = None) -> None:
    """Write the static Space of the in-browser page into `folder`: the page and its runtime files as they are,
    settings.json pointing at the int8 graph of `repo_id` (at `revision`, by default main), and the README with
    `repo_id` as its model."""
    check_web_runtime()
    folder.mkdir(parents=True, exist_ok=True)
    for name in (*WEB_FILES, *WEB_RUNTIME_FILES):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(WEB_DIR / name, folder / name)
    model_url = f"https://huggingface.co/{repo_id}/resolve/{quote(revision or 'main', safe='')}/"
    (folder / "settings.json").write_text(json.dumps({"model": model_url, "graph": WEB_GRAPH}, indent=2) + "\n")
    card = SpaceCard.load(WEB_DIR / "README.md")
    card.data.models = [repo_id]
    card.save(folder / "README.md")


def upload(folder: Path, args: argparse.Namespace) -> str:
    """Create the repository (and branch) if needed and upload `folder` in one commit; returns the commit URL."""
    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    if args.revision is not None:
        api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=args.repo_id, folder_path=folder, revision=args.revision, commit_message=args.commit_message
    )
    return commit.commit_url


def upload_space(folder: Path, args: argparse.Namespace) -> str:
    """Create the Gradio Space if needed and upload `folder` to it in one commit; returns the commit URL."""
    api = HfApi()
    api.create_repo(args.space, repo_type="space", space_sdk="gradio", private=args.private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=args.space, repo_type="space", folder_path=folder, commit_message=f"Demo of {args.repo_id}"
    )
    return commit.commit_url


def upload_web_space(folder: Path, args: argparse.Namespace) -> str:
    """Create the static Space if needed and upload `folder` to it in one commit; returns the commit URL."""
    api = HfApi()
    api.create_repo(args.web_space, repo_type="space", space_sdk="static", private=args.private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=args.web_space, repo_type="space", folder_path=folder, commit_message=f"In-browser {args.repo_id}"
    )
    return commit.commit_url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchmarks = [read_benchmark_result(path, name) for name, path in map(split_metrics_argument, args.metrics)]
    # What --onnx and --web_space need is checked before anything is loaded or uploaded.
    try:
        if args.onnx:
            require_onnx()
        if args.web_space is not None:
            check_web_runtime()
    except (ImportError, FileNotFoundError) as error:
        print(f"publish.py: error: {error}", file=sys.stderr)
        return 2

    config = AutoConfig.from_pretrained(args.model)
    converted_from = None if isinstance(config, StreetCLIPConfig) else args.model
    try:
        # The processor first: a model folder saved without one fails before the weights load. The text tower
        # stays, as a repository without it would reload with a random one.
        processor = StreetCLIPProcessor.from_pretrained(args.model)
        model = StreetCLIPForGeolocation.from_pretrained(args.model, config=config, processor=processor)
    except (OSError, ValueError) as error:
        print(f"publish.py: error: cannot load MODEL {args.model!r}: {error}", file=sys.stderr)
        return 2
    training_args = read_training_args(args.model)
    card = build_model_card(
        model.config,
        args.repo_id,
        license=args.license or base_model_license(base_model_of(training_args, converted_from)),
        converted_from=converted_from,
        training_args=training_args,
        benchmarks=benchmarks,
        space=args.space,
        onnx=args.onnx,
        web_space=args.web_space,
    )

    if args.dry_run is not None:
        args.dry_run.mkdir(parents=True, exist_ok=True)
        write_repo_folder(model, processor, args.dry_run, card, onnx=args.onnx)
        print(f"Wrote the repository folder for {args.repo_id} to {args.dry_run}; nothing was uploaded.")
        if args.space is not None:
            write_space_folder(space_dry_run(args.dry_run), args.repo_id)
            print(f"Wrote the Space folder for {args.space} to {space_dry_run(args.dry_run)}; nothing was uploaded.")
        if args.web_space is not None:
            write_web_space_folder(web_space_dry_run(args.dry_run), args.repo_id, args.revision)
            print(
                f"Wrote the web Space folder for {args.web_space} to {web_space_dry_run(args.dry_run)}; nothing was "
                "uploaded."
            )
        return 0

    with tempfile.TemporaryDirectory(prefix="streetclip-publish-") as staging:
        write_repo_folder(model, processor, Path(staging), card, onnx=args.onnx)
        try:
            commit_url = upload(Path(staging), args)
        except OSError as error:  # HTTP, authentication, offline and missing-token errors of huggingface_hub
            print(
                f"Upload to {args.repo_id} failed: {error}\nNothing was changed locally; {args.model} is untouched. "
                "Run again with --dry_run DIR to inspect the folder that would be uploaded.",
                file=sys.stderr,
            )
            return 1
    print(f"Published {args.model} to https://huggingface.co/{args.repo_id}: {commit_url}")
    if args.space is not None:
        with tempfile.TemporaryDirectory(prefix="streetclip-space-") as staging:
            write_space_folder(Path(staging), args.repo_id)
            try:
                commit_url = upload_space(Path(staging), args)
            except OSError as error:
                print(
                    f"The model is published, but the upload of the Space {args.space} failed: {error}\nRun "
                    "again to retry; --dry_run DIR writes the Space's folder to DIR-space for inspection.",
                    file=sys.stderr,
                )
                return 1
        print(f"Published the demo Space to https://huggingface.co/spaces/{args.space}: {commit_url}")
    if args.web_space is not None:
        with tempfile.TemporaryDirectory(prefix="streetclip-web-") as staging:
            write_web_space_folder(Path(staging), args.repo_id, args.revision)
            try:
                commit_url = upload_web_space(Path(staging), args)
            except OSError as error:
                print(
                    f"The model is published, but the upload of the web Space {args.web_space} failed: {error}\n"
                    "Run again to retry; --dry_run DIR writes its folder to DIR-web for inspection.",
                    file=sys.stderr,
                )
                return 1
        print(f"Published the in-browser Space to https://huggingface.co/spaces/{args.web_space}: {commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
