"""Settings that keep a notebook fast and small on a laptop CPU, a 2 GB Binder or a CI machine.

* :func:`configure` once, at the top of a notebook: torch on one thread.
* :func:`release_memory` gives memory that Python and torch have freed back to the system. The training
  loops of the helper package call it now and then, so notebooks need not.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch


def configure(threads: int = 1) -> dict[str, int]:
    """Run torch on ``threads`` CPU threads (default one).

    Our models are small, so a second thread gains little, and when the other core is busy (a browser,
    another kernel) two threads can run several times slower than one. Returns what was set.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)
    return {"threads": threads}


@functools.lru_cache(maxsize=1)
def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc has it; musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def release_memory() -> bool:
    """Hand freed heap memory back to the operating system; True where that was done (Linux, glibc).

    glibc keeps freed memory for reuse, and raises its mmap threshold after large buffers are freed, so
    a loop whose tensors change size every step (DP-SGD's Poisson-sampled batches) kept growing: about
    650 MB more per 30,000 DP-SGD samples here. ``malloc_trim`` every few steps keeps it near flat at no
    measurable cost (every single step would cost about 25%).
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
