"""`streetclip calibrate --model M --data DATA --output DIR`: a copy of the model whose `within_km` is calibrated (the
fit and its measurement are `app.calibration`)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..app import EXIT_OK, UsageError
from ..app.arguments import add_verbose_argument, int_at_least


REPORT_FILE = "calibration.json"


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add the `calibrate` subcommand to the `streetclip` parser."""
    calibrate = commands.add_parser(
        "calibrate",
        help="fit the temperatures that make within_km's confidences honest, on labelled photos",
        description=(
            "Fit one temperature per level (country, region, city) by the negative log-likelihood of the candidate "
            "city nearest each photo's true place, then a monotone map per radius (isotonic regression) of within_km "
            "to the share of photos within it, on all but a held-out share of DATA; print the expected "
            "calibration error (ECE, 10 equal-mass bins) and Brier score of within_km at each radius on the held-out "
            f"photos, before and after; and write DIR: the model with the temperatures in config.json "
            f"(`calibration`), its processor, and {REPORT_FILE}. DATA is read as eval/benchmark.py reads it."
        ),
        epilog="Exit status: 0 when DIR was written; 2 on usage errors (unreadable or invalid data, too few photos).",
    )
    calibrate.add_argument("--model", required=True, help="Hub repo or local folder, as for `streetclip locate`")
    calibrate.add_argument(
        "--data", required=True, help="a metadata CSV (with --image_dir), an image folder or a datasets id or folder"
    )
    calibrate.add_argument("--image_dir", type=Path, help="folder of the images a metadata CSV names (CSV only)")
    calibrate.add_argument("--split", default="test", help="dataset split to read (default: %(default)s)")
    calibrate.add_argument("--output", required=True, type=Path, metavar="DIR", help="the model folder to write")
    calibrate.add_argument(
        "--holdout",
        type=float,
        default=0.3,
        help="share of photos kept out of the fit, to measure on (default: %(default)s)",
    )
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (default: %(default)s)")
    calibrate.add_argument("--batch_size", type=int_at_least(1), default=32, help="photos per forward pass")
    calibrate.add_argument(
        "--overwrite", action="store_true", help="write into a DIR that holds other files (another model, say)"
    )
    add_verbose_argument(calibrate)
    calibrate.set_defaults(run=calibrate_command)


def calibrate_command(args: argparse.Namespace) -> int:
    """Run `streetclip calibrate`."""
    if not 0 < args.holdout < 1:
        raise UsageError(f"--holdout must be a share strictly between 0 and 1, got {args.holdout}.")
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {str(args.output)!r} is a file; name a folder for the calibrated model.")
    in_place = os.path.isdir(args.model) and args.output.is_dir() and args.output.samefile(args.model)
    if not (args.overwrite or in_place) and args.output.is_dir() and (held := sorted(args.output.iterdir())):
        raise UsageError(
            f"--output {str(args.output)!r} already holds {', '.join(path.name for path in held[:3])}"
            f"{', ...' if len(held) > 3 else ''}; pass --overwrite to write the calibrated model there, or name a "
            "new folder."
        )
    from ..app.benchmark_data import load_benchmark
    from ..app.calibration import calibrate
    from ..app.loading import load_model

    try:
        benchmark = load_benchmark(args.data, image_dir=args.image_dir, split=args.split)
    except (OSError, ValueError, ImportError) as error:
        raise UsageError(str(error)) from None
    # With its text tower and in its own dtype, so that DIR is as complete as the model it copies.
    model, processor = load_model(args.model, "cpu", "auto", None, vision_only=False)
    report = calibrate(model, processor.image_processor, benchmark, args.holdout, args.seed, args.batch_size)
    try:
        model.save_pretrained(args.output)
        processor.save_pretrained(args.output)
        (args.output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot write --output {str(args.output)!r}: {error}") from None
    temperatures = ", ".join(f"{level} {value:.3f}" for level, value in report["temperatures"].items())
    print(f"temperatures: {temperatures} (fitted on {report['num_fitted']} photos)")
    print(f"held out: {report['num_held_out']} photos; ECE and Brier before, with the temperatures only, and after")
    print("radius_km\tECE before\tECE temps\tECE after\tBrier before\tBrier temps\tBrier after")
    stages = [report[f"held_out_{stage}"] for stage in ("before", "temperatures_only", "after")]
    for radius in stages[0]["ece"]:
        print(radius + "".join(f"\t{errors[name][radius]:.4f}" for name in ("ece", "brier") for errors in stages))
    print(f"calibrated model and {REPORT_FILE} in {args.output}")
    return EXIT_OK
