"""Starting the ranks: N local processes (gloo on CPU, NCCL on GPUs), or the ranks torchrun
started.

Local ranks are child processes that die with the parent (PR_SET_PDEATHSIG), run in their own
process group, and are all killed when one fails or the run exceeds its timeout, so a dead or
hung rank never leaves the run, or processes, behind.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from planner.errors import PlannerError

ROOT = Path(__file__).resolve().parent.parent


LAST_PIDS: list = []   # process ids of the most recent launch's ranks (tests check none is left)


class RunFailed(RuntimeError):
    """A rank died, failed or hung; the message names the rank."""


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup():
    # die with the parent: the kernel sends SIGKILL when the parent thread exits
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _can_fork() -> bool:
    """Whether ranks may be forked from this process instead of started afresh: Linux, one
    thread (a fork copies only the caller, so a lock another thread holds would stay held), no
    CUDA context (CUDA cannot be used in a forked child), and VALIDATE_START not 'exec'."""
    import threading
    import torch
    return (sys.platform.startswith("linux") and os.environ.get("VALIDATE_START", "fork") != "exec"
            and threading.active_count() == 1 and not torch.cuda.is_initialized())


def _start(module: str, argv: list, env: dict, err: Path, threads: int, fork: bool):
    """One rank running `python -m module *argv` in its own session, stderr to `err`, dying with
    this process: forked from it (torch and the worker already imported: 8 ranks start in about
    a second instead of 20 on two cores, where each import of torch is 2-4 s) or, where a fork
    is unsafe, a new interpreter."""
    if not fork:
        return subprocess.Popen([sys.executable, "-m", module, *argv], env=env, cwd=str(ROOT),
                                stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                                preexec_fn=_child_setup, start_new_session=True)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    _forked_child(module, argv, env, err, threads)


def _forked_child(module: str, argv: list, env: dict, err: Path, threads: int):
    """The forked rank: what `python -m module` would do, with the launcher's environment and
    outputs; it never returns (os._exit), so no parent's atexit or test harness runs twice."""
    code = 1
    try:
        os.setsid()
        _child_setup()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        os.dup2(os.open(str(err), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(str(ROOT))
        import runpy
        import torch
        torch.set_num_threads(threads)
        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


class _Forked:
    """A forked rank with the part of Popen's interface the launcher uses."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)


def _kill_all(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: Path, n=4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [l for l in text.splitlines() if l.strip() and "Warning" not in l and "warn(" not in l]
    return "\n".join(lines)[-n:]


PEER_GONE = ("connection closed by peer", "connection reset", "broken pipe")   # gloo / TCP, lower case


def _root_cause(bad: list, errs: list) -> tuple:
    """(rank, exit code) that took the run down, of the ranks that ended badly: a rank that dies
    takes its peers down with gloo's 'connection closed by peer' / 'connection reset' errors,
    which may end within the same poll -- so a rank killed by a signal first, then one whose own
    last error is not a lost peer, then the lowest rank."""
    def peer_gone(r):
        return any(p in _tail(errs[r]).lower() for p in PEER_GONE)
    return min(bad, key=lambda rc: (rc[1] >= 0, peer_gone(rc[0]), rc[0]))


def launch(scenarios: list, nprocs: int, timeout: float, threads: int = 1, on_start=None, *,
           module: str = "validate.worker", job_extra: dict | None = None, on_poll=None,
           where=None):
    """Run `scenarios` on nprocs local ranks; returns rank 0's results (one list of per-rank
    result dicts per scenario). Raises RunFailed naming the failing rank, or on timeout.

    module: the rank's entry point (`python -m module job.json out`); job_extra: more keys for
    job.json; on_poll(progress_of_rank_0): called while the ranks run (a progress bar);
    where(scenario, step) -> str: how an error names the place a rank had reached."""
    import torch  # noqa: F401  (the parent checks torch imports before spawning N copies)
    tmp = Path(tempfile.mkdtemp(prefix="validate-"))
    job = tmp / "job.json"
    job.write_text(json.dumps({"scenarios": scenarios, "timeout": timeout, **(job_extra or {})}))
    out = tmp / "result.pt"
    port = free_port()
    procs, errs = [], []
    env0 = dict(os.environ)
    env0.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nprocs),
                OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore",
                PYTHONPATH=str(ROOT) + os.pathsep + env0.get("PYTHONPATH", ""))
    env0.pop("TORCHELASTIC_RUN_ID", None)
    fork = _can_fork()
    if fork:    # the ranks' imports (torch.distributed.tensor, ~1.5 s) done once, here
        importlib.import_module(module if module != "validate.calibrate" else "validate.calibrate.command")
    t0 = time.monotonic()
    try:
        for r in range(nprocs):
            env = dict(env0, RANK=str(r), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nprocs),
                       VALIDATE_PROGRESS=str(tmp / f"rank{r}.progress"))
            err = tmp / f"rank{r}.err"
            errs.append(err)
            procs.append(_start(module, [str(job), str(out)], env, err, threads, fork))
        LAST_PIDS[:] = [p.pid for p in procs]
        if on_start is not None:
            on_start()
        while True:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                time.sleep(0.2)
                codes = [p.poll() for p in procs]
                r, c = _root_cause([(r, c) for r, c in enumerate(codes) if c not in (None, 0)] or bad, errs)
                _kill_all(procs)
                how = f"was killed by signal {-c}" if c < 0 else f"exited with status {c}"
                last = _tail(errs[r]).splitlines()[-1] if _tail(errs[r]) else "no output"
                raise RunFailed(f"rank {r} {how}{_where(tmp, r, where)}: {last}" + _detail(errs[r]))
            if all(c == 0 for c in codes):
                break
            if on_poll is not None:
                on_poll(_progress_of(tmp, 0))
            if time.monotonic() - t0 > timeout:
                alive = [r for r, c in enumerate(codes) if c is None]
                at = sorted({_where(tmp, r, where) for r in alive})
                stuck = _stuck(procs, tmp, alive, where)
                _kill_all(procs)
                raise RunFailed(f"timed out after {timeout:g} s; {stuck}ranks still running: "
                                f"{', '.join(map(str, alive))}{''.join(at[:1])}")
            time.sleep(0.05)
        return torch.load(out, weights_only=False)
    finally:
        _kill_all(procs)
        for f in tmp.iterdir():
            try:
                f.unlink()
            except OSError:
                pass
        try:
            tmp.rmdir()
        except OSError:
            pass


def _state(pid: int) -> str:
    """The process state letter of /proc/<pid>/stat ('T': stopped), or '' where unreadable."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _stuck(procs, tmp: Path, alive: list, where=None) -> str:
    """Which of the ranks still running holds the others up, as the start of the timeout
    message: a stopped process (SIGSTOP, a debugger), else the ranks behind the furthest one;
    '' where every rank is at the same point."""
    stopped = [r for r in alive if _state(procs[r].pid) in ("T", "t")]
    if stopped:
        return (f"rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))} "
                f"{'are' if len(stopped) > 1 else 'is'} stopped (SIGSTOP or a debugger)"
                f"{_where(tmp, stopped[0], where)}; ")
    at = {r: _progress_of(tmp, r) for r in alive}
    known = [a for a in at.values() if a is not None]
    if known and min(known) < max(known) or (known and len(known) < len(alive)):
        first = min(known)
        behind = [r for r, a in at.items() if a is None or a == first]
        return f"rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} behind the others; "
    return ""


def _progress_of(tmp: Path, r: int):
    """(scenario, step) rank r last reported, or None."""
    try:
        sc, step = (tmp / f"rank{r}.progress").read_text().split()
        return int(sc), int(step)
    except (OSError, ValueError):
        return None


def _where(tmp: Path, r: int, where=None) -> str:
    at = _progress_of(tmp, r)
    if at is None:
        return " before its first step"
    sc, step = at
    if where is not None:
        return where(sc, step)
    return f" in step {step}" + (f" of scenario {sc}" if sc != 0 else "")


def _detail(err: Path) -> str:
    t = _tail(err)
    return ("\n" + t) if os.environ.get("VALIDATE_DEBUG") and t else ""


def check_torch():
    try:
        import torch  # noqa: F401
        import torch.distributed  # noqa: F401
    except ImportError:
        raise PlannerError("validate needs PyTorch: pip install 'dtplanner[validate]' "
                           "(CPU build: pip install torch)") from None
    import torch.distributed as dist
    if not dist.is_available():
        raise PlannerError("this PyTorch build has no torch.distributed; validate needs it")
