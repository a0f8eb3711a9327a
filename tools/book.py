"""Render the executed notebooks into a static site (``make html``): one page per chapter, and an index.

The index opens with the series' three concept diagrams (:data:`DIAGRAMS`, hand-written SVG files in
``tutorials/figures/``, copied into ``build/figures/``), then lists the chapters in order with the one-line
summary of the README's chapter table and the run time and peak memory that ``make run`` stamped into
each notebook. Pages embed their saved figures; a markdown cell may show a file of ``tutorials/figures/``
as ``figures/<name>``. The folder can be opened from disk or served as it is (GitHub Pages, any web
server).

A code cell whose input is hidden (``metadata.jupyter.source_hidden`` or the ``hide-input`` tag, see
``tools/chapter_metrics.py``) is rendered collapsed: its code inside a ``<details>`` block whose summary
reads "show code", its outputs shown as usual. ``<details>`` blocks in markdown (exercise solutions) are
kept as they are, folded until the reader opens them.

    python -m tools.book            # -> build/index.html, build/Part-01-....html, ...
"""
from __future__ import annotations

import argparse
import html
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

from tools.chapter_metrics import is_hidden
from tools.execute import STAMP, replace_widgets

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"
FIGURES = ROOT / "tutorials" / "figures"
# The concept diagrams of the index (and the README's "The big picture"), in reading order.
DIAGRAMS = ("fl-round.svg", "pairwise-masks.svg", "threat-model.svg")
SVG = "{http://www.w3.org/2000/svg}"


@dataclass
class Chapter:
    notebook: Path
    title: str
    summary: str
    run_time_s: float | None
    peak_memory_mb: int | None

    @property
    def page(self) -> str:
        return self.notebook.stem + ".html"


def book_order(path: Path) -> tuple[bool, str]:
    """Sort key: the chapters (``Part-*``) in name order, then the appendices (``Appendix-*``)."""
    return (not path.name.startswith("Part-"), path.name)


def series(folder: Path = ROOT / "tutorials") -> list[Path]:
    """The notebooks of the book, in order: ``Part-*.ipynb``, then ``Appendix-*.ipynb`` (as ``make run``)."""
    return sorted([*folder.glob("Part-*.ipynb"), *folder.glob("Appendix-*.ipynb")], key=book_order)


def readme_summaries(readme: Path) -> dict[str, str]:
    """``{notebook file name: "What you learn" cell}`` from the README's chapter table."""
    rows = re.findall(r"^\|\s*\[[^\]]*\]\(tutorials/([^)]+\.ipynb)\)\s*\|\s*(.+?)\s*\|\s*$",
                      readme.read_text(), re.M)
    return dict(rows)


def title_of(nb, fallback: str) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown" and (match := re.search(r"^#\s+(.+)$", cell.source, re.M)):
            return match[1].strip()
    return fallback


def first_sentence(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            text = " ".join(line for line in cell.source.splitlines() if line and not line.startswith("#"))
            if text:
                return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return ""


def chapters(notebooks: list[Path], readme: Path = ROOT / "README.md") -> list[Chapter]:
    summaries = readme_summaries(readme) if readme.exists() else {}
    found = []
    for path in sorted(notebooks, key=book_order):
        nb = nbformat.read(path, as_version=4)
        stamp = nb.metadata.get(STAMP, {})
        found.append(Chapter(path, title_of(nb, path.stem), summaries.get(path.name) or first_sentence(nb),
                             stamp.get("run_time_s"), stamp.get("peak_memory_mb")))
    return found


def _markdown_inline(text: str) -> str:
    """The few inline marks the README's summaries use: `code`, **bold**, *emphasis*."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", text)


def diagram_text(path: Path) -> tuple[str, str]:
    """``(title, description)`` of an SVG diagram: its ``<title>`` and ``<desc>`` elements."""
    root = ET.parse(path).getroot()
    return (root.findtext(f"{SVG}title", "").strip(), root.findtext(f"{SVG}desc", "").strip())


def _figures(figures: Path) -> str:
    items = []
    for name in DIAGRAMS:
        title, description = diagram_text(figures / name)
        items.append(f'<figure><img src="figures/{name}" title="{html.escape(title)}" '
                     f'alt="{html.escape(description)}"></figure>')
    return "\n".join(items)


def _cost(chapter: Chapter) -> str:
    if chapter.run_time_s is None:
        return "not executed with <code>make run</code>"
    minutes, seconds = divmod(round(chapter.run_time_s), 60)
    took = f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"
    memory = f", peak memory {chapter.peak_memory_mb / 1000:.1f} GB" if chapter.peak_memory_mb else ""
    return f"runs in {took}{memory}"


INDEX = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.5; color: #222; }}
li {{ margin-bottom: 1rem; }}
.cost {{ color: #666; font-size: 0.9em; }}
figure {{ margin: 1.5rem 0; }}
figure img {{ display: block; max-width: 100%; height: auto; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{intro}</p>
<h2>The big picture</h2>
<p>Three pictures to keep in mind while you read: who holds what in a round of federated learning, how
pairwise masks hide each owner's update inside a sum, and which protection guards against whom.</p>
{figures}
<h2>Chapters</h2>
<ol class="chapters">
{items}
</ol>
</body>
</html>
"""


def render_index(items: list[Chapter], title: str = "Secure-AI: privacy-preserving machine learning",
                 figures: Path = FIGURES) -> str:
    rows = "\n".join(
        f'<li><a href="{c.page}">{html.escape(c.title)}</a><br>'
        f'<span class="summary">{_markdown_inline(c.summary)}</span><br>'
        f'<span class="cost">{_cost(c)}</span></li>'
        for c in items
    )
    intro = ("Jupyter notebooks on training models with data you are not allowed to see, rendered with "
             "the outputs of their last run. Run them yourself with <code>make lab</code>.")
    return INDEX.format(title=html.escape(title), intro=intro, figures=_figures(figures), items=rows)


def build(notebooks: list[Path], out: Path, readme: Path = ROOT / "README.md",
          figures: Path = FIGURES) -> list[Chapter]:
    """Write one page per notebook, ``index.html`` and ``figures/`` into ``out``; returns the chapters,
    in order."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(figures, out / "figures", dirs_exist_ok=True)
    items = chapters(notebooks, readme)
    exporter = HTMLExporter(template_name="book", extra_template_basedirs=[str(TEMPLATES)])
    exporter.register_filter("hidden_input", is_hidden)
    for i, chapter in enumerate(items):
        nb = nbformat.read(chapter.notebook, as_version=4)
        nb.metadata["title"] = chapter.title
        replace_widgets(nb)  # a notebook saved by plain Jupyter: its bars as text, no widget scripts
        resources = {
            "metadata": {"name": chapter.notebook.stem},
            "book": {
                "previous": items[i - 1].page if i > 0 else None,
                "next": items[i + 1].page if i + 1 < len(items) else None,
            },
        }
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        (out / chapter.page).write_text(body, encoding="utf-8")
    (out / "index.html").write_text(render_index(items, figures=figures), encoding="utf-8")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "build")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or series()
    for chapter in build(notebooks, args.out):
        print(f"{args.out / chapter.page}  ({_cost(chapter)})")
    print(f"open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
