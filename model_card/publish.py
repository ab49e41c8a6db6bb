"""Publish a StreetCLIP model to the Hub as a repository that works for people who never install this package.

    python model_card/publish.py MODEL REPO_ID [--metrics [NAME=]FILE ...] [--license L] [--private]
        [--revision R] [--commit_message M] [--space SPACE_ID] [--dry_run DIR]

MODEL is a folder saved by `StreetCLIPForGeolocation` (such as the output of `training/pretrain.py`) or a plain CLIP
checkpoint, a folder or a Hub id such as `geolocal/StreetCLIP`, which is converted: probe heads are built for the
paper's candidates. The repository gets safetensors weights with their heads and candidate table, the image processor
and tokenizer, the code files that `trust_remote_code=True` runs, and README.md: the card, filled from MODEL's
`training_args.json` and the `--metrics` files of `eval/benchmark.py`. `--space SPACE_ID` also publishes the Gradio
demo of `model_card/space/` as that Space, serving REPO_ID, and the card links to it. `--dry_run DIR` writes exactly
that folder to DIR (and the Space's to DIR-space) and uploads nothing. MODEL itself is only read, never written.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from card import base_model_of, build_model_card, hub_repo_id, read_benchmark_result, read_training_args
from huggingface_hub import HfApi, ModelCard, SpaceCard
from transformers import AutoConfig
from transformers.utils import logging

from modeling_streetclip import StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.pipeline_geolocation import save_shareable_folder


logger = logging.get_logger(__name__)

# The Gradio demo: its app and requirements are published as they are, its README with the model filled in.
SPACE_DIR = Path(__file__).with_name("space")
SPACE_FILES = ("app.py", "requirements.txt")


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
        "--dry_run",
        type=Path,
        metavar="DIR",
        help="Write the repository folder here (and with --space, the Space's to DIR-space); upload nothing.",
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
    if args.dry_run is not None:
        folders = [args.dry_run] + ([space_dry_run(args.dry_run)] if args.space else [])
        for folder in folders:
            if folder.exists() and any(folder.iterdir()):
                parser.error(f"--dry_run writes {str(folder)!r}, which is not empty; name a new or empty folder.")
    return args


def space_dry_run(dry_run: Path) -> Path:
    """Where `--dry_run DIR` writes the Space's folder: beside DIR, never inside it (that would upload it with the
    model)."""
    return dry_run.with_name(f"{dry_run.name}-space")


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
    model: StreetCLIPForGeolocation, processor: StreetCLIPProcessor, folder: Path, card: ModelCard
) -> None:
    """Write everything the repository holds into `folder`: the folder `GeolocationPipeline.save_pretrained` writes
    (weights, config, processor and the code for `trust_remote_code=True`), and the card."""
    save_shareable_folder(model, processor, folder)
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
    card = SpaceCard.load(SPACE_DIR / "README.md")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchmarks = [read_benchmark_result(path, name) for name, path in map(split_metrics_argument, args.metrics)]

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
    )

    if args.dry_run is not None:
        args.dry_run.mkdir(parents=True, exist_ok=True)
        write_repo_folder(model, processor, args.dry_run, card)
        print(f"Wrote the repository folder for {args.repo_id} to {args.dry_run}; nothing was uploaded.")
        if args.space is not None:
            write_space_folder(space_dry_run(args.dry_run), args.repo_id)
            print(f"Wrote the Space folder for {args.space} to {space_dry_run(args.dry_run)}; nothing was uploaded.")
        return 0

    with tempfile.TemporaryDirectory(prefix="streetclip-publish-") as staging:
        write_repo_folder(model, processor, Path(staging), card)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
