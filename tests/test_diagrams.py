"""The concept diagrams (``tutorials/figures/*.svg``): hand-written SVG that any browser, GitHub and the
book show the same way.

Each file must be well-formed XML with a width, a height and a matching viewBox, about 700 px wide; hold a
``<title>`` and a ``<desc>`` (the book's alt text); load nothing from outside itself (no link, script,
image or font from a URL); use no text smaller than 12 px; and draw every party in its colour: owners,
the data scientist who aggregates, the key holder and attackers look the same in every diagram.
:func:`problems` does the reading; it is also run on copies broken on purpose, so every rule is shown to
fail. That each diagram renders with a non-zero size in Chromium is tested in ``tests/test_book.py``.
"""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tools.book import DIAGRAMS, FIGURES

ROOT = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"

# One colour pair (line and text, fill) per party, in every diagram. Greys (r = g = b) are free.
PALETTE = {
    "owner": ("#0b7a53", "#e3f4ec"),
    "aggregator": ("#1f5f9e", "#e3eef9"),
    "keyholder": ("#7b3a8c", "#f3e6f6"),
    "attacker": ("#b8451b", "#fbe9e1"),
}
WIDTH = (600, 800)
MIN_FONT_PX = 12
FORBIDDEN = {"script", "foreignObject", "image", "iframe", "object", "embed", "audio", "video"}
HEX = re.compile(r"#[0-9a-fA-F]{6}\b")


def _number(value: str | None) -> float | None:
    match = re.fullmatch(r"\s*([\d.]+)\s*(px)?\s*", value or "")
    return float(match[1]) if match else None


