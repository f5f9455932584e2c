"""release_free_memory: returns freed heap pages to the OS where glibc is present."""

from __future__ import annotations

import sys

import pytest
import torch

from optc.runtime.trim import release_free_memory


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_freed_heap_below_a_live_block_is_returned():
    # freeing one mmapped 4 MiB block raises glibc's mmap threshold past 1 MiB, so the 1 MiB
    # blocks after it sit on the heap; a small block allocated after them pins the heap top,
    # so plain free returns nothing; malloc_trim returns the free pages in between
    warm = torch.ones(1 << 20)
    del warm
    big = [torch.ones(1 << 18) for _ in range(256)]        # 256 MiB
    pin = torch.ones(1 << 10)
    for t in big:
        t.add_(1)                                          # touched: resident
    del big
    before = _rss_kib()
    released = release_free_memory()
    after = _rss_kib()
    assert pin.sum() == 1 << 10
    assert released
    assert before - after > 128 * 1024, (before, after)   # most of the 256 MiB came back


def test_is_safe_to_call_repeatedly():
    for _ in range(3):
        release_free_memory()
