"""`training/pretrain.py` and its modules: the script learns, resumes exactly, shards across processes, trains only
what its mode allows, and skips bad rows instead of crashing.

The end-to-end checks run the script as users do, in subprocesses (a few seconds of start-up each), on a tiny CLIP
and a small generated image folder whose colours depend on the country and stripes on the city. Runs that several
tests only read are made once per session (`shared_run`).
"""

import csv
import errno
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from subprocess import PIPE

import card as model_card
import datasets
import numpy as np
import pytest
import torch
import transformers.modeling_utils
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration
from arguments import LR_SCHEDULERS, DataArguments, ModelArguments
from builders import pretrain_args, run_pretrain_here
from contrastive import ContrastiveTowers, contrastive_loss, gather_across_processes
from data import GeoCollator, PlaceCaptioner, caption_dataset, caption_key, load_geo_dataset
from filelock import FileLock
from PIL import Image
from pretrain import (
    RUN_STATE_NAME,
    complete_checkpoints,
    drop_records_after,
    follow_schedule,
    parse_args,
    resume_candidates,
    resume_from,
    save_checkpoint,
    save_final_model,
    set_trainable_parameters,
)
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoTokenizer, SchedulerType, get_scheduler, pipeline

import modeling_streetclip
from modeling_streetclip import StreetCLIPForGeolocation, StreetCLIPProcessor
from modeling_streetclip.captions import CaptionMix
from modeling_streetclip.testing_utils import PLACES, place_photo, save_streetclip_folder


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_DIR = REPO_ROOT / "training"


PAPER_TEMPLATE = modeling_streetclip.StreetCLIPConfig().caption_template
COUNTRY_TEMPLATE = "A Street View photo in {country}."
IMAGE_SIZE = 30
TWO_PROCESSES = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
# One process, 6 batches of 16 per epoch: 8 steps cross an epoch, checkpoints at 3 and 6. Seed 0 draws the unreadable
# broken.png into step 2, before the first checkpoint.
REFERENCE_RUN = {"max_steps": 8, "checkpointing_steps": 3, "per_device_train_batch_size": 16, "seed": 0}
LORA_RUN = {
    "max_steps": 4,
    "checkpointing_steps": 2,
    "use_lora": True,
    "lora_dropout": 0.0,
    "gradient_checkpointing": True,
    "gradient_accumulation_steps": 2,
    "train_logit_scale": False,
}


def script_env(geo_data, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_DATASETS_CACHE": str(geo_data["cache"]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def run_pretrain(
    args: list[str],
    geo_data,
    launcher: tuple[str, ...] | None = None,
    succeeds: bool = True,
    **extra_env: str,
) -> subprocess.CompletedProcess:
    """Run training/pretrain.py as users do, by `launcher` (by default `main(args)` in this process, as one process
    runs it); unless told it should fail, check that it succeeded."""
    if launcher is None:
        result = run_pretrain_here(args, geo_data["cache"], **extra_env)
    else:
        command = [*launcher, str(TRAINING_DIR / "pretrain.py"), *args]
        env = script_env(geo_data, **extra_env)
        # A session of its own, so that a hung run's workers die with their launcher.
        with subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=PIPE, stderr=PIPE, text=True, start_new_session=True
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                pytest.fail(f"pretrain.py ran past 300 s; its log so far:\n{process.communicate()[1][-5000:]}")
        result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if succeeds:
        assert result.returncode == 0, f"pretrain.py failed:\n{result.stderr[-5000:]}"
    else:
        assert result.returncode != 0, "pretrain.py succeeded where it should have failed"
    return result


@pytest.fixture(scope="session")
def shared_run(tiny_clip_dir, geo_data, tmp_path_factory):
    """`shared_run(name, succeeds=True, **options)`: the output folder and stderr of one run of the script, made once
    per session, by whichever pytest-xdist worker asks first (the others wait for it). Tests must not change it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, which every worker shares

    def run(name: str, succeeds: bool = True, **options) -> tuple[Path, str]:
        output_dir = root / f"shared-run-{name}"
        stderr = root / f"shared-run-{name}.stderr"
        with FileLock(f"{output_dir}.lock"):
            if not stderr.exists():
                args = pretrain_args(tiny_clip_dir, geo_data, output_dir, record_sample_ids=True, **options)
                stderr.write_text(run_pretrain(args, geo_data, succeeds=succeeds).stderr, encoding="utf-8")
        return output_dir, stderr.read_text(encoding="utf-8")

    return run


def write_unreadable_rows(folder: Path) -> Path:
    """Two rows whose images cannot be read, a text file named .jpg and a truncated JPEG, added to `folder`'s
    metadata.csv (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.jpg").write_text("not a photo\n", encoding="utf-8")
    encoded = io.BytesIO()
    place_photo(1, 0, np.random.default_rng(0)).save(encoded, format="JPEG")
    (folder / "cut.jpg").write_bytes(encoded.getvalue()[:200])
    metadata = folder / "metadata.csv"
    rows = metadata.read_text(encoding="utf-8") if metadata.exists() else "file_name,latitude,longitude\n"
    metadata.write_text(rows + "notes.jpg,48.8566,2.3522\ncut.jpg,35.6762,139.6503\n", encoding="utf-8")
    return folder


def schedule_rates(max_steps: int, learning_rate: float, warmup_steps: int) -> list[float]:
    """The rate each step of a run trains at under the script's default cosine schedule, step 1 first."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)
    rates = []
    for _ in range(max_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {entry["step"]: entry["train/loss"] for entry in read_log(output_dir) if "train/loss" in entry}


def sample_ids_by_step(output_dir: Path, rank: int = 0) -> dict[int, list[int]]:
    """Row ids of each step's batch on one process, which records every step once, resumed or not."""
    records = [
        json.loads(line) for line in (output_dir / "sample_ids" / f"rank-{rank}.jsonl").read_text().splitlines()
    ]
    steps = [record["step"] for record in records]
    assert len(steps) == len(set(steps)), f"steps recorded twice: {steps}"
    return {record["step"]: record["row_ids"] for record in records}


def logged_steps(output_dir: Path, key: str = "train/loss") -> list[int]:
    """The steps of log_history.jsonl that carry `key`, in file order (a resumed run must not repeat any)."""
    return [entry["step"] for entry in read_log(output_dir) if key in entry]


def country_accuracy(model_dir: Path, folder: Path) -> float:
    """Share of the folder's photos whose first answer from the geolocation pipeline is the right country."""
    with open(folder / "metadata.csv", encoding="utf-8") as metadata:
        names = [row["file_name"] for row in csv.DictReader(metadata)]
    geolocate = pipeline("geolocation", model=str(model_dir))
    answers = geolocate([str(folder / name) for name in names])
    return float(
        np.mean([answer[0]["country"] == name.split("-")[0] for answer, name in zip(answers, names, strict=True)])
    )


def answers_a_country(model_dir: Path, geo_data) -> bool:
    """Whether the saved folder loads in the geolocation pipeline and answers one of the candidate countries."""
    answer = pipeline("geolocation", model=str(model_dir))(str(geo_data["eval"] / "Japan-0-0.png"))[0]
    return answer["country"] in PLACES


@pytest.mark.slow
def test_short_cpu_run_raises_held_out_country_accuracy_from_chance_to_at_least_0_8(
    tiny_clip_dir, geo_data, tmp_path, trained_geo_run
):
    """The slowest check here (about half a minute): `trained_geo_run`'s 40 steps of the tiny model, which the tests
    of other files use as a trained model."""
    before_dir = save_streetclip_folder(
        tiny_clip_dir, tmp_path / "before", candidate_countries=list(PLACES), cities_per_country=2
    )
    before = country_accuracy(before_dir, geo_data["eval"])
    output_dir, stderr = trained_geo_run
    after = country_accuracy(output_dir, geo_data["eval"])
    evaluations = [entry for entry in read_log(output_dir) if "eval/country_accuracy" in entry]
    print(f"held-out country accuracy: before {before:.3f} (chance {1 / len(PLACES):.3f}), after {after:.3f}")
    print("in-run evaluations:", [(entry["step"], round(entry["eval/country_accuracy"], 3)) for entry in evaluations])
    assert before <= 0.4
    assert after >= 0.8
    assert [entry["step"] for entry in evaluations] == [0, 20, 40]
    assert evaluations[-1]["eval/acc_2500km"] >= 0.8 and evaluations[-1]["eval/n"] == 3 * 2 * len(PLACES)
    assert "Skipping 2 of 99 rows of the training data: 1 with missing coordinates, 1 with latitude out of range" in (
        stderr
    )
    assert "broken.png' is not an image format Pillow can read" in stderr
    assert [entry for entry in read_log(output_dir) if "train/loss" in entry][-1]["train/skipped_rows"] >= 1
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))
    recorded = json.loads((output_dir / "training_args.json").read_text())
    assert recorded["completed_steps"] == recorded["max_steps"] == 40
    assert recorded["world_size"] == 1 and recorded["global_batch_size"] == recorded["per_device_train_batch_size"]


