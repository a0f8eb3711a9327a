"""``tools/chapter_metrics.py``: the learner goals of issue 21, measured per notebook.

Each rule is shown to pass on a small chapter built to meet every goal, and to fail on a copy built to
break it. The last test applies the goals to the real chapters.
"""
from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest

from tools import chapter_metrics as cm

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "tutorials").glob("Part-*.ipynb"))

FRAME_END = """## Recap

* A sum hides its terms.

## What's next

A sum still leaks what it sums: [Part 10](Part-10-next.ipynb) adds noise.

## Exercises

1. Add a sixth number. What is the sum now?

<details><summary>Solution</summary>

1. `np.arange(6).sum()` is 15.
2. It grew by 5, the number added.

</details>

2. Why does the order of the numbers not matter?

<details><summary>Solution</summary>

Addition is commutative.

</details>

3. Which number would you remove to make the sum even?

<details><summary><b>Solution</b></summary>

Any odd one: 1 or 3.

</details>
"""


def code(source: str, *tags: str, hidden: bool = False):
    cell = nbformat.v4.new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    if hidden:
        cell.metadata["jupyter"] = {"source_hidden": True}
    return cell


def md(source: str):
    return nbformat.v4.new_markdown_cell(source)


def good_chapter():
    """A chapter that meets every goal: 4 code lines on screen, half of them concept code."""
    return nbformat.v4.new_notebook(cells=[
        md("# Part 9: Sums\n\n## What you will learn\n\n"
           "* what a sum is\n* how to compute it\n* what it hides\n"),
        code("import numpy as np\nNUMBERS = 5", "setup"),
        md("## 1. A sum\n\nFive numbers, added."),
        code("x = np.arange(NUMBERS)\nx.sum()", "first-result"),
        code("# Check: the sum of 0..4 is 10\nassert x.sum() == 10", "check", "hide-input", hidden=True),
        md(FRAME_END),
    ])


def measure(nb, name="Part-09-sums.ipynb"):
    return cm.measure(nb, name)


def misses(nb, name="Part-09-sums.ipynb"):
    return measure(nb, name).misses()


def test_the_good_chapter_meets_every_goal():
    m = measure(good_chapter())
    assert m.misses() == {}
    assert (m.code_lines, m.hidden_lines, m.verification_lines, m.concept_lines) == (4, 2, 0, 2)
    assert m.first_result == (4, 24)
    assert (m.objectives, m.recap, m.whats_next, m.exercises, m.solutions) == (3, True, "yes", 3, 3)


# --- what is on screen ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["source_hidden", "hide-input tag"])
def test_either_marker_hides_a_cells_input(how):
    cell = code("a = 1\n\nb = 2", "setup")
    assert not cm.is_hidden(cell)
    if how == "source_hidden":
        cell.metadata["jupyter"] = {"source_hidden": True}
    else:
        cell.metadata["tags"].append("hide-input")
    assert cm.is_hidden(cell)
    nb = good_chapter()
    nb.cells.insert(2, cell)
    m = measure(nb)
    assert (m.code_lines, m.hidden_lines) == (4, 4)


def test_too_many_code_lines_on_screen():
    nb = good_chapter()
    nb.cells.insert(4, code("\n".join(f"y{i} = {i}" for i in range(250))))
    assert "code_lines" in misses(nb)
    nb.cells[4].metadata["tags"] = ["measurement", "hide-input"]
    assert "code_lines" not in misses(nb), "hidden lines are off screen"


def test_blank_lines_do_not_count_and_comments_do():
    assert cm.code_lines("a = 1\n\n   \n# why\nb = 2\n") == 3


def test_a_check_cell_counts_whole_and_an_assert_counts_every_line_it_spans():
    assert cm.assert_lines("x = 1\nassert (\n    x == 1\n), 'one'\ny = 2") == 3
    assert cm.assert_lines("%time x = 1\nassert x") == 1, "falls back to line prefixes when ast cannot parse"
    nb = good_chapter()
    nb.cells[4].metadata = {}  # the check cell, on screen and untagged: "# Check" makes it a check
    m = measure(nb)
    assert m.verification_lines == 2 and m.concept_lines == 2 and m.code_lines == 6
    assert "verification" in m.misses()
    nb.cells[4].source = "# Check: the sum\n" + "\n".join(f"s{i} = x[:{i}].sum()" for i in range(18)) + (
        "\nassert s17 == 136")
    assert measure(nb).verification_lines == 20, "every line of a check cell is verification"
    nb = good_chapter()
    nb.cells[3].source += "\nassert x.sum() == 10"  # an assert in a concept cell
    assert measure(nb).verification_lines == 1 and "verification" in misses(nb)


# --- the first result -----------------------------------------------------------------------------------


def test_no_first_result_tag_misses_the_goal():
    nb = good_chapter()
    nb.cells[3].metadata["tags"] = []
    assert measure(nb).first_result is None
    assert "first_result" in misses(nb)


