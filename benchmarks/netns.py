"""Two emulated hosts on one machine: two network namespaces joined by a veth pair whose link is
rate-limited with tc, and one torchrun per host (benchmarks/two_hosts.py uses it; root only).

Each namespace is a host to the network: its own loopback, its own address on the link and its
own ports, so torchrun's rendezvous and gloo's connections cross the shaped link exactly as two
machines' would. Both hosts share this machine's CPU cores (validate calibrate counts ranks per
machine, not per host, for that). Everything created here is removed on exit, on error and on
SIGINT / SIGTERM / SIGHUP; a driver killed with SIGKILL leaves namespaces named after its pid,
which the next start removes (`cleanup_stale`).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PREFIX = "dtpl-"          # namespace names: dtpl-<driver pid>-h<i>
IFNAME = "eth0"           # both veth ends are named eth0, each inside its own namespace
SUBNET = "10.231.0.{}"    # h0 = .1, h1 = .2, a private /24 that exists only inside the namespaces
PORT = 29500
HZ = 250                  # tbf's burst must hold rate / HZ bytes (CONFIG_HZ of this kernel; 1000 is safe too)


class Interrupted(BaseException):
    """A signal turned into an exception so that every `finally` runs."""


def log(msg: str):
    print(f"[two hosts] {msg}", file=sys.stderr, flush=True)


def missing_tools() -> list:
    """The commands this needs that are not installed (iproute2 provides both)."""
    return [t for t in ("ip", "tc") if not shutil.which(t)]


def sh(*cmd, ns=None, check=True, timeout=30) -> subprocess.CompletedProcess:
    """Run one command, in namespace `ns` if given; its output is captured."""
    argv = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    r = subprocess.run(argv, text=True, capture_output=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def parse_rate(rate: str) -> float:
    """tc's rate syntax ('1gbit', '500mbit') in bits per second."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate.lower())
    if not m:
        raise ValueError(f"--rate {rate!r}: expected a tc rate such as 1gbit, 500mbit or 100mbit")
    return float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def namespaces() -> list:
    return [ln.split()[0] for ln in sh("ip", "netns", "list").stdout.splitlines() if ln.strip()]


def _pids(ns: str) -> list:
    r = sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _signal_all(pids, sig):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def remove_namespace(ns: str, grace: float = 5.0):
    """Every process inside `ns` (SIGTERM, then SIGKILL), then the namespace. `ip netns del` alone
    only removes the name: a process left inside keeps the namespace and its veth alive, and
    torchrun starts its workers in their own sessions, so killing torchrun does not reach them."""
    if ns not in namespaces():
        return
    _signal_all(_pids(ns), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _pids(ns) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(50):
        left = _pids(ns)
        if not left:
            break
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.1)
    sh("ip", "netns", "del", ns, check=False)       # the veth pair goes with its namespace


def cleanup_stale():
    """Namespaces left by a driver that was killed with SIGKILL (its pid no longer exists)."""
    for ns in namespaces():
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-h\d", ns)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            log(f"removing {ns}, left by a driver that no longer runs")
            remove_namespace(ns)