@pytest.mark.slow
def test_a_checkpoint_save_logs_one_line(shared_run):
    reference_dir, stderr = shared_run("reference", **REFERENCE_RUN)
    checkpoints = reference_dir / "checkpoints"
    assert complete_checkpoints(checkpoints) == [checkpoints / "checkpoint_3", checkpoints / "checkpoint_6"]
    # Not accelerate's line per file saved.
    lines = [line for line in stderr.splitlines() if str(checkpoints) in line]
    assert len(lines) == 2 and all("Saved checkpoint" in line for line in lines), lines


@pytest.mark.slow
def test_killed_run_resumes_at_its_step_and_continues_the_data_order(shared_run, tiny_clip_dir, geo_data, tmp_path):
    reference_dir, _ = shared_run("reference", **REFERENCE_RUN)
    resumed_dir = tmp_path / "resumed"
    args = pretrain_args(tiny_clip_dir, geo_data, resumed_dir, record_sample_ids=True, **REFERENCE_RUN)
    killed = subprocess.Popen(
        [sys.executable, str(TRAINING_DIR / "pretrain.py"), *args],
        env=script_env(geo_data),
        cwd=REPO_ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    for line in killed.stderr:
        if "Saved checkpoint" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed after its first checkpoint"
    checkpoint = complete_checkpoints(resumed_dir / "checkpoints")[-1]
    killed_at = max(sample_ids_by_step(resumed_dir))
    assert killed_at < 8
    print(f"killed after step {killed_at}; resuming from {checkpoint.name}")

    result = run_pretrain([*args, "--resume_from_checkpoint", "latest"], geo_data)
    assert f"Resumed from {checkpoint} at step {checkpoint.name.split('_')[1]}" in result.stderr
    reference_losses, resumed_losses = train_losses(reference_dir), train_losses(resumed_dir)
    assert logged_steps(resumed_dir) == list(range(1, 9))
    # Every step, before and after the kill and across the epoch, drew the same rows as the uninterrupted run.
    assert sample_ids_by_step(resumed_dir) == sample_ids_by_step(reference_dir)
    assert resumed_losses[8] == pytest.approx(reference_losses[8], rel=1e-4)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_and_the_resumed_log_and_counts_carry_on(
    shared_run, tiny_clip_dir, geo_data, tmp_path
):
    """The latest checkpoint truncated and the previous one's random states corrupt: the run resumes from the previous
    one and says both; log_history.jsonl then holds each step once, and train/skipped_rows counts on from the
    checkpoint instead of restarting at 0."""
    reference_dir, _ = shared_run("reference", **REFERENCE_RUN)
    output_dir = tmp_path / "run"
    shutil.copytree(reference_dir, output_dir)
    checkpoints = output_dir / "checkpoints"
    assert json.loads((checkpoints / "checkpoint_3" / RUN_STATE_NAME).read_text()) == {
        "skipped_rows": 1,
        "skipped_batches": 0,
        "max_steps": 8,
    }
    truncate(checkpoints / "checkpoint_6" / "optimizer.bin")
    (checkpoints / "checkpoint_3" / "random_states_0.pkl").write_bytes(b"not a pickle")

    args = pretrain_args(tiny_clip_dir, geo_data, output_dir, record_sample_ids=True, **REFERENCE_RUN)
    result = run_pretrain([*args, "--resume_from_checkpoint", "latest"], geo_data)
    assert f"Checkpoint {checkpoints / 'checkpoint_6'} cannot be loaded (" in result.stderr
    assert f"falling back to the previous complete one, {checkpoints / 'checkpoint_3'}." in result.stderr
    assert f"The random states in {checkpoints / 'checkpoint_3' / 'random_states_0.pkl'} cannot be restored" in (
        result.stderr
    )
    assert f"Resumed from {checkpoints / 'checkpoint_3'} at step 3" in result.stderr
    assert logged_steps(output_dir) == list(range(1, 9))
    assert sorted(sample_ids_by_step(output_dir)) == list(range(1, 9))
    # The damaged checkpoint of step 6 was replaced by the resumed run's.
    assert complete_checkpoints(checkpoints) == [checkpoints / "checkpoint_3", checkpoints / "checkpoint_6"]

    def skipped_rows(log):
        return {entry["step"]: entry["train/skipped_rows"] for entry in log if "train/loss" in entry}

    assert skipped_rows(read_log(output_dir)) == skipped_rows(read_log(reference_dir))


@pytest.mark.slow
def test_two_processes_shard_the_data_and_match_the_one_process_loss(shared_run, tiny_clip_dir, geo_data, tmp_path):
    """Two gloo processes with 8 images each against one process with 16: the same global batches and losses, and
    checkpoints saved by both."""
    single_dir, _ = shared_run("reference", **REFERENCE_RUN)
    double_dir = tmp_path / "two-processes"
    options = {**REFERENCE_RUN, "per_device_train_batch_size": 8, "record_sample_ids": True}
    run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, double_dir, **options),
        geo_data,
        launcher=TWO_PROCESSES,
        ACCELERATE_USE_CPU="1",
    )
    single, rank0, rank1 = (
        sample_ids_by_step(single_dir),
        sample_ids_by_step(double_dir, 0),
        sample_ids_by_step(double_dir, 1),
    )
    for step in range(1, 9):
        assert not set(rank0[step]) & set(rank1[step]), "both processes got the same rows"
        assert rank0[step] + rank1[step] == single[step]
    single_losses, double_losses = train_losses(single_dir), train_losses(double_dir)
    print("loss per step, one process:", single_losses)
    print("loss per step, two processes:", double_losses)
    assert list(double_losses) == list(range(1, 9))
    for step, loss in single_losses.items():
        assert double_losses[step] == pytest.approx(loss, abs=1e-4)
    checkpoint = double_dir / "checkpoints" / "checkpoint_6"
    assert complete_checkpoints(double_dir / "checkpoints")[-1] == checkpoint
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {path.name for path in checkpoint.iterdir()}


@pytest.mark.slow
def test_model_card_counts_the_epochs_and_the_precision_the_run_used(shared_run):
    # --max_steps over several passes: the card read the ignored --num_train_epochs (1) and precision "None" before.
    output_dir, _ = shared_run("reference", **REFERENCE_RUN)
    recorded = model_card.read_training_args(output_dir)
    assert recorded["completed_steps"] == 8 and recorded["num_train_epochs"] == 1
    assert recorded["mixed_precision"] == "no"
    last_epoch = read_log(output_dir)[-1]["train/epoch"]  # counted from 0, as the "epoch 19" of 20
    assert last_epoch == math.ceil(8 / recorded["updates_per_epoch"]) - 1 >= 1
    config = modeling_streetclip.StreetCLIPConfig.from_pretrained(output_dir)
    card = model_card.build_model_card(config, "someone/run", training_args=recorded).text
    epochs = f"{8 / recorded['updates_per_epoch']:.2f}".rstrip("0").rstrip(".")
    assert f"- **Epochs:** `{epochs}`\n" in card
    assert "- **Mixed precision:** `no`\n" in card