def test_a_late_first_result_misses_the_goal_by_lines_or_by_words():
    late = good_chapter()
    late.cells.insert(2, code("\n".join(f"z{i} = {i}" for i in range(37)), "setup"))
    assert measure(late).first_result == (41, 24) and "first_result" in misses(late)
    late.cells[2].metadata["tags"].append("hide-input")
    assert measure(late).first_result == (4, 24), "hidden lines are not read on the way"
    wordy = good_chapter()
    wordy.cells.insert(2, md("word " * 477))
    assert measure(wordy).first_result == (4, 501) and "first_result" in misses(wordy)
    wordy.cells[2].source = "<details><summary>Aside</summary>\n\n" + "word " * 477 + "\n</details>"
    assert measure(wordy).first_result == (4, 25), "a folded aside is not read on the way"


def test_only_the_first_tagged_cell_counts():
    nb = good_chapter()
    nb.cells.append(code("x.mean()", "first-result"))
    assert measure(nb).first_result == (4, 24)


# --- concept code ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", cm.NON_CONCEPT_TAGS)
def test_tagged_cells_are_not_concept_code(tag):
    nb = good_chapter()
    nb.cells.insert(4, code("timer = 0\nmemory = 0\nrelease = 0", tag))
    m = measure(nb)
    assert m.concept_lines == 2 and m.concept_share == pytest.approx(2 / 7)
    assert "concept" in m.misses()


def test_hiding_concept_code_is_a_problem():
    nb = good_chapter()
    nb.cells.insert(4, code("y = x * 2", hidden=True))
    found = misses(nb)
    assert "hidden_concept" in found and "c4" in found["hidden_concept"]
    nb.cells[4].metadata["tags"] = ["measurement"]
    assert "hidden_concept" not in misses(nb)


# --- markdown -------------------------------------------------------------------------------------------


def test_words_leave_out_code_html_links_urls_and_images():
    text = ("The **model** goes out: [Part 2](Part-02-x.ipynb) <b>twice</b>.\n\n"
            "```python\nignored words here\n```\n"
            "See https://example.org/a/b and ![a digit](digit.png). Don't count `x_ptr` twice.")
    assert cm.markdown_words(text) == 13  # The model goes out Part 2 twice See and Don't count x_ptr twice
    folded = "Intro.\n\n<details><summary>Solution</summary>\n\nfour words inside here\n\n</details>"
    assert cm.markdown_words(folded) == 6 and cm.markdown_words(folded, folded=True) == 2


def test_a_markdown_cell_over_300_words_on_screen_misses_the_goal():
    nb = good_chapter()
    nb.cells.insert(2, md("word " * 301))
    found = misses(nb)
    assert "long_cells" in found and "c2 (301)" in found["long_cells"]
    nb.cells[2].source = "<details><summary>Aside</summary>\n\n" + "word " * 301 + "\n</details>"
    assert "long_cells" not in misses(nb), "a folded block is not a wall of text"


def test_joiners_count_semicolons_dashes_and_colons_of_prose_only():
    text = ("One idea; another — and a third: here. Ranges 1–6 and times 12:30 are not joiners, "
            "a spaced – is.\n\n"
            "| a | b |\n|:---|---:|\n| x | y |\n\n`a: b; c` and https://example.org are code and URLs.")
    assert cm.joiners(text) == 4
    nb = nbformat.v4.new_notebook(cells=[md("one; two three four five six seven eight nine ten")])
    assert measure(nb).joiners_per_100_words == pytest.approx(10.0)


# --- the frame ------------------------------------------------------------------------------------------


def _replace(nb, old, new, cell=None):
    targets = [cell] if cell is not None else range(len(nb.cells))
    for index in targets:
        nb.cells[index].source = nb.cells[index].source.replace(old, new)
    return nb


@pytest.mark.parametrize("change, expected", [
    (lambda nb: _replace(nb, "## What you will learn", "**What you will learn**"), None),
    (lambda nb: _replace(nb, "* what it hides\n", ""), 2),
    (lambda nb: _replace(nb, "* what it hides\n", "* a\n* b\n* c\n* d\n"), 6),
    (lambda nb: nb.cells.insert(0, code("import numpy as np", "setup")), None),
])
def test_objectives_need_a_heading_before_the_code_and_3_to_5_items(change, expected):
    nb = good_chapter()
    change(nb)
    m = measure(nb)
    assert m.objectives == expected and "objectives" in m.misses()


@pytest.mark.parametrize("heading", ["## Objectives", "### Learning objectives",
                                     "## By the end of this chapter", "## What you'll learn",
                                     "## What you’ll learn"])
def test_objectives_headings_that_count(heading):
    nb = _replace(good_chapter(), "## What you will learn", heading)
    assert measure(nb).objectives == 3


def test_a_missing_recap_misses_the_goal():
    nb = _replace(good_chapter(), "## Recap\n\n* A sum hides its terms.\n\n", "")
    assert "recap" in misses(nb)
    nb = _replace(good_chapter(), "* A sum hides its terms.\n", "")
    assert "recap" in misses(nb), "a heading with nothing under it is no recap"


