"""Render the executed notebooks into a static site (``make html``): one page per chapter, and an index.

The index lists the chapters in order with the one-line summary of the README's chapter table and the
run time and peak memory that ``make run`` stamped into each notebook. Pages embed their figures, so
the folder can be opened from disk or served as it is (GitHub Pages, any web server).

    python -m tools.book            # -> build/index.html, build/Part-01-....html, ...
"""
from __future__ import annotations

import argparse
import html
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

from tools.execute import STAMP, replace_widgets

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"


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
    for path in sorted(notebooks):
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
</style>
</head>
<body>
<h1>{title}</h1>
<p>{intro}</p>
<ol class="chapters">
{items}
</ol>
</body>
</html>
"""


def render_index(items: list[Chapter], title: str = "Secure-AI: privacy-preserving machine learning") -> str:
    rows = "\n".join(
        f'<li><a href="{c.page}">{html.escape(c.title)}</a><br>'
        f'<span class="summary">{_markdown_inline(c.summary)}</span><br>'
        f'<span class="cost">{_cost(c)}</span></li>'
        for c in items
    )
    intro = ("Jupyter notebooks on training models with data you are not allowed to see, rendered with "
             "the outputs of their last run. Run them yourself with <code>make lab</code>.")
    return INDEX.format(title=html.escape(title), intro=intro, items=rows)


def build(notebooks: list[Path], out: Path, readme: Path = ROOT / "README.md") -> list[Chapter]:
    """Write one page per notebook and ``index.html`` into ``out``; returns the chapters, in order."""
    out.mkdir(parents=True, exist_ok=True)
    items = chapters(notebooks, readme)
    exporter = HTMLExporter(template_name="book", extra_template_basedirs=[str(TEMPLATES)])
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
    (out / "index.html").write_text(render_index(items), encoding="utf-8")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "build")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "tutorials").glob("Part-*.ipynb"))
    for chapter in build(notebooks, args.out):
        print(f"{args.out / chapter.page}  ({_cost(chapter)})")
    print(f"open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
