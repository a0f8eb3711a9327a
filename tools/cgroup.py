"""Run a command, or execute notebooks, inside a Linux memory cgroup with a hard limit, as Binder does.

A Binder pod's memory limit is a memory cgroup: everything in it (JupyterLab, the kernel, the processes
the kernel starts, the page cache they fill) is counted once, and when the total reaches the limit the
kernel's OOM killer ends a process in it (usually the notebook's kernel). ``make binder-check`` executes
each notebook, exactly as ``make run`` does but into a temporary folder, in a fresh cgroup of 1.8 GB (a
2 GB pod minus JupyterLab's share), and reports whether it finished and the cgroup's peak.

    python -m tools.cgroup --limit 1.8G tutorials/Part-07-*.ipynb     # notebooks, one cgroup each
    python -m tools.cgroup --limit 200M -- python -c "..."              # any command

Where it works: Linux, as root or with a delegated cgroup. cgroup v1 (a ``memory`` hierarchy, as on this
project's CI machines): a child of this process's own memory cgroup. cgroup v2: a child of this process's
cgroup (or of its parent) when the ``memory`` controller is enabled for its children, else a transient
``systemd-run --scope`` unit. :func:`unavailable` says why none of these can be used here; the command
line and the tests then stop with that reason.

The cgroup's peak (``memory.max_usage_in_bytes`` in v1, ``memory.peak`` in v2) counts the page cache
too: it is the figure a Binder limit is compared with, not the series' memory metric (the proportional
set size of the processes, :mod:`secure_ai.memory`), which ``make run`` stamps.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BINDER_LIMIT = 1_800_000_000  # bytes: 2 GB pod minus JupyterLab's share (issue 23)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def parse_size(text: str) -> int:
    """``"1.8G"`` -> 1,800,000,000 bytes (decimal units, as the budgets are stated; ``Gi`` for binary)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]i?)?B?\s*", text, re.I)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 1.8G, 500M, 2Gi)")
    return int(float(match[1]) * _UNITS[(match[2] or "").upper()])


# --- where a memory cgroup can be made ------------------------------------------------------------------
def _mounts() -> list[tuple[str, str, str]]:
    """``(mount point, root inside the hierarchy, "cgroup" or "cgroup2" + options)`` of cgroup mounts."""
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((fields[4], fields[3], f"{tail[0]} {tail[2]}"))
    return found


