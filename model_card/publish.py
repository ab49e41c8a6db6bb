"""Publish a StreetCLIP model to the Hub as a repository that works for people who never install this package.

    python model_card/publish.py MODEL REPO_ID [--metrics [NAME=]FILE ...] [--license L] [--private]
        [--revision R] [--commit_message M] [--dry_run DIR]

MODEL is a folder saved by `StreetCLIPForGeolocation` (such as the output of `training/pretrain.py`) or a plain CLIP
checkpoint, a folder or a Hub id such as `geolocal/StreetCLIP`, which is converted: probe heads are built for the
paper's candidates. The repository gets safetensors weights with their heads and candidate table, the image processor
and tokenizer, the code files that `trust_remote_code=True` runs, and README.md: the card, filled from MODEL's
`training_args.json` and the `--metrics` files of `eval/benchmark.py`. `--dry_run DIR` writes exactly that folder to
DIR and uploads nothing. MODEL itself is only read, never written.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from card import base_model_of, build_model_card, hub_repo_id, read_benchmark_result, read_training_args
from huggingface_hub import HfApi, ModelCard
from transformers import AutoConfig
from transformers.utils import logging

from modeling_streetclip import StreetCLIPConfig, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.pipeline_geolocation import save_shareable_folder


logger = logging.get_logger(__name__)


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
        "--dry_run", type=Path, metavar="DIR", help="Write the repository folder here; upload nothing."
    )
    args = parser.parse_args(argv)
    if hub_repo_id(args.repo_id) is None:
        parser.error(f"REPO_ID must be a Hub repository id NAMESPACE/NAME, got {args.repo_id!r}.")
    if args.dry_run is not None and args.dry_run.exists() and any(args.dry_run.iterdir()):
        parser.error(f"--dry_run {str(args.dry_run)!r} is not empty; name a new or empty folder.")
    return args


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
    )

    if args.dry_run is not None:
        args.dry_run.mkdir(parents=True, exist_ok=True)
        write_repo_folder(model, processor, args.dry_run, card)
        print(f"Wrote the repository folder for {args.repo_id} to {args.dry_run}; nothing was uploaded.")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
