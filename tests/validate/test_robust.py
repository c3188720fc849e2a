"""Validation runs that never hang (issue 7): a rank that dies (killed by a signal, exiting,
raising) or stalls ends the run within its timeout with an error naming the rank and the step,
exit status 3, and no process left behind; reports are written atomically (a failed or
interrupted run leaves the previous file intact); a launch whose world size does not match the
layout is refused before any collective. Every run here is 2 CPU ranks of a tiny model."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch  # noqa: F401

from planner.layout import Layout
from planner.model_spec import ModelSpec
from validate import api
from validate.launch import LAST_PIDS, RunFailed

ROOT = Path(__file__).resolve().parents[2]
TINY = ModelSpec(name="tiny", layers=2, hidden=16, heads=2, kv_heads=2, ffn_hidden=32, vocab=32,
                 mlp="swiglu")
DP2 = Layout(dp=2, micro_batch=1, global_batch=2, seq_len=8, zero=1)
SIZE = ["--layers", "2", "--hidden", "16", "--heads", "2", "--kv-heads", "2", "--ffn-hidden", "32",
        "--vocab", "32", "--seq-len", "8"]


def _all_gone(pids):
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie is gone for our purposes only once reaped; the launcher waits on its children
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] != "Z":
                return False
    return True


@pytest.mark.parametrize("fault,pattern", [
    ({"kind": "kill", "rank": 1, "step": 1}, r"rank 1 was killed by signal 9 in step 1"),
    ({"kind": "raise", "rank": 0, "step": 2}, r"rank 0 exited with status 3 in step 2: .*injected failure"),
])
def test_a_dying_rank_is_named_and_takes_the_run_down(fault, pattern):
    t0 = time.perf_counter()
    with pytest.raises(RunFailed, match=pattern):
        api.launch_layouts([(TINY, DP2, fault)], steps=2, timeout=60)
    assert time.perf_counter() - t0 < 40
    assert len(LAST_PIDS) == 2 and _all_gone(LAST_PIDS)


def test_a_rank_killed_from_outside_mid_run():
    """SIGKILL from another process (the OOM killer, an operator) while the ranks train."""
    from validate.config import scenario
    from validate.launch import launch
    cfg = scenario(TINY, DP2, steps=1, timed_steps=10 ** 4)     # runs until killed

    def killer():
        time.sleep(6.0)
        os.kill(LAST_PIDS[1], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(RunFailed, match=r"rank 1 was killed by signal 9 (in step \d+|before its first step)"):
        launch([cfg], 2, timeout=90, on_start=lambda: threading.Thread(target=killer, daemon=True).start())
    assert time.perf_counter() - t0 < 45
    assert _all_gone(LAST_PIDS)


def test_a_stopped_rank_is_named_in_the_timeout():
    """SIGSTOP on one rank (a debugger, a stuck host): every rank is still running when the
    timeout fires, but the message names the stopped one."""
    from validate.config import scenario
    from validate.launch import launch
    cfg = scenario(TINY, DP2, steps=1, timed_steps=10 ** 4)

    def stopper():
        time.sleep(3.0)
        os.kill(LAST_PIDS[1], signal.SIGSTOP)
    with pytest.raises(RunFailed, match=r"timed out after 8 s; rank 1 is stopped \(SIGSTOP"):
        launch([cfg], 2, timeout=8, on_start=lambda: threading.Thread(target=stopper, daemon=True).start())
    assert _all_gone(LAST_PIDS)


def _cli(*args, timeout=120, env=None):
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "validate", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_stalled_rank_times_out_with_exit_3(tmp_path):
    """A stalled rank under the CLI's --timeout: exit 3, one line naming the ranks and the step,
    and the previous report left as it was."""
    out = tmp_path / "report.json"
    out.write_text('{"previous": true}\n')
    fault = json.dumps({"kind": "hang", "rank": 1, "step": 1})
    t0 = time.perf_counter()
    p = _cli("run", "--model", "llama-3-8b", "--gpus", "2", "--dp", "2", *SIZE, "--steps", "1",
             "--timeout", "15", "--out", str(out), "--no-reference",
             env={"VALIDATE_FAULT": fault})
    took = time.perf_counter() - t0
    assert p.returncode == 3, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("validate: error: timed out after 15 s")
    assert "ranks still running: " in err[0] and "1" in err[0] and "in step 1" in err[0]
    assert took < 45
    assert out.read_text() == '{"previous": true}\n'
    assert not [f for f in tmp_path.iterdir() if f.name != "report.json"]


def test_report_replaced_atomically_on_success(tmp_path):
    out = tmp_path / "report.json"
    out.write_text("old\n")
    p = _cli("run", "--model", "llama-3-8b", "--gpus", "2", "--dp", "2", *SIZE, "--steps", "1",
             "--timed-steps", "1", "--out", str(out), "--no-reference", "--format", "json")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["world"] == 2 and json.loads(p.stdout) == rep
    assert [f.name for f in tmp_path.iterdir()] == ["report.json"]      # no temporary left


def test_interrupted_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    """A write interrupted after the temporary file is written (here: the rename fails) leaves
    the previous file and no temporary."""
    from planner import atomic
    out = tmp_path / "p.toml"
    out.write_text("previous\n")

    def boom(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic.atomic_write_text(out, "new\n")
    assert out.read_text() == "previous\n"
    assert [f.name for f in tmp_path.iterdir()] == ["p.toml"]


def test_torchrun_world_size_mismatch_refused_before_any_collective():
    """Under torchrun with 4 ranks for a 2-rank layout: exit 2 at once with a clear message; it
    does not wait for ranks that will never come (no rendezvous is attempted)."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}     # a port nothing listens on
    t0 = time.perf_counter()
    p = _cli("run", "--model", "llama-3-8b", "--gpus", "2", "--dp", "2", *SIZE, env=env, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "torchrun started 4 ranks" in err[0] and "tp*pp*dp*cp = 2" in err[0]
    assert time.perf_counter() - t0 < 30


def test_spawned_world_size_mismatch_refused_before_rendezvous(tmp_path):
    """A rank whose WORLD_SIZE does not match its scenario's layout exits with a clear message
    before init_process_group (no peer is waited for)."""
    from validate.config import scenario
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"scenarios": [scenario(TINY, DP2)], "timeout": 30}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="1")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "validate.worker", str(job), str(tmp_path / "out.pt")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "3 ranks were started but scenario 0's layout needs tp*pp*dp*cp = 2" in p.stderr
    assert time.perf_counter() - t0 < 30


