"""The committed notebooks are what a reader sees on GitHub, nbviewer or in the rendered book.

Each one must have been executed by ``make run`` from its current code (every code cell carries the hash
of the source it ran, see ``tools/execute.py``), top to bottom, and its saved outputs must show what the
code drew and printed: a figure for every cell that draws, finished progress bars as text, and no error,
traceback or warning. These rules hold for cells whose input is hidden too (their outputs are on screen),
and a hidden input is hidden everywhere: in JupyterLab (``metadata.jupyter.source_hidden``) and in the
book (the ``hide-input`` tag) alike. :func:`problems` does the reading; the tests below also run it on
copies broken on purpose, so that every rule is shown to fail.
"""
from __future__ import annotations

import base64
import copy
import re
import struct
from pathlib import Path

import nbformat
import pytest

from tools.book import series
from tools.chapter_metrics import HIDE_INPUT_TAG
from tools.execute import STAMP, WIDGET_VIEW, source_hash

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = series()  # the chapters, then the appendices
RERUN = "run `make run` and commit the result"

# A cell draws when it calls the helper's plots or pyplot (comments ignored).
DRAWS = re.compile(r"\b(?:plt\.\w+|show_digits|plot_\w+)\s*\(")
# What must never be saved: a traceback, a Python or syft warning, syft's log lines.
NOISE = re.compile(
    r"Traceback \(most recent call last\)|\b\w*Warning\b:|\bSyftWarning\b|\bSyftError\b"
    r"|^(?:CRITICAL|ERROR|WARNING):|Using SQLiteDBConfig|You have launched a development server",
    re.M,
)
TQDM_BAR = re.compile(r"(\d+)%\|")


def png_size(data: str) -> tuple[int, int]:
    raw = base64.b64decode(data)
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        return (0, 0)
    return struct.unpack(">II", raw[16:24])


def output_texts(output) -> list[str]:
    if output.output_type == "stream":
        return [output.text]
    data = output.get("data", {})
    return [str(data[key]) for key in ("text/plain", "text/html", "text/markdown") if key in data]


def problems(nb) -> list[str]:
    """Everything a reader would find wrong in the saved notebook ``nb``; empty when it is fine."""
    found = []
    if STAMP not in nb.metadata or "run_time_s" not in nb.metadata[STAMP]:
        found.append(f"not executed by `make run` (no metadata.{STAMP}); {RERUN}")
    if "widgets" in nb.metadata:
        found.append("widget state saved: progress bars would show as '0%' outside Jupyter; " + RERUN)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    if counts != list(range(1, len(code) + 1)):
        found.append(f"not executed top to bottom in one run (execution counts {counts}); {RERUN}")
    stale = [
        n for n, cell in enumerate(code, 1)
        if cell.metadata.get(STAMP, {}).get("source") != source_hash(cell.source)
    ]
    if stale:
        found.append(f"code cells {stale}: saved outputs are stale (the code changed since it ran); {RERUN}")
    for number, cell in enumerate(code, 1):
        first_line = (cell.source.strip().splitlines() or [""])[0]
        where = f"code cell {number} ({first_line[:50]})"
        code_lines = "\n".join(line.split("#", 1)[0] for line in cell.source.splitlines())
        images = [png_size(o.data["image/png"]) for o in cell.outputs if "image/png" in o.get("data", {})]
        collapsed = bool(cell.metadata.get("jupyter", {}).get("source_hidden"))
        tagged = HIDE_INPUT_TAG in cell.metadata.get("tags", [])
        if collapsed != tagged:
            found.append(
                f"{where}: input hidden in JupyterLab (source_hidden) but not in the book: add the "
                f"{HIDE_INPUT_TAG!r} tag" if collapsed else
                f"{where}: input hidden in the book ({HIDE_INPUT_TAG!r} tag) but not in JupyterLab: set "
                "metadata.jupyter.source_hidden to true")
        if DRAWS.search(code_lines) and not images:
            found.append(f"{where}: draws but saved no figure (was MPLBACKEND=Agg set?); {RERUN}")
        if any(w == 0 or h == 0 for w, h in images):
            found.append(f"{where}: a saved figure is not a PNG of non-zero size")
        for output in cell.outputs:
            if output.output_type == "error":
                found.append(f"{where}: saved an error: {output.ename}: {output.evalue}")
            if WIDGET_VIEW in output.get("data", {}):
                found.append(f"{where}: a widget output (shows as '0%' or nothing outside Jupyter); {RERUN}")
            for text in output_texts(output):
                if (match := NOISE.search(text)) is not None:
                    found.append(f"{where}: saved noise {match[0]!r}")
                unfinished = [p for p in TQDM_BAR.findall(text) if p != "100"]
                if unfinished:
                    found.append(f"{where}: a progress bar saved at {unfinished[-1]}%, not as finished")
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_saved_notebook_is_what_the_code_produces(path):
    found = problems(nbformat.read(path, as_version=4))
    assert not found, f"{path.name}:\n" + "\n".join(found)