@pytest.mark.slow
def test_lora_run_with_accumulation_and_checkpointing_saves_merged_attention_updates_only(
    shared_run, tiny_clip_dir, geo_data, tmp_path
):
    output_dir, stderr = shared_run("lora", **LORA_RUN)
    # Neither transformers' renamed checkpointing methods nor peft's use of them warn at every run.
    assert "checkpointing` is deprecated" not in stderr
    base = load_file(tiny_clip_dir / "model.safetensors")
    trained = load_file(output_dir / "model.safetensors")
    assert not any("lora" in name for name in trained)
    changed = {name for name, weight in base.items() if not torch.equal(weight, trained[name])}
    assert changed and all(name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "out_proj") for name in changed)
    assert all(name.endswith(".weight") for name in changed)
    assert answers_a_country(output_dir, geo_data)
    # The model card is filled from this run's own record, not from defaults.
    publish = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "model_card" / "publish.py"),
            str(output_dir),
            "me/lora-run",
            "--dry_run",
            str(tmp_path / "repo"),
        ],
        env=script_env(geo_data),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert publish.returncode == 0, publish.stderr
    card = (tmp_path / "repo" / "README.md").read_text()
    for line in ("- **Mode:** `lora`", "- **Steps:** `4`", "- **Global batch size:** `16`", "- **LoRA rank:** `16`"):
        assert line in card


@pytest.mark.slow
def test_a_run_resumed_with_a_larger_max_steps_trains_on_along_the_longer_schedule(
    shared_run, tiny_clip_dir, geo_data, tmp_path
):
    """Extending a finished 4-step run to 6 steps restored the 4-step cosine's last rate, 0, for step 5. The log
    gives the rate each step trained at."""
    finished_dir, _ = shared_run("lora", **LORA_RUN)
    output_dir = tmp_path / "run"
    shutil.copytree(finished_dir, output_dir)
    options = {**LORA_RUN, "max_steps": 6}
    result = run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, output_dir, resume_from_checkpoint="latest", **options), geo_data
    )
    checkpoints = output_dir / "checkpoints"
    assert f"{checkpoints / 'checkpoint_4'} was saved by a run of 4 steps; this run trains to 6" in result.stderr
    log = {entry["step"]: entry for entry in read_log(output_dir)}
    assert sorted(log) == [1, 2, 3, 4, 5, 6]
    # 5% warmup rounds up to one step in both runs.
    first_run, extended = schedule_rates(4, 1e-3, warmup_steps=1), schedule_rates(6, 1e-3, warmup_steps=1)
    assert [log[step]["train/learning_rate"] for step in (1, 2, 3, 4)] == pytest.approx(first_run)
    assert [log[step]["train/learning_rate"] for step in (5, 6)] == pytest.approx(extended[4:])
    assert min(extended[4:]) > 0
    at_step_4, at_step_6 = (load_file(checkpoints / f"checkpoint_{step}" / "model.safetensors") for step in (4, 6))
    assert any(not torch.equal(at_step_4[name], at_step_6[name]) for name in at_step_4), "steps 5 and 6 did not train"


@pytest.mark.slow
def test_the_readme_training_command_runs_as_printed_on_tiny_data(tiny_clip_dir, geo_data, tmp_path):
    """training/README.md's launch command, with only its paths and sizes made tiny: `accelerate launch`, bf16,
    evaluation and checkpoints as printed. bf16 runs died at their first evaluation, which builds the city heads under
    autocast."""
    readme = (TRAINING_DIR / "README.md").read_text(encoding="utf-8")
    command = readme.split("One CPU or one GPU:\n\n```bash\n", 1)[1].split("```", 1)[0]
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:3] == ["accelerate", "launch", "training/pretrain.py"]
    args = words[3:]
    output_dir = tmp_path / "streetclip-run"
    tiny = {
        "--model_name_or_path": tiny_clip_dir,
        "--train_data": geo_data["train"],
        "--eval_data": geo_data["eval"],
        "--countries": geo_data["countries"],
        "--output_dir": output_dir,
        "--max_steps": 2,
        "--per_device_train_batch_size": 8,
        "--checkpointing_steps": 1,
        "--eval_steps": 1,
    }
    for option, value in tiny.items():
        assert option in args, f"the README's command no longer has {option}"
        args[args.index(option) + 1] = str(value)
    assert args[args.index("--mixed_precision") + 1] == "bf16"
    run_pretrain(args, geo_data, launcher=(sys.executable, "-m", "accelerate.commands.launch"))
    assert logged_steps(output_dir, "eval/country_accuracy") == [1, 2]
    assert all(math.isfinite(loss) for loss in train_losses(output_dir).values())
    assert [path.name for path in complete_checkpoints(output_dir / "checkpoints")] == ["checkpoint_1", "checkpoint_2"]
    assert json.loads((output_dir / "training_args.json").read_text())["mixed_precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["example_config.yaml", "streetclip_recipe.yaml"])
def test_the_shipped_configs_run_as_printed_on_tiny_data(tiny_clip_dir, geo_data, tmp_path, config_name):
    """Each YAML file in training/, with only its paths and sizes made tiny (the paper's 193 countries stay)."""
    config = yaml.safe_load((TRAINING_DIR / config_name).read_text(encoding="utf-8"))
    output_dir = tmp_path / "run"
    paths = {
        "model_name_or_path": str(tiny_clip_dir),
        "train_data": str(geo_data["train"]),
        "output_dir": str(output_dir),
    }
    for key, value in paths.items():
        assert key in config, f"{config_name} no longer sets {key}"
        config[key] = value
    if "eval_data" in config:
        config["eval_data"] = str(geo_data["eval"])
    # Sizes for 97 tiny images on two cores; a setting the file leaves out keeps the script's default.
    tiny = {
        "max_steps": 1,
        "num_train_epochs": 1,
        "checkpointing_steps": 1,
        "eval_steps": 1,
        "dataloader_num_workers": 0,
    }
    config.update({key: value for key, value in tiny.items() if key in config})
    config_path = tmp_path / config_name
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    run_pretrain([str(config_path)], geo_data)
    recorded = json.loads((output_dir / "training_args.json").read_text())
    assert recorded["completed_steps"] == recorded["max_steps"] >= 1
    assert recorded["learning_rate"] == config["learning_rate"]
    if config.get("eval_on_start"):
        assert logged_steps(output_dir, "eval/country_accuracy") == [0, 1]
    geolocate = pipeline("geolocation", model=str(output_dir))
    assert len(geolocate.model.candidate_places.country_names) == 193


@pytest.mark.slow
def test_batches_without_a_readable_image_are_skipped_counted_and_leave_the_model_as_it_was(
    tiny_clip_dir, geo_data, tmp_path
):
    """A text file and a truncated JPEG, one per process and step: the run died reshaping an empty batch. Now each
    step is skipped on every process alike, counted and logged, and makes no update (weight decay would otherwise move
    the weights on zero gradients)."""
    output_dir = tmp_path / "run"
    args = pretrain_args(
        tiny_clip_dir,
        geo_data,
        output_dir,
        train_data=write_unreadable_rows(tmp_path / "unreadable"),
        per_device_train_batch_size=1,
        max_steps=2,
        checkpointing_steps=100,
    )
    result = run_pretrain(args, geo_data, launcher=TWO_PROCESSES, ACCELERATE_USE_CPU="1")
    log = read_log(output_dir)
    assert [(entry["step"], entry["train/skipped_batches"], entry["train/skipped_rows"]) for entry in log] == [
        (1, 1, 2),
        (2, 2, 4),
    ]
    assert not [entry for entry in log if "train/loss" in entry]
    assert "Step 1: no image of its batch could be read, on any process; the batch is skipped" in result.stderr
    assert "Trained 2 steps; 4 rows were dropped from their batches (train/skipped_rows) and 2 batches with no " in (
        result.stderr
    )
    before, after = load_file(tiny_clip_dir / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert before.keys() <= after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_a_process_without_a_readable_image_trains_on_with_the_other_and_matches_one_process(
    tiny_clip_dir, geo_data, tmp_path
):
    """Two photos and two unreadable files, a global batch of 4: in some steps one process has nothing readable while
    the other has both photos. It must still take part in the gather and the gradient sync (a hang otherwise), and
    the losses must stay those of one process reading the same batches."""
    folder = tmp_path / "half-readable"
    folder.mkdir()
    place_photo(0, 0, np.random.default_rng(0)).save(folder / "paris.png")
    place_photo(1, 0, np.random.default_rng(1)).save(folder / "tokyo.png")
    (folder / "metadata.csv").write_text(
        "file_name,latitude,longitude\nparis.png,48.8566,2.3522\ntokyo.png,35.6762,139.6503\n", encoding="utf-8"
    )
    write_unreadable_rows(folder)
    options = {"train_data": folder, "max_steps": 4, "checkpointing_steps": 100, "record_sample_ids": True}
    single_dir, double_dir = tmp_path / "one-process", tmp_path / "two-processes"
    run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, single_dir, per_device_train_batch_size=4, **options), geo_data
    )
    run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, double_dir, per_device_train_batch_size=2, **options),
        geo_data,
        launcher=TWO_PROCESSES,
        ACCELERATE_USE_CPU="1",
    )
    rank0, rank1 = sample_ids_by_step(double_dir, 0), sample_ids_by_step(double_dir, 1)
    one_sided = [step for step in rank0 if not rank0[step] or not rank1[step]]
    print("rows per step and process:", [(rank0[step], rank1[step]) for step in sorted(rank0)])
    assert one_sided, "no step left a process without a readable image; choose another seed"
    single_losses, double_losses = train_losses(single_dir), train_losses(double_dir)
    assert list(double_losses) == list(range(1, 5))
    for step, loss in single_losses.items():
        assert double_losses[step] == pytest.approx(loss, abs=1e-4)


