"""awq_nb.memory.trim: freed heap memory goes back to the system (glibc), so the search's resident
memory does not creep up block after block."""
import subprocess
import sys

import pytest

from awq_nb import memory

CHURN = """
import ctypes, sys, torch
from awq_nb.memory import trim
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: serve these temporaries from the heap, as glibc does
libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: once its dynamic threshold has risen; no automatic trim
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
keep = []
for i in range(24):              # the pattern of a layer-wise search: big temporaries, small keepers
    a = torch.ones((1 << 19) + i * 8192)   # 2 MiB and growing, so no freed chunk fits the next one
    keep.append(torch.ones(256))           # and a survivor after each keeps them from merging
    del a
if sys.argv[1] == "trim":
    assert trim()
print((rss() - base) / 2**20)
"""


@pytest.mark.skipif(memory._libc() is None, reason="needs glibc's malloc_trim")
def test_trim_returns_freed_temporaries():
    def grown_mib(mode):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    trimmed, kept = grown_mib("trim"), grown_mib("keep")
    assert trimmed < 8, f"resident memory grew {trimmed:.1f} MiB after trim()"
    assert kept > trimmed + 16, f"without trim {kept:.1f} MiB, with {trimmed:.1f}: the test no longer shows the effect"
