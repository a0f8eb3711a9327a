"""``make html``: the rendered book, opened in headless Chromium as a reader's browser would open it.

Without Chromium the browser tests skip with one line, except in CI (``CI=true``), where ``.ci/run``
installs it and a missing browser is a failure.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import pytest

from tools.book import build, readme_summaries
from tools.browser import Chromium, find_chromium

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("Part-*.ipynb"))


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


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_page_renders_in_chromium(book, browser, notebook):
    out, chapters = book
    chapter = next(c for c in chapters if c.notebook == notebook)
    figures = sum(
        "image/png" in output.get("data", {})
        for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"
        for output in cell.outputs
    )
    report = browser.check((out / chapter.page).as_uri())
    assert not report.errors, report.errors
    assert not report.external, f"the page needs the network: {report.external}"
    assert report.title == chapter.title
    assert report.h1 and report.h1["text"].startswith(chapter.title) and report.h1["height"] > 0
    assert len(report.images) == figures, f"{figures} figures saved, {len(report.images)} shown"
    broken = [image for image in report.images if not (image["width"] > 0 and image["height"] > 0)]
    assert not broken, f"figures that did not render: {broken}"


def test_index_renders_in_chromium(book, browser):
    out, chapters = book
    report = browser.check((out / "index.html").as_uri())
    assert not report.errors and not report.external, (report.errors, report.external)
    assert report.title and report.h1 and report.h1["height"] > 0
    assert report.links == [chapter.page for chapter in chapters]


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
