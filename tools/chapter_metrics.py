"""Measure each notebook against the learner goals of issue 21: what is on screen, how soon the first result
comes, how much of the code is the idea itself, and the frame every chapter shares.

    python -m tools.chapter_metrics tutorials/*.ipynb              # a Markdown table, one row a notebook
    python -m tools.chapter_metrics --problems tutorials/*.ipynb   # ... and what each chapter misses
    python -m tools.chapter_metrics --check tutorials/Part-*.ipynb # exit status 1: a chapter misses a goal

The definitions follow the learner review's §1 (``shared/reviews/2026-12-learner-review.md``). Tags are
cell tags (``metadata.tags``); CONTRIBUTING.md says when to use each.

**On screen.** A code cell's input is *hidden* when ``metadata.jupyter.source_hidden`` is true (JupyterLab
shows it collapsed) or when the cell has the ``hide-input`` tag (the book shows it collapsed, under "show
code"). Its outputs stay on screen. Every other code cell is on screen.

**Code lines.** Non-blank lines of on-screen code cells, comments included. Hidden lines are reported
apart. Goal: at most 250.

**Verification.** On-screen lines of ``check`` cells (below: the whole cell, what it computes for its
asserts included) plus the lines spanned by ``assert`` statements in other on-screen cells (found with
``ast``: a three-line assert counts three), as a share of the code lines. Goal: at most 10%. This is what
the issue's "30% of Part 4 is asserts" measured (the review's Table C, "verification"): counting assert
statements alone would let a 20-line check cell with one ``assert`` pass as 5%. The table also shows the
assert statements' lines alone.

**First result.** On-screen code lines and on-screen markdown words (below) in all cells up to and including
the first cell tagged ``first-result``: the cell whose output first shows the chapter's idea working (the
review chose these cells by hand, in its Table B). Goal: at most 40 lines and 500 words. A chapter
without the tag misses the goal.

**Concept code.** On-screen code lines in cells tagged none of ``setup``, ``plumbing``, ``measurement`` and
``check``, as a share of the code lines. A cell whose first line starts with ``# Check`` counts as
``check``, tagged or not. Goal: at least 50%. A hidden cell must be one of these four kinds: hiding the idea
does not meet the goals, it breaks them.

**Markdown words.** Tokens between white space that hold a letter or a digit (``don't``, ``x_ptr`` and
``60,000`` are one word each; a lone ``—`` or ``*`` is none), in markdown cells without fenced code, HTML
tags, link targets, URLs and images. This reproduces the review's counts (Parts 1, 2 and 4: 2,237, 2,779
and 3,069 words; 913 and 1,156 before the first result of Parts 1 and 2). *Words on screen* leave out
the body of each ``<details>`` block (its ``<summary>`` counts): a solution is read when the reader
unfolds it. The first result and the cell limit count words on screen.

**Long cells.** Markdown cells of more than 300 words on screen. Goal: none.

**Joiners.** ``;``, ``—``, a spaced ``–`` and ``:`` in markdown prose (not in code, URLs, HTML tags, table
rules or times such as 12:30), per 100 markdown words, folded ones included. For information only: the
review's Table D found 3.3-4.2 in the series and about 1 in the tutorials it compared with.

**Frame.** Headings are Markdown headings of any level, matched without regard to case.

* *Objectives*: a heading "What you will learn", "What you'll learn", "Objectives", "Learning objectives" or
  "By the end of this chapter ..." before the first code cell, with 3-5 list items under it.
* *Recap*: a heading that starts with "Recap", with text under it.
* *What's next*: a heading "What's next" (or "Next steps", "Where to go next") whose text holds a link:
  to the next chapter, or, after the last, to further reading.
* *Exercises*: a heading that starts with "Exercises", with 3-6 exercises under it. An exercise starts
  at the beginning of a line: ``1. ...``, ``**1.** ...``, ``**Exercise 1** ...`` or a heading
  ``### Exercise 1``. Each needs a solution the reader can unfold before the next exercise starts: a
  ``<details>`` block whose ``<summary>`` contains "Solution". Numbered lines inside a ``<details>`` block
  are part of the solution, not new exercises.

Chapters are ``Part-*.ipynb``. Appendices (``Appendix-*.ipynb``) and any other notebook are measured and
reported, but exempt from the goals.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

HIDE_INPUT_TAG = "hide-input"
FIRST_RESULT_TAG = "first-result"
NON_CONCEPT_TAGS = ("setup", "plumbing", "measurement", "check")


@dataclass(frozen=True)
class Goals:
    """The goals of issue 21, per chapter."""

    max_code_lines: int = 250
    max_verification_share: float = 0.10
    max_first_result_lines: int = 40
    max_first_result_words: int = 500
    min_concept_share: float = 0.50
    objectives: tuple[int, int] = (3, 5)
    exercises: tuple[int, int] = (3, 6)
    max_cell_words: int = 300


GOALS = Goals()

# --- cells ----------------------------------------------------------------------------------------------


def tags(cell) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def is_hidden(cell) -> bool:
    """Is the input of this code cell hidden (``source_hidden`` or the ``hide-input`` tag)?"""
    if cell.get("cell_type") != "code":
        return False
    metadata = cell.get("metadata", {})
    return bool(metadata.get("jupyter", {}).get("source_hidden")) or HIDE_INPUT_TAG in tags(cell)


def is_check_cell(cell) -> bool:
    lines = [line for line in cell.get("source", "").splitlines() if line.strip()]
    return bool(lines) and lines[0].lstrip().startswith("# Check")


def kind(cell) -> str:
    """``"concept"``, or the first of ``setup``, ``plumbing``, ``measurement``, ``check`` the cell is."""
    cell_tags = tags(cell)
    for tag in NON_CONCEPT_TAGS:
        if tag in cell_tags or (tag == "check" and is_check_cell(cell)):
            return tag
    return "concept"


def code_lines(source: str) -> int:
    """Non-blank lines."""
    return sum(1 for line in source.splitlines() if line.strip())


def assert_lines(source: str) -> int:
    """Non-blank lines spanned by ``assert`` statements (by line prefix where the cell does not parse)."""
    lines = source.splitlines()
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics, or a cell that is broken on purpose
        return sum(1 for line in lines if line.lstrip().startswith("assert"))
    spanned = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            spanned.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return sum(1 for number in spanned if lines[number - 1].strip())


# --- markdown -------------------------------------------------------------------------------------------

ALNUM = re.compile(r"[^\W_]")
HTML_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][^>]*>", re.S)
IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
URL = re.compile(r"\bhttps?://\S+")
DETAILS = re.compile(r"<details\b[^>]*>(.*?)</details\s*>", re.S | re.I)
SUMMARY = re.compile(r"<summary\b[^>]*>(.*?)</summary\s*>", re.S | re.I)
FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines of a markdown cell outside fenced code blocks."""
    kept, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match[1][0] * 3
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            kept.append(line)
    return kept


