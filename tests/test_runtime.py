"""secure_ai.runtime: torch threads are set, and freed heap memory really goes back to the system."""
import platform
import sys

import numpy as np
import pytest
import torch
from secure_ai import runtime

ON_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.fixture()
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_sets_the_threads(restore_threads):
    assert runtime.configure() == {"threads": 1} and torch.get_num_threads() == 1
    assert runtime.configure(threads=2)["threads"] == torch.get_num_threads() == 2


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_configure_rejects_bad_thread_counts(threads):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        runtime.configure(threads=threads)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not ON_GLIBC, reason="malloc_trim is glibc's")
def test_release_memory_returns_freed_heap_pages():
    blocks = [np.ones(8192) for _ in range(4000)]  # 64 KiB each: from the heap, below the mmap threshold
    del blocks[::2], blocks[::2]  # free 3 of every 4, leaving holes that plain top-trimming cannot return
    before = _rss_mb()
    assert runtime.release_memory() is True
    assert before - _rss_mb() > 100  # ~190 MB were free inside the heap
    del blocks


def test_release_memory_is_harmless_elsewhere(monkeypatch):
    monkeypatch.setattr(runtime, "_glibc", lambda: None)
    assert runtime.release_memory() is False
