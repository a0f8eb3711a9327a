"""The files that describe the environment agree with each other.

* Two locks (from ``make lock``), one per Python: ``requirements.txt`` for 3.11 and
  ``requirements-py312.txt`` for 3.12 (the Makefile's ``LOCKS`` says which is which). Each says in its
  header which Python compiled it. They pin the same versions of the packages they share, except those
  that ``requirements.in`` pins per Python (numpy: syft 0.9.5 wants 1.24 on 3.11, 1.26 on 3.12).
* ``environment.yml`` (conda, Binder) takes Python 3.11 and pins exactly the 3.11 lock, minus the
  CUDA-only runtime packages that the locks mark ``sys_platform == "linux"``.
* That marker hides only CUDA runtime packages (nvidia-*, cuda-*, triton), and every one of them has it.
* ``requirements.in`` pins each top-level package exactly, at each lock's version (a pin with a
  ``python_version`` marker, at the version of the lock for that Python).
* ``pyproject.toml`` admits Python 3.11 and 3.12, nothing else.

:func:`problems` takes the paths and returns what is wrong, so the same check runs on the real files
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
LOCKS = {"3.11": "requirements.txt", "3.12": "requirements-py312.txt"}
FILES = ("environment.yml", *LOCKS.values(), "requirements.in", "pyproject.toml")
LINUX_ONLY = 'sys_platform == "linux"'
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;#]+)\s*(?:;\s*(?P<marker>[^#]*?))?\s*$"
)
PER_PYTHON = re.compile(r'^python_version\s*(?P<op>[<>=!]=?)\s*"(?P<version>[0-9.]+)"$')


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


def read_requirements_in(path: Path, python: str) -> tuple[dict[str, str], list[str]]:
    """Top-level ``{name: version}`` of ``requirements.in`` for Python ``python`` ("3.11"), and the lines
    that are not an exact pin (a pin may carry a ``python_version`` marker, nothing else)."""
    pins, odd = {}, []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        per_python = PER_PYTHON.match(match["marker"]) if match and match["marker"] else None
        if match is None or (match["marker"] and per_python is None):
            odd.append(line)
        elif per_python is None or SpecifierSet(per_python["op"] + per_python["version"]).contains(python):
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


def lock_problems(label: str, lock: dict, odd: list[str]) -> list[str]:
    """What is wrong with one lock on its own: not exact pins, markers other than the CUDA one."""
    found = [f"{label}: not an exact pin: {line!r}" for line in odd]
    for name, (_, marker) in sorted(lock.items()):
        if marker is not None and marker != LINUX_ONLY:
            found.append(f"{label}: {name} has an unexpected marker {marker!r}")
        elif marker == LINUX_ONLY and not is_cuda_only(name):
            found.append(f"{label}: {name} is marked Linux-only but is not a CUDA runtime package")
        elif is_cuda_only(name) and marker != LINUX_ONLY:
            found.append(f"{label}: CUDA runtime package {name} lacks '; {LINUX_ONLY}'")
    if not any(marker == LINUX_ONLY for _, marker in lock.values()):
        found.append(f"{label}: no CUDA runtime packages at all; run `make lock` on Linux")
    return found


def problems(env_path: Path, lock311_path: Path, lock312_path: Path, in_path: Path,
             pyproject_path: Path) -> list[str]:
    """Everything on which the files disagree; empty when they are consistent."""
    found: list[str] = []
    paths = {"3.11": lock311_path, "3.12": lock312_path}
    locks = {}
    for python, path in paths.items():
        lock, odd = read_lock(path)
        locks[python] = lock
        # (b) the Linux-only marker is on exactly the CUDA runtime packages, and on nothing else
        found += lock_problems(path.name, lock, odd)
        if f"with Python {python}\n" not in path.read_text():
            found.append(f"{path.name}: not compiled with Python {python} (see its header); run `make lock`")
        # (c) every top-level pin of requirements.in is this lock's version
        top, odd_in = read_requirements_in(in_path, python)
        if python == "3.11":
            found += [f"requirements.in: not an exact pin: {line!r}" for line in odd_in]
        for name, version in sorted(top.items()):
            if name not in lock:
                found.append(f"requirements.in: {name} is missing from {path.name}; run `make lock`")
            elif lock[name][0] != version:
                found.append(f"requirements.in: {name}=={version} but {path.name} has {lock[name][0]}; "
                             "run `make lock`")
    # the two locks pin the same versions, except what requirements.in pins per Python
    per_python = set(read_requirements_in(in_path, "3.11")[0].items()) ^ set(
        read_requirements_in(in_path, "3.12")[0].items())
    differ_on_purpose = {name for name, _ in per_python}
    for name in sorted(locks["3.11"].keys() & locks["3.12"].keys() - differ_on_purpose):
        if locks["3.11"][name][0] != locks["3.12"][name][0]:
            found.append(f"{name}: {locks['3.11'][name][0]} in {lock311_path.name} but "
                         f"{locks['3.12'][name][0]} in {lock312_path.name}; pin it per Python in "
                         "requirements.in")
    lock = locks["3.11"]
    cuda_only = {name for name, (_, marker) in lock.items() if marker == LINUX_ONLY and is_cuda_only(name)}

    # (a) environment.yml pins the 3.11 lock minus the CUDA-only packages, name for name, version for version
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

    # (d) Python: conda and Binder take 3.11; pyproject admits 3.11 and 3.12
    pythons = [str(dep) for dep in conda if re.match(r"^python\b(?!-)", str(dep))]
    if not (len(pythons) == 1 and re.fullmatch(r"python\s*==?\s*3\.11(\.\*|\.\d+)?", pythons[0])):
        found.append(f"environment.yml: python is {pythons!r}, expected ['python=3.11'] (its lock's)")
    requires = tomllib.loads(pyproject_path.read_text()).get("project", {}).get("requires-python", "")
    spec = SpecifierSet(requires)
    admitted = all(spec.contains(v) for v in ("3.11.0", "3.11.9", "3.12.0", "3.12.9"))
    if not admitted or spec.contains("3.10.14") or spec.contains("3.13.0"):
        found.append(f"pyproject.toml: requires-python is {requires!r}; it must admit 3.11 and 3.12 only")
    return found


def test_the_real_files_agree():
    found = problems(*(ROOT / name for name in FILES))
    assert not found, "\n".join(found)


def test_the_cuda_only_set_is_the_torch_runtime():
    for name in LOCKS.values():
        lock, _ = read_lock(ROOT / name)
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
    for name in LOCKS.values():
        lock, _ = read_lock(ROOT / name)
        for package, (version, _) in lock.items():
            assert bool(regex.match(f"{package}=={version}")) == is_cuda_only(package), package


def test_the_makefile_picks_the_lock_of_its_python():
    """``LOCKS`` in the Makefile maps each Python to the lock compiled with it."""
    makefile = (ROOT / "Makefile").read_text()
    pairs = re.search(r"^LOCKS\s*:=\s*(.+)$", makefile, re.M)
    assert pairs, "Makefile lost its LOCKS table"
    assert dict(pair.split(":") for pair in pairs[1].split()) == LOCKS


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
    "the 3.12 lock drifts from the 3.11 one": (
        edit("requirements-py312.txt", r"^(tqdm==)\S+$", r"\g<1>9.9.9", regex=True),
        "tqdm: 4.70.1 in requirements.txt but 9.9.9 in requirements-py312.txt",
    ),
    "the 3.12 lock has the 3.11 numpy": (
        edit("requirements-py312.txt", r"^(numpy==)\S+$", r"\g<1>1.24.4", regex=True),
        "requirements.in: numpy==1.26.4 but requirements-py312.txt has 1.24.4",
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
        "requirements.in: syft==0.9.4 but requirements.txt has 0.9.5",
    ),
    "requirements.in pin made loose": (
        edit("requirements.in", "opacus==", "opacus>="),
        "requirements.in: not an exact pin",
    ),
    "requirements.in pins by another marker": (
        edit("requirements.in", 'numpy==1.24.4 ; python_version < "3.12"', 'numpy==1.24.4 ; os_name == "nt"'),
        "requirements.in: not an exact pin",
    ),
    "requirements.in names a package the lock lacks": (
        append("requirements.in", "flwr==1.0.0"),
        "requirements.in: flwr is missing from requirements.txt",
    ),
    # (d) Python
    "env python 3.12": (
        edit("environment.yml", "- python=3.11", "- python=3.12"),
        "environment.yml: python is",
    ),
    "pyproject admits 3.13": (
        edit("pyproject.toml", r"^requires-python = .*$", 'requires-python = ">=3.11"', regex=True),
        "pyproject.toml: requires-python",
    ),
    "pyproject refuses 3.12": (
        edit("pyproject.toml", r"^requires-python = .*$", 'requires-python = ">=3.11,<3.12"', regex=True),
        "pyproject.toml: requires-python",
    ),
    "pyproject requires 3.12": (
        edit("pyproject.toml", r"^requires-python = .*$", 'requires-python = ">=3.12"', regex=True),
        "pyproject.toml: requires-python",
    ),
    "lock compiled with 3.12": (
        edit("requirements.txt", "with Python 3.11\n", "with Python 3.12\n"),
        "requirements.txt: not compiled with Python 3.11",
    ),
    "3.12 lock compiled with 3.11": (
        edit("requirements-py312.txt", "with Python 3.12\n", "with Python 3.11\n"),
        "requirements-py312.txt: not compiled with Python 3.12",
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
