"""`streetclip locate` and eval/benchmark.py on two processes (torchrun on the CPU, gloo), against one process.

Every input is recorded once, with the answers of one process; one progress bar and one summary count all of them;
a process killed mid-run leaves a file that a rerun with one process (through `accelerate launch -m`) or with two
completes without losing or repeating an input; the benchmark's metrics are those of one process. Each launch
starts Python twice, so the cases share their launches: four in all.
"""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import benchmark
import pytest

from modeling_streetclip.app.records import options_path
from modeling_streetclip.cli import main
from modeling_streetclip.testing_utils import random_photo


pytestmark = pytest.mark.slow  # every case launches Python processes

REPO = Path(__file__).resolve().parents[1]
# Two images a batch: 40 inputs make 10 steps of two batches, so a process can die with work done and work left.
BATCH_SIZE = 2
GOOD_PHOTOS = 36
# Run as the script of every process: `streetclip`, except that the process of rank 1 kills itself (SIGKILL: no
# cleanup of any kind) as it starts its third batch.
KILL_RANK_1 = """
import os, signal, sys

from modeling_streetclip.app import batch
from modeling_streetclip.cli import main

batches = 0
run_batch = batch._batch_records


def run_batch_or_die(*args, **kwargs):
    global batches
    batches += 1
    if batches == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return run_batch(*args, **kwargs)


batch._batch_records = run_batch_or_die
sys.exit(main())
"""


def launch(*argv, script: Path | None = None, cpu_env: bool = True, cwd: Path) -> subprocess.CompletedProcess:
    """Two processes under torchrun (a free port: `--standalone`), running `streetclip` or `script`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(script)] if script else ["-m", "modeling_streetclip.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu_env:
        env["ACCELERATE_USE_CPU"] = "1"  # as the docs show; without it, no GPU means the CPU all the same
    return subprocess.run(
        command + [str(arg) for arg in argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def accelerate_launch(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """One process under `accelerate launch`, as `streetclip locate --help` shows it: -q (without it, Accelerate
    1.16's launcher repeats the command's standard error in a traceback when it exits non-zero) and every value the
    launcher would otherwise default with a warning."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--cpu", "--num_processes", "1"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--num_cpu_threads_per_process", "1", "-m", "modeling_streetclip.cli", *map(str, argv)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_answers(records: list[dict], expected: list[dict]) -> None:
    """The same records, in the same order: keys, errors, places and coordinates exactly, scores to float rounding
    (the processes may sum in another order than the reference's)."""
    assert [(record["path"], record.get("error")) for record in records] == [
        (record["path"], record.get("error")) for record in expected
    ]
    for record, reference in zip(records, expected, strict=True):
        for answer, expected_answer in zip(record.get("answers", []), reference.get("answers", []), strict=True):
            # Strings exactly, numbers (and the masses of `within_km`, a dict approx takes whole) to 1e-6.
            assert answer.keys() == expected_answer.keys()
            assert answer == {
                key: pytest.approx(value) if isinstance(value, (float, dict)) else value
                for key, value in expected_answer.items()
            }


def progress_totals(stderr: str) -> list[str]:
    """The `done/total` of every finished progress bar of `streetclip locate`."""
    return re.findall(r"streetclip locate: 100%\|[^|]*\| (\d+/\d+) ", stderr)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """40 inputs: 36 photos and 4 files that are not (empty, text, a truncated JPEG, noise named .png)."""
    folder = tmp_path_factory.mktemp("photos")
    for seed in range(GOOD_PHOTOS):
        random_photo(seed, (32, 24)).save(folder / f"{seed:02d}.jpg")
    (folder / "bad-empty.jpg").write_bytes(b"")
    (folder / "bad-notes.jpg").write_text("field notes, not a photo\n")
    jpeg = io.BytesIO()
    random_photo(99, (64, 48)).save(jpeg, format="JPEG")
    (folder / "bad-truncated.jpg").write_bytes(jpeg.getvalue()[:200])
    (folder / "bad-noise.png").write_bytes(bytes(range(256)) * 4)
    return folder


def locate_args(photos: Path, model: Path, output: Path) -> list:
    return ["locate", photos, "--model", model, "--output", output, "--batch_size", BATCH_SIZE, "--num_workers", 0]


@pytest.fixture(scope="module")
def one_process(photos, small_streetclip_dir, tmp_path_factory) -> list[dict]:
    """The records of a run on this one process, the reference."""
    output = tmp_path_factory.mktemp("one-process") / "answers.jsonl"
    assert main([str(arg) for arg in locate_args(photos, small_streetclip_dir, output)]) == 1
    return jsonl(output)


def test_two_processes_record_each_input_once_with_the_answers_of_one_process(
    photos, small_streetclip_dir, one_process, tmp_path
):
    output = tmp_path / "answers.jsonl"
    result = launch(*locate_args(photos, small_streetclip_dir, output), cwd=tmp_path)

    # torchrun exits 1 when a process does; each process's own status is in its report: 1, some inputs failed.
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.findall(r"exitcode\s*: (-?\d+)", result.stderr) and "exitcode  : 2" not in result.stderr
    assert "exitcode  : 1" in result.stderr
    records = jsonl(output)
    assert len(records) == 40 and len({record["path"] for record in records}) == 40
    assert_same_answers(records, one_process)
    assert sum("error" in record for record in records) == 4
    assert result.stderr.count("streetclip locate: 36 of 40 inputs geolocated, 4 failed") == 1
    assert progress_totals(result.stderr) == ["40/40"]  # one bar, counting both processes' images


