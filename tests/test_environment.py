"""The four files that describe the environment agree with each other.

* ``requirements.txt`` (the lock, from ``make lock``) is the truth.
* ``environment.yml`` (conda, Binder) pins exactly the same packages at the same versions, minus the
  CUDA-only runtime packages that the lock marks ``sys_platform == "linux"``.
* That marker hides only CUDA runtime packages (nvidia-*, cuda-*, triton), and every one of them has it.
* ``requirements.in`` pins each top-level package exactly, at the lock's version.
* Python is 3.11 everywhere.

:func:`problems` takes the four paths and returns what is wrong, so the same check runs on the real files
and, in :func:`test_a_broken_copy_is_caught`, on copies broken on purpose: each assertion is shown to fail.
"""

from __future__ import annotations

import re
import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
FILES = ("environment.yml", "requirements.txt", "requirements.in", "pyproject.toml")
LINUX_ONLY = 'sys_platform == "linux"'
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)\s*(?:;\s*(?P<marker>[^#]*?))?\s*$"
)


def canonical(name: str) -> str:
    """PEP 503 name: ``Jupyter_Server`` and ``jupyter-server`` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_cuda_only(name: str) -> bool:
    """The packages the Makefile's ``lock`` target marks Linux-only (its ``CUDA_ONLY`` pattern)."""
    name = canonical(name)
    return name.startswith(("nvidia-", "cuda-")) or name == "triton"


def read_lock(path: Path) -> tuple[dict[str, tuple[str, str | None]], list[str]]:
    """``{name: (version, marker)}`` of ``requirements.txt``, and the lines that are not an exact pin."""
    pins, odd = {}, []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            odd.append(line)
            continue
        pins[canonical(match["name"])] = (match["version"], match["marker"] or None)
    return pins, odd


def read_requirements_in(path: Path) -> tuple[dict[str, str], list[str]]:
    """Top-level ``{name: version}`` of ``requirements.in``, and the lines that are not an exact pin."""
    pins, odd = {}, []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        if match is None or match["marker"]:
            odd.append(line)
        else:
            pins[canonical(match["name"])] = match["version"]
    return pins, odd


def read_environment(path: Path) -> tuple[dict, list[str], list]:
    """environment.yml as ``(document, conda dependencies, pip list)``."""
    document = yaml.safe_load(path.read_text())
    conda, pip = [], []
    for item in document.get("dependencies") or []:
        if isinstance(item, dict) and set(item) == {"pip"}:
            pip.extend(item["pip"] or [])
        else:
            conda.append(item)
    return document, conda, pip


def problems(env_path: Path, lock_path: Path, in_path: Path, pyproject_path: Path) -> list[str]:
    """Everything on which the four files disagree; empty when they are consistent."""
    found: list[str] = []
    lock, odd_lock = read_lock(lock_path)
    found += [f"requirements.txt: not an exact pin: {line!r}" for line in odd_lock]

    # (b) the Linux-only marker is on exactly the CUDA runtime packages, and on nothing else
    for name, (_, marker) in sorted(lock.items()):
        if marker is not None and marker != LINUX_ONLY:
            found.append(f"requirements.txt: {name} has an unexpected marker {marker!r}")
        elif marker == LINUX_ONLY and not is_cuda_only(name):
            found.append(f"requirements.txt: {name} is marked Linux-only but is not a CUDA runtime package")
        elif is_cuda_only(name) and marker != LINUX_ONLY:
            found.append(f"requirements.txt: CUDA runtime package {name} lacks '; {LINUX_ONLY}'")
    cuda_only = {name for name, (_, marker) in lock.items() if marker == LINUX_ONLY and is_cuda_only(name)}
    if not cuda_only:
        found.append("requirements.txt: no CUDA runtime packages at all; run `make lock` on Linux")

    # (a) environment.yml pins the lock minus the CUDA-only packages, name for name, version for version
    document, conda, pip = read_environment(env_path)
    if document.get("name") != "secure-ai":
        found.append(f"environment.yml: name is {document.get('name')!r}, expected 'secure-ai'")
    if document.get("channels") != ["conda-forge"]:
        found.append(f"environment.yml: channels are {document.get('channels')!r}, expected ['conda-forge']")
    if "pip" not in conda:
        found.append("environment.yml: 'pip' is not among the conda dependencies")
    if not pip or pip[0] != CPU_INDEX:
        found.append(f"environment.yml: the pip list must start with {CPU_INDEX!r}")
    env_pins: dict[str, str] = {}
    for entry in pip:
        if entry == CPU_INDEX:
            continue
        match = PIN.match(str(entry))
        if match is None or match["marker"]:
            found.append(f"environment.yml: not an exact pin: {entry!r}")
            continue
        name = canonical(match["name"])
        if name in env_pins:
            found.append(f"environment.yml: {name} is listed twice")
        env_pins[name] = match["version"]
    expected = {name: version for name, (version, _) in lock.items() if name not in cuda_only}
    for name in sorted(expected.keys() - env_pins.keys()):
        found.append(f"environment.yml: {name}=={expected[name]} of the lock is missing")
    for name in sorted(env_pins.keys() - expected.keys()):
        why = "is CUDA-only (left out on purpose)" if name in cuda_only else "is not in the lock"
        found.append(f"environment.yml: {name}=={env_pins[name]} {why}")
    for name in sorted(expected.keys() & env_pins.keys()):
        if env_pins[name] != expected[name]:
            found.append(f"environment.yml: {name}=={env_pins[name]} but the lock has {expected[name]}")

    # (c) every top-level pin of requirements.in is the lock's version
    top, odd_in = read_requirements_in(in_path)
    found += [f"requirements.in: not an exact pin: {line!r}" for line in odd_in]
    for name, version in sorted(top.items()):
        if name not in lock:
            found.append(f"requirements.in: {name} is missing from the lock; run `make lock`")
        elif lock[name][0] != version:
            found.append(
                f"requirements.in: {name}=={version} but the lock has {lock[name][0]}; run `make lock`"
            )

    # (d) Python 3.11 everywhere
    pythons = [str(dep) for dep in conda if re.match(r"^python\b(?!-)", str(dep))]
    if not (len(pythons) == 1 and re.fullmatch(r"python\s*==?\s*3\.11(\.\*|\.\d+)?", pythons[0])):
        found.append(f"environment.yml: python is {pythons!r}, expected ['python=3.11']")
    requires = tomllib.loads(pyproject_path.read_text()).get("project", {}).get("requires-python", "")
    spec = SpecifierSet(requires)
    if (
        not (spec.contains("3.11.0") and spec.contains("3.11.9"))
        or spec.contains("3.10.14")
        or spec.contains("3.12.0")
    ):
        found.append(f"pyproject.toml: requires-python is {requires!r}; it must admit 3.11 and only 3.11")
    if "with Python 3.11\n" not in lock_path.read_text():
        found.append("requirements.txt: not compiled with Python 3.11 (see its header); run `make lock`")
    return found


def test_the_real_files_agree():
    found = problems(*(ROOT / name for name in FILES))
    assert not found, "\n".join(found)


def test_the_cuda_only_set_is_the_torch_runtime():
    lock, _ = read_lock(ROOT / "requirements.txt")
    cuda_only = sorted(name for name, (_, marker) in lock.items() if marker == LINUX_ONLY)
    assert cuda_only, "no Linux-only packages: was the lock compiled on Linux?"
    assert all(name.startswith(("nvidia-", "cuda-")) or name == "triton" for name in cuda_only), cuda_only
    assert {"torch", "torchvision", "syft", "numpy"}.isdisjoint(cuda_only)


def test_the_makefile_marks_the_same_packages():
    """The ``lock`` target's pattern and :func:`is_cuda_only` must be the same rule."""
    makefile = (ROOT / "Makefile").read_text()
    pattern = re.search(r"^CUDA_ONLY\s*:=\s*(.+)$", makefile, re.M)
    assert pattern, "Makefile lost its CUDA_ONLY pattern"
    regex = re.compile(f"^({pattern[1].strip()})")
    lock, _ = read_lock(ROOT / "requirements.txt")
    for name, (version, _) in lock.items():
        assert bool(regex.match(f"{name}=={version}")) == is_cuda_only(name), name


# --- every check fails on drift: the same function on copies broken on purpose --------------------------


def edit(name: str, old: str, new: str, *, regex: bool = False) -> Callable[[Path], None]:
    """A breakage: replace ``old`` (literal, or multiline regex) by ``new`` once in the copy of ``name``."""

    def apply(folder: Path) -> None:
        path = folder / name
        text = path.read_text()
        changed = re.sub(old, new, text, count=1, flags=re.M) if regex else text.replace(old, new, 1)
        assert changed != text, f"the breakage did not apply: {old!r} not in {name}"
        path.write_text(changed)

    return apply


def drop_lines(name: str, ending: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / name
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.rstrip().endswith(ending)]
        assert len(kept) < len(lines), f"the breakage did not apply: no line of {name} ends with {ending!r}"
        path.write_text("".join(kept))

    return apply


def append(name: str, line: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / name
        path.write_text(path.read_text().rstrip("\n") + "\n" + line + "\n")

    return apply


BREAKAGES = {
    # (a) environment.yml vs the lock
    "env version drifts": (
        edit("environment.yml", r"^(\s+- numpy==)\S+$", r"\g<1>9.9.9", regex=True),
        "environment.yml: numpy==9.9.9 but the lock has",
    ),
    "env misses a package": (
        edit("environment.yml", r"^\s+- syft==\S+\n", "", regex=True),
        "environment.yml: syft==0.9.5 of the lock is missing",
    ),
    "env has an extra package": (
        append("environment.yml", "      - flwr==1.0.0"),
        "environment.yml: flwr==1.0.0 is not in the lock",
    ),
    "env sneaks in a CUDA package": (
        append("environment.yml", "      - nvidia-cublas==13.1.1.3"),
        "is CUDA-only",
    ),
    "env lists a package twice": (append("environment.yml", "      - zipp==4.1.2"), "zipp is listed twice"),
    "env loses the CPU index": (
        edit("environment.yml", CPU_INDEX + "\n", ""),
        "the pip list must start with",
    ),
    "env pin made loose": (
        edit("environment.yml", r"^(\s+- tqdm)==", r"\g<1>>=", regex=True),
        "not an exact pin",
    ),
    "lock bumps a version": (
        edit("requirements.txt", r"^(pandas==)\S+$", r"\g<1>9.9.9", regex=True),
        "but the lock has 9.9.9",
    ),
    "lock gains a package": (
        append("requirements.txt", "sniffio2==1.0"),
        "sniffio2==1.0 of the lock is missing",
    ),
    # (b) the Linux-only marker
    "a real package hides behind the marker": (
        edit("requirements.txt", r"^(numpy==\S+)$", r'\g<1> ; sys_platform == "linux"', regex=True),
        "numpy is marked Linux-only but is not a CUDA runtime package",
    ),
    "a CUDA package loses its marker": (
        edit("requirements.txt", r'^(triton==\S+) ; sys_platform == "linux"$', r"\g<1>", regex=True),
        "CUDA runtime package triton lacks",
    ),
    "lock compiled on macOS (no CUDA packages)": (
        drop_lines("requirements.txt", '; sys_platform == "linux"'),
        "no CUDA runtime packages at all",
    ),
    # (c) requirements.in vs the lock
    "requirements.in pin drifts": (
        edit("requirements.in", "syft==0.9.5", "syft==0.9.4"),
        "requirements.in: syft==0.9.4 but the lock has 0.9.5",
    ),
    "requirements.in pin made loose": (
        edit("requirements.in", "opacus==", "opacus>="),
        "requirements.in: not an exact pin",
    ),
    "requirements.in names a package the lock lacks": (
        append("requirements.in", "flwr==1.0.0"),
        "requirements.in: flwr is missing from the lock",
    ),
    # (d) Python 3.11
    "env python 3.12": (
        edit("environment.yml", "- python=3.11", "- python=3.12"),
        "environment.yml: python is",
    ),
    "pyproject admits 3.12": (
        edit("pyproject.toml", r"^requires-python = .*$", 'requires-python = ">=3.11"', regex=True),
        "pyproject.toml: requires-python",
    ),
    "pyproject requires 3.12": (
        edit("pyproject.toml", r"^requires-python = .*$", 'requires-python = ">=3.12"', regex=True),
        "pyproject.toml: requires-python",
    ),
    "lock compiled with 3.12": (
        edit("requirements.txt", "with Python 3.11\n", "with Python 3.12\n"),
        "not compiled with Python 3.11",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_copy_is_caught(breakage, tmp_path):
    for name in FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    assert problems(*(tmp_path / name for name in FILES)) == [], "the unbroken copy must pass"
    breaker, expected = BREAKAGES[breakage]
    breaker(tmp_path)
    found = problems(*(tmp_path / name for name in FILES))
    assert any(expected in problem for problem in found), f"expected {expected!r} in:\n" + "\n".join(found)
