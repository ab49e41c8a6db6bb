"""Publish a StreetCLIP model to the Hub as a repository that works for people who never install this package.

MODEL (a saved StreetCLIPForGeolocation, or a plain CLIP checkpoint, converted) becomes a repository with its weights,
processor, remote code and card; `--space` and `--web_space` add Spaces serving it, `--dry_run DIR` uploads nothing
(model_card/README.md). MODEL itself is only read, never written.
"""

import argparse
import json
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path
from urllib.parse import quote

from card import base_model_source, build_model_card, hub_repo_id, read_benchmark_result, read_training_args
from huggingface_hub import HfApi, ModelCard, SpaceCard
from transformers import AutoConfig
from transformers.utils import logging

from modeling_streetclip import GeolocationPipeline, StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app import world_map
from modeling_streetclip.app.export import require_onnx, save_onnx_folder
from modeling_streetclip.app.files import file_in_the_way


logger = logging.get_logger(__name__)

# The Gradio demo: its app and requirements are published as they are, its README with the model filled in.
SPACE_DIR = Path(__file__).with_name("space")
SPACE_FILES = ("app.py", "requirements.txt")
# The in-browser page: its files, and those of its locked onnxruntime-web (`npm ci`) at the paths it imports them from.
WEB_DIR = Path(__file__).with_name("web")
WEB_FILES = ("index.html", "app.js", "decisions.js", "map.js", "preprocess.js", "style.css")
WEB_RUNTIME_FILES = tuple(
    f"node_modules/onnxruntime-web/dist/{name}"
    for name in ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
)
# A quarter of the float32 graph's download, and the agreement of its first answers is measured (README, "ONNX").
WEB_GRAPH = "onnx/model_quantized.onnx"
# The Spaces beside the model, by option: what messages call it, its SDK, and the suffix of the folder `--dry_run DIR`
# writes it to, DIR-<suffix> (beside DIR: inside, it would be uploaded with the model).
SPACES = {"space": ("Space", "gradio", "space"), "web_space": ("web Space", "static", "web")}


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
        "--license", help="License of the weights (default: the one the base model's Hub card declares, inherited)."
    )
    parser.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="Create the repositories private (else the Hub's default).",
    )
    parser.add_argument("--revision", help="Branch to upload to, created if missing (default: main).")
    parser.add_argument("--commit_message", default="Upload StreetCLIP geolocation model", help="The commit message.")
    parser.add_argument("--space", metavar="SPACE_ID", help="Also publish the Gradio demo (space/) as this Space.")
    parser.add_argument(
        "--onnx", action="store_true", help='Also write the ONNX graphs (onnx/); needs pip install "streetclip[onnx]".'
    )
    parser.add_argument(
        "--web_space",
        metavar="SPACE_ID",
        help="Also publish the in-browser page (web/) as a static Space (needs --onnx).",
    )
    parser.add_argument(
        "--dry_run", type=Path, metavar="DIR", help="Write the folders to DIR (DIR-space, DIR-web); upload nothing."
    )
    args = parser.parse_args(argv)
    for flag, repo_id in (("REPO_ID", args.repo_id), ("--space", args.space), ("--web_space", args.web_space)):
        if repo_id is not None and hub_repo_id(repo_id) is None:
            parser.error(f"{flag} must be a Hub repository id NAMESPACE/NAME, got {repo_id!r}.")
    if args.space is not None and args.revision is not None:
        parser.error(
            "--space serves the main branch of REPO_ID, not --revision; publish the model to main, or the Space "
            "without --space once the model is there."
        )
    if args.web_space is not None and not args.onnx:
        parser.error("--web_space needs --onnx: the page runs the ONNX graph that --onnx adds to REPO_ID.")
    if args.dry_run is not None:
        folders = [space_dry_run(args.dry_run, SPACES[option][2]) for option in SPACES if vars(args)[option]]
        for folder in [args.dry_run, *folders]:
            if (blocker := file_in_the_way(folder)) is not None:
                parser.error(f"--dry_run writes the folder {str(folder)!r}, but {str(blocker)!r} is a file.")
            if folder.is_dir() and any(folder.iterdir()):
                parser.error(f"--dry_run writes {str(folder)!r}, which is not empty; name a new or empty folder.")
    return args


def space_dry_run(dry_run: Path, suffix: str = "space") -> Path:
    """Where `--dry_run DIR` writes a Space's folder: DIR-`suffix`."""
    return dry_run.with_name(f"{dry_run.name}-{suffix}")


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
    """Write the repository into `folder`: what `GeolocationPipeline.save_pretrained` writes (weights, config,
    processor, code for `trust_remote_code=True`), with `onnx` the ONNX graphs, and the card."""
    GeolocationPipeline(model=model, processor=processor).save_pretrained(folder)
    if onnx:
        save_onnx_folder(model, processor, folder)
    card.save(folder / "README.md")


