"""Closing the loop: calibrate this machine, then predict and measure the step time of layouts
covering tp, pp, dp, cp, ep and ZeRO on 8 local ranks.

    python benchmarks/calibrated_accuracy.py [--profile cpu.toml] [--quick] [--out results.json]

1. `python -m validate calibrate --out <profile> --nprocs 8` (skipped with --profile FILE);
2. every layout below runs in one launch of 8 ranks (`validate.api.launch_layouts`: one warm-up
   step, one counted step, --timed-steps uninstrumented timed steps);
3. `validate.api.report_for(..., hardware=<profile>)` predicts each layout's step time with the
   calibrated profile (as validate runs it: validate/calibrate/predict.py) and puts the measured
   time and its compute / communication-wait split beside it.

Prints one row per layout and the median absolute error. The models are sized so that one step
takes about a second on a 2-core CPU with 8 ranks (arithmetic dominates host overhead); see
validate/README.md for what the model misses on smaller ones.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.layout import Layout  # noqa: E402
from planner.model_spec import ModelSpec, MoESpec  # noqa: E402

H = 512
DENSE = ModelSpec(name="bench-dense", layers=4, hidden=H, heads=8, kv_heads=4, ffn_hidden=2 * H,
                  vocab=1024, mlp="swiglu")
MOE = ModelSpec(name="bench-moe", layers=4, hidden=H, heads=8, kv_heads=4, ffn_hidden=2 * H, vocab=1024,
                mlp="swiglu", moe=MoESpec(experts=8, top_k=2, expert_ffn_hidden=H, shared_experts=0,
                                          dense_layers=0))
SEQ, GB = 256, 16


def L(**k):
    base = dict(micro_batch=1, global_batch=GB, seq_len=SEQ, zero=1)
    base.update(k)
    return Layout(**base)


LAYOUTS = {
    "dp8 zero1": (DENSE, L(dp=8)),
    "dp8 zero0": (DENSE, L(dp=8, zero=0)),
    "dp8 zero3 (FSDP2)": (DENSE, L(dp=8, zero=3)),
    "tp2 sp dp4": (DENSE, L(tp=2, dp=4, sp=True)),
    "pp2 dp4": (DENSE, L(pp=2, dp=4)),
    "cp2 dp4": (DENSE, L(cp=2, dp=4)),
    "ep4 dp8 (MoE)": (MOE, L(dp=8, ep=4)),
    "tp2 pp2 dp2": (DENSE, L(tp=2, pp=2, dp=2)),
}


def calibrate(path: str, quick: bool, max_bytes: int | None) -> float:
    cmd = [sys.executable, "-m", "validate", "calibrate", "--out", path, "--nprocs", "8"]
    if quick:
        cmd.append("--quick")
    if max_bytes:
        cmd += ["--max-bytes", str(max_bytes)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True,
                       stdout=subprocess.PIPE)
    if r.returncode:
        raise SystemExit(f"calibrate failed ({r.returncode})")
    print(r.stdout)
    return time.perf_counter() - t0


def speed_check(seconds: float = 3.0) -> float:
    """GFLOP per CPU second of a fixed fp32 GEMM in this process, one thread: a thermometer for the
    machine's speed (a shared VM's cores run faster or slower as its neighbours load the host).
    Taken after calibrating and after the runs; the ratio says how far the runs' machine was from
    the calibrated one. Reported, never applied to a prediction."""
    import torch
    torch.set_num_threads(1)
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    n, c0 = 0, time.process_time()
    while time.process_time() - c0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 384 ** 3 * n / (time.process_time() - c0) / 1e9


def _machine_cpu():
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)."""
    import resource
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(v) - v[3] - v[4]) / hz           # all but idle and iowait
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def _foreign_share(a, b, wall):
    """Share of the machine's CPU that other processes used during the runs (a shared machine
    makes step times noisy; the calibration saw whatever load there was when it ran)."""
    try:
        other = (b[0] - a[0]) - (b[1] - a[1])
        return max(other, 0.0) / (wall * (os.cpu_count() or 1))
    except Exception:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", help="use this calibrated profile instead of calibrating now")
    ap.add_argument("--quick", action="store_true", help="calibrate --quick")
    ap.add_argument("--max-bytes", type=int, default=64 * 1024 * 1024,
                    help="largest collective message calibrated (default 64 MiB: above the largest "
                         "gradient buffer of these models)")
    ap.add_argument("--timed-steps", type=int, default=3)
    ap.add_argument("--only", help="comma-separated layout names")
    ap.add_argument("--out", help="write the rows as JSON")
    a = ap.parse_args(argv)
    from validate import api
    tmp = None
    prof = a.profile
    cal_s = None
    if not prof:
        tmp = tempfile.mkdtemp(prefix="calibrated-accuracy-")
        prof = str(Path(tmp) / "this-machine.toml")
        cal_s = calibrate(prof, a.quick, a.max_bytes)
    cases = LAYOUTS
    if a.only:
        keep = [x.strip() for x in a.only.split(",")]
        cases = {k: v for k, v in LAYOUTS.items() if k in keep}
    speed_cal = speed_check()
    t0 = time.perf_counter()
    load0 = _machine_cpu()
    runs = api.launch_layouts(list(cases.values()), steps=1, timed_steps=a.timed_steps,
                              dtype="float32", timeout=3600)
    run_s = time.perf_counter() - t0
    foreign = _foreign_share(load0, _machine_cpu(), run_s)
    speed_run = speed_check()
    rows = []
    for (name, (spec, lay)), (cfg, per_rank) in zip(cases.items(), runs):
        rep = api.report_for(cfg, spec, lay, per_rank, reference=False, hardware=prof)
        st, tb = rep["step_time_s"], rep["time_breakdown"]
        m = (tb.get("measured") or {}).get("mean_over_ranks") or {}
        p = tb.get("predicted") or {}
        terms = sorted(((k, v) for k, v in (tb.get("predicted_s") or {}).items() if v > 0),
                       key=lambda kv: -kv[1])
        rows.append({"layout": name, "model": spec.name, "measured_s": st["measured"],
                     "predicted_s": st["predicted"],
                     "error": (st["predicted"] - st["measured"]) / st["measured"],
                     "measured_compute_s": m.get("compute_s"), "measured_wait_s": m.get("comm_wait_s"),
                     "measured_cpu_s": m.get("cpu_s"), "measured_process_cpu_s": m.get("process_cpu_s"),
                     "predicted_compute_s": p.get("compute_s"), "predicted_wait_s": p.get("comm_wait_s"),
                     "predicted_terms_s": dict(terms),
                     "counts_ok": rep["ok"],
                     "per_rank_step_s": [x for s in rep["details"]["stages"] for x in s["step_time_s"]]})
    hdr = (f"{'layout':20s} {'measured':>9s} {'predicted':>9s} {'error':>7s}   {'meas. compute/wait':>19s}"
           f"   {'pred. compute/wait':>19s}  largest predicted terms")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        top = ", ".join(f"{k} {v:.3f}" for k, v in list(r["predicted_terms_s"].items())[:3])
        print(f"{r['layout']:20s} {r['measured_s']:9.3f} {r['predicted_s']:9.3f} {100 * r['error']:+6.1f}%   "
              f"{r['measured_compute_s']:9.3f}/{r['measured_wait_s']:<9.3f}   "
              f"{r['predicted_compute_s']:9.3f}/{r['predicted_wait_s']:<9.3f}  {top}")
    errs = [abs(r["error"]) for r in rows]
    within = sum(e <= 0.20 for e in errs)
    print(f"\nmedian |error| {100 * median(errs):.1f}%, {within}/{len(rows)} layouts within 20%; "
          f"profile {prof}" + (f" (calibrated in {cal_s:.0f} s)" if cal_s else "")
          + f"; runs {run_s:.0f} s"
          + (f"; other processes used {100 * foreign:.0f}% of the machine's CPU meanwhile"
             if foreign is not None else ""))
    print(f"machine speed (fp32 GEMM, GFLOP per CPU second, one thread): {speed_cal:.1f} before the runs, "
          f"{speed_run:.1f} after ({100 * (speed_run / speed_cal - 1):+.0f}%); a shared VM drifts, and a "
          f"drift of more than a few percent moves every measured time by as much")
    if a.out:
        from planner.atomic import atomic_write_text
        atomic_write_text(a.out, json.dumps({"profile": prof, "rows": rows, "foreign_cpu_share": foreign,
                                             "median_abs_error": median(errs),
                                             "speed_gflop_per_cpu_s": {"before_runs": speed_cal,
                                                                       "after_runs": speed_run}},
                                            indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
