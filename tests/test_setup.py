"""README.md's set-up section and `.ci/run` cannot drift apart: two commands, the same in both, and one torch release
named alike in README's CPU command, CI's install and pyproject.toml's floor."""

import re
import shlex
import tomllib
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]
# The marker before each README command in .ci/run, in README's order.
CI_MARKERS = ("# README: install", "# README: test")


def _setup_section() -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]


def _commands(script: str) -> list[str]:
    """The shell commands of a script or code block: its lines without comments and blanks, continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _readme_setup_commands() -> list[str]:
    blocks = re.findall(r"^```(?:bash|sh|shell)?\n(.*?)^```", _setup_section(), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"README's set-up section must hold one command block, found {len(blocks)}"
    return _commands(blocks[0])


def _torch_release(requirement: str) -> str:
    """The `major.minor` torch release a requirement or pip argument names, e.g. "2.13" for `torch==2.13.*`."""
    match = re.search(r"torch\s*(?:==|>=)\s*(\d+\.\d+)", requirement)
    assert match, f"no torch release in {requirement!r}"
    return match[1]


def test_readme_setup_is_exactly_two_commands_install_then_test():
    install, test = _readme_setup_commands()
    assert shlex.split(install)[:3] == ["pip", "install", "-e"]
    assert shlex.split(test)[:3] == ["python", "-m", "pytest"]


def test_ci_runs_readme_setup_commands_verbatim_in_order():
    lines = (REPO_ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marked = [lines[lines.index(marker) + 1] for marker in CI_MARKERS]
    assert marked == _readme_setup_commands()
    ci_commands = _commands("\n".join(lines))
    assert [command for command in ci_commands if command in marked] == marked  # each once, install before test
    assert ci_commands[-1] == marked[-1], "the suite must be the last thing CI runs, so its status is CI's"


def test_torch_floor_is_the_release_ci_tests_with_no_ceiling():
    requirements = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    [torch_requirement] = [spec for spec in requirements["dependencies"] if re.match(r"torch\b", spec)]
    assert "<" not in torch_requirement, "a ceiling would make pip replace a user's newer torch"
    release = _torch_release(torch_requirement)
    cpu_commands = re.findall(r"`(pip install [^`]*download\.pytorch\.org/whl/cpu[^`]*)`", _setup_section())
    assert len(cpu_commands) == 1, "README's set-up section must give the CPU build's install command once"
    assert _torch_release(cpu_commands[0]) == release
    ci_torch = [
        command
        for command in _commands((REPO_ROOT / ".ci" / "run").read_text())
        if command.startswith("pip install torch")
    ]
    assert [_torch_release(command) for command in ci_torch] == [release], "CI must test the floor users may get"
