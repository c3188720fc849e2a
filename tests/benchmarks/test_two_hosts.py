"""benchmarks/two_hosts.py: the short version of the two-host rehearsal (calibrate across a shaped
link, then layouts inside and across the hosts), and that it leaves nothing behind. Needs root
and iproute2 (CI runs as root; the README's set-up installs iproute2 where it is missing)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "two_hosts.py"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
                                reason="network namespaces and tc need root and iproute2")


def _namespaces_of(pid: int) -> list:
    out = subprocess.run(["ip", "netns", "list"], text=True, capture_output=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(f"dtpl-{pid}-")]


def _run(args, tmp_path, **kw):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@needs_root
def test_short_rehearsal_calibrates_two_levels_and_ranks_the_layouts(tmp_path):
    out = tmp_path / "rows.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = _run(["--quick", "--out", str(out)], scratch)
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode in (0, 1), stderr[-3000:]
    lines = stdout.strip().splitlines()
    assert re.fullmatch(r"two hosts: 2 layouts, median \|err\| \d+\.\d%, worst \d+\.\d%, ranking (ok|wrong)",
                        lines[-1]), stdout
    assert re.search(r"level 0 \(.*domain 2\).*; level 1 \(.*domain all\)", stdout), stdout
    res = json.loads(out.read_text())
    assert {r["layout"] for r in res["rows"]} == {"tp2 dp2", "dp2 pp2"}
    assert all(r["counts_ok"] for r in res["rows"]), res["rows"]
    # the machine's speed was probed before and after each layout (validate/calibrate/speed.py)
    assert all(r["speed"] > 0 and len(r["speed_probes"]) == 2 and r["predicted_at_calibration_s"] > 0
               for r in res["rows"]), res["rows"]
    # the two step times are seconds apart (DTensor TP's host cost; PP across the link is cheap)
    assert res["ranking_ok"], stdout
    assert not _namespaces_of(p.pid)
    assert not list(scratch.iterdir())         # its working directory is gone too


@needs_root
def test_ctrl_c_removes_namespaces_link_and_processes(tmp_path):
    p = _run(["--quick"], tmp_path, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_namespaces_of(p.pid)) < 2 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert len(_namespaces_of(p.pid)) == 2, p.communicate()[1]
    time.sleep(3)                               # into torchrun's start-up
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert not _namespaces_of(p.pid)
    assert not list(tmp_path.iterdir())


def test_bad_rate_is_one_line_exit_2(tmp_path):
    p = _run(["--rate", "fast"], tmp_path)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert err.startswith("two_hosts: error: --rate 'fast'") and err.count("\n") == 1


def test_a_step_is_its_slowest_rank_and_a_layout_its_fastest_step():
    """The rehearsal's measured time: per timed step the slowest rank (the step ends when it
    does), and of those steps the fastest (the least disturbed by the machine's other load)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("two_hosts_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    per_rank = [{"timed_times": [3.0, 2.0, 2.6]}, {"timed_times": [2.5, 2.2, 4.0]}]
    assert mod.step_times(per_rank) == [3.0, 2.2, 4.0]
    assert min(mod.step_times(per_rank)) == 2.2
