"""Continue CLIP's contrastive pretraining on geo-tagged images with synthetic place captions (StreetCLIP).

    accelerate launch training/pretrain.py --model_name_or_path openai/clip-vit-large-patch14-336 \\
        --train_data path/to/imagefolder --output_dir streetclip-run --max_steps 10000

or `accelerate launch training/pretrain.py config.yaml` (training/README.md); the output folder loads in
`pipeline("geolocation", model=output_dir)`.
"""

import json
import logging
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler

from modeling_streetclip import CandidatePrompts, StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.app.files import atomic_write, file_in_the_way, write_json
from modeling_streetclip.gallery_store import names_a_missing_folder


try:
    import evaluate
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, load, set_seed
    from accelerate.utils.constants import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_WEIGHTS_NAME, SCHEDULER_NAME
    from arguments import DataArguments, ModelArguments, TrainingArguments
    from contrastive import ContrastiveTowers, at_least_one_row, contrastive_loss, gather_across_processes
    from data import PLACE_FIELDS, GeoCollator, PlaceCaptioner, caption_dataset, load_geo_dataset
    from peft import LoraConfig, get_peft_model
except ModuleNotFoundError as error:
    # `pip install streetclip` installs inference only; training needs the packages of the [train] extra.
    if (error.name or "").partition(".")[0] not in ("accelerate", "datasets", "evaluate", "peft", "scipy"):
        raise
    message = (
        f"training/pretrain.py needs the [train] extra, which installs {error.name}: "
        'pip install "streetclip[train]" (in a checkout: pip install -e ".[train]").'
    )
    if __name__ == "__main__":
        sys.exit(message)
    raise ModuleNotFoundError(message, name=error.name) from error


logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
GEODESIC_METRIC = REPO_ROOT / "eval" / "geodesic_accuracy"
PUBLISH_SCRIPT = REPO_ROOT / "model_card" / "publish.py"
# Accelerate's automatic checkpoint naming, with the iteration set to the step.
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
# The script's counters, written into a checkpoint once every process has saved: they mark it complete.
RUN_STATE_NAME = "run_state.json"
CHECKPOINT_FILES = (f"{OPTIMIZER_NAME}.bin", f"{SCHEDULER_NAME}.bin", RUN_STATE_NAME)
# A failed write: OSError, RuntimeError from torch.save (a full disk reads "basic_ios::clear") or SafetensorError.
CHECKPOINT_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
CHECKPOINT_READ_ERRORS = (*CHECKPOINT_WRITE_ERRORS, EOFError, KeyError, ValueError, pickle.UnpicklingError)
RANDOM_STATE_KEYS = frozenset({"random_state", "numpy_random_seed", "torch_manual_seed"})


class ConfigFileParser(HfArgumentParser):
    """Raises argparse's complaints about a config file's options, for `main` to print in one line naming the file."""

    def error(self, message: str):
        raise ValueError(message)