def _own_path(controller: str) -> str | None:
    """This process's path in the v1 hierarchy holding ``controller`` ("" for the v2 one)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if (controller == "" and names == "") or controller in names.split(","):
            return path
    return None


def _under(mount: str, root: str, path: str) -> Path:
    relative = os.path.relpath(path, root) if root != "/" else path.lstrip("/")
    return Path(mount, relative if relative != "." else "")


def _v1_parent() -> Path | None:
    for mount, root, kind in _mounts():
        if kind.startswith("cgroup ") and "memory" in kind.split(" ", 1)[1].split(","):
            own = _own_path("memory")
            if own is not None:
                return _under(mount, root, own)
    return None


def _v2_parent() -> Path | None:
    own = _own_path("")
    for mount, root, kind in _mounts():
        if kind.startswith("cgroup2") and own is not None:
            here = _under(mount, root, own)
            for parent in (here, here.parent):
                try:
                    enabled = (parent / "cgroup.subtree_control").read_text().split()
                except OSError:
                    continue
                if "memory" in enabled and os.access(parent, os.W_OK):
                    return parent
    return None


def _systemd_run() -> list[str] | None:
    if shutil.which("systemd-run") is None or not Path("/run/systemd/system").is_dir():
        return None  # systemd is not this machine's init: systemd-run cannot make units
    user = [] if os.geteuid() == 0 else ["--user"]
    return ["systemd-run", *user, "--quiet", "--scope", "--collect"]


def unavailable() -> str | None:
    """Why no memory cgroup can be made here, or ``None`` when one can."""
    if not sys.platform.startswith("linux"):
        return f"memory cgroups are a Linux feature (this is {sys.platform})"
    v1 = _v1_parent()
    if v1 is not None:
        return None if os.access(v1, os.W_OK) else f"{v1} is not writable (run as root, or delegate it)"
    if _v2_parent() is not None or _systemd_run() is not None:
        return None
    return ("no writable memory cgroup: neither a cgroup v1 memory hierarchy nor a cgroup v2 one with the "
            "memory controller delegated here, and no systemd to ask (run as root, or on Binder itself)")


# --- the cgroup --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """How a command fared in its cgroup."""

    returncode: int
    peak_bytes: int | None       # the cgroup's peak usage (processes + page cache + kernel memory)
    oom_kills: int               # processes the OOM killer ended in it
    seconds: float
    stderr: str = ""             # what the command wrote to a captured stderr
    pss_peak_bytes: int | None = None  # a notebook's: what `make run` stamps (secure_ai.memory)

    @property
    def killed(self) -> bool:
        return self.oom_kills > 0


def _counters(folder: Path) -> tuple[int | None, int]:
    """(peak bytes, OOM kills) of the cgroup at ``folder``, v1 or v2."""

    def number(name: str) -> int | None:
        try:
            return int((folder / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def field(name: str, key: str) -> int:
        try:
            text = (folder / name).read_text()
        except OSError:
            return 0
        match = re.search(rf"^{key} (\d+)$", text, re.M)
        return int(match[1]) if match else 0

    if (folder / "memory.max_usage_in_bytes").exists():  # v1
        return number("memory.max_usage_in_bytes"), field("memory.oom_control", "oom_kill")
    return number("memory.peak"), field("memory.events", "oom_kill")


def _own_folder() -> Path | None:
    """The folder of the memory cgroup this process is in (v1 or v2)."""
    for mount, root, kind in _mounts():
        if kind.startswith("cgroup ") and "memory" in kind.split(" ", 1)[1].split(","):
            own = _own_path("memory")
            return None if own is None else _under(mount, root, own)
    own = _own_path("")
    for mount, root, kind in _mounts():
        if kind.startswith("cgroup2") and own is not None:
            return _under(mount, root, own)
    return None


def _kill_all(folder: Path) -> None:
    """End what is left in the cgroup (processes this run started: e.g. servers of a killed kernel)."""
    for _ in range(50):
        try:
            pids = [int(p) for p in (folder / "cgroup.procs").read_text().split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def run(command: list[str], limit: int, **popen) -> Outcome:
    """Run ``command`` in a new memory cgroup limited to ``limit`` bytes (no swap); wait for it."""
    reason = unavailable()
    if reason:
        raise RuntimeError(reason)
    if limit < 10**7:
        raise ValueError(f"limit {limit} bytes is below 10 MB: not even Python starts")
    parent = _v1_parent() or _v2_parent()
    if parent is None:  # v2 through systemd: the scope vanishes at exit, so the command reports from inside
        return _run_in_scope(command, limit, **popen)
    folder = parent / f"secure-ai-{os.getpid()}-{time.monotonic_ns()}"
    folder.mkdir()
    try:
        if (folder / "memory.limit_in_bytes").exists():  # v1; memsw (memory + swap) only after memory
            (folder / "memory.limit_in_bytes").write_text(str(limit))
            if (folder / "memory.memsw.limit_in_bytes").exists():
                (folder / "memory.memsw.limit_in_bytes").write_text(str(limit))
        else:
            (folder / "memory.max").write_text(str(limit))
            if (folder / "memory.swap.max").exists():
                (folder / "memory.swap.max").write_text("0")
        procs = str(folder / "cgroup.procs")

        def join() -> None:  # in the child, before exec: it and everything it starts are in the cgroup
            with open(procs, "w") as handle:
                handle.write(str(os.getpid()))

        tic = time.perf_counter()
        done = subprocess.run(command, preexec_fn=join, **popen)
        seconds = time.perf_counter() - tic
        _kill_all(folder)
        peak, kills = _counters(folder)
        return Outcome(done.returncode, peak, kills, seconds, _text(done.stderr))
    finally:
        _kill_all(folder)
        for _ in range(50):
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _run_in_scope(command: list[str], limit: int, **popen) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="secure-ai-cgroup-") as tmp:
        report = Path(tmp, "report.json")
        wrapper = [sys.executable, "-m", "tools.cgroup", "--report", str(report), "--", *command]
        properties = ["-p", f"MemoryMax={limit}", "-p", "MemorySwapMax=0"]
        tic = time.perf_counter()
        done = subprocess.run([*_systemd_run(), *properties, *wrapper], **popen)
        seconds = time.perf_counter() - tic
        try:
            found = json.loads(report.read_text())
        except (OSError, ValueError):  # the wrapper itself was killed
            return Outcome(done.returncode, None, 1 if done.returncode else 0, seconds, _text(done.stderr))
        return Outcome(found["returncode"], found["peak"], found["oom_kills"], seconds, _text(done.stderr))


def _text(captured) -> str:
    return captured.decode(errors="replace") if isinstance(captured, bytes) else captured or ""


def _report(path: Path, command: list[str]) -> int:
    """Inside a systemd scope: run ``command``, then write the scope's counters to ``path``."""
    returncode = subprocess.run(command).returncode
    folder = _own_folder()
    peak, kills = _counters(folder) if folder else (None, 0)
    path.write_text(json.dumps({"returncode": returncode, "peak": peak, "oom_kills": kills}))
    return returncode