def fold_details(text: str) -> str:
    """``text`` as the reader first sees it: each ``<details>`` block reduced to its ``<summary>``."""
    def summary(match):
        found = SUMMARY.search(match[1])
        return f" {found[1]} " if found else " "

    return DETAILS.sub(summary, text)


def _words_text(text: str) -> str:
    text = "\n".join(prose_lines(text))
    text = HTML_TAG.sub(" ", IMAGE.sub(" ", text))
    return URL.sub(" ", LINK_TARGET.sub("]", text))


def markdown_words(text: str, folded: bool = False) -> int:
    """Words in a markdown cell; ``folded=True``: words on screen, without the bodies of ``<details>``."""
    tokens = _words_text(fold_details(text) if folded else text).split()
    return sum(1 for token in tokens if ALNUM.search(token))


def joiners(text: str) -> int:
    """Semicolons, em dashes, spaced en dashes and colons in the prose of a markdown cell."""
    lines = [line for line in prose_lines(text) if not TABLE_RULE.match(line)]
    prose = re.sub(r"`[^`\n]*`", " ", "\n".join(lines))
    prose = URL.sub(" ", HTML_TAG.sub(" ", LINK_TARGET.sub("]", IMAGE.sub(" ", prose))))
    colons = len(re.findall(r"(?<!\d):|:(?!\d)", prose))
    return prose.count(";") + prose.count("—") + len(re.findall(r"\s–\s", prose)) + colons