def config_file_options(path: str) -> list[str]:
    """The options of a YAML or JSON file as command-line arguments (a list gives several values; null, the default),
    so that argparse checks their names, types and presence as it does on the command line."""
    try:
        with open(path, encoding="utf-8") as file:
            config = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    except OSError as error:
        raise type(error)(f"cannot read {path!r}: {error.strerror or error}.") from None
    except yaml.YAMLError as error:  # its message spans lines and repeats the path
        mark = getattr(error, "problem_mark", None)
        where = f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(error)
        raise ValueError(f"not valid YAML: {' '.join(where.split())}") from None
    if not isinstance(config, dict):
        raise ValueError(f"holds a {type(config).__name__}, not option names with their values")
    options = []
    for name, value in config.items():
        if value is not None:
            options += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return options


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Arguments from the command line, or from a single YAML or JSON file holding the same names."""
    dataclass_types = (ModelArguments, DataArguments, TrainingArguments)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        try:
            options = config_file_options(argv[0])
            model_args, data_args, training_args = ConfigFileParser(dataclass_types).parse_args_into_dataclasses(
                args=options
            )
        except ValueError as error:
            raise ValueError(f"{argv[0]}: {error}") from None
    else:
        model_args, data_args, training_args = HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args=argv)
    if data_args.streaming and training_args.max_steps is None:
        raise ValueError("A streamed data set has no length to count epochs in: give --max_steps with --streaming.")
    return model_args, data_args, training_args


def check_paths(model_args: ModelArguments, data_args: DataArguments, output_dir: Path) -> None:
    """Refuse, before anything loads, a model or data path with nothing there (a Hub id is left to the loaders, which
    read it the same way) and an --output_dir that is, or lies in, a file."""
    sources = {"model_name_or_path": model_args.model_name_or_path, "train_data": data_args.train_data}
    for option, source in {**sources, "eval_data": data_args.eval_data}.items():
        if source is not None and names_a_missing_folder(source):
            raise FileNotFoundError(
                f"--{option} {source!r}: nothing is at that path, and it is not a Hub id (ORG/NAME)."
            )
    if (blocker := file_in_the_way(output_dir)) is not None:
        raise NotADirectoryError(f"--output_dir {str(output_dir)!r}: {str(blocker)!r} is a file, not a folder.")


def set_trainable_parameters(model: StreetCLIPForGeolocation, args: ModelArguments) -> nn.Module:
    """Choose what trains: everything, one tower, or LoRA adapters (then returns the peft model). The probe heads
    never train: they are rebuilt from the text tower for evaluation and saving."""
    model.requires_grad_(not args.use_lora)
    frozen = [model.country_head, model.city_head]
    if args.freeze_text_tower:
        frozen += [model.text_model, model.text_projection]
    if args.freeze_vision_tower:
        frozen += [model.vision_model, model.visual_projection]
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)
    model.logit_scale.requires_grad_(args.train_logit_scale)
    if args.use_lora:
        with warnings.catch_warnings():
            # peft reads `is_gradient_checkpointing`, which transformers 5 renamed `is_activation_checkpointing`.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            lora = {"lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
            model = get_peft_model(model, LoraConfig(r=args.lora_r, target_modules=args.lora_target_modules, **lora))
        model.get_base_model().logit_scale.requires_grad_(args.train_logit_scale)  # peft froze it
    return model


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints, oldest first: one that a kill or a full disk cut short lacks its run state."""
    paths = [path for path in checkpoints_dir.glob("checkpoint_*") if CHECKPOINT_PATTERN.match(path.name)]
    complete = [path for path in paths if all((path / name).is_file() for name in CHECKPOINT_FILES)]
    return sorted(complete, key=lambda path: int(path.name.removeprefix("checkpoint_")))


def resume_candidates(resume_from_checkpoint: str | None, checkpoints_dir: Path) -> list[Path]:
    """The checkpoints to try, in order, checked before anything loads: `latest` gives every complete one, newest
    first (a damaged one falls back to the one before); a folder gives itself alone."""
    if resume_from_checkpoint is None:
        return []
    if resume_from_checkpoint == "latest":
        return complete_checkpoints(checkpoints_dir)[::-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint folder not found: {str(path)!r}.")
    if (path / "checkpoints").is_dir():
        saved = complete_checkpoints(path / "checkpoints")
        example = f"e.g. {str(saved[-1])!r}" if saved else "it holds none yet"
        raise ValueError(
            f"--resume_from_checkpoint {str(path)!r} is a training output folder, not a checkpoint: give one of the "
            f"checkpoints in its checkpoints/ folder ({example}), or `--resume_from_checkpoint latest --output_dir "
            f"{path}`."
        )
    if CHECKPOINT_PATTERN.match(path.name) is None:
        raise ValueError(f"Checkpoint folder {str(path)!r} is not named checkpoint_<step>, as this script saves them.")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"--resume_from_checkpoint {str(path)!r} is not a checkpoint saved by this script: it has no "
            f"{' or '.join(missing)}."
        )
    return [path]


