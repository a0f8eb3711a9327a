"""Memory as a memory cgroup (a Binder pod, a container) counts it: the series' one memory metric.

A page that two processes share (a forked owner server and the kernel it was forked from share most of
theirs, copy-on-write) is in both processes' resident set size (RSS), so RSS summed over processes counts
it twice, and a forked server's RSS says little about what it adds. The **proportional set size** (PSS)
splits each shared page among the processes that map it: PSS summed over a group of processes is the
memory they hold together, each page counted once, and a process's PSS is its fair share of it. A memory
cgroup counts those pages once too (plus the page cache and kernel memory, see ``tools/cgroup.py``).

* :func:`pss` of one process, :func:`tree_pss` of a process and all its descendants;
* :class:`TreeSampler`: the peak of :func:`tree_pss` over time, cheaply (``make run`` stamps it).

Linux reads PSS from ``/proc/<pid>/smaps_rollup``. Elsewhere (macOS, Windows) there is no PSS: these
functions fall back to RSS, which there overstates only what processes share (syft starts its servers
with *spawn* on macOS, so they share little).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import psutil


def pss(pid: int) -> int:
    """Proportional set size of process ``pid`` in bytes (RSS where the OS has no PSS)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        if Path("/proc/self/smaps_rollup").exists():  # Linux: the process is gone
            raise psutil.NoSuchProcess(pid) from None
    except ProcessLookupError:
        raise psutil.NoSuchProcess(pid) from None
    except PermissionError:
        raise psutil.AccessDenied(pid) from None
    return psutil.Process(pid).memory_info().rss


def tree(pid: int) -> list[psutil.Process]:
    """Process ``pid`` and all its descendants (children, their children, ...)."""
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def tree_pss(pid: int) -> int:
    """PSS of process ``pid`` and all its descendants, in bytes: what they hold together."""
    return sum(_each_pss(tree(pid)).values())


def _each_pss(processes: Iterable[psutil.Process]) -> dict[int, int]:
    found = {}
    for process in processes:
        try:
            found[process.pid] = pss(process.pid)
        except psutil.Error:
            pass  # ended meanwhile: it holds nothing
    return found


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


class TreeSampler(threading.Thread):
    """Samples :func:`tree_pss` of process ``pid`` every ``interval`` seconds in a daemon thread; ``peak``
    is the largest total seen, ``cell_peak`` the largest since :meth:`new_cell`.

    Reading PSS costs about 20 ms per process with torch loaded (the kernel walks its page tables), so
    reading a kernel and three owner servers every 0.1 s would take most of a core. The full reading is
    made at most once per ``full_interval`` (and less often when it takes longer: the sampler stays under
    about 5% of one core); in between, the total moves with the processes' RSS, which costs microseconds:
    a page a process allocates is in its RSS and its PSS alike. A new process is counted from the next full
    reading on.
    """

    def __init__(self, pid: int, interval: float = 0.1, full_interval: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.full_interval = pid, interval, full_interval
        self.peak = self.cell_peak = 0
        self._pss: dict[int, int] = {}    # each process's PSS at the last full reading
        self._rss: dict[int, int] = {}    # ... and its RSS then
        self._read_at, self._cost = -math.inf, 0.0
        self._done = threading.Event()

    def read(self, fresh: bool = True) -> int:
        """The tree's PSS now: fully re-read when ``fresh`` or the last full reading is old enough."""
        now = time.perf_counter()
        if fresh or now - self._read_at >= max(self.full_interval, 20 * self._cost):
            processes = tree(self.pid)
            self._pss = _each_pss(processes)
            self._rss = {pid: _rss(pid) for pid in self._pss}
            self._read_at = time.perf_counter()
            self._cost = self._read_at - now
            return sum(self._pss.values())
        return sum(self._pss.values()) + sum(_rss(pid) - rss for pid, rss in self._rss.items())

    def run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                now = self.read(fresh=False)
            except psutil.Error:
                return
            self.peak, self.cell_peak = max(self.peak, now), max(self.cell_peak, now)

    def new_cell(self) -> int:
        """The peak since the last call; starts the next period."""
        peak, self.cell_peak = self.cell_peak, 0
        return peak

    def stop(self) -> None:
        self._done.set()
        self.join()
