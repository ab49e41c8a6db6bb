"""`training/pretrain.py` and its modules: the script learns, resumes exactly, shards across processes, trains only
what its mode allows, and skips bad rows instead of crashing.

The end-to-end checks run the script as users do, in subprocesses (a few seconds of start-up each), on a tiny CLIP
and a small generated image folder whose colours depend on the country and stripes on the city.
"""

import csv
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import card as model_card
import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator, PartialState
from arguments import DataArguments, ModelArguments
from contrastive import ContrastiveTowers, contrastive_loss, gather_across_processes
from data import GeoCollator, PlaceCaptioner, caption_dataset, caption_key, load_geo_dataset
from pretrain import PARTIAL_SUFFIX, latest_checkpoint, parse_args, save_checkpoint, set_trainable_parameters
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, pipeline

import modeling_streetclip
from modeling_streetclip.captions import CaptionMix
from modeling_streetclip.testing_utils import PLACES, place_photo, save_streetclip_folder, write_geo_imagefolder


REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINING_DIR = REPO_ROOT / "training"


PAPER_TEMPLATE = modeling_streetclip.StreetCLIPConfig().caption_template
COUNTRY_TEMPLATE = "A Street View photo in {country}."
IMAGE_SIZE = 30


@pytest.fixture(scope="module")
def geo_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("geo-data")
    countries = root / "countries.txt"
    countries.write_text("\n".join(PLACES) + "\n", encoding="utf-8")
    return {
        "train": write_geo_imagefolder(root / "train", photos_per_city=8, seed=0, bad_rows=True),
        "eval": write_geo_imagefolder(root / "eval", photos_per_city=3, seed=1),
        "countries": countries,
        "cache": root / "datasets-cache",
    }


def script_env(geo_data, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "HF_DATASETS_CACHE": str(geo_data["cache"]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **extra,
    }


def pretrain_args(tiny_clip_dir, geo_data, output_dir, **overrides) -> list[str]:
    options = {
        "model_name_or_path": tiny_clip_dir,
        "train_data": geo_data["train"],
        "countries": geo_data["countries"],
        "cities_per_country": 2,
        "output_dir": output_dir,
        "per_device_train_batch_size": 8,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "report_to": "none",
        **overrides,
    }
    args = []
    for name, value in options.items():
        if value is True:
            args.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            args += [f"--{name}", *map(str, value)]
        else:
            args += [f"--{name}", str(value)]
    return args


def run_pretrain(
    args: list[str], geo_data, launcher: tuple[str, ...] = (sys.executable,), **extra_env: str
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*launcher, str(TRAINING_DIR / "pretrain.py"), *args],
        env=script_env(geo_data, **extra_env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"pretrain.py failed:\n{result.stderr[-5000:]}"
    return result


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log_history.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {entry["step"]: entry["train/loss"] for entry in read_log(output_dir) if "train/loss" in entry}


def sample_ids_by_step(output_dir: Path, rank: int = 0) -> dict[int, list[int]]:
    """Row ids of each step's batch on one process; a step re-run after a resume keeps its last record."""
    lines = (output_dir / "sample_ids" / f"rank-{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record["row_ids"] for record in map(json.loads, lines)}


def country_accuracy(model_dir: Path, folder: Path) -> float:
    """Share of the folder's photos whose first answer from the geolocation pipeline is the right country."""
    with open(folder / "metadata.csv", encoding="utf-8") as metadata:
        names = [row["file_name"] for row in csv.DictReader(metadata)]
    geolocate = pipeline("geolocation", model=str(model_dir))
    answers = geolocate([str(folder / name) for name in names])
    return float(
        np.mean([answer[0]["country"] == name.split("-")[0] for answer, name in zip(answers, names, strict=True)])
    )


def test_short_cpu_run_raises_held_out_country_accuracy_from_chance_to_at_least_0_8(tiny_clip_dir, geo_data, tmp_path):
    """The slowest check here (about a minute on two cores): 40 steps of the tiny model."""
    before_dir = save_streetclip_folder(
        tiny_clip_dir, tmp_path / "before", candidate_countries=list(PLACES), cities_per_country=2
    )
    before = country_accuracy(before_dir, geo_data["eval"])
    output_dir = tmp_path / "run"
    result = run_pretrain(
        pretrain_args(
            tiny_clip_dir,
            geo_data,
            output_dir,
            eval_data=geo_data["eval"],
            max_steps=40,
            per_device_train_batch_size=16,
            eval_steps=20,
            eval_on_start=True,
            checkpointing_steps=100,
            logging_steps=10,
            dataloader_num_workers=1,
            report_to="tensorboard",
            # A tiny text tower cannot carry the fine caption over to the country prompt alone: mix in the coarse one.
            caption_templates=[PAPER_TEMPLATE, COUNTRY_TEMPLATE],
            caption_template_probabilities=[0.5, 0.5],
        ),
        geo_data,
    )
    after = country_accuracy(output_dir, geo_data["eval"])
    evaluations = [entry for entry in read_log(output_dir) if "eval/country_accuracy" in entry]
    print(f"held-out country accuracy: before {before:.3f} (chance {1 / len(PLACES):.3f}), after {after:.3f}")
    print("in-run evaluations:", [(entry["step"], round(entry["eval/country_accuracy"], 3)) for entry in evaluations])
    assert before <= 0.4
    assert after >= 0.8
    assert [entry["step"] for entry in evaluations] == [0, 20, 40]
    assert evaluations[-1]["eval/acc_2500km"] >= 0.8 and evaluations[-1]["eval/n"] == 3 * 2 * len(PLACES)
    assert "Skipping 2 of 99 rows of the training data: 1 with missing coordinates, 1 with latitude out of range" in (
        result.stderr
    )
    assert "broken.png' is not an image format Pillow can read" in result.stderr
    assert [entry for entry in read_log(output_dir) if "train/loss" in entry][-1]["train/skipped_rows"] >= 1
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))
    recorded = json.loads((output_dir / "training_args.json").read_text())
    assert recorded["completed_steps"] == recorded["max_steps"] == 40
    assert recorded["world_size"] == 1 and recorded["global_batch_size"] == recorded["per_device_train_batch_size"]


def test_killed_run_resumes_at_its_step_and_continues_the_data_order(tiny_clip_dir, geo_data, tmp_path):
    options = {"max_steps": 30, "checkpointing_steps": 3, "record_sample_ids": True}
    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    run_pretrain(pretrain_args(tiny_clip_dir, geo_data, reference_dir, **options), geo_data)

    killed = subprocess.Popen(
        [
            sys.executable,
            str(TRAINING_DIR / "pretrain.py"),
            *pretrain_args(tiny_clip_dir, geo_data, resumed_dir, **options),
        ],
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
    checkpoint = latest_checkpoint(resumed_dir / "checkpoints")
    killed_at = max(sample_ids_by_step(resumed_dir))
    assert checkpoint is not None and killed_at < 30
    print(f"killed after step {killed_at}; resuming from {checkpoint.name}")

    result = run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, resumed_dir, resume_from_checkpoint="latest", **options), geo_data
    )
    resumed_step = int(checkpoint.name.split("-")[1])
    assert f"Resumed from {checkpoint} at step {resumed_step}" in result.stderr
    reference_losses, resumed_losses = train_losses(reference_dir), train_losses(resumed_dir)
    assert max(resumed_losses) == max(reference_losses) == 30
    # Every step, before and after the kill, drew the same rows as the uninterrupted run.
    assert sample_ids_by_step(resumed_dir) == sample_ids_by_step(reference_dir)
    assert resumed_losses[30] == pytest.approx(reference_losses[30], rel=1e-4)


