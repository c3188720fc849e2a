"""validate/worker.py: what every rank sets up before its process group."""
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
if sys.argv[1] == "set":
    from validate.worker import keep_host_buffers
    assert keep_host_buffers()
def step():
    g = torch.empty(12_000_000)      # 46 MiB, as dp8's flat fp32 gradients of the two-host model
    g.fill_(1.0)
    del g
for _ in range(10):              # the heap settles: it may grow a few times as small objects land in freed space
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode):
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_cpu_rank_reuses_its_large_buffers_instead_of_faulting_them_in_every_step():
    """A 46 MiB buffer freed and allocated again each step is a fresh mmap under glibc's
    defaults (11,719 pages to fault in and zero, every step); a rank keeps it, as the CUDA
    caching allocator does on a GPU. The heap may grow in the first few steps (Python's small
    objects land in the freed space; seen 1-3 times, glibc 2.36), so the count starts after ten."""
    plain, kept = _faults("plain"), _faults("set")
    assert plain > 20 * 11_000, plain             # the default really does re-fault, every step
    assert kept < 11_719, (kept, plain)           # settled: not one buffer's pages in twenty steps