@pytest.fixture
def tiny_streetclip(tiny_clip_dir):
    return modeling_streetclip.StreetCLIPForGeolocation.from_pretrained(
        tiny_clip_dir, candidate_countries=list(PLACES)[:2], cities_per_country=1
    )


@pytest.mark.parametrize(
    ("mode", "trains"),
    [
        ({}, lambda name: True),
        ({"freeze_text_tower": True}, lambda name: not name.startswith(("text_model.", "text_projection."))),
        ({"freeze_vision_tower": True}, lambda name: not name.startswith(("vision_model.", "visual_projection."))),
        ({"use_lora": True, "train_logit_scale": False}, lambda name: "lora_" in name),
    ],
    ids=["full", "frozen-text", "frozen-vision", "lora"],
)
def test_each_mode_trains_exactly_its_parameters(tiny_streetclip, tiny_clip_dir, mode, trains):
    model = set_trainable_parameters(tiny_streetclip, ModelArguments(str(tiny_clip_dir), lora_dropout=0.0, **mode))
    names = {name.removeprefix("base_model.model."): parameter for name, parameter in model.named_parameters()}
    expected = {name for name in names if trains(name) and not name.startswith(("country_head", "city_head"))}
    trainable = {name for name, parameter in names.items() if parameter.requires_grad}
    assert trainable == expected
    if mode.get("use_lora"):
        # 2 towers x 2 layers x 4 projections, each adapter r x (32 + 32) for hidden size 32.
        assert sum(names[name].numel() for name in trainable) == 2 * 2 * 4 * 16 * (32 + 32)

    before = {name: parameter.detach().clone() for name, parameter in names.items()}
    towers = ContrastiveTowers(model)
    optimizer = torch.optim.AdamW([parameter for parameter in towers.parameters() if parameter.requires_grad], 0.01)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    input_ids = torch.randint(0, 400, (4, 12), generator=generator)
    loss = contrastive_loss(*towers(pixel_values, input_ids, torch.ones_like(input_ids)), torch.arange(4))
    loss.backward()
    optimizer.step()
    changed = {name for name, parameter in names.items() if not torch.equal(parameter, before[name])}
    # A LoRA "B" matrix starts at zero, so its "A" partner gets no gradient in the first step.
    assert changed <= trainable and changed
    assert {name for name in trainable if "lora_A" not in name} <= changed


def test_identical_captions_are_deduplicated_into_one_class_per_place():
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 8, generator=generator), dim=-1)
    distinct_texts = torch.nn.functional.normalize(torch.randn(3, 8, generator=generator), dim=-1)
    caption_of_image = torch.tensor([0, 1, 1, 2])  # images 1 and 2 show the same place
    scale = torch.tensor(10.0)
    loss = contrastive_loss(images, distinct_texts[caption_of_image], scale, caption_keys=caption_of_image * 1000)

    logits = scale * images @ distinct_texts.T  # 4 images x 3 distinct captions
    image_to_text = torch.nn.functional.cross_entropy(logits, caption_of_image)
    text_targets = torch.tensor([[1, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1]])
    text_to_image = torch.nn.functional.cross_entropy(logits.T, text_targets)
    assert loss.item() == pytest.approx(((image_to_text + text_to_image) / 2).item(), rel=1e-5)
    # With one-hot targets the two copies could never be told apart; here a perfect model reaches the floor.
    perfect = contrastive_loss(
        distinct_texts[caption_of_image], distinct_texts[caption_of_image], torch.tensor(1e4), caption_of_image
    )
    # Only text to image keeps a floor: the shared caption's target is spread over its two images (entropy log 2).
    floor = math.log(2) / 3 / 2
    assert perfect.item() == pytest.approx(floor, abs=1e-3)


def test_a_batch_of_only_unreadable_images_gives_a_zero_loss_that_reaches_the_parameters():
    embeds = torch.zeros(0, 8, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    loss = contrastive_loss(embeds, embeds, scale, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and scale.grad.item() == 0.0


def test_the_towers_take_an_empty_batch_and_still_reach_every_parameter(tiny_streetclip, tiny_clip_dir):
    """A process whose images were all unreadable runs the towers on nothing: CLIP cannot, and DDP's gradient sync
    waits for a gradient of every parameter from every process."""
    towers = ContrastiveTowers(set_trainable_parameters(tiny_streetclip, ModelArguments(str(tiny_clip_dir))))
    image_embeds, text_embeds, logit_scale = towers(
        torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE), torch.empty(0, 1, dtype=torch.long), torch.empty(0, 1)
    )
    projection = tiny_streetclip.config.projection_dim
    assert image_embeds.shape == text_embeds.shape == (0, projection)
    contrastive_loss(image_embeds, text_embeds, logit_scale, torch.empty(0, dtype=torch.long)).backward()
    trainable = [(name, parameter) for name, parameter in towers.named_parameters() if parameter.requires_grad]
    assert trainable and not [name for name, parameter in trainable if parameter.grad is None]
    assert all(torch.equal(parameter.grad, torch.zeros_like(parameter)) for _, parameter in trainable)


def test_gathering_on_one_process_keeps_the_local_batch():
    embeddings, keys = torch.ones(3, 2), torch.arange(3)
    gathered_embeddings, gathered_keys = gather_across_processes(Accelerator(cpu=True), embeddings, keys)
    assert gathered_embeddings is embeddings and gathered_keys is keys


def checkpointing_accelerator(project_dir: Path, total_limit: int | None = None) -> Accelerator:
    """An accelerator that names checkpoints as the script's does."""
    return Accelerator(
        cpu=True,
        project_config=ProjectConfiguration(
            project_dir=str(project_dir), automatic_checkpoint_naming=True, total_limit=total_limit
        ),
    )


def test_complete_checkpoints_ignore_folders_that_a_kill_cut_short(tmp_path):
    for step in (3, 12, 15, 9):
        (tmp_path / f"checkpoint_{step}").mkdir()
        for name in ("optimizer.bin", "scheduler.bin", RUN_STATE_NAME):
            if step != 15 or name != RUN_STATE_NAME:  # the run state is written last
                (tmp_path / f"checkpoint_{step}" / name).touch()
    assert complete_checkpoints(tmp_path) == [tmp_path / f"checkpoint_{step}" for step in (3, 9, 12)]
    assert complete_checkpoints(tmp_path / "missing") == []


def test_checkpoints_replace_leftovers_of_their_step_and_keep_the_newest(tmp_path):
    accelerator = checkpointing_accelerator(tmp_path, total_limit=2)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    leftover = tmp_path / "checkpoints" / "checkpoint_4"
    leftover.mkdir(parents=True)
    (leftover / "half-written.bin").write_bytes(b"")
    for step in (2, 4, 6):
        assert save_checkpoint(accelerator, step, {"step": step})
    checkpoints = tmp_path / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint_4", "checkpoint_6"]
    assert complete_checkpoints(checkpoints) == [checkpoints / "checkpoint_4", checkpoints / "checkpoint_6"]
    assert not (checkpoints / "checkpoint_4" / "half-written.bin").exists()
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(checkpoints / "checkpoint_6"))
    assert model.weight.abs().sum() > 0


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs a POSIX file-size limit")
@pytest.mark.parametrize(
    ("limit", "error"),
    [(100_000, "SafetensorError"), (300_000, "RuntimeError")],
    ids=["weights-file", "optimizer-file"],
)
def test_a_checkpoint_write_that_fails_keeps_the_older_checkpoints_and_the_run_going(tmp_path, caplog, limit, error):
    """A real failing write, as on a full disk: the file-size limit stops the weights file (safetensors) or the
    optimiser state (torch.save, which said only "basic_ios::clear" on a full disk) part-way. Accelerate retires the
    oldest checkpoint before writing a new one: of --checkpoints_total_limit 2, one survives the failed write."""
    import resource

    accelerator = checkpointing_accelerator(tmp_path, total_limit=2)
    model = torch.nn.Linear(256, 256)  # 263 kB of weights, and after a step twice that of optimiser state
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(1, 256)).sum().backward()
    optimizer.step()
    assert save_checkpoint(accelerator, 2, {"skipped_rows": 1})
    assert save_checkpoint(accelerator, 4, {"skipped_rows": 2})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        with caplog.at_level(logging.ERROR):
            saved = save_checkpoint(accelerator, 6, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    checkpoints = tmp_path / "checkpoints"
    assert not saved
    assert f"Could not write checkpoint {checkpoints / 'checkpoint_6'} ({error}: " in caplog.text
    assert "The older checkpoints are intact, and training goes on" in caplog.text
    assert [path.name for path in checkpoints.iterdir()] == ["checkpoint_4"]
    assert json.loads((checkpoints / "checkpoint_4" / RUN_STATE_NAME).read_text()) == {"skipped_rows": 2}
    # With room again, the next checkpoint saves.
    assert save_checkpoint(accelerator, 8, {})
    assert sorted(path.name for path in checkpoints.iterdir()) == ["checkpoint_4", "checkpoint_8"]


@pytest.fixture
def saved_checkpoints(tmp_path):
    """An accelerator with a model, optimiser and scheduler prepared, as in the script, and checkpoints at steps 2
    and 4 whose weights differ: (accelerator, model, checkpoints folder, weights saved at step 2)."""
    accelerator = checkpointing_accelerator(tmp_path)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    save_checkpoint(accelerator, 2, {"skipped_rows": 3})
    at_step_2 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(accelerator, 4, {"skipped_rows": 5})
    return accelerator, model, tmp_path / "checkpoints", at_step_2


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "scheduler.bin", RUN_STATE_NAME])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(saved_checkpoints, caplog, damaged):
    accelerator, model, checkpoints, at_step_2 = saved_checkpoints
    truncate(checkpoints / "checkpoint_4" / damaged)
    with caplog.at_level(logging.WARNING):
        checkpoint, run_state = resume_from(accelerator, resume_candidates("latest", checkpoints), model)
    assert (checkpoint, run_state) == (checkpoints / "checkpoint_2", {"skipped_rows": 3})
    assert torch.equal(model.weight, at_step_2)
    assert f"Checkpoint {checkpoints / 'checkpoint_4'} cannot be loaded (" in caplog.text
    assert f"falling back to the previous complete one, {checkpoints / 'checkpoint_2'}." in caplog.text