def test_a_killed_process_leaves_a_file_that_one_or_two_processes_complete(
    photos, small_streetclip_dir, one_process, tmp_path
):
    killer = tmp_path / "kill_rank_1.py"
    killer.write_text(KILL_RANK_1)
    killed = tmp_path / "killed" / "answers.jsonl"
    killed.parent.mkdir()
    # Without ACCELERATE_USE_CPU: on a machine without a GPU the processes still form one group.
    result = launch(*locate_args(photos, small_streetclip_dir, killed), script=killer, cpu_env=False, cwd=tmp_path)

    assert result.returncode != 0 and "SIGKILL" in result.stderr, result.stderr[-3000:]
    partial = jsonl(killed)
    assert 0 < len(partial) < 40 and len({record["path"] for record in partial}) == len(partial)
    assert_same_answers(partial, one_process[: len(partial)])

    resumed = {}
    for processes in (1, 2):
        output = tmp_path / f"rerun-{processes}" / "answers.jsonl"
        output.parent.mkdir()
        shutil.copy(killed, output)
        shutil.copy(options_path(killed), options_path(output))
        if processes == 1:
            result = accelerate_launch(*locate_args(photos, small_streetclip_dir, output), cwd=tmp_path)
            # What a user of the documented command line sees: the launcher adds nothing (no traceback, no second
            # copy of the command's output, no note on values it defaulted).
            assert "Traceback" not in result.stderr and "accelerate launch" not in result.stderr, result.stderr
        else:
            result = launch(*locate_args(photos, small_streetclip_dir, output), cwd=tmp_path)
        assert result.returncode == 1, result.stderr[-3000:]
        summary = (
            f"36 of 40 inputs geolocated, 4 failed (see the error field); {len(partial)} were recorded by an "
            "earlier run"
        )
        assert result.stderr.count(summary) == 1
        assert progress_totals(result.stderr) == [f"{40 - len(partial)}/{40 - len(partial)}"]
        resumed[processes] = jsonl(output)

    for records in resumed.values():
        assert records[: len(partial)] == partial  # kept as they were, then the rest
        assert_same_answers(sorted(records, key=lambda r: r["path"]), sorted(one_process, key=lambda r: r["path"]))


def benchmark_args(model: Path, data: Path, images: Path, output_dir: Path) -> list[str]:
    return [
        *("--model", str(model), "--data", str(data), "--image_dir", str(images), "--output_dir", str(output_dir)),
        *("--batch_size", str(BATCH_SIZE), "--num_workers", "0", "--device", "cpu"),
    ]


def test_benchmark_on_two_processes_writes_the_metrics_and_predictions_of_one(photos, small_streetclip_dir, tmp_path):
    data = tmp_path / "benchmark.csv"
    rows = [(f"{seed:02d}.jpg", (seed * 7) % 160 - 80, (seed * 37) % 340 - 170) for seed in range(20)]
    rows += [("bad-truncated.jpg", 10, 10), ("20.jpg", 200, 10)]  # an unreadable image; a latitude out of range
    with data.open("w", newline="") as file:
        csv.writer(file).writerows([("IMG_ID", "LAT", "LON"), *rows])
    one, two = tmp_path / "one", tmp_path / "two"

    benchmark.main(benchmark_args(small_streetclip_dir, data, photos, one))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + [str(REPO / "eval" / "benchmark.py"), *benchmark_args(small_streetclip_dir, data, photos, two)],
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in two.iterdir()) == sorted(benchmark.OUTPUT_FILES)
    metrics = {directory: json.loads((directory / "metrics.json").read_text()) for directory in (one, two)}
    for varying in ("wall_time_s", "num_processes"):
        assert varying in metrics[one]
        metrics[one].pop(varying), metrics[two].pop(varying)
    assert metrics[two] == metrics[one]
    assert (metrics[two]["num_inputs"], metrics[two]["num_evaluated"]) == (22, 20)
    predictions = {directory: list(csv.DictReader((directory / "predictions.csv").open())) for directory in (one, two)}
    assert [row["id"] for row in predictions[two]] == [row[0] for row in rows]
    for row, reference in zip(predictions[two], predictions[one], strict=True):
        scores = ("score", "country_score", "runner_ups")
        assert {k: v for k, v in row.items() if k not in scores} == {
            k: v for k, v in reference.items() if k not in scores
        }
        for score in scores[:2]:
            assert float(row[score] or "nan") == pytest.approx(float(reference[score] or "nan"), rel=1e-5, nan_ok=True)
    assert result.stdout.count("inputs scored; outputs in") == 1  # printed by the main process alone


def test_a_usage_error_stops_both_processes_and_is_reported_once(photos, small_streetclip_dir, tmp_path):
    result = launch(*locate_args(photos, small_streetclip_dir, tmp_path / "answers.txt"), cwd=tmp_path)

    assert result.returncode == 1 and "exitcode  : 2" in result.stderr
    assert result.stderr.count("streetclip locate: error: Cannot tell the format of --output") == 1
