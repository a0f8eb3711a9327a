"""``make html``: the rendered book, opened in headless Chromium as a reader's browser would open it.

Beyond the pages themselves: the index shows the three concept diagrams (``tutorials/figures/``), cells
whose input is hidden render folded under "show code" with their outputs on screen, and the ``<details>``
blocks of exercise solutions start folded and unfold.

Without Chromium the browser tests skip with one line, except in CI (``CI=true``), where ``.ci/run``
installs it and a missing browser is a failure.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from tools.book import DIAGRAMS, FIGURES, build, diagram_text, readme_summaries, series
from tools.browser import Chromium, find_chromium
from tools.chapter_metrics import is_hidden

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = series()  # the chapters, then the appendices


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    return out, build(NOTEBOOKS, out)


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI: .ci/run installs it with apt-get install chromium")
        pytest.skip("no Chromium here (apt-get install chromium); the rendered book is checked in CI")
    with Chromium() as chromium:
        yield chromium


def test_make_html_renders_the_book_into_build():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^html: \$\(STAMP\)\n\t\$\(BIN\)/python -m tools\.book\b", makefile, re.M)
    assert "build/" in (ROOT / ".gitignore").read_text().split()


def test_index_lists_every_chapter_in_order_with_summary_and_run_time(book):
    out, chapters = book
    index = (out / "index.html").read_text()
    assert [c.notebook for c in chapters] == NOTEBOOKS
    summaries = readme_summaries(ROOT / "README.md")
    positions = []
    for chapter in chapters:
        assert (out / chapter.page).is_file()
        positions.append(index.index(f'href="{chapter.page}"'))
        item = index[positions[-1]:].split("</li>", 1)[0]
        assert chapter.summary and chapter.summary == summaries[chapter.notebook.name]
        assert re.search(r"runs in (\d+ min )?\d+ s", item), f"{chapter.page}: no run time (run `make run`)"
    assert positions == sorted(positions), "chapters out of order"


def test_index_shows_the_concept_diagrams(book):
    out, _ = book
    index = (out / "index.html").read_text()
    assert "<h2>The big picture</h2>" in index
    assert index.index("The big picture") < index.index('<ol class="chapters">')
    for name in DIAGRAMS:
        assert (out / "figures" / name).read_bytes() == (FIGURES / name).read_bytes()
        title, description = diagram_text(FIGURES / name)
        assert title and description
        assert f'<img src="figures/{name}"' in index, name


def markdown_images(nb) -> int:
    """Images a notebook's markdown shows (``![...](...)`` or ``<img``), e.g. a diagram of figures/."""
    return sum(len(re.findall(r"!\[[^\]]*\]\(|<img\b", cell.source)) for cell in nb.cells
               if cell.cell_type == "markdown")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_page_renders_in_chromium(book, browser, notebook):
    out, chapters = book
    chapter = next(c for c in chapters if c.notebook == notebook)
    nb = nbformat.read(notebook, as_version=4)
    figures = sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells if cell.cell_type == "code"
        for output in cell.outputs
    ) + markdown_images(nb)
    report = browser.check((out / chapter.page).as_uri())
    assert not report.errors, report.errors
    assert not report.external, f"the page needs the network: {report.external}"
    assert report.title == chapter.title
    assert report.h1 and report.h1["text"].startswith(chapter.title) and report.h1["height"] > 0
    assert len(report.images) == figures, f"{figures} figures saved, {len(report.images)} shown"
    broken = [image for image in report.images if not (image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"figures that did not render: {broken}"
    hidden = [cell for cell in nb.cells if is_hidden(cell)]
    folded_code = [d for d in report.details if d["class"] == "book-hidden-input"]
    assert len(folded_code) == len(hidden), f"{len(hidden)} hidden cells, {len(folded_code)} folded"
    for cell, details in zip(hidden, folded_code):
        assert details["summary"] == "show code" and not details["open"], details
        assert details["unfolded_height"] > details["folded_height"] > 0, details
        if cell.outputs:
            assert details["outputs_height"] > 0, f"the outputs of a hidden cell are not shown: {details}"
    for details in report.details:  # exercise solutions, asides: folded until the reader opens them
        assert details["summary"] and not details["open"], details
        assert details["unfolded_height"] > details["folded_height"] > 0, details


def test_index_renders_in_chromium(book, browser):
    out, chapters = book
    report = browser.check((out / "index.html").as_uri())
    assert not report.errors and not report.external, (report.errors, report.external)
    assert report.title and report.h1 and report.h1["height"] > 0
    assert report.links == [chapter.page for chapter in chapters]
    shown = {image["src"].rsplit("/", 1)[-1]: image for image in report.images}
    assert sorted(shown) == sorted(DIAGRAMS), report.images
    for name, image in shown.items():  # an SVG that fails to parse or load has a natural size of 0
        width = float(re.match(r"[\d.]+", ET.parse(FIGURES / name).getroot().get("width"))[0])
        assert image["complete"] and image["width"] == width and image["height"] > 0, (name, image)


def sample_chapter(folder: Path) -> Path:
    """A chapter with a visible cell, a hidden check cell with output, and an exercise with a solution."""
    cells = [
        nbformat.v4.new_markdown_cell("# Part 9: Sums"),
        nbformat.v4.new_code_cell("x = sum(range(5))\nprint(x)"),
        nbformat.v4.new_code_cell("# Check: the sum is 10\nassert x == 10\nprint('checked: 10')"),
        nbformat.v4.new_markdown_cell("## Exercises\n\n1. Add a sixth number.\n\n"
                                      "<details><summary>Solution</summary>\n\n`sum(range(6))` is 15.\n\n"
                                      "</details>\n"),
    ]
    for count, (cell, text) in enumerate(zip(cells[1:3], ("10\n", "checked: 10\n")), 1):
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
        cell.execution_count = count
    cells[2].metadata.update(tags=["hide-input", "check"], jupyter={"source_hidden": True})
    path = folder / "Part-09-sums.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def test_a_hidden_cell_is_rendered_folded_with_its_output(tmp_path):
    out = tmp_path / "build"
    build([sample_chapter(tmp_path)], out, readme=tmp_path / "no-README.md")
    page = (out / "Part-09-sums.html").read_text()
    folded = page.split('<details class="book-hidden-input">')
    assert len(folded) == 2, "one hidden cell, one folded input"
    before, after = folded
    assert "sum" in before and "range" in before, "the visible cell's code is not folded"
    code, rest = after.split("</details>", 1)
    assert "<summary>show code</summary>" in code and "assert" in code and "checked" in code
    assert "checked: 10" in rest, "the hidden cell's output is shown after the folded code"
    assert "<details><summary>Solution</summary>" in rest


def test_hidden_code_and_solutions_unfold_in_chromium(browser, tmp_path):
    out = tmp_path / "build"
    build([sample_chapter(tmp_path)], out, readme=tmp_path / "no-README.md")
    report = browser.check((out / "Part-09-sums.html").as_uri())
    assert not report.errors and not report.external, (report.errors, report.external)
    code, solution = report.details
    assert (code["class"], code["summary"], code["open"]) == ("book-hidden-input", "show code", False)
    assert code["unfolded_height"] > code["folded_height"] + 20, "the folded code takes no room until opened"
    assert code["outputs_height"] > 0, "the hidden cell's output is on screen"
    assert (solution["summary"], solution["open"]) == ("Solution", False)
    assert solution["unfolded_height"] > solution["folded_height"] > 0


def test_the_browser_check_catches_a_broken_page(browser, tmp_path):
    """The checks above can fail: a script error, a missing figure and a CDN script are all reported."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<html><head><title>t</title><script src="https://example.com/x.js"></script></head><body><h1>t</h1>'
        '<img src="missing.png"><script>undefinedFunction()</script></body></html>'
    )
    report = browser.check(page.as_uri())
    assert any("undefinedFunction" in error for error in report.errors), report.errors
    assert any("missing.png" in error for error in report.errors), report.errors
    assert report.external == ["https://example.com/x.js"]
    assert report.images[0]["width"] == 0


def test_appendices_follow_the_chapters(tmp_path):
    chapter = sample_chapter(tmp_path)
    appendix = tmp_path / "Appendix-A-attacking-our-own-protocols.ipynb"
    appendix.write_bytes(chapter.read_bytes())
    assert series(tmp_path) == [chapter, appendix]
    items = build([appendix, chapter], tmp_path / "build", readme=tmp_path / "no-README.md")
    assert [item.notebook for item in items] == [chapter, appendix]
    index = (tmp_path / "build" / "index.html").read_text()
    assert index.index(f'href="{chapter.stem}.html"') < index.index(f'href="{appendix.stem}.html"')