def test_a_damaged_checkpoint_with_nothing_to_fall_back_to_is_refused_naming_it(saved_checkpoints):
    accelerator, model, checkpoints, _ = saved_checkpoints
    for step in (2, 4):
        truncate(checkpoints / f"checkpoint_{step}" / "model.safetensors")
    for resume in ("latest", str(checkpoints / "checkpoint_4")):
        # `latest` tries checkpoint_4, then checkpoint_2; a named folder is never swapped for another.
        named = "checkpoint_2" if resume == "latest" else "checkpoint_4"
        with pytest.raises(ValueError, match=f"Cannot resume from checkpoint '.*{named}': a file in it is damaged"):
            resume_from(accelerator, resume_candidates(resume, checkpoints), model)


def test_a_checkpoint_of_another_model_size_is_refused_naming_a_parameter_and_both_shapes(saved_checkpoints):
    """It was reported as damaged or truncated, though its files are intact; nothing is loaded."""
    _, _, checkpoints, _ = saved_checkpoints
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(16, 8)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    weights = model.weight.detach().clone()
    for resume, named in (("latest", "checkpoint_4"), (str(checkpoints / "checkpoint_2"), "checkpoint_2")):
        with pytest.raises(ValueError) as refused:
            resume_from(accelerator, resume_candidates(resume, checkpoints), model)
        assert str(refused.value).startswith(
            f"Cannot resume from checkpoint '{checkpoints / named}': it holds the weights of a model of another size "
            "(its parameter 'weight' has shape [8, 8] in model.safetensors, and [8, 16] in the model of this run); "
            "its files are intact."
        )
        assert "damaged" not in str(refused.value)
    assert torch.equal(model.weight, weights)


def test_a_restored_scheduler_follows_the_schedule_of_the_resuming_run():
    """A finished 4-step cosine is at rate 0; restored into a 6-step run (with another peak rate), it must give step 5
    the 6-step schedule's rate and then go on along that schedule."""

    def cosine(max_steps: int, learning_rate: float):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
        return get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=max_steps)

    saved, resumed, reference = cosine(4, 1e-3), cosine(6, 2e-3), cosine(6, 2e-3)
    for scheduler, steps in ((saved, 4), (reference, 4)):
        for _ in range(steps):
            scheduler.optimizer.step()
            scheduler.step()
    assert saved.get_last_lr() == [0.0]
    resumed.optimizer.load_state_dict(saved.optimizer.state_dict())
    resumed.load_state_dict(saved.state_dict())
    follow_schedule(resumed, 2e-3, 4)
    for _ in range(2):
        assert resumed.get_last_lr() == pytest.approx(reference.get_last_lr())
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0])
        assert resumed.get_last_lr()[0] > 0
        for scheduler in (resumed, reference):
            scheduler.optimizer.step()
            scheduler.step()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda path: path.write_bytes(b"not a pickle"),
        lambda path: path.write_bytes(path.read_bytes()[:100]),
        lambda path: torch.save({"step": 0}, path),
        lambda path: path.unlink(),
    ],
    ids=["garbage", "truncated", "incomplete", "missing"],
)
def test_random_states_that_cannot_be_restored_are_warned_about(saved_checkpoints, caplog, corrupt):
    """accelerate skips them with an INFO line only, and the resume silently stops being exact."""
    accelerator, model, checkpoints, _ = saved_checkpoints
    states = checkpoints / "checkpoint_4" / "random_states_0.pkl"
    corrupt(states)
    with caplog.at_level(logging.WARNING):
        checkpoint, _ = resume_from(accelerator, resume_candidates("latest", checkpoints), model)
    assert checkpoint == checkpoints / "checkpoint_4"
    assert f"The random states in {states} cannot be restored" in caplog.text


def test_intact_random_states_restore_without_a_warning(saved_checkpoints, caplog):
    accelerator, model, checkpoints, _ = saved_checkpoints
    with caplog.at_level(logging.WARNING):
        resume_from(accelerator, resume_candidates("latest", checkpoints), model)
    assert not caplog.records


def test_resuming_from_anything_but_a_checkpoint_of_this_script_is_refused(tmp_path):
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints" / "checkpoint_5").mkdir(parents=True)  # cut short
    (output_dir / "checkpoints" / "checkpoint_3").mkdir()
    for name in ("optimizer.bin", "scheduler.bin", RUN_STATE_NAME):
        (output_dir / "checkpoints" / "checkpoint_3" / name).touch()
    with pytest.raises(ValueError, match=r"is a training output folder, not a checkpoint: .*checkpoint_3"):
        resume_candidates(str(output_dir), output_dir / "checkpoints")
    with pytest.raises(FileNotFoundError, match="missing"):
        resume_candidates(str(tmp_path / "missing"), output_dir / "checkpoints")
    (tmp_path / "weights").mkdir()
    with pytest.raises(ValueError, match="is not named checkpoint_<step>"):
        resume_candidates(str(tmp_path / "weights"), output_dir / "checkpoints")
    with pytest.raises(
        ValueError, match="not a checkpoint saved by this script: it has no optimizer.bin or scheduler"
    ):
        resume_candidates(str(output_dir / "checkpoints" / "checkpoint_5"), output_dir / "checkpoints")
    assert resume_candidates(None, output_dir / "checkpoints") == []
    assert resume_candidates("latest", tmp_path / "no-checkpoints-yet") == []