def test_two_processes_shard_the_data_and_match_the_one_process_loss(tiny_clip_dir, geo_data, tmp_path):
    """Two gloo processes with 4 images each against one process with 8: the same global batches and losses."""
    options = {"max_steps": 4, "checkpointing_steps": 100, "record_sample_ids": True}
    single_dir, double_dir = tmp_path / "one-process", tmp_path / "two-processes"
    run_pretrain(pretrain_args(tiny_clip_dir, geo_data, single_dir, **options), geo_data)
    run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, double_dir, per_device_train_batch_size=4, **options),
        geo_data,
        launcher=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        ACCELERATE_USE_CPU="1",
    )
    single, rank0, rank1 = (
        sample_ids_by_step(single_dir),
        sample_ids_by_step(double_dir, 0),
        sample_ids_by_step(double_dir, 1),
    )
    for step in range(1, 5):
        assert not set(rank0[step]) & set(rank1[step]), "both processes got the same rows"
        assert rank0[step] + rank1[step] == single[step]
    single_losses, double_losses = train_losses(single_dir), train_losses(double_dir)
    print("loss per step, one process:", single_losses)
    print("loss per step, two processes:", double_losses)
    assert list(double_losses) == [1, 2, 3, 4]
    for step, loss in single_losses.items():
        assert double_losses[step] == pytest.approx(loss, abs=1e-4)


def test_lora_run_with_accumulation_and_checkpointing_saves_merged_attention_updates_only(
    tiny_clip_dir, geo_data, tmp_path
):
    output_dir = tmp_path / "lora"
    run_pretrain(
        pretrain_args(
            tiny_clip_dir,
            geo_data,
            output_dir,
            max_steps=3,
            checkpointing_steps=100,
            use_lora=True,
            lora_dropout=0.0,
            gradient_checkpointing=True,
            gradient_accumulation_steps=2,
            train_logit_scale=False,
        ),
        geo_data,
    )
    base = load_file(tiny_clip_dir / "model.safetensors")
    trained = load_file(output_dir / "model.safetensors")
    assert not any("lora" in name for name in trained)
    changed = {name for name, weight in base.items() if not torch.equal(weight, trained[name])}
    assert changed and all(name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "out_proj") for name in changed)
    assert all(name.endswith(".weight") for name in changed)
    answer = pipeline("geolocation", model=str(output_dir))(str(geo_data["eval"] / "Japan-0-0.png"))[0]
    assert answer["country"] in PLACES
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
    for line in ("- **Mode:** `lora`", "- **Steps:** `3`", "- **Global batch size:** `16`", "- **LoRA rank:** `16`"):
        assert line in card


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