HANG_IN_SUBGROUP = """
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from validate.counters import GroupLabeler
from validate.groups import Groups, Topo, set_group_timeout
dist.init_process_group("gloo", timeout=timedelta(seconds=3))
set_group_timeout(3)
rank = int(os.environ["RANK"])
# 4 ranks as tp2 x dp2: a mesh dim spanning the whole world would reuse the default group (and its
# timeout); the tp dim's [0, 1] is a group of its own
g = Groups(Topo(4, rank, 2, 1, 2, 1, 1, 1), False, GroupLabeler()).get("tp")
if int(os.environ["RANK"]) == 1:
    time.sleep(25)          # a stalled peer
try:
    dist.all_reduce(torch.ones(4), group=g)
    print("completed")
except Exception as e:
    print("error", type(e).__name__, str(e).splitlines()[0][:200])
"""


def test_groups_honour_the_run_timeout_not_torchs_default(tmp_path):
    """validate's groups (the device mesh's dims, groups.Groups) take the run's --timeout:
    dist.new_group's default is the backend's 30 minutes, so under torchrun a stalled peer in a TP/DP/PP group hung the run
    instead of ending it. Rank 0's collective must fail on the 3 s timeout, not complete when the
    stalled rank wakes after 25 s."""
    import socket
    script = tmp_path / "hang_in_subgroup.py"
    script.write_text(HANG_IN_SUBGROUP)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "4",
           "PYTHONPATH": str(ROOT)}
    peers = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for r in (1, 2, 3)]
    try:
        r0 = subprocess.run([sys.executable, str(script)], env={**env, "RANK": "0"}, capture_output=True, text=True,
                            timeout=120)
    finally:
        for peer in peers:
            peer.kill()
            peer.wait()
    assert r0.stdout.startswith("error"), (r0.stdout, r0.stderr[-1500:])
    assert "Timed out" in r0.stdout or "timeout" in r0.stdout.lower()


def test_forked_and_fresh_ranks_compute_the_same_run(monkeypatch):
    """Ranks are forked from the launcher (torch imported once) unless that is unsafe (another
    thread, a CUDA context) or VALIDATE_START=exec; a fresh interpreter per rank is the fallback.
    Both start the same ranks: the same losses and counts, and every check passes."""
    import validate.launch as L
    assert L._can_fork()
    forked = api.run_layouts([(TINY, DP2)], steps=2, dtype="float64", timeout=120)[0]
    pids_forked = list(LAST_PIDS)
    monkeypatch.setenv("VALIDATE_START", "exec")
    assert not L._can_fork()
    fresh = api.run_layouts([(TINY, DP2)], steps=2, dtype="float64", timeout=120)[0]
    assert forked["ok"] and fresh["ok"]
    key = lambda rep: [(c["quantity"], c.get("group", ""), c.get("kind", ""), c["measured"])  # noqa: E731
                       for c in rep["checks"] if c["quantity"] != "step_time_s"]
    assert len(key(forked)) > 5 and key(forked) == key(fresh)
    assert _all_gone(pids_forked) and _all_gone(LAST_PIDS)


def test_no_fork_beside_another_thread():
    """A fork copies only the calling thread; a lock another thread holds would stay held in the
    child, so ranks start afresh whenever this process runs more than one thread."""
    import validate.launch as L
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, daemon=True)
    t.start()
    try:
        assert not L._can_fork()
    finally:
        stop.set()
        t.join()
    assert L._can_fork()