@pytest.mark.slow
def test_a_bad_resume_folder_is_refused_before_the_model_loads(geo_data, tmp_path):
    """Given the output folder instead of one of its checkpoints, the run used to load the model and the data, and
    then fail on a state_dict error."""
    output_dir = tmp_path / "run"
    (output_dir / "checkpoints").mkdir(parents=True)
    result = run_pretrain(
        [
            *("--model_name_or_path", str(tmp_path / "no-such-model"), "--train_data", str(tmp_path / "no-data")),
            *("--output_dir", str(output_dir), "--resume_from_checkpoint", str(output_dir)),
        ],
        geo_data,
        succeeds=False,
    )
    assert f"--resume_from_checkpoint '{output_dir}' is a training output folder, not a checkpoint" in result.stderr
    assert "no-such-model" not in result.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--warmup_ratio", "5"), "--warmup_ratio is a share of the training steps, in [0, 1]; got 5.0."),
        (("--countries", "no-such-list.txt"), "cannot read --countries 'no-such-list.txt': No such file"),
        (("--resume_from_checkpoint", "no-such-checkpoint"), "--resume_from_checkpoint folder not found"),
        (("--lr_scheduler_type", "bogus"), "--lr_scheduler_type must be one of linear, cosine,"),
        (("--lr_scheduler_type", "reduce_lr_on_plateau"), "--lr_scheduler_type must be one of"),
        (("--report_to", "bogus"), "--report_to 'bogus': Unsupported logging capability: bogus."),
        (
            ("--caption_template_probabilities", "0.3", "0.3"),
            "bad --caption_templates or --caption_template_probabilities: Got 1 caption templates but 2",
        ),
        (
            ("--caption_templates", "A photo in {continent}."),
            "bad --caption_templates or --caption_template_probabilities: Caption templates use ['continent']",
        ),
        (("--caption_templates", "A photo in {country"), "bad --caption_templates or"),
        (("--model_name_or_path", "./no-such-model"), "--model_name_or_path './no-such-model': nothing is at that"),
        (("--train_data", "./no-such-data"), "--train_data './no-such-data': nothing is at that path, and it is not"),
        (("--eval_data", "runs/a/no-such-data"), "--eval_data 'runs/a/no-such-data': nothing is at that path"),
    ],
)
def test_a_bad_option_ends_in_one_line_naming_it_with_exit_status_2(geo_data, tmp_path, options, message):
    """They ended in a traceback and exit status 1, where `streetclip` and `eval/benchmark.py` print one line; some
    only after the model and the data had loaded (a Hub id such as `m` is left to the loaders, which fail offline)."""
    result = run_pretrain(
        ["--model_name_or_path", "m", "--train_data", "d", "--output_dir", str(tmp_path / "run"), *options],
        geo_data,
        succeeds=False,
    )
    assert_refused_at_start_up(result, message)


def assert_refused_at_start_up(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"pretrain.py: error: {message}"), result.stderr
    assert "Traceback" not in result.stderr


CONFIG = "model_name_or_path: m\ntrain_data: d\noutput_dir: run\n"


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.yaml", "train_data: [d\n", "not valid YAML: expected ',' or ']', but got '<stream end>' at line 2,"),
        ("run.yaml", "- train_data\n", "holds a list, not option names with their values"),
        ("run.yaml", "model_name_or_path: m\n", "the following arguments are required: --train_data/--train-data,"),
        (
            "run.yaml",
            f"{CONFIG}learning_rate: abc\n",
            "argument --learning_rate/--learning-rate: invalid float value: 'abc'",
        ),
        ("run.yaml", f"{CONFIG}max_steps: 1.5\n", "argument --max_steps/--max-steps: invalid int value: '1.5'"),
        ("run.yaml", f"{CONFIG}no_such_option: 1\n", "Some specified arguments are not used by the HfArgumentParser"),
        ("run.json", '{"learning_rate": ', "Expecting value: line 1 column 19"),
        ("missing.yaml", None, "No such file or directory."),
    ],
)
def test_a_bad_config_file_ends_in_one_line_naming_it(geo_data, tmp_path, name, text, message):
    """A YAML or JSON file went to the dataclasses unchecked: malformed YAML, a missing option or a value of the wrong
    type ended in a traceback (`learning_rate: abc` in a TypeError from a comparison)."""
    config = tmp_path / name
    if text is None:
        message = f"cannot read {str(config)!r}: {message}"
    else:
        config.write_text(text, encoding="utf-8")
        message = f"{config}: {message}"
    assert_refused_at_start_up(run_pretrain_here([str(config)], geo_data["cache"]), message)


def test_an_output_dir_that_is_or_lies_in_a_file_is_refused_at_start_up(geo_data, tmp_path):
    (tmp_path / "notes.txt").write_text("")
    for output_dir in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        result = run_pretrain_here(
            ["--model_name_or_path", "m", "--train_data", "d", "--output_dir", str(output_dir)], geo_data["cache"]
        )
        assert_refused_at_start_up(result, f"--output_dir '{output_dir}': '{tmp_path / 'notes.txt'}' is a file")


def test_the_accepted_lr_schedulers_build_from_the_steps_alone():
    """The names --lr_scheduler_type accepts are transformers' and step as the script steps them."""
    for name in LR_SCHEDULERS:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = get_scheduler(SchedulerType(name), optimizer, 1, 10)
        optimizer.step()
        scheduler.step()


def test_a_resumed_run_drops_the_log_records_it_is_about_to_write_again(tmp_path):
    log = tmp_path / "log_history.jsonl"
    records = [{"step": step, "train/loss": 1.0 / step} for step in (1, 2, 3, 4)]
    # A kill mid-write can leave a cut-off last line.
    log.write_text("".join(json.dumps(record) + "\n" for record in records) + '{"step": 5, "tra', encoding="utf-8")
    drop_records_after(log, 2)
    assert [json.loads(line) for line in log.read_text().splitlines()] == records[:2]
    drop_records_after(tmp_path / "absent.jsonl", 2)
    assert not (tmp_path / "absent.jsonl").exists()


@pytest.fixture
def captioner(tiny_clip_dir):
    PartialState()  # the data module logs through accelerate, as the script does
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    mix = CaptionMix((PAPER_TEMPLATE, COUNTRY_TEMPLATE), (1.0, 0.0))
    return PlaceCaptioner(mix, tokenizer, max_length=77, country_names={"CZ": "Czech Republic"})


def test_place_captioner_fills_missing_labels_from_coordinates_and_reads_osv5m_codes(captioner):
    batch = {
        "latitude": [48.8566, 50.0755, -33.8688, 35.6895],
        "longitude": [2.3522, 14.4378, 151.2093, 139.6917],
        "city": [None, "Praha", "Bondi", "Tokyo"],
        "region": [None, None, "NSW", "Tokyo"],
        "country": [None, "CZ", "Australia", "JP"],
    }
    rows = captioner(batch, [0, 1, 2, 3])
    assert rows["caption"] == [
        "A Street View photo close to the town of Paris in the region of Île-de-France in France.",
        # The candidate list's spelling wins over GeoNames' "Czechia", so captions match the country prompts.
        "A Street View photo close to the town of Praha in the region of Prague in Czech Republic.",
        "A Street View photo close to the town of Bondi in the region of NSW in Australia.",
        "A Street View photo close to the town of Tokyo in the region of Tokyo in Japan.",
    ]
    assert rows["country_code"] == ["FR", "CZ", "AU", "JP"]
    assert rows["skip_reason"] == ["", "", "", ""]
    assert rows["caption_key"][0] == caption_key(rows["caption"][0])


def test_bad_rows_are_dropped_before_training_with_a_logged_count(captioner, tmp_path, caplog):
    dataset = datasets.Dataset.from_dict(
        {
            "image": ["a.png", "b.png", "c.png", "d.png"],
            "latitude": [48.85, None, 151.2, 95.0],
            "longitude": [2.35, 2.35, -33.8, 200.0],
        }
    )
    with caplog.at_level(logging.WARNING):
        kept = caption_dataset(dataset, captioner, "image", description="toy data")
    assert kept["row_id"] == [0]
    assert (
        "Skipping 3 of 4 rows of the toy data: 1 with missing coordinates, 1 with latitude out of range (latitude and "
        "longitude look swapped), 1 with latitude out of range." in caplog.text
    )


