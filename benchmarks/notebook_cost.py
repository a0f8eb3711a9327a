"""What each chapter costs a reader: run time and peak memory, each notebook executed alone.

Run from the repository root (``make cost``); the notebooks are executed into a temporary folder, never
in place, exactly as ``make run`` executes them (fresh ``secure-ai`` kernel, inline figures). Peak memory
is the largest total, sampled every 0.1 s, of the proportional set size (PSS) of the kernel and the
processes it starts (syft's HTTP datasites in Parts 1 and 6), each shared page counted once
(:mod:`secure_ai.memory`): what a Binder user's 2 GB must hold besides JupyterLab and the page cache
(``make binder-check`` runs each notebook inside such a limit). With PyPI's CUDA build of torch (Linux)
part of it is torch's CUDA libraries, which a CPU-only torch (Binder, conda, macOS) does not load
(INSTALLATION.md, "CPU-only torch").

    .venv/bin/python benchmarks/notebook_cost.py                 # every chapter and appendix, a table
    .venv/bin/python benchmarks/notebook_cost.py --cells 5 tutorials/Part-02-*.ipynb

``--cells N`` also lists the N code cells during which memory peaked highest, to find what to cut.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.book import series, title_of  # noqa: E402
from tools.execute import execute  # noqa: E402

GB = 1e9  # decimal gigabytes, as the budgets are stated


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--cells", type=int, default=0, help="list the N cells with the highest peaks")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or series()   # the chapters, then the appendices
    rows = []
    with tempfile.TemporaryDirectory(prefix="notebook-cost-") as out:
        for path in notebooks:
            print(f"executing {path.name} ...", file=sys.stderr, flush=True)
            run = execute(path, Path(out) / path.name)
            nb = nbformat.read(Path(out) / path.name, as_version=4)
            rows.append((title_of(nb, path.stem), run))
            if args.cells:
                print(f"  cells of {path.name} with the highest peaks:", file=sys.stderr)
                for index, peak in sorted(run.cell_peaks, key=lambda item: -item[1])[: args.cells]:
                    first = (nb.cells[index].source.strip().splitlines() or [""])[0][:70]
                    print(f"    {peak / GB:5.2f} GB  cell {index:3d}  {first}", file=sys.stderr)
    print(f"<!-- measured with `make cost`: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {version('torch')}, {time.strftime('%Y-%m-%d')} -->")
    print("| Chapter | Run time | Peak memory |\n|---|---|---|")
    for title, run in rows:
        peak = f"{run.peak_bytes / GB:.2f} GB" if run.peak_bytes else "unknown"
        print(f"| {title} | {duration(run.seconds)} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
