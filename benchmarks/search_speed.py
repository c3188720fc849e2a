"""Search speed: candidates evaluated, search seconds, candidates/s, whole-command wall time and
peak memory of `plan` for the issue's cases.

    python benchmarks/search_speed.py [--repeat N]

Each case runs the real console command (`python -m planner ... --format json`) in a fresh
process, so wall time includes Python start-up and imports; the JSON gives the search's own
count and seconds. Peak RSS is the child's ru_maxrss.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CASES = [
    ("gpt-20b on 64", ["--model", "gpt-20b", "--gpus", "64"]),
    ("llama-3.1-405b on 16,384", ["--model", "llama-3.1-405b", "--gpus", "16384"]),
    ("gpt-1t on 16,384", ["--model", "gpt-1t", "--gpus", "16384"]),
    ("deepseek-v3 on 2,048", ["--model", "deepseek-v3", "--gpus", "2048"]),
    ("llama-3-70b on 1,024-32,768", ["--model", "llama-3-70b", "--gpus", "1024-32768", "--tokens", "15T"]),
]


def run_case(args):
    cmd = [sys.executable, "-m", "planner", *args, "--format", "json", "--top", "5"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    d = json.loads(r.stdout)
    return d, wall, max(rss, before) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1, help="runs per case (best wall time is kept)")
    a = ap.parse_args(argv)
    print(f"{'case':32s} {'evaluated':>12s} {'search_s':>9s} {'cand/s':>12s} {'wall_s':>7s} {'peak_MiB':>9s}  best")
    rates, ok_wall = [], True
    for name, args in CASES:
        best = None
        for _ in range(a.repeat):
            d, wall, rss = run_case(args)
            if best is None or wall < best[1]:
                best = (d, wall, rss)
        d, wall, rss = best
        rate = d["evaluated"] / max(d["search_seconds"], 1e-9)
        rates.append(rate)
        lay = d["layouts"][0] if d["layouts"] else {}
        desc = (f"{lay.get('gpus', d['gpus'])} GPUs tp{lay.get('tp')} pp{lay.get('pp')} dp{lay.get('dp')} "
                f"cp{lay.get('cp')} ep{lay.get('ep')} {lay.get('tokens_per_s_per_gpu', 0):,.0f} tok/s/gpu") if lay else "none fits"
        print(f"{name:32s} {d['evaluated']:12,d} {d['search_seconds']:9.2f} {rate:12,.0f} {wall:7.2f} {rss:9.0f}  {desc}")
        if "-" not in args[3] and wall > 5:
            ok_wall = False
    print(f"\nSUMMARY min_rate={min(rates):,.0f}/s median_rate={sorted(rates)[len(rates) // 2]:,.0f}/s "
          f"single_count_cases_under_5s={'yes' if ok_wall else 'no'}")


if __name__ == "__main__":
    main()