# --- every rule fails on a copy broken on purpose -----------------------------------------------------

PNG_1x1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def good_notebook():
    cells = [
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell("fig = show_digits(images)  # owner side"),
        nbformat.v4.new_code_cell("for _ in progress(range(3)): pass"),
        nbformat.v4.new_code_cell("# Check: three images\nassert len(images) == 3"),
    ]
    cells[3].metadata.update(tags=[HIDE_INPUT_TAG, "check"], jupyter={"source_hidden": True})
    figure = {"image/png": PNG_1x1, "text/plain": "<Figure>"}
    cells[1].outputs = [nbformat.v4.new_output("display_data", data=figure)]
    bar = "x: 100%|██████████| 3/3 [00:01<00:00]\n"
    cells[2].outputs = [nbformat.v4.new_output("stream", name="stdout", text=bar)]
    for count, cell in enumerate(cells[1:], 1):
        cell.execution_count = count
        cell.metadata[STAMP] = {"source": source_hash(cell.source)}
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata[STAMP] = {"run_time_s": 1.0, "peak_memory_mb": 100}
    return nb


def _edit_source(nb):
    nb.cells[2].source += "\nprint(1)"


def _no_figure(nb):
    nb.cells[1].outputs = []


def _error(nb):
    error = nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])
    nb.cells[2].outputs.append(error)


def _warning(nb):
    nb.cells[2].outputs.append(
        nbformat.v4.new_output("stream", name="stderr", text="/x.py:3: UserWarning: deprecated\n")
    )


def _syft_log(nb):
    nb.cells[2].outputs.append(
        nbformat.v4.new_output("stream", name="stderr", text="CRITICAL:syft.server.server:Hash of the key\n")
    )


def _widget(nb):
    nb.cells[2].outputs = [nbformat.v4.new_output(
        "display_data", data={WIDGET_VIEW: {"model_id": "abc"}, "text/plain": "  0%|          | 0/3"})]


def _unfinished_bar(nb):
    nb.cells[2].outputs[0].text = "x:  40%|████      | 2/5 [00:01<00:01]\n"


def _never_stamped(nb):
    del nb.metadata[STAMP]


def _out_of_order(nb):
    nb.cells[1].execution_count = 7


def _hidden_cell_edited(nb):
    nb.cells[3].source += " and images.ndim == 3"


def _hidden_cell_draws_nothing(nb):
    nb.cells[3].source = nb.cells[3].source + "\nshow_digits(images)"
    nb.cells[3].metadata[STAMP] = {"source": source_hash(nb.cells[3].source)}


def _hidden_in_lab_only(nb):
    nb.cells[3].metadata["tags"] = ["check"]


def _hidden_in_the_book_only(nb):
    del nb.cells[3].metadata["jupyter"]


def _new_cell(nb):
    nb.cells.append(nbformat.v4.new_code_cell("1 + 1"))
    nb.cells[-1].execution_count = 4


BREAKAGES = {
    "code edited after the run": (_edit_source, "stale"),
    "figure missing": (_no_figure, "draws but saved no figure"),
    "error saved": (_error, "saved an error: ValueError"),
    "Python warning saved": (_warning, "UserWarning"),
    "syft log saved": (_syft_log, "CRITICAL:"),
    "tqdm widget saved": (_widget, "a widget output"),
    "bar saved unfinished": (_unfinished_bar, "saved at 40%"),
    "executed without make run": (_never_stamped, "not executed by `make run`"),
    "cells run out of order": (_out_of_order, "not executed top to bottom"),
    "cell added, never run": (_new_cell, "stale"),
    "hidden cell edited after the run": (_hidden_cell_edited, "code cells [3]: saved outputs are stale"),
    "hidden cell draws, saved no figure": (_hidden_cell_draws_nothing,
                                           "code cell 3 (# Check: three images): draws but saved no figure"),
    "input hidden in JupyterLab only": (_hidden_in_lab_only, "but not in the book"),
    "input hidden in the book only": (_hidden_in_the_book_only, "but not in JupyterLab"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_notebook_is_caught(breakage):
    nb = good_notebook()
    assert problems(nb) == [], "the unbroken notebook must pass"
    broken = copy.deepcopy(nb)
    breaker, expected = BREAKAGES[breakage]
    breaker(broken)
    found = problems(broken)
    assert any(expected in problem for problem in found), f"expected {expected!r} in:\n" + "\n".join(found)
