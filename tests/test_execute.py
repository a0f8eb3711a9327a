"""``make run`` (tools/execute.py) on a small notebook: figures whatever MPLBACKEND says, progress bars
saved as their final text, stamps that tests/test_saved_notebooks.py accepts."""
from __future__ import annotations

import time

import nbformat
import pytest
from test_saved_notebooks import problems

from tools.execute import STAMP, WIDGET_VIEW, execute, source_hash

CELLS = [
    "import matplotlib.pyplot as plt\nfrom tqdm.auto import tqdm",
    "plt.plot([1, 2, 3]);",
    "for _ in tqdm(range(3), desc='kept'):\n    pass",
    "for _ in tqdm(range(3), desc='hidden', leave=False):\n    pass",
    "print('done')",
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    path = tmp_path_factory.mktemp("run") / "tiny.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    nb.metadata["kernelspec"] = {"name": "secure-ai", "display_name": "secure-ai", "language": "python"}
    nbformat.write(nb, path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MPLBACKEND", "Agg")  # what .ci/run exports: make run must draw anyway
        run = execute(path)
    return nbformat.read(path, as_version=4), run


def texts(cell) -> str:
    return "".join(output.get("text", "") for output in cell.outputs)


def test_figures_are_saved_even_with_agg_in_the_environment(executed):
    nb, _ = executed
    assert any("image/png" in output.get("data", {}) for output in nb.cells[1].outputs)


def test_progress_bars_are_saved_as_their_final_text(executed):
    nb, _ = executed
    assert "widgets" not in nb.metadata
    for cell in nb.cells:
        assert not any(WIDGET_VIEW in output.get("data", {}) for output in cell.outputs)
    assert texts(nb.cells[2]).startswith("kept: 100%|██████████| 3/3 [")
    assert texts(nb.cells[3]) == "", "a bar the loop hid (leave=False) is not saved either"
    assert texts(nb.cells[4]) == "done\n"


def test_stamps_and_costs(executed):
    nb, run = executed
    for cell in nb.cells:
        assert cell.metadata[STAMP]["source"] == source_hash(cell.source)
    assert nb.metadata[STAMP]["run_time_s"] > 0
    assert 20 < nb.metadata[STAMP]["peak_memory_mb"] < 2000  # a Python kernel with matplotlib
    assert [i for i, _ in run.cell_peaks] == list(range(len(CELLS)))
    assert problems(nb) == []


def test_a_failing_notebook_is_reported_and_not_saved(tmp_path, capsys):
    from tools.execute import main

    path = tmp_path / "fails.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 / 0")])
    nb.metadata["kernelspec"] = {"name": "secure-ai", "display_name": "secure-ai", "language": "python"}
    nbformat.write(nb, path)
    before = path.read_text()
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "fails.ipynb failed" in err and "not saved" in err
    assert path.read_text() == before


def test_memory_sampler_counts_children_without_eating_a_core(monkeypatch):
    """PSS (about 20 ms per process to read, with torch loaded) is re-read at most once per
    ``full_interval``; in between only RSS, every sample. Reading every process every 0.1 s took 60% of a
    core with three owner servers."""
    import subprocess
    import sys

    import psutil
    from secure_ai import memory

    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(50_000_000); import time; time.sleep(30)"])
    try:
        reads = []
        original = memory.pss
        monkeypatch.setattr(memory, "pss", lambda pid: reads.append(pid) or original(pid))
        sampler = memory.TreeSampler(psutil.Process().pid, full_interval=60.0)
        for _ in range(100):                                  # the child has allocated its 50 MB
            if psutil.Process(child.pid).memory_info().rss > 50e6:
                break
            time.sleep(0.05)
        first = sampler.read(fresh=True)                      # after a cell: read everything
        assert child.pid in reads and first > original(psutil.Process().pid) + 50e6
        reads.clear()
        for _ in range(50):                                   # the 0.1 s samples in between
            sampler.read(fresh=False)
        assert reads == []
        assert sampler.read(fresh=True) > 0 and reads.count(child.pid) == 1   # (other children may exist)
    finally:
        child.kill()
        child.wait()


def test_pss_adds_up_where_rss_counts_shared_pages_twice():
    """A forked child shares its parent's pages: RSS counts them in both, PSS splits them, so the tree's
    PSS is close to what parent and child hold together (issue 23, FL review 38)."""
    import os
    import signal

    import numpy as np
    import psutil
    from secure_ai import memory

    if not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("PSS is read from /proc/<pid>/smaps_rollup (Linux)")
    block = np.ones(100_000_000 // 8)  # 100 MB, resident, shared with the child after fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only waits
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    try:
        os.close(read)
        me, child = psutil.Process(), psutil.Process(pid)
        rss_sum = me.memory_info().rss + child.memory_info().rss
        pss_sum = memory.pss(me.pid) + memory.pss(pid)
        assert rss_sum - pss_sum > 90e6, "the 100 MB block is in both RSS, once in the summed PSS"
        assert memory.pss(pid) < child.memory_info().rss - 40e6
        assert block.sum() > 0
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
