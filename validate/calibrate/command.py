"""`python -m validate calibrate --out my-cluster.toml [--base h100-sxm] [--quick]`: measure the
machine or cluster this runs on and write a complete hardware profile fitted to it.

Started alone it spawns --nprocs local ranks (gloo on CPU, NCCL on GPUs); under torchrun it is
one of the launcher's ranks and measures every network level the ranks span (inside a host,
across hosts). What is measured and how: validate/calibrate/measure.py; the fits:
validate/calibrate/fit.py and analyse.py; the profile: validate/calibrate/profile.py. The raw points, the fits
and their residuals go to a side file (my-cluster.points.json). Both files are written
atomically (temporary file, then rename): an interrupted calibration leaves no half profile and
keeps an earlier one intact.

Exit status: 0 written, 2 bad input, 3 a rank died, failed or timed out.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

DEFAULT_NPROCS_CPU = 8


def add_parser(sub):
    from planner.cliutil import float_arg as _float_arg, int_arg as _int_arg
    p = sub.add_parser("calibrate", help="measure this machine/cluster and write a fitted hardware profile")
    p.add_argument("--out", required=True, help="profile to write (.toml); the points go beside it")
    p.add_argument("--base", help="profile to take what is not measured from (price, reserved memory, "
                                  "datasheet peaks, network levels not spanned)")
    p.add_argument("--name", help="profile name (default: the --out file's stem)")
    p.add_argument("--quick", action="store_true", help="a small grid and message range (about a minute)")
    p.add_argument("--nprocs", type=_int_arg("--nprocs"),
                   help=f"local ranks to spawn (default: the GPUs, or {DEFAULT_NPROCS_CPU} on a CPU)")
    p.add_argument("--window", type=_float_arg("--window", 0.0, strict=True),
                   help="seconds per timing (default 0.15 with --quick, 0.4 without)")
    p.add_argument("--max-bytes", type=_int_arg("--max-bytes", 4096),
                   help="largest collective message (default 256 MiB, 1 MiB with --quick on a CPU)")
    p.add_argument("--timeout", type=_float_arg("--timeout", 0.0, strict=True), default=1800.0,
                   help="seconds for the whole measurement; a hung or dead rank ends it (default 1800)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    p.add_argument("--format", choices=("table", "json"), default="table", help="the fit summary on stdout")
    p.add_argument("--collectives", choices=("auto", "cpu", "loaded", "idle"), default="auto",
                   help="which collective timings the network levels are fitted to: 'cpu' (the CPU "
                        "seconds ranks spend, x ranks per core: ranks sharing CPU cores), 'loaded' "
                        "(between GEMMs, as in a training step), 'idle' (back to back); 'auto' "
                        "(default): cpu where ranks share cores, else loaded. 'cpu' and 'idle' skip "
                        "the measurements between GEMMs (a shorter calibration)")
    p.add_argument("--from-points", help="refit and write a profile from an earlier run's .points.json "
                                         "(no measurement)")
    return p


# ---------------------------------------------------------------------------------------------
# progress bar (stderr, plain text; redrawn in place on a terminal, every 10% otherwise)
class Bar:
    def __init__(self, total: int, labels=None, stream=None, enabled=True):
        self.total, self.labels = max(total, 1), labels or []
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.monotonic()
        self.last = -1
        self.last_decile = -1

    def update(self, done: int):
        if not self.enabled or done == self.last:
            return
        self.last = done
        frac = min(done / self.total, 1.0)
        width = 30
        fill = int(round(frac * width))
        label = self.labels[done] if done < len(self.labels) else ""
        line = (f"calibrate [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                f"{time.monotonic() - self.t0:5.0f}s {label}")
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
        else:
            dec = int(frac * 10)
            if dec == self.last_decile:
                return
            self.last_decile = dec
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.update(self.total)
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# the rank side
def measure_rank(job: dict, progress=None):
    """Run the plan on this (already initialised) rank; rank 0 returns every rank's results."""
    import torch.distributed as dist
    from .measure import measure
    from ..worker import _inject, device_for
    device = device_for(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    fault = job.get("fault") or {}
    rank = dist.get_rank()

    def prog(i):
        if progress is not None:
            progress(i)
        _inject(fault, rank, i)          # test hook: a rank that dies or hangs at item i
    res = measure(job["plan"], device, job["window"], prog)
    out = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((res, machine_id()), out, dst=0)
    if rank != 0:
        return None
    return {"results": [r for r, _ in out], "machines": [m for _, m in out]}


def machine_id() -> str:
    """Which kernel this rank runs on: ranks with the same boot id share one machine's CPU cores,
    even when they are different hosts to the network (network namespaces, containers)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def worker_main(job_path: str, out_path: str):
    """Entry point of a spawned rank (validate/launch.py sets RANK, WORLD_SIZE, MASTER_*)."""
    from ..worker import finish_rank, init_rank, report_progress
    with open(job_path) as f:
        job = json.load(f)
    rank = int(os.environ["RANK"])
    init_rank(float(job.get("timeout", 600)))

    def progress(i):          # measurement i, where the launcher's messages say "step"
        report_progress(0, i)
    try:
        out = measure_rank(job, progress)
    except Exception as e:
        import traceback
        sys.stderr.write(f"validate calibrate: rank {rank} failed: {type(e).__name__}: {e}\n"
                         f"{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(3)
    finish_rank([out], out_path)


# ---------------------------------------------------------------------------------------------
# the command
def _check_out(path: str):
    from planner.errors import PlannerError
    p = Path(path)
    if p.suffix.lower() != ".toml":
        raise PlannerError(f"--out {path}: a hardware profile is a .toml file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise PlannerError(f"--out {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PlannerError(f"--out {path}: directory {parent} is not writable")
    if p.exists() and p.is_dir():
        raise PlannerError(f"--out {path}: is a directory")


def points_path(out: str) -> Path:
    p = Path(out)
    return p.with_name(p.stem + ".points.json")


def provenance(device_type: str, world: int, local: int, threads: int, machines=()) -> dict:
    import platform
    from datetime import datetime, timezone

    import torch
    if device_type == "cuda":
        dev = torch.cuda.get_device_name(0)
        backend = "nccl"
    else:
        dev = _cpu_name()
        backend = "gloo"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": socket.gethostname(), "device": dev, "device_type": device_type,
            "torch": torch.__version__, "backend": backend, "world": world, "ranks_per_host": local,
            "hosts": max(world // max(local, 1), 1), "threads_per_rank": threads,
            "cpu_cores": os.cpu_count(), "python": platform.python_version(),
            # ranks on rank 0's machine (several "hosts" may share one: namespaces, containers)
            "ranks_per_machine": (machines.count(machines[0]) if machines else local),
            "platform": platform.platform()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "CPU"


def run(a) -> int:
    from planner.errors import PlannerError
    from planner.profiles import load_hardware
    from .measure import build_plan, describe
    from ..launch import RunFailed, check_torch, launch, under_torchrun
    _check_out(a.out)
    if a.from_points:
        return refit(a)
    base = load_hardware(a.base) if a.base else None     # a bad base is refused before measuring
    check_torch()
    import torch
    cuda = torch.cuda.is_available()
    window = a.window or (0.15 if a.quick else 0.4)
    torchrun = under_torchrun()
    if torchrun:
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    else:
        world = a.nprocs or (torch.cuda.device_count() if cuda else DEFAULT_NPROCS_CPU)
        if cuda and world > torch.cuda.device_count():
            raise PlannerError(f"--nprocs {world}: this host has {torch.cuda.device_count()} GPUs")
        local = world
    if world < 2:
        raise PlannerError("calibrate needs at least 2 ranks to measure collectives (--nprocs >= 2)")
    # collectives between GEMMs are measured unless the fit asked for is another condition's
    plan = build_plan(world=world, local=local, device="cuda" if cuda else "cpu", quick=a.quick,
                      max_bytes=a.max_bytes, loaded=a.collectives in ("auto", "loaded"))
    labels = [describe(it) for it in plan]
    job = {"plan": plan, "window": window, "timeout": a.timeout}
    if os.environ.get("VALIDATE_CALIBRATE_FAULT"):       # test hook: kill or stall a rank
        job["fault"] = json.loads(os.environ["VALIDATE_CALIBRATE_FAULT"])
    threads = 1
    t0 = time.monotonic()
    if torchrun:
        got = _run_torchrun(job, labels, a)
        if got is None:
            return 0
    else:
        bar = Bar(len(plan), labels, enabled=a.progress)

        def where(sc, step):
            return f" in measurement {step} ({labels[step]})" if 0 <= step < len(labels) else ""
        try:
            got = launch([], world, a.timeout, threads=threads, module="validate.calibrate",
                         job_extra=job, on_poll=lambda at: at and bar.update(at[1]), where=where)[0]
        except RunFailed as e:
            if bar.tty:
                sys.stderr.write("\n")
            print(f"validate: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 3
        bar.close()
    per_rank = got["results"]
    prov = provenance("cuda" if cuda else "cpu", world, local, threads, got["machines"])
    prov["seconds"] = round(time.monotonic() - t0, 1)
    prov["quick"] = bool(a.quick)
    prov["window"] = window          # validate/calibrate/speed.py re-measures items with it
    return finish(a, plan, per_rank, prov, base)


def _run_torchrun(job, labels, a):
    import torch.distributed as dist
    from ..worker import init_rank
    init_rank(a.timeout)          # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*
    rank = dist.get_rank()
    bar = Bar(len(job["plan"]), labels, enabled=a.progress and rank == 0)
    out = measure_rank(job, bar.update)
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    bar.close()
    return out


def finish(a, plan, per_rank, prov, base) -> int:
    """Fit, write the points (first: a fit that fails keeps the measurement) and then the
    profile, each atomically; print the summary."""
    from planner.atomic import atomic_write_text
    from planner.errors import PlannerError
    from planner.profiles import cluster_from_dict, profile_to_toml
    from .analyse import analyse
    from .profile import build_profile
    from .summary import summary_table
    fits = analyse(plan, per_rank, prov, base, collectives=getattr(a, "collectives", "auto"))
    name = a.name or Path(a.out).stem
    pts = {"provenance": prov, "plan": plan, "results": per_rank, "fits": fits,
           "profile": str(Path(a.out).name), "base": base.name if base is not None else None}
    if not getattr(a, "from_points", None):
        atomic_write_text(points_path(a.out), json.dumps(pts, indent=1, default=_plain) + "\n")
    prof = build_profile(name, fits, prov, base)       # adds fits["layer_probe"]
    if not getattr(a, "from_points", None) and "layer_probe" in fits:
        atomic_write_text(points_path(a.out), json.dumps(pts, indent=1, default=_plain) + "\n")
    text = profile_to_toml(prof, header=f"{name}: written by python -m validate calibrate; raw points, fits "
                                        f"and residuals in {points_path(a.out).name}")
    import tomllib
    try:
        cluster_from_dict(tomllib.loads(text), a.out)      # never write a profile the planner refuses
    except PlannerError as e:
        raise PlannerError(f"the fitted profile is not valid ({e}); the points are in "
                           f"{points_path(a.out)}") from None
    atomic_write_text(a.out, text)
    if a.format == "json":
        print(json.dumps({"profile": a.out, "points": str(points_path(a.out)), "provenance": prov,
                          "fits": {k: v for k, v in fits.items() if k != "points"}}, indent=2,
                         default=_plain))
    else:
        print(summary_table(fits, prov))
        print(f"\nwrote {a.out}" + ("" if getattr(a, "from_points", None) else f" and {points_path(a.out)}"))
    return 0


def _plain(o):
    try:
        return float(o)
    except (TypeError, ValueError):
        return str(o)


def refit(a) -> int:
    """--from-points: fit and write a profile from an earlier calibration's points file."""
    from planner.errors import PlannerError
    from planner.profiles import load_hardware
    try:
        with open(a.from_points) as f:
            pts = json.load(f)
        plan, per_rank, prov = pts["plan"], pts["results"], pts["provenance"]
    except FileNotFoundError:
        raise PlannerError(f"--from-points {a.from_points}: file not found") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlannerError(f"--from-points {a.from_points}: not a calibration points file ({e})") from None
    base_name = a.base or pts.get("base")
    base = load_hardware(base_name) if base_name else None
    return finish(a, plan, per_rank, prov, base)