class TwoHosts:
    """Context manager: two namespaces h0 and h1, a veth link between them shaped to `rate` in
    each direction (egress qdisc on both ends), torn down on exit whatever happened."""

    def __init__(self, rate: str = "1gbit", qdisc: str = "tbf"):
        if qdisc not in ("tbf", "htb"):
            raise ValueError(f"qdisc {qdisc!r}: expected tbf or htb")
        self.rate, self.bits, self.qdisc = rate, parse_rate(rate), qdisc
        self.ns = [f"{PREFIX}{os.getpid()}-h{i}" for i in (0, 1)]
        self.addr = [SUBNET.format(i + 1) for i in (0, 1)]

    def __enter__(self):
        self._old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _setup(self):
        for ns in self.ns:
            sh("ip", "netns", "add", ns)
        # the pair is created inside the two namespaces: it never exists in this one
        sh("ip", "link", "add", IFNAME, "netns", self.ns[0], "type", "veth", "peer", "name", IFNAME,
           "netns", self.ns[1])
        for ns, a in zip(self.ns, self.addr):
            sh("ip", "-n", ns, "addr", "add", f"{a}/24", "dev", IFNAME)
            sh("ip", "-n", ns, "link", "set", "lo", "up")       # lo starts down in a new namespace
            sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            self._shape(ns)

    def _shape(self, ns: str):
        """Egress shaping at each end, so each direction of the full-duplex link gets `rate`."""
        if self.qdisc == "tbf":
            burst = max(64 * 1024, int(self.bits / 8 / HZ * 1.05))      # tc-tbf(8): burst >= rate/HZ
            sh("tc", "qdisc", "add", "dev", IFNAME, "root", "tbf", "rate", self.rate, "burst", burst,
               "latency", "50ms", ns=ns)
        else:
            sh("tc", "qdisc", "add", "dev", IFNAME, "root", "handle", "1:", "htb", "default", "10", ns=ns)
            sh("tc", "class", "add", "dev", IFNAME, "parent", "1:", "classid", "1:10", "htb", "rate",
               self.rate, "ceil", self.rate, "quantum", "60000", ns=ns)

    def describe(self) -> str:
        return (f"hosts {self.addr[0]} and {self.addr[1]} (network namespaces), veth link shaped to "
                f"{self.rate} each way with tc {self.qdisc}")

    def close(self):
        """Remove both namespaces (and with them the link and every process inside); a second
        Ctrl-C during the clean-up cannot cut it short."""
        quiet = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            for ns in self.ns:
                try:
                    remove_namespace(ns)
                except Exception as e:            # keep going with the other one, and say so
                    log(f"clean-up of {ns} failed: {e}")
        finally:
            for s, h in getattr(self, "_old", quiet).items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ torchrun on both hosts
    def torchrun(self, args: list, nproc: int, logdir: Path, timeout: float, tag: str) -> None:
        """`python -m torch.distributed.run --nnodes 2 --nproc-per-node nproc ... args` in both
        hosts (static rendezvous at h0's address), each in its own session so that a terminal's
        Ctrl-C reaches only the driver, which then tears both down. Raises with the log's tail
        when a host fails, when one fails first (the other is stopped at once) or on timeout."""
        # torchrun and torch write temporary directories (torchelastic_*, inductor caches) that
        # they do not all remove: they go under logdir/tmp, which the caller removes
        (logdir / "tmp").mkdir(exist_ok=True)
        env = dict(os.environ, GLOO_SOCKET_IFNAME=IFNAME, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   TMPDIR=str(logdir / "tmp"))
        procs, logs = [], []
        try:
            for node in (0, 1):
                path = logdir / f"{tag}.h{node}.log"
                logs.append(path)
                cmd = ["ip", "netns", "exec", self.ns[node], sys.executable, "-m", "torch.distributed.run",
                       "--nnodes", "2", "--nproc-per-node", str(nproc), "--node-rank", str(node),
                       "--master-addr", self.addr[0], "--master-port", str(PORT)] + [str(a) for a in args]
                with open(path, "w") as f:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            _wait(procs, logs, timeout, tag)
        finally:
            for p in procs:
                if p.poll() is None:
                    _killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _killpg(p.pid, signal.SIGKILL)
                    p.wait()
            for ns in self.ns:                     # workers outlive torchrun (own sessions)
                _signal_all(_pids(ns), signal.SIGKILL)


def _wait(procs, logs, timeout, tag):
    deadline = time.monotonic() + timeout
    while True:
        rcs = [p.poll() for p in procs]
        if all(rc == 0 for rc in rcs):
            return
        bad = [i for i, rc in enumerate(rcs) if rc not in (None, 0)]
        if bad:
            i = bad[0]
            raise RuntimeError(f"{tag}: torchrun on h{i} exited with {rcs[i]}; its log "
                               f"{logs[i]} ends:\n{_tail(logs[i])}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tag}: still running after {timeout:.0f} s; logs in {logs[0].parent}")
        time.sleep(0.2)


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _killpg(pid, sig):
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _raise(signum, frame):
    raise Interrupted(signal.Signals(signum).name)
