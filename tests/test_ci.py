"""What CI runs is what the README tells readers to run, and ``make test`` really executes the notebooks.

These tests read files only (no ``make``, no network): they guard the wiring between ``.ci/run``, the
``Makefile``, ``pyproject.toml``, the notebooks' kernel and the documentation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tools.book import series

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"
MAKEFILE = (ROOT / "Makefile").read_text()
README = (ROOT / "README.md").read_text()
DOCS = ("README.md", "INSTALLATION.md", "CONTRIBUTING.md")
NOTEBOOKS = series()  # the chapters, then the appendices (as make run, make test and the book)
BINDER = "https://mybinder.org/v2/gh/secure-ai/secure-ai/main?urlpath=lab/tree/tutorials"


def shell_lines(path: Path) -> list[str]:
    """The script's lines without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines()[1:])
    return [line for line in lines if line]


def fenced_blocks(markdown: str) -> list[list[str]]:
    """Each fenced code block as its lines, with trailing comments and blank lines dropped."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.M | re.S)
    return [
        [line.split("#", 1)[0].strip() for line in b.splitlines() if line.split("#", 1)[0].strip()]
        for b in blocks
    ]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", MAKEFILE, re.M))


# --- .ci/run -------------------------------------------------------------------------------------------


def test_ci_run_is_an_executable_bash_script():
    assert os.access(CI_RUN, os.X_OK), "chmod +x .ci/run"
    assert CI_RUN.read_text().startswith("#!/usr/bin/env bash\n")
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(CI_RUN)], check=True)


def test_ci_run_stops_on_the_first_failure():
    lines = shell_lines(CI_RUN)
    options = " ".join(line for line in lines if line.startswith("set "))
    assert re.search(r"set -\w*e", options), ".ci/run must use `set -e`"
    assert "pipefail" in options, ".ci/run must use `set -o pipefail`"
    assert not any(line.startswith("set +e") for line in lines)


def test_ci_run_uses_the_readme_commands():
    """CI installs and tests through the same make targets a reader uses, and marks itself as CI."""
    lines = shell_lines(CI_RUN)
    assert "make env" in lines and "make test" in lines, "CI must run exactly `make env` and `make test`"
    assert any(re.search(r"\bCI=true\b", line) and line.startswith("export") for line in lines), (
        "tests/conftest.py turns a missing MNIST into a failure only when CI is set"
    )


def test_ci_run_installs_chromium_before_the_tests():
    """tests/test_book.py fails in CI without a browser: .ci/run installs Debian's chromium when missing."""
    lines = shell_lines(CI_RUN)
    install = [i for i, line in enumerate(lines) if "apt-get install" in line and "chromium" in line]
    check = [i for i, line in enumerate(lines) if "command -v chromium" in line]
    assert install and check and check[0] < install[0] < lines.index("make test")


# --- Makefile ------------------------------------------------------------------------------------------


def test_makefile_has_the_documented_targets():
    documented = {"lab", "test", "run", "html", "cost", "env", "lock", "lint", "clean"}
    assert documented <= make_targets(), documented - make_targets()
    phony = re.search(r"^\.PHONY:(.*)$", MAKEFILE, re.M)
    assert phony and documented - {"env"} <= set(phony[1].split())


def test_make_test_runs_pytest_with_the_notebooks():
    """``make test`` is pytest (notebooks spread over xdist workers, one file each, one thread each);
    pytest's own configuration must collect and run the notebooks."""
    assert re.search(
        r"^test: \$\(STAMP\)( mnist)?\n\tOMP_NUM_THREADS=1 \$\(BIN\)/python -m pytest"
        r" -n \$\(JOBS\) --dist loadfile\s*$",
        MAKEFILE, re.M,
    ), "make test must run plain pytest, one notebook per xdist worker"
    assert re.search(r"^JOBS \?= [1-9]\d*\s*$", MAKEFILE, re.M)
    import xdist  # noqa: F401  (the lock must provide it)

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert {"tests", "tutorials"} <= set(config["testpaths"])
    options = config["addopts"].split()
    assert "--nbval-lax" in options or "--nbval" in options, "without it no notebook is executed"
    assert "--nbval-current-env" in options, "notebooks must run on .venv's Python"


def test_every_notebook_names_the_kernel_make_installs():
    """``make lab`` registers a kernel named secure-ai; a notebook asking for another one would open on a
    Python without the lock's packages."""
    kernel = re.search(r"ipykernel install --sys-prefix --name (\S+)", MAKEFILE)
    assert kernel, "Makefile no longer registers a kernel"
    from tools.execute import KERNEL

    run = r"^run: \$\(STAMP\)\n\t\$\(BIN\)/python -m tools\.execute \$\(NOTEBOOKS\)$"
    assert re.search(run, MAKEFILE, re.M), "`make run` must go through tools/execute.py"
    assert KERNEL == kernel[1], "`make run` (tools/execute.py) must execute with that kernel"
    for doc in ("INSTALLATION.md",):
        assert f"--name {kernel[1]}" in (ROOT / doc).read_text(), doc
    for notebook in NOTEBOOKS:
        spec = json.loads(notebook.read_text())["metadata"].get("kernelspec", {})
        assert spec.get("name") == kernel[1], f"{notebook.name} asks for kernel {spec.get('name')!r}"


# --- what the documentation promises -------------------------------------------------------------------


def test_readme_set_up_is_exactly_make_lab_and_make_test():
    assert ["make lab", "make test"] in fenced_blocks(README)
    assert "make run" in README


def test_readme_binder_badge():
    assert f"[![Binder](https://mybinder.org/badge_logo.svg)]({BINDER})" in README


def test_readme_lists_every_chapter():
    for notebook in NOTEBOOKS:
        assert f"](tutorials/{notebook.name})" in README, f"add {notebook.name} to the README's chapter table"


@pytest.mark.parametrize("doc", DOCS)
def test_local_links_in_the_docs_exist(doc):
    text = (ROOT / doc).read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_anchors_within_a_doc_exist(doc):
    text = (ROOT / doc).read_text()
    anchors = {
        github_anchor(h)
        for h in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M)
    }
    missing = [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    assert not missing, f"{doc} links to missing sections: {missing}"


def test_installation_names_the_mnist_files_the_helper_looks_for():
    from secure_ai.data import MNIST_FILES

    text = (ROOT / "INSTALLATION.md").read_text()
    assert "SECURE_AI_DATA" in text and "MNIST/raw/" in text
    for name in MNIST_FILES:
        assert name in text, name


def test_mnist_is_never_committed():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    venv = ".venv" if (ROOT / ".venv").is_symlink() else ".venv/bin/python"  # git stops at a symlink
    for path in ("data/MNIST/raw/train-images-idx3-ubyte", venv):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not git-ignored"


def test_binder_registers_the_kernel_the_notebooks_use():
    post_build = ROOT / "postBuild"
    assert os.access(post_build, os.X_OK), "chmod +x postBuild (Binder runs it after environment.yml)"
    assert "ipykernel install --sys-prefix --name secure-ai" in post_build.read_text()
    for notebook in NOTEBOOKS:
        kernel = json.loads(notebook.read_text())["metadata"]["kernelspec"]["name"]
        assert kernel == "secure-ai", notebook.name
