"""`eval/speed/gpu_check.sh`, the GPU check a lent machine runs: it parses, dry-runs on the CPU with the tiny model
and prints every figure it promises, and says what is wrong instead of failing obscurely."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "speed" / "gpu_check.sh"


def run_check(*arguments: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *arguments],
        env={**os.environ, "PYTHON": sys.executable, **environment},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_cpu_dry_run_prints_every_figure_and_passes_the_agreement_check():
    result = run_check("--device", "cpu", "--steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device cpu:") and "model tiny" in lines[0]
    header = next(index for index, line in enumerate(lines) if line.startswith("dtype"))
    columns = "dtype bare img/s call img/s call/bare steady img/s steady/bare peak MiB country= city= emb cos"
    assert lines[header].split() == columns.split()
    for line, dtype in zip(lines[header + 1 : header + 4], ("float32", "bfloat16", "float16"), strict=True):
        fields = line.split()
        assert fields[0] == dtype and float(fields[1]) > 0 and float(fields[2]) > 0
        assert fields[4] == fields[5] == "nan"  # one batch: both timed calls are the same, so no steady state
        assert fields[6] == "n/a"  # no GPU memory to report on the CPU
        assert float(fields[7]) >= 0.98 and 0.99 <= float(fields[9]) <= 1.0001
    assert "resized and cropped in 8 bits" in result.stdout
    assert "largest difference from the image processor's pixel values 0.0e+00" in result.stdout  # PIL backend here
    assert "attention implementation (vision tower): sdpa" in result.stdout
    assert "probe accuracy in float32 on 204 held-out photos: country 1.000" in result.stdout
    assert "CHECK bfloat16 first-answer country agrees with float32: 1.000 >= 0.98: PASS" in result.stdout
    assert "TARGET bfloat16 pipeline / bare forward in steady state: nan >= 0.8: NOT MET (one call over 64 photos" in (
        result.stdout
    )
    build = next(line for line in lines if line.startswith("index build, bfloat16, 1 process"))
    assert float(build.split(": ")[1].split()[0]) > 0  # one command over 64 JPEGs, its start-up included
    assert build.endswith("of 64 JPEGs (start-up included), nan img/s in steady state")  # one batch: no steady state
    assert "Loading weights" not in result.stderr  # progress bars would crowd out the figures


def test_missing_install_is_named_with_the_command_that_fixes_it(tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    python.chmod(0o755)
    result = run_check(PYTHON=str(python))
    assert result.returncode == 3
    assert 'install the project first: pip install -e ".[dev]"' in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(monkeypatch, capsys):
    """The script's own check, in this process; the other tests check that the shell passes exit statuses on."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cuda"])
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    assert stopped.value.code == 2
    assert "sees no CUDA device; use --device cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_timeout_stops_the_run_and_says_so():
    result = run_check("--device", "cpu", "--steps", "1", GPU_CHECK_TIMEOUT_S="1")
    assert result.returncode == 124
    assert "gpu_check: stopped after 1 s (GPU_CHECK_TIMEOUT_S)" in result.stderr