# --- sections and the frame -----------------------------------------------------------------------------


@dataclass
class Section:
    level: int
    title: str
    cell: int  # index of the cell that holds the heading
    lines: list[str] = field(default_factory=list)  # markdown below the heading, up to the next one as high

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def sections(nb) -> list[Section]:
    """Every markdown heading of ``nb``, with the markdown lines under it (across cells, subheadings
    included) up to the next heading of the same or a higher level."""
    found: list[Section] = []
    open_sections: list[Section] = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        for line in prose_lines(cell.source):
            heading = HEADING.match(line)
            if heading:
                level = len(heading[1])
                open_sections = [section for section in open_sections if section.level < level]
            for section in open_sections:
                section.lines.append(line)
            if heading:
                found.append(Section(level, heading[2].strip(), index))
                open_sections.append(found[-1])
    return found


OBJECTIVES = re.compile(
    r"^(what you(?: wi|['’])ll learn|(learning )?objectives|by the end of (this|the) chapter)", re.I)
RECAP = re.compile(r"^recap\b", re.I)
WHATS_NEXT = re.compile(r"^(what(?:['’]s| is| comes) next|next steps|where to go (?:next|from here))", re.I)
EXERCISES = re.compile(r"^exercises\b", re.I)
LIST_ITEM = re.compile(r"^\s{0,3}(?:[-*+]|\d{1,2}[.)])\s+\S")
LINK = re.compile(r"\[[^\]]+\]\([^)]+\)|<a\s[^>]*href=", re.I)
EXERCISE_START = re.compile(
    r"^(?:(?:\*\*|__)?(\d{1,2})[.)](?:\*\*|__)?\s"
    r"|#{1,6}\s+exercise\s+(\d{1,2})\b|(?:\*\*|__)exercise\s+(\d{1,2})\b)",
    re.I,
)


def _first(found: list[Section], pattern: re.Pattern) -> Section | None:
    return next((section for section in found if pattern.search(section.title)), None)


def split_exercises(text: str) -> list[str]:
    """The exercises under an "Exercises" heading, each with what follows it up to the next one."""
    exercises: list[list[str]] = []
    depth = 0
    for line in text.splitlines():
        if depth == 0 and EXERCISE_START.match(line):
            exercises.append([])
        if exercises:
            exercises[-1].append(line)
        depth += len(re.findall(r"<details\b", line, re.I)) - len(re.findall(r"</details\s*>", line, re.I))
        depth = max(depth, 0)
    return ["\n".join(lines) for lines in exercises]


def has_solution(exercise: str) -> bool:
    """Does this exercise hold a ``<details>`` block whose ``<summary>`` says "Solution"?"""
    for block in DETAILS.finditer(exercise):
        summary = SUMMARY.search(block[1])
        if summary and "solution" in HTML_TAG.sub("", summary[1]).lower():
            return True
    return False


# --- a notebook's measurements -------------------------------------------------------------------------


