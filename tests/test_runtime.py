import subprocess
import sys

import pytest

# Run in a fresh interpreter: the setting is process-wide and other tests' training runs set it.
FAULTS = """
import resource, torch
from lmforge.runtime import keep_freed_memory

def faults(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # above glibc's largest mmap threshold, 32 MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

stock = faults(3)
assert keep_freed_memory()
faults(15)  # the heap settles
print(stock, faults(5))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    """A training step frees and reallocates the same large tensors: they must not fault in again."""
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True).stdout
    stock, kept = map(int, out.split())
    assert stock > 3 * 10_000  # glibc's default: unmapped on free, 16,384 fresh 4 KiB pages each time
    assert kept < 2000