@pytest.mark.parametrize(
    ("column", "cell"),
    [("latitude", "abc"), ("longitude", "abc"), ("latitude", ""), ("latitude", "nan")],
    ids=["text-latitude", "text-longitude", "empty", "nan"],
)
def test_a_non_number_coordinate_cell_drops_its_row_and_the_rest_still_train(
    captioner, tiny_clip_dir, tmp_path, caplog, column, cell
):
    """One text cell types a whole CSV column as text; the cleaned coordinates must still reach the collator as
    numbers (it died with "too many dimensions 'str'")."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("g1.png", "g2.png"):
        place_photo(0, 0, rng).save(folder / name)
    bad = {"latitude": "48.1", "longitude": "2.2", column: cell}
    (folder / "metadata.csv").write_text(
        f"file_name,latitude,longitude\ng1.png,48.8566,2.3522\ng2.png,{bad['latitude']},{bad['longitude']}\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING):
        rows = caption_dataset(load_geo_dataset(str(folder), "train", "image"), captioner, "image")
    assert "Skipping 1 of 2 rows of the data: 1 with missing coordinates." in caplog.text
    assert rows.features["latitude"] == rows.features["longitude"] == datasets.Value("float64")
    collator = GeoCollator(AutoImageProcessor.from_pretrained(tiny_clip_dir), captioner.tokenizer, "image", ["FR"])
    batch = collator([rows[index] for index in range(len(rows))])
    assert batch["coordinates"].tolist() == [[48.8566, 2.3522]]
    assert batch["row_ids"].tolist() == [0]


def test_collator_drops_unreadable_images_and_counts_them(captioner, tiny_clip_dir, geo_data):
    dataset = load_geo_dataset(str(geo_data["train"]), "train", "image")
    rows = caption_dataset(dataset.select(range(94, 99)), captioner, "image")
    image_processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    collator = GeoCollator(image_processor, captioner.tokenizer, "image", ["CA", "FR"])
    batch = collator([rows[index] for index in range(len(rows))])
    # The last five rows: two Canadian photos, broken.png, and two bad rows that never reach the collator.
    assert len(rows) == 3
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["row_ids"].tolist() == [0, 1]
    assert batch["country_rows"].tolist() == [0, 0]
    assert batch["skipped_rows"].item() == 1
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == 2


def test_a_row_without_an_image_is_dropped_from_its_batch_and_counted(captioner, tiny_clip_dir, tmp_path, caplog):
    """A `datasets` row whose image is None raised a TypeError from the image loader and stopped the run."""
    photo = tmp_path / "photo.png"
    place_photo(0, 0, np.random.default_rng(0)).save(photo)
    source = datasets.Dataset.from_dict(
        {"image": [str(photo), None], "latitude": [48.8566, 48.8566], "longitude": [2.3522, 2.3522]}
    ).cast_column("image", datasets.Image())
    source.save_to_disk(tmp_path / "data")
    rows = caption_dataset(load_geo_dataset(str(tmp_path / "data"), "train", "image"), captioner, "image")
    collator = GeoCollator(AutoImageProcessor.from_pretrained(tiny_clip_dir), captioner.tokenizer, "image", ["FR"])
    with caplog.at_level(logging.WARNING):
        batch = collator([rows[0], rows[1]])
    assert batch["row_ids"].tolist() == [0] and batch["skipped_rows"].item() == 1
    assert "Skipping row 1: The row has no image (its image cell is empty)." in caplog.text


@pytest.mark.parametrize("size", [(1, 2000), (2000, 1)], ids=["1xN", "Nx1"])
def test_an_image_of_extreme_aspect_ratio_trains_on_its_centre(captioner, tiny_clip_dir, tmp_path, size):
    """Resizing the short edge of a 1 x 20,000 px PNG (490 bytes) to 336 px takes gigabytes: such an image killed the
    run with a MemoryError. The collator cuts its kept centre before resizing, so it trains as any photo does."""
    folder = tmp_path / "photos"
    folder.mkdir()
    place_photo(0, 0, np.random.default_rng(0)).save(folder / "photo.png")
    Image.new("RGB", size, (90, 120, 60)).save(folder / "sliver.png")
    (folder / "metadata.csv").write_text(
        "file_name,latitude,longitude\nphoto.png,48.8566,2.3522\nsliver.png,48.8566,2.3522\n", encoding="utf-8"
    )
    rows = caption_dataset(load_geo_dataset(str(folder), "train", "image"), captioner, "image")
    image_processor = AutoImageProcessor.from_pretrained(tiny_clip_dir)
    image_processor.size = {"shortest_edge": 336}  # what makes the strip's whole resize cost gigabytes
    collator = GeoCollator(image_processor, captioner.tokenizer, "image", ["FR"])
    batch = collator([rows[index] for index in range(len(rows))])
    assert batch["row_ids"].tolist() == [0, 1] and batch["skipped_rows"].item() == 0
    assert batch["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_arguments_are_read_from_a_yaml_file(tmp_path, geo_data):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: some/clip\n"
        f"train_data: {geo_data['train']}\n"
        "output_dir: out\n"
        "max_steps: 7\n"
        "use_lora: true\n"
        "caption_templates:\n"
        f"  - '{PAPER_TEMPLATE}'\n"
        f"  - '{COUNTRY_TEMPLATE}'\n"
        "caption_template_probabilities: [0.8, 0.2]\n",
        encoding="utf-8",
    )
    model_args, data_args, training_args = parse_args([str(config)])
    assert (model_args.model_name_or_path, model_args.use_lora, training_args.max_steps) == ("some/clip", True, 7)
    assert data_args.caption_mix(PAPER_TEMPLATE, seed=0).probabilities == (0.8, 0.2)
    assert DataArguments(train_data="x").caption_mix(PAPER_TEMPLATE, seed=0).templates == (PAPER_TEMPLATE,)


def test_example_config_parses_and_streaming_needs_max_steps(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the config names its countries file relative to the checkout, as users run it
    model_args, data_args, training_args = parse_args([str(TRAINING_DIR / "example_config.yaml")])
    assert model_args.model_name_or_path == "openai/clip-vit-large-patch14-336"
    assert len(model_args.read_countries()) == 193
    assert data_args.caption_mix(PAPER_TEMPLATE, training_args.seed).probabilities == (0.8, 0.1, 0.1)
    with pytest.raises(ValueError, match="--max_steps with --streaming"):
        parse_args(["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o", "--streaming"])


def test_the_streetclip_recipe_holds_the_published_hyperparameters(monkeypatch):
    """training/streetclip_recipe.yaml: the recipe on geolocal/StreetCLIP's model card, which the defaults are not."""
    monkeypatch.chdir(REPO_ROOT)
    model_args, data_args, training_args = parse_args([str(TRAINING_DIR / "streetclip_recipe.yaml")])
    assert model_args.model_name_or_path == "openai/clip-vit-large-patch14-336"
    assert len(model_args.read_countries()) == 193
    recipe = (
        training_args.learning_rate,
        training_args.num_train_epochs,
        training_args.per_device_train_batch_size,
        training_args.gradient_accumulation_steps,
    )
    assert recipe == (1e-6, 3, 32, 12)
    assert training_args.max_steps is None  # the epochs decide
    assert data_args.caption_mix(PAPER_TEMPLATE, training_args.seed).templates == (PAPER_TEMPLATE,)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("num_train_epochs", "0", "--num_train_epochs must be at least 1, got 0"),
        ("max_logit_scale", "0", "--max_logit_scale must be at least 1"),
        ("max_logit_scale", "nan", "--max_logit_scale must be at least 1"),
        ("warmup_ratio", "5", "--warmup_ratio is a share of the training steps, in [0, 1]; got 5.0"),
        ("warmup_steps", "-1", "--warmup_steps must be at least 0, got -1"),
        ("learning_rate", "0", "--learning_rate must be positive, got 0.0"),
        ("adam_beta2", "1", "--adam_beta2 must be in [0, 1), got 1.0"),
        ("checkpoints_total_limit", "0", "--checkpoints_total_limit must be at least 1, got 0"),
        ("lora_dropout", "1", "--lora_dropout must be in [0, 1), got 1.0"),
        ("cities_per_country", "0", "--cities_per_country must be at least 1, got 0"),
        ("max_train_samples", "0", "--max_train_samples must be at least 1, got 0"),
        ("dataloader_num_workers", "-1", "--dataloader_num_workers must be at least 0, got -1"),
    ],
)
def test_out_of_range_arguments_are_refused_at_start_up_naming_the_option(option, value, message):
    """`--num_train_epochs 0` trained nothing and exited 0; `--max_logit_scale 0` failed after step 1 with "math
    domain error"; `--warmup_ratio 5` was accepted."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_args(["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o", f"--{option}", value])


def test_default_dataloader_workers_start_no_more_processes_than_there_are_cores():
    """Four workers on two cores made torch warn at every run."""
    workers = DataArguments(train_data="x").dataloader_num_workers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(DataLoader(list(range(8)), batch_size=2, num_workers=workers))
    assert len(batches) == 4 and 1 <= workers <= 4


def test_lora_on_a_checkpointed_model_hides_peft_deprecation_warning_there_only(tiny_streetclip, tiny_clip_dir):
    tiny_streetclip.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_trainable_parameters(tiny_streetclip, ModelArguments(str(tiny_clip_dir), use_lora=True))
    assert not [warning for warning in caught if "is_gradient_checkpointing" in str(warning.message)]
    assert warnings.filters == filters  # nothing was silenced beyond that call


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_heads_built_under_autocast_match_those_built_in_float32(tiny_clip_dir, dtype):
    """Mixed-precision training may set the candidates under autocast: the text tower then answers in the autocast
    dtype, which could not be written into the float32 heads."""
    reference, model = (
        modeling_streetclip.StreetCLIPForGeolocation.from_pretrained(
            tiny_clip_dir, candidate_countries=list(PLACES), cities_per_country=2
        )
        for _ in range(2)
    )
    processor = StreetCLIPProcessor.from_pretrained(tiny_clip_dir)
    pixel_values = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=dtype):
        model.set_candidates(model.candidate_places, processor)
        outputs = model(pixel_values=pixel_values)
    assert torch.isfinite(outputs.predicted_coordinates).all()
    for head in ("country_head", "city_head"):
        weight = getattr(model, head).weight
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, getattr(reference, head).weight, atol=0.03, rtol=0.03)


# The packages only the [train] extra installs (pyyaml comes with transformers).
TRAIN_EXTRA = ("accelerate", "datasets", "evaluate", "peft", "tensorboard", "reverse_geocode", "scipy")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("missing", "how"),
    [(TRAIN_EXTRA, "script"), (("datasets",), "import")],
    ids=["no-extra-script", "no-datasets-import"],
)
def test_without_the_train_extra_the_script_says_which_extra_to_install(tmp_path, missing, how):
    """`pip install streetclip` leaves out training's packages: importing the script or running it must name the
    extra to install, not fail deep inside an import."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\n\nfor name in {missing!r}:\n    sys.modules[name] = None  # as if not installed\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(TRAINING_DIR), os.environ.get("PYTHONPATH", "")]),
    }
    command = ["-c", "import pretrain"] if how == "import" else [str(TRAINING_DIR / "pretrain.py"), "--help"]
    result = subprocess.run(
        [sys.executable, *command], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0
    named = re.search(
        r'needs the \[train\] extra, which installs (\w+): pip install "streetclip\[train\]"', result.stderr
    )
    assert named and named.group(1) in missing, result.stderr[-2000:]
    if how == "script":
        assert "Traceback" not in result.stderr


def test_countries_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ModelArguments("clip", countries=str(tmp_path / "missing.txt")).read_countries()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lists no country"):
        ModelArguments("clip", countries=str(empty)).read_countries()


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs a POSIX file-size limit")
def test_a_final_save_that_fails_leaves_nothing_half_written_and_says_why(small_streetclip_dir, tmp_path):
    """A real failing write, as on a full disk (a file-size limit stops the weights file part-way)."""
    import resource

    model = StreetCLIPForGeolocation.from_pretrained(small_streetclip_dir)
    processor = StreetCLIPProcessor.from_pretrained(small_streetclip_dir)
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "log_history.jsonl").write_text("{}\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        problem = save_final_model(model, processor, {"completed_steps": 3}, output_dir)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert problem is not None and "MB are free on its disk" in problem
    assert [path.name for path in output_dir.iterdir()] == ["log_history.jsonl"]  # no partial weights, no leftovers
    assert save_final_model(model, processor, {"completed_steps": 3}, output_dir) is None
    assert not (output_dir / "final-model").exists() and not (output_dir / "final-model.tmp").exists()
    assert json.loads((output_dir / "training_args.json").read_text()) == {"completed_steps": 3}
    assert pipeline("geolocation", model=str(output_dir))(place_photo(0, 0, np.random.default_rng(0)), top_k=1)


@pytest.mark.slow
def test_a_run_whose_final_save_fails_exits_naming_the_checkpoint_that_resumes_it(
    tiny_clip_dir, geo_data, tmp_path, monkeypatch
):
    """The final save fails (ENOSPC injected into its weights file only): the run exits non-zero naming the intact
    checkpoint, and the command it names, rerun, saves the trained model."""
    output_dir = tmp_path / "run"
    save_file = transformers.modeling_utils.safe_save_file

    def failing_save_file(tensors, filename, *args, **kwargs):
        if "final-model" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_save_file)
    args = pretrain_args(tiny_clip_dir, geo_data, output_dir, max_steps=2, checkpointing_steps=2)
    result = run_pretrain(args, geo_data, succeeds=False)
    monkeypatch.undo()
    assert f"Training finished (2 steps), but the final model could not be saved to {output_dir} (OSError: " in (
        result.stderr
    )
    assert f"The latest checkpoint, {output_dir / 'checkpoints' / 'checkpoint_2'}, is intact" in result.stderr
    assert not (output_dir / "model.safetensors").exists()
    run_pretrain([*args, "--resume_from_checkpoint", "latest"], geo_data)
    assert answers_a_country(output_dir, geo_data)