@dataclass
class Metrics:
    notebook: str
    chapter: bool  # a Part-*.ipynb, held to the goals
    code_lines: int = 0  # on screen
    hidden_lines: int = 0
    assert_lines: int = 0  # on screen: lines of assert statements, in any cell
    verification_lines: int = 0  # on screen: check cells, and assert statements in other cells
    concept_lines: int = 0  # on screen
    first_result: tuple[int, int] | None = None  # (code lines, words) up to the first-result cell
    objectives: int | None = None  # list items under the objectives heading; None: no heading before the code
    recap: bool = False
    whats_next: str = "no"  # "yes", "no link" or "no"
    exercises: int = 0
    solutions: int = 0
    words: int = 0  # all markdown words, folded ones included
    joiners: int = 0
    long_cells: list[tuple[int, int]] = field(default_factory=list)  # (cell index, words on screen)
    hidden_concept: list[int] = field(default_factory=list)  # hidden cells that are concept code

    @property
    def verification_share(self) -> float:
        return self.verification_lines / self.code_lines if self.code_lines else 0.0

    @property
    def concept_share(self) -> float:
        return self.concept_lines / self.code_lines if self.code_lines else 0.0

    @property
    def joiners_per_100_words(self) -> float:
        return 100 * self.joiners / self.words if self.words else 0.0

    def misses(self, goals: Goals = GOALS) -> dict[str, str]:
        """``{goal: what is wrong}`` for every goal this notebook misses (exempt notebooks too)."""
        found = {}
        if self.code_lines > goals.max_code_lines:
            found["code_lines"] = (f"{self.code_lines} code lines on screen "
                                   f"(goal: at most {goals.max_code_lines})")
        if self.verification_share > goals.max_verification_share:
            found["verification"] = (
                f"checks and asserts are {self.verification_share:.0%} of the code on screen "
                f"({self.verification_lines} lines; goal: at most {goals.max_verification_share:.0%}): hide "
                "the checks that do not teach (`hide-input`) or move them to tests/")
        if self.first_result is None:
            found["first_result"] = f"no cell tagged `{FIRST_RESULT_TAG}`"
        elif (self.first_result[0] > goals.max_first_result_lines
              or self.first_result[1] > goals.max_first_result_words):
            found["first_result"] = (
                f"first result after {self.first_result[0]} code lines and {self.first_result[1]} words "
                f"(goal: at most {goals.max_first_result_lines} and {goals.max_first_result_words})")
        if self.concept_share < goals.min_concept_share:
            found["concept"] = (f"concept code is {self.concept_share:.0%} of the code on screen "
                                f"(goal: at least {goals.min_concept_share:.0%})")
        if self.hidden_concept:
            cells = ", ".join(f"c{index}" for index in self.hidden_concept)
            found["hidden_concept"] = (f"{cells}: input hidden but not tagged {', '.join(NON_CONCEPT_TAGS)} "
                                       "(nor a `# Check` cell): keep the idea on screen")
        low, high = goals.objectives
        if self.objectives is None:
            found["objectives"] = "no objectives heading (\"What you will learn\") before the first code cell"
        elif not low <= self.objectives <= high:
            found["objectives"] = f"{self.objectives} objectives (goal: {low}-{high} list items)"
        if not self.recap:
            found["recap"] = "no \"Recap\" heading with text under it"
        if self.whats_next != "yes":
            found["whats_next"] = ("no \"What's next\" heading" if self.whats_next == "no"
                                   else "the \"What's next\" section links nowhere")
        low, high = goals.exercises
        if not low <= self.exercises <= high:
            found["exercises"] = (f"{self.exercises} exercises under an \"Exercises\" heading "
                                  f"(goal: {low}-{high})")
        if self.solutions < self.exercises:
            found["solutions"] = (f"{self.exercises - self.solutions} of {self.exercises} exercises have no "
                                  "<details> block with a \"Solution\" summary")
        if self.long_cells:
            cells = ", ".join(f"c{index} ({words})" for index, words in self.long_cells)
            found["long_cells"] = f"markdown cells over {goals.max_cell_words} words on screen: {cells}"
        return found


def is_chapter(path: Path) -> bool:
    return path.name.startswith("Part-")