def resume_from(accelerator: Accelerator, candidates: list[Path], model: nn.Module) -> tuple[Path, dict]:
    """Load the first of `candidates` that loads into the prepared `model`, optimiser and scheduler, warning for each
    damaged one passed over; returns it and its run state. A damaged last candidate stops the run, and so does a
    checkpoint of a model of another size (its older siblings would not fit either)."""
    for position, checkpoint in enumerate(candidates):
        if (mismatch := shape_mismatch(checkpoint, model)) is not None:
            raise ValueError(
                f"Cannot resume from checkpoint {str(checkpoint)!r}: it holds the weights of a model of another size "
                f"({mismatch}); its files are intact. Resume with the model and the settings it was trained with "
                "(--model_name_or_path, --countries, --cities_per_country, --use_lora and --lora_*), or train this "
                "model in another --output_dir."
            )
        try:
            run_state = json.loads((checkpoint / RUN_STATE_NAME).read_text(encoding="utf-8"))
            accelerator.load_state(str(checkpoint))
        except CHECKPOINT_READ_ERRORS as error:
            problem = f"{type(error).__name__}: {error}"
            if position + 1 == len(candidates):
                newer = "; the newer ones cannot be loaded either" if position else ""
                raise ValueError(
                    f"Cannot resume from checkpoint {str(checkpoint)!r}: a file in it is damaged or truncated "
                    f"({problem}){newer}."
                ) from error
            logger.warning(
                f"Checkpoint {checkpoint} cannot be loaded ({problem}); falling back to the previous complete one, "
                f"{candidates[position + 1]}."
            )
            continue
        warn_if_random_states_unreadable(checkpoint / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl")
        return checkpoint, run_state


def shape_mismatch(checkpoint: Path, model: nn.Module) -> str | None:
    """A parameter whose shape in `checkpoint`'s weights header differs from `model`'s, described; None if all fit or
    the header cannot be read (the load then reports the file as damaged)."""
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    try:
        with safe_open(checkpoint / SAFE_WEIGHTS_NAME, framework="pt") as saved:
            saved_shapes = {name: saved.get_slice(name).get_shape() for name in saved.keys()}
    except (OSError, SafetensorError):
        return None
    for name, shape in saved_shapes.items():
        if name in shapes and shape != shapes[name]:
            return (
                f"its parameter {name!r} has shape {shape} in {SAFE_WEIGHTS_NAME}, and {shapes[name]} in the model of "
                "this run"
            )
    return None


def warn_if_random_states_unreadable(path: Path) -> None:
    """accelerate skips random states it cannot read with an INFO line; the draws then differ from an uninterrupted
    run's, which deserves a warning. Its own loader tells whether its restore failed."""
    try:
        missing = RANDOM_STATE_KEYS - set(load(path))
        problem = f"it lacks {sorted(missing)}" if missing else None
    except (*CHECKPOINT_READ_ERRORS, TypeError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        logger.warning(
            f"The random states in {path} cannot be restored ({problem}); the run goes on with fresh ones, so its "
            "random draws differ from those of an uninterrupted run.",
            main_process_only=False,
        )


def follow_schedule(lr_scheduler: LRScheduler, learning_rate: float, step: int) -> None:
    """Put a restored scheduler at `step` of this run's schedule, peaking at `learning_rate`: `LambdaLR` does not save
    transformers' schedule closures, so a resumed run with a larger --max_steps would keep the shorter one's end."""
    state = lr_scheduler.state_dict()
    state.update(base_lrs=[learning_rate] * len(state["base_lrs"]), last_epoch=step - 1)
    lr_scheduler.load_state_dict(state)
    lr_scheduler.step()  # sets every parameter group's rate for `step`


def drop_records_after(log_path: Path, step: int) -> None:
    """Keep only the records of steps up to `step` in a JSON-lines log that a resumed run is about to extend."""
    if not log_path.is_file():
        return
    kept = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill mid-write
    with atomic_write(log_path) as rewritten:
        rewritten.write_text("".join(kept), encoding="utf-8")


def save_checkpoint(accelerator: Accelerator, step: int, run_state: dict) -> bool:
    """`accelerator.save_state` into checkpoints/checkpoint_<step>, then `run_state`, which marks it complete; returns
    whether it saved. A failed write (a full disk) removes the folder; training goes on to the next checkpoint."""
    checkpoint = Path(accelerator.project_dir, "checkpoints", f"checkpoint_{step}")
    if accelerator.is_main_process and checkpoint.exists():
        shutil.rmtree(checkpoint)  # left incomplete by a kill, or stale after resuming from an older checkpoint
    accelerator.wait_for_everyone()
    accelerator.project_configuration.iteration = step  # accelerate names the folder after it
    error = None
    try:
        accelerator.save_state()
    except CHECKPOINT_WRITE_ERRORS as caught:
        error = caught
    # Every process learns whether any write failed, which also waits for all of them to finish theirs.
    failed = bool(accelerator.reduce(torch.tensor(int(error is not None), device=accelerator.device)).item())
    if accelerator.is_main_process and not failed:
        try:
            write_json(checkpoint / RUN_STATE_NAME, run_state)
            logger.info(f"Saved checkpoint {checkpoint}")
        except OSError as caught:
            error, failed = caught, True
    if error is not None:
        logger.error(
            f"Could not write checkpoint {checkpoint} ({write_failure(error, checkpoint.parent)}). The older "
            "checkpoints are intact, and training goes on to save at the next checkpoint step.",
            main_process_only=False,
        )
    if accelerator.is_main_process and failed:
        shutil.rmtree(checkpoint, ignore_errors=True)
    accelerator.wait_for_everyone()
    return not failed


def write_failure(error: Exception, folder: Path) -> str:
    """A failed write described, with the free space on the disk of `folder`."""
    return f"{type(error).__name__}: {error}; {shutil.disk_usage(folder).free / 2**20:.1f} MB are free on its disk"


def append_record(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as log_file:
        log_file.write(json.dumps(record) + "\n")


def log_metrics(accelerator: Accelerator, metrics: dict[str, float], step: int, output_dir: Path) -> None:
    """To the Accelerate trackers, and to output_dir/log_history.jsonl for scripts that read results back."""
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        append_record(output_dir / "log_history.jsonl", {"step": step, **metrics})


@torch.no_grad()
def evaluate_geolocation(
    accelerator: Accelerator,
    model: StreetCLIPForGeolocation,
    batches: DataLoader,
    prompts: CandidatePrompts,
    metric: evaluate.EvaluationModule,
) -> dict[str, float]:
    """Country accuracy and the geodesic metric on the held-out data, with heads rebuilt from the text tower."""
    model.eval()
    model.set_candidates(model.candidate_places, prompts)
    gathered = []
    for batch in tqdm(batches, desc="Evaluating", leave=False, disable=not accelerator.is_local_main_process):
        rows = len(batch["row_ids"])  # 0 when no image of the batch was readable; the gather still runs
        with accelerator.autocast():
            outputs = model(pixel_values=at_least_one_row(batch["pixel_values"]))
        predicted, predicted_country = outputs.predicted_coordinates[:rows], outputs.predicted_country[:rows]
        columns = (batch["row_ids"], predicted, batch["coordinates"], predicted_country, batch["country_rows"])
        gathered.append([values.cpu().numpy() for values in gather_across_processes(accelerator, *columns)])
    model.train()
    row_ids, predicted, true, predicted_country, true_country = map(np.concatenate, zip(*gathered, strict=True))
    # Accelerate repeats a few rows to even out the last batches across processes: count each row once.
    _, first = np.unique(row_ids, return_index=True)
    metrics = metric.compute(predictions=predicted[first].tolist(), references=true[first].tolist())
    metrics["country_accuracy"] = float(np.mean(predicted_country[first] == true_country[first]))
    return {f"eval/{key}": float(value) for key, value in metrics.items()}


def save_final_model(
    model: StreetCLIPForGeolocation, processor: StreetCLIPProcessor, run_record: dict[str, Any], output_dir: Path
) -> str | None:
    """Save `model`, `processor` and `run_record` (training_args.json, which the model card reads) into `output_dir`
    all or nothing, so that loaders never half-read a folder; returns None when saved, else what went wrong."""
    staged = output_dir / "final-model"
    try:
        with atomic_write(staged) as folder:
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
            (folder / "training_args.json").write_text(json.dumps(run_record, indent=2) + "\n", encoding="utf-8")
    except CHECKPOINT_WRITE_ERRORS as error:
        return write_failure(error, output_dir)
    for path in staged.iterdir():
        os.replace(path, output_dir / path.name)
    staged.rmdir()
    return None


def main(argv: list[str] | None = None) -> None:
    try:  # the options, checked before anything loads; a bad one ends in one line naming it, as argparse's errors do
        model_args, data_args, training_args = parse_args(argv)
        output_dir = Path(training_args.output_dir)
        checkpoints_to_try = resume_candidates(training_args.resume_from_checkpoint, output_dir / "checkpoints")
        countries = model_args.read_countries()
        check_paths(model_args, data_args, output_dir)
    except (OSError, ValueError) as error:
        print(f"pretrain.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    accelerator = Accelerator(
        gradient_accumulation_steps=training_args.gradient_accumulation_steps,
        mixed_precision=training_args.mixed_precision,
        log_with=None if training_args.report_to == "none" else training_args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir),
            logging_dir=str(output_dir / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=training_args.checkpoints_total_limit,
        ),
        # Every process draws the same permutation, so the data is sharded, never duplicated, and resumable. Each
        # reads its own batches: the main process cannot split batches whose size varies with unreadable images.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=training_args.seed, dispatch_batches=False
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)  # a line per file saved; the script logs one per checkpoint
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.mixed_precision == "fp16" and not accelerator.native_amp:
        logger.warning("fp16 mixed precision needs a GPU; on a CPU accelerate computes in float32 (bf16 runs there).")
    set_seed(training_args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Model: heads for the requested candidates; all text (prompts, captions) goes through the processor.
    settings = {"candidate_countries": countries, "cities_per_country": model_args.cities_per_country}
    processor = StreetCLIPProcessor.from_pretrained(model_args.model_name_or_path)
    model = StreetCLIPForGeolocation.from_pretrained(
        model_args.model_name_or_path, processor=processor, **{key: value for key, value in settings.items() if value}
    )
    places = model.candidate_places
    prompts = processor.candidate_prompts(places)  # tokenised once, encoded again at every evaluation
    if model_args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    towers = ContrastiveTowers(set_trainable_parameters(model, model_args))
    trainable_parameters = [parameter for parameter in towers.parameters() if parameter.requires_grad]
    trainable, total = (sum(p.numel() for p in group) for group in (trainable_parameters, towers.parameters()))
    logger.info(f"Training {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%).")

    # Data: captions and tokens once, in the main process first so that the others reuse its cache.
    captioner = PlaceCaptioner(
        data_args.caption_mix(processor.caption_template, training_args.seed),
        processor.tokenizer,
        max_length=model.config.text_config.max_position_embeddings,
        # The candidate list's spelling of each country, so that captions and the country prompts agree.
        country_names=dict(zip(places.country_codes, places.country_names, strict=True)),
        columns={field: getattr(data_args, f"{field}_column") for field in ("latitude", "longitude", *PLACE_FIELDS)},
    )

    def captioned(kind: str, streaming: bool, description: str):
        """The `kind` ("train" or "eval") data: --{kind}_data, --{kind}_split, --max_{kind}_samples."""
        data, split, limit = (
            getattr(data_args, name.format(kind)) for name in ("{}_data", "{}_split", "max_{}_samples")
        )
        dataset = load_geo_dataset(data, split, data_args.image_column, streaming)
        dataset = dataset if limit is None else dataset.take(limit)
        num_proc = data_args.preprocessing_num_workers
        return caption_dataset(dataset, captioner, data_args.image_column, num_proc, description)

    with accelerator.main_process_first():
        train_dataset = captioned("train", data_args.streaming, "training data")
        if data_args.eval_data is not None:
            eval_dataset = captioned("eval", False, "eval data")
    if data_args.streaming:
        train_dataset = train_dataset.shuffle(seed=training_args.seed, buffer_size=data_args.shuffle_buffer_size)
    collator = GeoCollator(
        processor.image_processor, processor.tokenizer, data_args.image_column, places.country_codes
    )
    workers = data_args.dataloader_num_workers
    train_dataloader = DataLoader(
        train_dataset,
        shuffle=not data_args.streaming,
        batch_size=training_args.per_device_train_batch_size,
        collate_fn=collator,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=training_args.dataloader_drop_last,
    )

    # AdamW without weight decay on gains, biases and the temperature (CLIP's choice).
    matrices = [p for p in trainable_parameters if p.ndim >= 2]
    others = [p for p in trainable_parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": training_args.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=training_args.learning_rate,
        betas=(training_args.adam_beta1, training_args.adam_beta2),
        eps=training_args.adam_epsilon,
    )
    towers, optimizer, train_dataloader = accelerator.prepare(towers, optimizer, train_dataloader)
    evaluate_now = None  # evaluates on --eval_data, if given
    if data_args.eval_data is not None:
        batch_size = training_args.per_device_eval_batch_size
        eval_dataloader = accelerator.prepare(
            DataLoader(eval_dataset, batch_size, collate_fn=collator, num_workers=workers)
        )
        metric = evaluate.load(str(GEODESIC_METRIC))
        evaluate_now = partial(evaluate_geolocation, accelerator, model, eval_dataloader, prompts, metric)
    if not data_args.streaming and len(train_dataloader) == 0:
        raise ValueError(
            f"--train_data {data_args.train_data!r} leaves {len(train_dataset)} usable rows, fewer than one batch of "
            f"--per_device_train_batch_size {training_args.per_device_train_batch_size} for each of "
            f"{accelerator.num_processes} process(es), and --dataloader_drop_last drops incomplete batches."
        )
    if data_args.streaming:
        max_steps, num_epochs, updates_per_epoch = training_args.max_steps, sys.maxsize, None
    else:
        updates_per_epoch = math.ceil(len(train_dataloader) / training_args.gradient_accumulation_steps)
        max_steps = training_args.max_steps or training_args.num_train_epochs * updates_per_epoch
        num_epochs = math.ceil(max_steps / updates_per_epoch)
    warmup_steps = training_args.warmup_steps or math.ceil(training_args.warmup_ratio * max_steps)
    # Warmup and training steps, scaled: Accelerate steps a prepared scheduler once per process and optimiser step.
    scale = accelerator.num_processes
    lr_scheduler = get_scheduler(training_args.lr_scheduler_type, optimizer, warmup_steps * scale, max_steps * scale)
    lr_scheduler = accelerator.prepare(lr_scheduler)
    hyperparameters = {**vars(model_args), **vars(data_args), **vars(training_args)}
    # Trackers take numbers and text, not lists.
    tracked = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hyperparameters.items()}
    accelerator.init_trackers("streetclip-pretrain", config=tracked)

    # Resume: the exact step, the data position within its epoch, and the logs and counts up to that step.
    global_step, first_epoch, skip_batches, run_state = 0, 0, 0, {}
    sample_log = output_dir / "sample_ids" / f"rank-{accelerator.process_index}.jsonl"
    if training_args.resume_from_checkpoint == "latest" and not checkpoints_to_try:
        logger.warning(f"No checkpoint in {output_dir / 'checkpoints'} to resume from; starting a new run.")
    if checkpoints_to_try:
        checkpoint, run_state = resume_from(accelerator, checkpoints_to_try, towers)
        global_step = int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))
        follow_schedule(lr_scheduler.scheduler, training_args.learning_rate, global_step * accelerator.num_processes)
        if run_state["max_steps"] != max_steps:
            logger.info(
                f"{checkpoint} was saved by a run of {run_state['max_steps']} steps; this run trains to {max_steps}: "
                f"the learning-rate schedule ({training_args.lr_scheduler_type}, warmup_steps={warmup_steps}) is "
                f"that of {max_steps} steps, at {lr_scheduler.get_last_lr()[0]:.3g} for step {global_step + 1}."
            )
        completed_batches = global_step * training_args.gradient_accumulation_steps
        # A streamed data set is one endless epoch.
        epoch_batches = sys.maxsize if data_args.streaming else len(train_dataloader)
        first_epoch, skip_batches = divmod(completed_batches, epoch_batches)
        if accelerator.is_main_process:
            drop_records_after(output_dir / "log_history.jsonl", global_step)
        drop_records_after(sample_log, global_step)
        accelerator.wait_for_everyone()
        logger.info(f"Resumed from {checkpoint} at step {global_step} (epoch {first_epoch}, batch {skip_batches}).")

    logger.info(
        f"Training for {max_steps} steps; contrastive batch {training_args.per_device_train_batch_size} per process x "
        f"{accelerator.num_processes}, {training_args.gradient_accumulation_steps} micro-batch(es) per step."
    )
    if evaluate_now is not None and training_args.eval_on_start and global_step == 0:
        log_metrics(accelerator, evaluate_now(), 0, output_dir)
    if training_args.record_sample_ids:
        sample_log.parent.mkdir(parents=True, exist_ok=True)

    progress = tqdm(total=max_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    towers.train()
    skipped_rows = torch.zeros((), dtype=torch.long, device=accelerator.device)
    # Micro-batches whose global batch held no readable image: the same count on every process.
    skipped_batches = run_state.get("skipped_batches", 0)
    # The current optimiser step's rows over all processes and micro-batches, and its micro-batch losses.
    step_rows, step_losses = 0, []

    def skipped_so_far() -> int:
        """Rows dropped by the collators of all processes since the start of the run (not of this resume)."""
        return run_state.get("skipped_rows", 0) + int(accelerator.reduce(skipped_rows, reduction="sum").item())

    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_steps:
            break
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in batches:
            skipped_rows += batch["skipped_rows"]
            if training_args.record_sample_ids:
                append_record(sample_log, {"step": global_step + 1, "row_ids": batch["row_ids"].tolist()})
            # Every process runs the same collectives whatever its batch holds (an empty one runs the towers on a
            # stand-in row), so that one process's unreadable images never leave the others waiting.
            with accelerator.accumulate(towers):
                image_embeds, text_embeds, logit_scale = towers(
                    batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
                )
                image_embeds, text_embeds, caption_keys = gather_across_processes(
                    accelerator, image_embeds, text_embeds, batch["caption_keys"]
                )
                loss = contrastive_loss(image_embeds, text_embeds, logit_scale, caption_keys)
                accelerator.backward(loss)
                step_rows += len(caption_keys)
                # A step without a readable image makes no update: AdamW's momentum and weight decay would still
                # move the weights on zero gradients.
                if step_rows:
                    if accelerator.sync_gradients and training_args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(towers.parameters(), training_args.max_grad_norm)
                    optimizer.step()
                learning_rate = lr_scheduler.get_last_lr()[0]  # the rate this step trains at, for the log
                lr_scheduler.step()
                optimizer.zero_grad()
            if len(caption_keys):
                step_losses.append(loss.detach().item())
            else:
                skipped_batches += 1
                logger.warning(
                    f"Step {global_step + 1}: no image of its batch could be read, on any process; the batch is "
                    "skipped (train/skipped_batches)."
                )
            if not accelerator.sync_gradients:
                continue
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(model_args.max_logit_scale))
            global_step += 1
            progress.update(1)
            metrics = {
                "train/learning_rate": learning_rate,
                "train/logit_scale": model.logit_scale.exp().item(),
                "train/epoch": epoch,
                "train/skipped_batches": skipped_batches,
            }
            if step_losses:  # a step whose every batch was skipped has no loss
                metrics["train/loss"] = sum(step_losses) / len(step_losses)
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            step_rows, step_losses = 0, []
            last = global_step == max_steps
            if global_step % training_args.logging_steps == 0 or last:
                log_metrics(accelerator, {**metrics, "train/skipped_rows": skipped_so_far()}, global_step, output_dir)
            if global_step % training_args.checkpointing_steps == 0:
                counts = {"skipped_rows": skipped_so_far(), "skipped_batches": skipped_batches}
                save_checkpoint(accelerator, global_step, {**counts, "max_steps": max_steps})
            if evaluate_now is not None and (global_step % training_args.eval_steps == 0 or last):
                log_metrics(accelerator, evaluate_now(), global_step, output_dir)
            if last:
                break
    progress.close()
    logger.info(
        f"Trained {global_step} steps; {skipped_so_far()} rows were dropped from their batches (train/skipped_rows) "
        f"and {skipped_batches} batches with no readable image were skipped (train/skipped_batches)."
    )

    # The final folder: merged weights, heads from the trained text tower, and the processor.
    accelerator.wait_for_everyone()
    # The DDP wrapper goes while the process group lives: a reducer that outlives the group destroys it holding the
    # GIL, which can deadlock against gloo's worker threads as the process exits.
    towers = accelerator.unwrap_model(towers)
    accelerator.free_memory()
    if accelerator.is_main_process:
        if model_args.use_lora:
            towers.clip.merge_and_unload()  # into `model`, the base of the peft model
        model.set_candidates(places, prompts)
        # What the model card's training section reports (model_card/card.py reads these names).
        run_record = {
            **hyperparameters,
            "max_steps": max_steps,
            "completed_steps": global_step,
            "updates_per_epoch": updates_per_epoch,  # for the card's epochs; None for a streamed data set
            "mixed_precision": accelerator.mixed_precision,  # whether from --mixed_precision or `accelerate config`
            "world_size": accelerator.num_processes,
            "global_batch_size": training_args.per_device_train_batch_size
            * accelerator.num_processes
            * training_args.gradient_accumulation_steps,
        }
        problem = save_final_model(model, processor, run_record, output_dir)
        if problem is not None:
            accelerator.end_training()
            latest = complete_checkpoints(output_dir / "checkpoints")
            sys.exit(
                f"Training finished ({global_step} steps), but the final model could not be saved to {output_dir} "
                f"({problem}); nothing half-written was left there. "
                + (
                    f"The latest checkpoint, {latest[-1]}, is intact: free some space and rerun the same command with "
                    "--resume_from_checkpoint latest, which trains from it to the end and saves."
                    if latest
                    else "No checkpoint was saved (--checkpointing_steps): free some space and train again."
                )
            )
        logger.info(f"Saved the StreetCLIP model to {output_dir}")
        if training_args.push_to_hub:
            # The repository model_card/publish.py makes: card, custom code and config for trust_remote_code.
            command = [sys.executable, str(PUBLISH_SCRIPT), str(output_dir), training_args.hub_model_id]
            if subprocess.run(command).returncode != 0:
                accelerator.end_training()
                sys.exit(
                    f"Training finished and {output_dir} is saved, but pushing it failed (see above). Retry with: "
                    f"python {PUBLISH_SCRIPT.relative_to(REPO_ROOT)} {output_dir} {training_args.hub_model_id}"
                )
            logger.info(f"Pushed {output_dir} to the Hub as {training_args.hub_model_id}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