def test_whats_next_must_exist_and_link_somewhere():
    nb = _replace(good_chapter(), "## What's next", "## Coming up")
    assert measure(nb).whats_next == "no" and "whats_next" in misses(nb)
    nb = _replace(good_chapter(), "[Part 10](Part-10-next.ipynb)", "Part 10")
    assert measure(nb).whats_next == "no link" and "whats_next" in misses(nb)
    for heading in ("## Where to go next", "## What’s next", "### Next steps"):
        nb = _replace(good_chapter(), "## What's next", heading)
        assert measure(nb).whats_next == "yes", heading


def test_too_few_or_too_many_exercises():
    nb = good_chapter()
    nb.cells[-1].source = nb.cells[-1].source.split("3. Which number")[0]
    assert measure(nb).exercises == 2 and "exercises" in misses(nb)
    nb = good_chapter()
    for n in range(4, 8):
        nb.cells[-1].source += (f"\n{n}. Another.\n\n"
                                "<details><summary>Solution</summary>\n\nYes.\n\n</details>\n")
    assert measure(nb).exercises == 7 and "exercises" in misses(nb)


def test_every_exercise_needs_a_solution_to_unfold():
    nb = _replace(good_chapter(), "<summary>Solution</summary>\n\nAddition",
                  "<summary>Hint</summary>\n\nAddition")
    m = measure(nb)
    assert (m.exercises, m.solutions) == (3, 2) and "solutions" in m.misses()
    nb = _replace(good_chapter(), "Addition is commutative.\n\n</details>", "Addition is commutative.")
    nb = _replace(nb, "<details><summary>Solution</summary>\n\nAddition", "Addition")
    assert measure(nb).solutions == 2


def test_numbered_lines_inside_a_solution_are_not_exercises():
    assert measure(good_chapter()).exercises == 3  # solution 1 holds "1." and "2." lines


def test_exercises_as_headings():
    nb = good_chapter()
    frame = "## Recap\n\nDone.\n\n## What's next\n\n[More](x.ipynb)\n\n## Exercises\n\n"
    nb.cells[-1].source = frame + "".join(
        f"### Exercise {n}: sums\n\nDo it.\n\n<details><summary>Solution</summary>\n\nDone.\n\n</details>\n\n"
        for n in range(1, 5))
    m = measure(nb)
    assert (m.exercises, m.solutions) == (4, 4) and m.misses() == {}


def test_frame_across_cells():
    """Recap, what's next and each exercise may sit in cells of their own."""
    nb = good_chapter()
    end = nb.cells.pop()
    for part in end.source.split("\n\n## "):
        nb.cells.append(md(part if part.startswith("## ") else "## " + part))
    assert measure(nb).misses() == {}


# --- appendices, the table and the command --------------------------------------------------------------


def test_appendices_are_measured_but_exempt():
    nb = good_chapter()
    nb.cells.insert(4, code("\n".join(f"y{i} = {i}" for i in range(300))))
    appendix = measure(nb, "Appendix-A-attacking-our-own-protocols.ipynb")
    assert not appendix.chapter and "code_lines" in appendix.misses()
    chapter = measure(nb, "Part-05-homomorphic-encryption.ipynb")
    table = cm.table([chapter, appendix])
    rows = table.splitlines()[2:]
    assert rows[0].endswith("| misses 1 |") and "| 304 (+2 hidden) ✗ |" in rows[0]
    assert rows[1].endswith("| exempt |") and "✗" not in rows[1]


def test_command_prints_the_table_and_check_fails_on_a_missing_goal(tmp_path, capsys):
    good, bad = tmp_path / "Part-01-good.ipynb", tmp_path / "Part-02-bad.ipynb"
    nbformat.write(good_chapter(), good)
    broken = copy.deepcopy(good_chapter())
    broken.cells[3].metadata["tags"] = []
    nbformat.write(broken, bad)
    assert cm.main([str(good), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| notebook |") and "| Part-01-good.ipynb |" in out
    assert out.rstrip().endswith("| met |")
    assert cm.main([str(good), str(bad), "--check", "--problems"]) == 1
    out = capsys.readouterr().out
    assert "Part-02-bad.ipynb:\n- no cell tagged `first-result`" in out
    assert cm.main([str(bad)]) == 0, "without --check the table is information"


# --- the real chapters ----------------------------------------------------------------------------------


def test_every_chapter_meets_the_learner_goals():
    assert CHAPTERS, "no tutorials/Part-*.ipynb found"
    found = {path.name: cm.measure_file(path).misses() for path in CHAPTERS}
    failing = {name: problems for name, problems in found.items() if problems}
    assert not failing, "\n".join(
        f"{name}:\n" + "\n".join(f"  - {problem}" for problem in problems.values())
        for name, problems in failing.items()
    )