def test_gathering_on_one_process_keeps_the_local_batch():
    embeddings, keys = torch.ones(3, 2), torch.arange(3)
    gathered_embeddings, gathered_keys = gather_across_processes(embeddings, keys)
    assert gathered_embeddings is embeddings and gathered_keys is keys


def test_latest_checkpoint_ignores_partial_folders_left_by_a_kill(tmp_path):
    for name in ("checkpoint-3", "checkpoint-12", f"checkpoint-15{PARTIAL_SUFFIX}", "checkpoint-9"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-12"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_checkpoints_replace_partial_leftovers_and_keep_the_newest(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    leftover = tmp_path / f"checkpoint-4{PARTIAL_SUFFIX}"
    leftover.mkdir()
    (leftover / "half-written.bin").write_bytes(b"")
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step, total_limit=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert not (tmp_path / "checkpoint-4" / "half-written.bin").exists()
    with torch.no_grad():
        model.weight.zero_()
    accelerator.load_state(str(latest_checkpoint(tmp_path)))
    assert model.weight.abs().sum() > 0


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


def test_countries_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ModelArguments("clip", countries=str(tmp_path / "missing.txt")).read_countries()
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lists no country"):
        ModelArguments("clip", countries=str(empty)).read_countries()


def test_push_to_hub_publishes_through_publish_py_and_keeps_the_model_when_it_fails(tiny_clip_dir, geo_data, tmp_path):
    output_dir = tmp_path / "pushed"
    args = pretrain_args(tiny_clip_dir, geo_data, output_dir, max_steps=1, push_to_hub=True, hub_model_id="me/run")
    # Offline, the upload fails: the run must say so, and the trained folder must stay usable.
    result = subprocess.run(
        [sys.executable, str(TRAINING_DIR / "pretrain.py"), *args],
        env=script_env(geo_data),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "Upload to me/run failed" in result.stderr
    assert f"but pushing it failed (see above). Retry with: python model_card/publish.py {output_dir} me/run" in (
        result.stderr
    )
    assert (
        pipeline("geolocation", model=str(output_dir))(str(geo_data["eval"] / "Japan-0-0.png"))[0]["country"] in PLACES
    )


def test_push_to_hub_without_a_repo_id_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="--push_to_hub needs --hub_model_id"):
        parse_args(["--model_name_or_path", "m", "--train_data", "d", "--output_dir", "o", "--push_to_hub"])


def test_epochs_count_the_batches_of_the_filtered_data(tiny_clip_dir, geo_data, tmp_path):
    output_dir = tmp_path / "epochs"
    run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, output_dir, num_train_epochs=2, per_device_train_batch_size=16),
        geo_data,
    )
    recorded = json.loads((output_dir / "training_args.json").read_text())
    good_rows = (
        96 + 1
    )  # write_geo_imagefolder's 96 photos plus its unreadable one; the two bad coordinates are dropped
    assert recorded["completed_steps"] == recorded["max_steps"] == 2 * (good_rows // 16)


def test_model_card_counts_the_epochs_and_the_precision_the_run_used(tiny_clip_dir, geo_data, tmp_path):
    # --max_steps over several passes: the card read the ignored --num_train_epochs (1) and precision "None" before.
    output_dir = tmp_path / "card"
    run_pretrain(pretrain_args(tiny_clip_dir, geo_data, output_dir, max_steps=13), geo_data)
    recorded = model_card.read_training_args(output_dir)
    assert recorded["completed_steps"] == 13 and recorded["num_train_epochs"] == 1
    assert recorded["mixed_precision"] == "no"
    last_epoch = read_log(output_dir)[-1]["train/epoch"]  # counted from 0, as the "epoch 19" of 20
    assert last_epoch == math.ceil(13 / recorded["updates_per_epoch"]) - 1 >= 1
    config = modeling_streetclip.StreetCLIPConfig.from_pretrained(output_dir)
    card = model_card.build_model_card(config, "someone/run", training_args=recorded).text
    epochs = f"{13 / recorded['updates_per_epoch']:.2f}".rstrip("0").rstrip(".")
    assert f"- **Epochs:** `{epochs}`\n" in card
    assert "- **Mixed precision:** `no`\n" in card


def test_streamed_data_trains_in_bfloat16_mixed_precision(tiny_clip_dir, geo_data, tmp_path):
    output_dir = tmp_path / "streamed"
    run_pretrain(
        pretrain_args(tiny_clip_dir, geo_data, output_dir, streaming=True, max_steps=2, mixed_precision="bf16"),
        geo_data,
    )
    assert sorted(train_losses(output_dir)) == [1, 2]
    assert all(math.isfinite(loss) for loss in train_losses(output_dir).values())
    recorded = json.loads((output_dir / "training_args.json").read_text())
    assert recorded["mixed_precision"] == "bf16" and recorded["updates_per_epoch"] is None
    answer = pipeline("geolocation", model=str(output_dir))(str(geo_data["eval"] / "Japan-0-0.png"))[0]
    assert answer["country"] in PLACES
