"""Execute notebooks the way ``make run`` does, and leave them readable wherever they are shown.

What a saved notebook gets, whatever the caller's environment:

* figures: the kernel always starts with Jupyter's inline matplotlib backend (an inherited
  ``MPLBACKEND=Agg`` would draw every figure nowhere);
* progress bars as text: tqdm's widgets are saved as references that GitHub, nbviewer and HTML exports
  show as nothing or as "0%"; each one is replaced by its final state as one text line
  (``epochs: 100%|##########| 3/3 [00:51<00:00, ...]``), and bars the loop hid when done are dropped;
* stamps: each code cell's metadata holds a hash of the source it was executed from, and the notebook's
  metadata the run time and the peak memory of the kernel and the processes it starts, as their summed
  proportional set size (:mod:`secure_ai.memory`: what a memory cgroup counts of them, each shared page
  once; ``make html`` shows them).

    python -m tools.execute tutorials/Part-01-*.ipynb            # in place, as `make run`
    python -m tools.execute --output-dir /tmp/out tutorials/*.ipynb
"""
from __future__ import annotations

import argparse
import hashlib
import html
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TUTORIALS = str(Path(__file__).resolve().parents[1] / "tutorials")
if TUTORIALS not in sys.path:
    sys.path.insert(0, TUTORIALS)
from secure_ai.memory import TreeSampler  # noqa: E402  (the helper package: no torch, no syft)

KERNEL = "secure-ai"
INLINE = "module://matplotlib_inline.backend_inline"
STAMP = "secure_ai"  # metadata key, in the notebook and in each code cell
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def source_hash(source: str) -> str:
    """The stamp of a code cell: what ``tests/test_saved_notebooks.py`` compares with its source."""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


# --- progress bars ------------------------------------------------------------------------------------


def _text(value: str) -> str:
    return html.unescape(value).replace("\u2007", " ")


def bar_text(model_id: str, state: dict) -> str | None:
    """The final text of a tqdm widget (``desc: 100%|##########| 3/3 [...]``), or None when the loop hid
    it at the end (``leave=False``) or it is not a tqdm bar."""
    box = state.get(model_id, {})
    if box.get("model_name") != "HBoxModel":
        return None
    children = [state.get(ref.removeprefix("IPY_MODEL_"), {}) for ref in box["state"].get("children", [])]
    if [c.get("model_name") for c in children] != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    layout = state.get(box["state"].get("layout", "").removeprefix("IPY_MODEL_"), {}).get("state", {})
    if layout.get("visibility") == "hidden" or layout.get("display") == "none":
        return None  # tqdm hides a finished leave=False bar: the reader never sees it either
    left, progress, right = (c["state"] for c in children)
    total = progress.get("max") or 0
    filled = round(10 * progress.get("value", 0) / total) if total else 0
    bar = "█" * filled + " " * (10 - filled)
    return f"{_text(left.get('value', ''))}|{bar}|{_text(right.get('value', ''))}"


def replace_widgets(nb) -> int:
    """Replace every widget output by its final text (or drop it); returns how many were replaced."""
    state = nb.metadata.pop("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    replaced = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            view = output.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                outputs.append(output)
                continue
            replaced += 1
            text = bar_text(view.get("model_id", ""), state)
            if text is not None:
                outputs.append(nbformat.v4.new_output("stream", name="stdout", text=text + "\n"))
        cell.outputs = _merge_streams(outputs)
    return replaced


def _merge_streams(outputs: list) -> list:
    merged: list = []
    for output in outputs:
        last = merged[-1] if merged else None
        if (output.output_type == "stream" and last is not None and last.output_type == "stream"
                and last.name == output.name):
            last.text += output.text
        else:
            merged.append(output)
    return merged


# --- execution ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one execution measured."""

    path: Path
    seconds: float
    peak_bytes: int | None
    cell_peaks: list[tuple[int, int]] = field(default_factory=list)  # (cell index, peak while it ran)


def execute(path: Path, output: Path | None = None, timeout: int = 900) -> Run:
    """Execute ``path`` top to bottom in a fresh ``secure-ai`` kernel and save it (to ``output``, default
    in place) with figures, text progress bars and stamps. Raises ``CellExecutionError`` on a failing cell
    (nothing is saved then)."""
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, MPLBACKEND=INLINE)  # figures must land in the notebook, whatever the caller set
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=KERNEL, record_timing=False, coalesce_streams=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    cell_peaks: list[tuple[int, int]] = []
    sampler: list[TreeSampler] = []

    def before_cell(cell, cell_index, **_):
        if not sampler:  # the kernel is up: watch it (and what it starts) until the end
            sampler.append(TreeSampler(client.km.provisioner.pid))
            sampler[0].start()
        sampler[0].new_cell()

    def after_cell(cell, cell_index, **_):
        try:
            now = sampler[0].read()
        except psutil.Error:  # the kernel died: nbclient reports it
            now = 0
        cell_peaks.append((cell_index, max(sampler[0].new_cell(), now)))

    client.on_cell_start, client.on_cell_executed = before_cell, after_cell
    start = time.perf_counter()
    try:
        client.execute(env=env)
    finally:
        if sampler:
            sampler[0].stop()
    seconds = time.perf_counter() - start
    peak = max([sampler[0].peak if sampler else 0, *(p for _, p in cell_peaks)]) or None

    replace_widgets(nb)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps of an earlier nbconvert run
        if cell.cell_type == "code":
            cell.metadata[STAMP] = {"source": source_hash(cell.source)}
    nb.metadata[STAMP] = {
        "run_time_s": round(seconds, 1),
        "peak_memory_mb": round(peak / 1e6) if peak else None,
        "executed": time.strftime("%Y-%m-%d"),
    }
    nbformat.write(nb, Path(output) if output else path)
    return Run(path, seconds, peak, cell_peaks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--output-dir", type=Path, help="save executed copies here (default: in place)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        output = args.output_dir / notebook.name if args.output_dir else None
        if output:
            output.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {notebook.name}", flush=True)
        try:
            run = execute(notebook, output, args.timeout)
        except CellExecutionError as error:
            print(f"{error}\n{notebook.name} failed (see the cell above); it was not saved.", file=sys.stderr)
            return 1
        peak = f"{run.peak_bytes / 1e9:.2f} GB" if run.peak_bytes else "unknown"
        print(f"   {run.seconds:.0f} s, peak memory {peak} (PSS of the kernel and its children)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