# --- notebooks ---------------------------------------------------------------------------------------------
def run_notebook(notebook: Path, limit: int = BINDER_LIMIT, timeout: int = 900) -> Outcome:
    """Execute ``notebook`` as ``make run`` does (into a temporary folder), inside a cgroup of ``limit``."""
    import nbformat  # only here: the command line for other commands needs nothing outside the stdlib

    with tempfile.TemporaryDirectory(prefix="secure-ai-binder-") as out:
        command = [sys.executable, "-m", "tools.execute", "--output-dir", out, "--timeout", str(timeout),
                   str(Path(notebook).resolve())]
        outcome = run(command, limit, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                      stderr=subprocess.PIPE)
        executed = Path(out, Path(notebook).name)
        if executed.exists():
            stamp = nbformat.read(executed, as_version=4).metadata.get("secure_ai", {})
            if stamp.get("peak_memory_mb"):
                outcome.pss_peak_bytes = stamp["peak_memory_mb"] * 10**6
        return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", default="1.8G", help="hard memory limit, e.g. 1.8G (default) or 500M")
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("targets", nargs="*", help="notebooks, or -- and a command")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.report:
        return _report(args.report, command)
    reason = unavailable()
    if reason:
        print(f"cannot run under a memory limit here: {reason}", file=sys.stderr)
        return 2
    limit = parse_size(args.limit)
    if command:
        outcome = run(command, limit)
        peak = f"{outcome.peak_bytes / 1e6:,.0f} MB" if outcome.peak_bytes else "unknown"
        print(f"exit {outcome.returncode}, cgroup peak {peak}, OOM kills {outcome.oom_kills}",
              file=sys.stderr)
        return outcome.returncode if outcome.returncode >= 0 else 128 - outcome.returncode  # as a shell
    failed = 0
    print(f"| notebook | under {limit / 1e9:.2g} GB | cgroup peak | PSS peak | run time |")
    print("|---|---|---|---|---|")
    for notebook in args.targets:
        outcome = run_notebook(Path(notebook), limit)
        verdict = ("killed for memory" if outcome.killed
                   else "finishes" if outcome.returncode == 0 else f"fails (exit {outcome.returncode})")
        peak = f"{outcome.peak_bytes / 1e6:,.0f} MB" if outcome.peak_bytes else "unknown"
        pss = f"{outcome.pss_peak_bytes / 1e6:,.0f} MB" if outcome.pss_peak_bytes else "-"
        print(f"| {Path(notebook).name} | {verdict} | {peak} | {pss} | {outcome.seconds:.0f} s |", flush=True)
        if outcome.returncode != 0:
            failed += 1
            print("\n".join(outcome.stderr.strip().splitlines()[-15:]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