def _copy_space(source: Path, names: tuple[str, ...], folder: Path, repo_id: str) -> None:
    """Copy `names` from `source` into `folder`, and its README with `repo_id` as the model (`models:`, which the
    demo serves and the Hub links the Space and the model by)."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, folder / name)
    card = SpaceCard.load(source / "README.md")
    card.data.models = [repo_id]
    card.save(folder / "README.md")


def write_space_folder(folder: Path, repo_id: str) -> None:
    """Write the demo Space serving `repo_id` into `folder`, with the map module that, without the package, the app
    cannot import (it then runs the model repository's code)."""
    _copy_space(SPACE_DIR, SPACE_FILES, folder, repo_id)
    shutil.copyfile(world_map.__file__, folder / "world_map.py")


def write_web_space_folder(folder: Path, repo_id: str, revision: str | None = None) -> None:
    """Write the in-browser page's static Space into `folder`, its settings.json pointing at the int8 graph of
    `repo_id` at `revision` (by default main)."""
    _copy_space(WEB_DIR, (*WEB_FILES, *WEB_RUNTIME_FILES), folder, repo_id)
    model_url = f"https://huggingface.co/{repo_id}/resolve/{quote(revision or 'main', safe='')}/"
    (folder / "settings.json").write_text(json.dumps({"model": model_url, "graph": WEB_GRAPH}, indent=2) + "\n")


def upload(
    folder: Path, repo_id: str, private: bool | None, message: str, revision: str | None = None, **space
) -> str:
    """Create the repository (with `space`, its `repo_type` and `space_sdk`), and the branch, if needed, and upload
    `folder` in one commit; returns the commit URL."""
    api = HfApi()
    api.create_repo(repo_id, **space, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        repo_type=space.get("repo_type"),
        folder_path=folder,
        revision=revision,
        commit_message=message,
    ).commit_url


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The --metrics files, and what --onnx and --web_space need, are checked before anything is loaded or uploaded.
    try:
        benchmarks = [read_benchmark_result(path, name) for name, path in map(split_metrics_argument, args.metrics)]
        if args.onnx:
            require_onnx()
        if args.web_space and (missing := [name for name in WEB_RUNTIME_FILES if not (WEB_DIR / name).is_file()]):
            raise FileNotFoundError(
                f"The page's runtime files are not installed ({', '.join(missing)}); run `npm ci --prefix {WEB_DIR}` first."
            )
    except (ImportError, OSError, ValueError) as error:  # OSError and ValueError: a --metrics file missing or wrong
        print(f"publish.py: error: {error}", file=sys.stderr)
        return 2

    try:
        config = AutoConfig.from_pretrained(args.model)
        converted_from = None if isinstance(config, StreetCLIPConfig) else args.model
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
        license=args.license or base_model_license(hub_repo_id(base_model_source(training_args, converted_from))),
        converted_from=converted_from,
        training_args=training_args,
        benchmarks=benchmarks,
        space=args.space,
        onnx=args.onnx,
        web_space=args.web_space,
    )
    writers = {"space": write_space_folder, "web_space": partial(write_web_space_folder, revision=args.revision)}
    spaces = [(vars(args)[option], *SPACES[option], writers[option]) for option in SPACES if vars(args)[option]]

    if args.dry_run is not None:
        args.dry_run.mkdir(parents=True, exist_ok=True)
        write_repo_folder(model, processor, args.dry_run, card, onnx=args.onnx)
        print(f"Wrote the repository folder for {args.repo_id} to {args.dry_run}; nothing was uploaded.")
        for space_id, name, _, suffix, write in spaces:
            write(folder := space_dry_run(args.dry_run, suffix), args.repo_id)
            print(f"Wrote the {name} folder for {space_id} to {folder}; nothing was uploaded.")
        return 0

    with tempfile.TemporaryDirectory(prefix="streetclip-publish-") as staging:
        write_repo_folder(model, processor, Path(staging), card, onnx=args.onnx)
        try:
            commit_url = upload(Path(staging), args.repo_id, args.private, args.commit_message, args.revision)
        except OSError as error:  # HTTP, authentication, offline and missing-token errors of huggingface_hub
            print(
                f"Upload to {args.repo_id} failed: {error}\nNothing was changed locally; {args.model} is untouched. "
                "Run again with --dry_run DIR to inspect the folder that would be uploaded.",
                file=sys.stderr,
            )
            return 1
    print(f"Published {args.model} to https://huggingface.co/{args.repo_id}: {commit_url}")
    for space_id, name, sdk, suffix, write in spaces:
        with tempfile.TemporaryDirectory(prefix=f"streetclip-{suffix}-") as staging:
            write(Path(staging), args.repo_id)
            message = f"{name} for {args.repo_id}"
            try:
                commit_url = upload(Path(staging), space_id, args.private, message, repo_type="space", space_sdk=sdk)
            except OSError as error:
                print(
                    f"The model is published, but the upload of the {name} {space_id} failed: {error}\nRun again to "
                    f"retry; --dry_run DIR writes its folder to DIR-{suffix} for inspection.",
                    file=sys.stderr,
                )
                return 1
        print(f"Published the {name} to https://huggingface.co/spaces/{space_id}: {commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