def measure(nb, name: str = "notebook.ipynb", goals: Goals = GOALS) -> Metrics:
    """Measure the notebook ``nb`` (an nbformat node); ``name`` decides whether it is a chapter."""
    metrics = Metrics(name, is_chapter(Path(name)))
    code_so_far = words_so_far = 0
    first_code = next((i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"), len(nb.cells))
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            lines = code_lines(cell.source)
            if is_hidden(cell):
                metrics.hidden_lines += lines
                if kind(cell) == "concept" and lines:
                    metrics.hidden_concept.append(index)
            else:
                asserts = assert_lines(cell.source)
                metrics.code_lines += lines
                metrics.assert_lines += asserts
                metrics.verification_lines += lines if kind(cell) == "check" else asserts
                metrics.concept_lines += lines if kind(cell) == "concept" else 0
                code_so_far += lines
        elif cell.cell_type == "markdown":
            shown = markdown_words(cell.source, folded=True)
            metrics.words += markdown_words(cell.source)
            metrics.joiners += joiners(cell.source)
            words_so_far += shown
            if shown > goals.max_cell_words:
                metrics.long_cells.append((index, shown))
        if metrics.first_result is None and FIRST_RESULT_TAG in tags(cell):
            metrics.first_result = (code_so_far, words_so_far)

    found = sections(nb)
    objectives = _first(found, OBJECTIVES)
    if objectives is not None and objectives.cell < first_code:
        metrics.objectives = sum(1 for line in objectives.lines if LIST_ITEM.match(line))
    recap = _first(found, RECAP)
    metrics.recap = recap is not None and markdown_words(recap.text) > 0
    whats_next = _first(found, WHATS_NEXT)
    if whats_next is not None:
        metrics.whats_next = "yes" if LINK.search(whats_next.text) else "no link"
    exercises = _first(found, EXERCISES)
    if exercises is not None:
        blocks = split_exercises(exercises.text)
        metrics.exercises = len(blocks)
        metrics.solutions = sum(has_solution(block) for block in blocks)
    return metrics


def measure_file(path: Path, goals: Goals = GOALS) -> Metrics:
    return measure(nbformat.read(path, as_version=4), path.name, goals)


# --- the table ------------------------------------------------------------------------------------------

COLUMNS = (
    ("notebook", None),
    ("code lines on screen (≤ 250)", "code_lines"),
    ("checks and asserts (≤ 10%)", "verification"),
    ("first result: lines / words (≤ 40 / 500)", "first_result"),
    ("concept code (≥ 50%)", "concept"),
    ("objectives (3–5)", "objectives"),
    ("recap", "recap"),
    ("what's next", "whats_next"),
    ("exercises (3–6) / with solution", "exercises"),
    ("md cells > 300 words", "long_cells"),
    ("`;` `—` `:` per 100 words", None),
    ("goals", None),
)


def _cells(m: Metrics, goals: Goals) -> list[str]:
    misses = m.misses(goals)
    hidden = f" (+{m.hidden_lines} hidden)" if m.hidden_lines else ""
    if m.first_result is None:
        first = "no tag"
    else:
        first = f"{m.first_result[0]} / {m.first_result[1]:,}"
    if m.chapter:
        verdict = "met" if not misses else f"misses {len(misses)}"
    else:
        verdict = "exempt"
    values = [
        m.notebook,
        f"{m.code_lines}{hidden}",
        f"{m.verification_share:.0%} ({m.verification_lines}; asserts {m.assert_lines})",
        first,
        f"{m.concept_share:.0%}" + (f", hidden concept: {len(m.hidden_concept)}" if m.hidden_concept else ""),
        "none" if m.objectives is None else str(m.objectives),
        "yes" if m.recap else "no",
        m.whats_next,
        f"{m.exercises} / {m.solutions}",
        ", ".join(f"c{index} ({words})" for index, words in m.long_cells) or "0",
        f"{m.joiners_per_100_words:.1f}",
        verdict,
    ]
    extra = {"exercises": ("exercises", "solutions"), "concept": ("concept", "hidden_concept")}
    for i, (_, key) in enumerate(COLUMNS):
        keys = extra.get(key, (key,))
        if m.chapter and key and any(k in misses for k in keys):
            values[i] += " ✗"
    return values


def table(metrics: list[Metrics], goals: Goals = GOALS) -> str:
    """A Markdown table, one row per notebook; ✗ marks a goal a chapter misses."""
    rows = [[title for title, _ in COLUMNS], ["---"] + ["---:"] * (len(COLUMNS) - 1)]
    rows += [_cells(m, goals) for m in metrics]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="default: tutorials/Part-*.ipynb and tutorials/Appendix-*.ipynb")
    parser.add_argument("--problems", action="store_true", help="list what each notebook misses")
    parser.add_argument("--check", action="store_true", help="exit status 1 when a chapter misses a goal")
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted(
        [*(ROOT / "tutorials").glob("Part-*.ipynb"), *(ROOT / "tutorials").glob("Appendix-*.ipynb")],
        key=lambda path: (not is_chapter(path), path.name))
    metrics = [measure_file(path) for path in notebooks]
    print(table(metrics))
    failing = [m for m in metrics if m.chapter and m.misses()]
    if args.problems:
        for m in metrics:
            if m.misses():
                print(f"\n{m.notebook}{'' if m.chapter else ' (exempt)'}:")
                print("\n".join(f"- {problem}" for problem in m.misses().values()))
    return 1 if args.check and failing else 0


if __name__ == "__main__":
    sys.exit(main())