EPOCHS_RUN = {"num_train_epochs": 2, "per_device_train_batch_size": 32, "push_to_hub": True, "hub_model_id": "me/run"}


@pytest.mark.slow
def test_push_to_hub_publishes_through_publish_py_and_keeps_the_model_when_it_fails(shared_run, geo_data):
    # Offline, the upload fails: the run must say so, and the trained folder must stay usable.
    output_dir, stderr = shared_run("epochs", succeeds=False, **EPOCHS_RUN)
    assert "Upload to me/run failed" in stderr
    assert f"but pushing it failed (see above). Retry with: python model_card/publish.py {output_dir} me/run" in (
        stderr
    )
    assert answers_a_country(output_dir, geo_data)


def test_push_to_hub_without_a_repo_id_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        parse_args(["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o", "--push_to_hub"])


@pytest.mark.slow
def test_epochs_count_the_batches_of_the_filtered_data(shared_run):
    output_dir, _ = shared_run("epochs", succeeds=False, **EPOCHS_RUN)
    recorded = json.loads((output_dir / "training_args.json").read_text())
    # write_geo_imagefolder's 96 photos plus its unreadable one; the two bad coordinates are dropped.
    good_rows = 96 + 1
    assert recorded["completed_steps"] == recorded["max_steps"] == 2 * (good_rows // 32)


@pytest.mark.slow
def test_streamed_data_trains_and_evaluates_in_fp16_mixed_precision(tiny_clip_dir, geo_data, tmp_path):
    """On a CPU, accelerate computes fp16 runs in float32, which the script says; on a GPU they run in fp16."""
    output_dir = tmp_path / "streamed"
    result = run_pretrain(
        pretrain_args(
            tiny_clip_dir,
            geo_data,
            output_dir,
            streaming=True,
            max_steps=2,
            mixed_precision="fp16",
            eval_data=geo_data["eval"],
            eval_steps=1,
            eval_on_start=True,
        ),
        geo_data,
    )
    assert sorted(train_losses(output_dir)) == [1, 2]
    assert all(math.isfinite(loss) for loss in train_losses(output_dir).values())
    assert logged_steps(output_dir, "eval/country_accuracy") == [0, 1, 2]
    recorded = json.loads((output_dir / "training_args.json").read_text())
    assert recorded["mixed_precision"] == "fp16" and recorded["updates_per_epoch"] is None
    assert ("fp16 mixed precision needs a GPU" in result.stderr) == (not torch.cuda.is_available())
    assert answers_a_country(output_dir, geo_data)
