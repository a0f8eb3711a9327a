"""tools/cgroup.py (``make binder-check``): a hard memory limit, as in a Binder pod, that counts a
notebook's kernel and every process it starts; over it the OOM killer ends the run and we say so."""
from __future__ import annotations

import sys

import nbformat
import pytest

from tools import cgroup

REASON = cgroup.unavailable()
needs_cgroup = pytest.mark.skipif(REASON is not None, reason=f"no memory cgroup here: {REASON}")
HOLD = "b = bytearray({n}); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.5)"


def test_sizes_are_read_as_the_budgets_are_written():
    assert cgroup.parse_size("1.8G") == 1_800_000_000
    assert cgroup.parse_size("500M") == 500_000_000
    assert cgroup.parse_size("2Gi") == 2 * 2**30
    with pytest.raises(ValueError, match="not a size"):
        cgroup.parse_size("lots")


def test_the_reason_to_skip_is_clear():
    assert REASON is None or "cgroup" in REASON or "Linux" in REASON


@needs_cgroup
def test_over_the_limit_the_command_is_killed_and_under_it_it_finishes():
    under = cgroup.run([sys.executable, "-c", HOLD.format(n=100_000_000)], 250_000_000)
    assert under.returncode == 0 and not under.killed
    assert 100e6 < under.peak_bytes <= 250e6
    over = cgroup.run([sys.executable, "-c", HOLD.format(n=300_000_000)], 250_000_000)
    assert over.killed and over.returncode != 0
    assert over.peak_bytes >= 240e6


@needs_cgroup
def test_children_count_toward_the_limit():
    """Each process alone fits (150 MB), together they do not: the limit is on the group, as in a pod."""
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {HOLD.format(n=150_000_000)!r}])"
    both = f"{child}; {HOLD.format(n=150_000_000)}"
    alone = cgroup.run([sys.executable, "-c", child], 250_000_000)
    assert alone.returncode == 0, alone.stderr
    together = cgroup.run([sys.executable, "-c", both.replace("subprocess.run", "subprocess.Popen")],
                          250_000_000)
    assert together.killed


def _notebook(tmp_path, code: str):
    path = tmp_path / "hold.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "secure-ai", "display_name": "secure-ai", "language": "python"}
    nbformat.write(nb, path)
    return path


@needs_cgroup
def test_a_notebook_and_the_servers_it_starts_run_under_one_limit(tmp_path):
    """A notebook whose cell starts a process holding 300 MB: killed under 250 MB, fine under 1.8 GB."""
    code = (f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
            f"{HOLD.format(n=300_000_000)!r}], check=True)")
    path = _notebook(tmp_path, code)
    small = cgroup.run_notebook(path, limit=250_000_000)
    assert small.killed and small.returncode != 0
    binder = cgroup.run_notebook(path)
    assert binder.returncode == 0 and not binder.killed, binder.stderr
    assert 300e6 < binder.peak_bytes < cgroup.BINDER_LIMIT
    assert 300e6 < binder.pss_peak_bytes < binder.peak_bytes  # the stamp: processes only, no page cache


def test_the_command_line_stops_with_the_reason_where_no_cgroup_can_be_made(monkeypatch, capsys):
    monkeypatch.setattr(cgroup, "unavailable", lambda: "no cgroup on this test machine")
    assert cgroup.main(["--limit", "1G", "--", "true"]) == 2
    assert "no cgroup on this test machine" in capsys.readouterr().err