def problems(text: str) -> list[str]:
    """Everything wrong with the SVG source ``text``; empty when it is fine."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as error:
        return [f"not well-formed XML: {error}"]
    found = []
    if root.tag != f"{SVG}svg":
        found.append(f"the root element is {root.tag}, not an SVG <svg>")
    width, height = _number(root.get("width")), _number(root.get("height"))
    if width is None or height is None:
        found.append("no numeric width and height on <svg>")
    view_box = [float(v) for v in re.split(r"[\s,]+", root.get("viewBox", "").strip()) if v]
    if len(view_box) != 4:
        found.append("no viewBox on <svg>")
    elif width is not None and height is not None and view_box[2:] != [width, height]:
        found.append(f"viewBox {view_box} does not match width {width} and height {height}")
    if width is not None and not WIDTH[0] <= width <= WIDTH[1]:
        found.append(f"{width:g} px wide: draw it for about 700 px ({WIDTH[0]}-{WIDTH[1]})")
    for tag in ("title", "desc"):
        if not (root.findtext(f"{SVG}{tag}") or "").strip():
            found.append(f"no <{tag}> (the book's caption and alt text come from it)")

    for element in root.iter():
        name = element.tag.split("}")[-1]
        if name in FORBIDDEN:
            found.append(f"a <{name}> element: diagrams draw with shapes and text only")
        for attribute in ("href", f"{XLINK}href"):
            target = element.get(attribute)
            if target is not None and not target.startswith("#"):
                found.append(f"an external reference {target!r}: only #ids inside the file")
    without_namespaces = re.sub(r"\sxmlns(:\w+)?=\"[^\"]*\"", "", text)
    for match in re.finditer(r"url\(\s*['\"]?([^)'\"]*)", without_namespaces):
        if not match[1].startswith("#"):
            found.append(f"an external url({match[1]})")
    if re.search(r"@import|\bhttps?://|\bfile:/|\bdata:[\w.+-]+/[\w.+-]+[;,]", without_namespaces):
        found.append("a URL or @import: the file must load nothing from outside")

    sizes = re.findall(r"font-size\s*[:=]\s*\"?([\d.]+)", text)
    small = sorted({float(size) for size in sizes if float(size) < MIN_FONT_PX})
    if small:
        listed = ", ".join(f"{size:g}" for size in small)
        found.append(f"text of {listed} px: at least {MIN_FONT_PX} px stays readable")

    allowed = {colour for pair in PALETTE.values() for colour in pair}
    for colour in sorted({c.lower() for c in HEX.findall(text)}):
        r, g, b = colour[1:3], colour[3:5], colour[5:7]
        if colour not in allowed and not r == g == b:
            found.append(f"colour {colour} is neither a party's colour nor a grey")
    style = "".join(element.text or "" for element in root.iter(f"{SVG}style"))
    for role, rule in re.findall(r"\.(owner|aggregator|keyholder|attacker)-[\w-]*\s*\{([^}]*)\}", style):
        wrong = {c.lower() for c in HEX.findall(rule)} - set(PALETTE[role])
        if any(not c[1:3] == c[3:5] == c[5:7] for c in wrong):
            found.append(f"the {role} class uses {sorted(wrong)}, not the {role}'s colours {PALETTE[role]}")
    return found


SVGS = sorted(FIGURES.glob("*.svg"))


def test_the_diagrams_exist():
    assert {name for name in DIAGRAMS} <= {path.name for path in SVGS}
    assert len(DIAGRAMS) == 3


@pytest.mark.parametrize("path", SVGS, ids=lambda p: p.name)
def test_diagram_is_clean_svg(path):
    found = problems(path.read_text(encoding="utf-8"))
    assert not found, f"{path.name}:\n" + "\n".join(found)


def test_every_diagram_draws_owner_and_aggregator_in_their_colours():
    for name in DIAGRAMS:
        text = (FIGURES / name).read_text(encoding="utf-8").lower()
        assert PALETTE["owner"][0] in text and PALETTE["aggregator"][0] in text, name
    threat = (FIGURES / "threat-model.svg").read_text(encoding="utf-8").lower()
    assert PALETTE["attacker"][0] in threat and PALETTE["keyholder"][0] in threat


def test_readme_shows_the_big_picture_before_the_chapters():
    readme = (ROOT / "README.md").read_text()
    start, chapters = readme.find("\n## The big picture\n"), readme.find("\n## Chapters\n")
    assert 0 < start < chapters, "README: a '## The big picture' section before '## Chapters'"
    section = readme[start:chapters]
    for name in DIAGRAMS:
        assert f"](tutorials/figures/{name})" in section, f"README's big picture does not show {name}"


# --- every rule fails on a copy broken on purpose -----------------------------------------------------

GOOD = """<svg xmlns="http://www.w3.org/2000/svg" width="700" height="100" viewBox="0 0 700 100">
  <title>t</title><desc>d</desc>
  <style>text { font-size: 14px; } .owner-box { fill: #e3f4ec; stroke: #0b7a53; }</style>
  <defs><marker id="m"><path d="M0,0 L1,1" fill="#1f5f9e"/></marker></defs>
  <rect class="owner-box" width="10" height="10" fill="#555555"/><use href="#m"/>
  <line x2="5" marker-end="url(#m)"/><text>owner</text>
</svg>"""

BREAKAGES = {
    "not XML": (("</svg>", ""), "not well-formed XML"),
    "no viewBox": ((' viewBox="0 0 700 100"', ""), "no viewBox"),
    "viewBox of another size": (('viewBox="0 0 700 100"', 'viewBox="0 0 350 50"'), "does not match"),
    "too wide": (('width="700" height="100" viewBox="0 0 700 100"', 'width="1400" height="100" '
                  'viewBox="0 0 1400 100"'), "1400 px wide"),
    "no title": (("<title>t</title>", ""), "no <title>"),
    "a remote link": (('<use href="#m"/>', '<use href="https://example.org/icons.svg#m"/>'),
                      "external reference"),
    "a URL in the text": (("<text>owner</text>", "<text>see https://example.org</text>"), "a URL"),
    "a remote image": (("<text>owner</text>", '<image href="digit.png" width="5" height="5"/>'), "<image>"),
    "a script": (("<text>owner</text>", "<script>alert(1)</script>"), "<script>"),
    "a web font": (("text { font-size: 14px; }", "@import url(https://fonts.example/a.css);"), "url("),
    "tiny text": (("font-size: 14px", "font-size: 9px"), "9 px"),
    "a colour of no party": (('fill="#555555"', 'fill="#ff0000"'), "#ff0000 is neither"),
    "an owner in the aggregator's blue": (("stroke: #0b7a53", "stroke: #1f5f9e"), "the owner class uses"),
}


def test_the_good_svg_passes():
    assert problems(GOOD) == []


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_diagram_is_caught(breakage):
    (old, new), expected = BREAKAGES[breakage]
    assert old in GOOD
    found = problems(GOOD.replace(old, new))
    assert any(expected in problem for problem in found), f"expected {expected!r} in:\n" + "\n".join(found)
