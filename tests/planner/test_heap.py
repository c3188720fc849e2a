"""planner/heap.py: the `plan` command keeps numpy's large temporaries on the heap (glibc)."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "set":
    from planner.heap import keep_temporaries_on_heap
    assert keep_temporaries_on_heap()
def burst():
    arrays = [np.ones(131072) for _ in range(16)]     # 16 arrays of 1 MiB, as a search chunk's temporaries
    del arrays
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode):
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_temporaries_are_reused_not_faulted_in_again():
    """Without the setting, glibc hands 1 MiB blocks back to the kernel and faults them in again
    on every burst (256 pages each); with it the blocks are reused."""
    plain, kept = _faults("plain"), _faults("set")
    assert plain > 40 * 16 * 256 / 4, plain          # the default really does re-fault (else the test says nothing)
    assert kept < plain / 10, (kept, plain)


def test_a_users_own_malloc_setting_stands(monkeypatch):
    from planner.heap import keep_temporaries_on_heap
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert keep_temporaries_on_heap() is False
