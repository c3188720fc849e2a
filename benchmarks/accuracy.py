"""Predict every published run and compare with its measured tokens/s per GPU.

    python benchmarks/accuracy.py [--csv PATH] [--format table|csv]

Each run's stated layout is fixed; unstated knobs are searched (planner/published.py). Prints a
row per run and a summary: median and mean absolute error, and the share within 10%.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from planner.errors import PlannerError  # noqa: E402
from published import DEFAULT_CSV, predict_run, read_runs  # noqa: E402


def run(csv_path=None, quiet=False):
    rows = []
    for r in read_runs(csv_path):
        if not (r.get("measured_tokens_per_s_per_gpu") or "").strip():
            rows.append(dict(row_id=r["row_id"], model=r["model"], status="no measured tokens/s"))
            continue
        try:
            ri, plan, res = predict_run(r)
        except PlannerError as e:
            rows.append(dict(row_id=r["row_id"], model=r["model"], status=f"error: {e}"))
            continue
        if plan is None:
            rows.append(dict(row_id=r["row_id"], model=r["model"], status="no candidate"))
            continue
        pred = plan.tokens_per_s_per_gpu
        L = plan.layout
        rows.append(dict(row_id=r["row_id"], model=r["model"][:22], gpu=ri.hardware, n=ri.gpus, stack=ri.stack,
                         layout=f"tp{L.tp} pp{L.pp} dp{L.dp} cp{L.cp} ep{L.ep} v{L.vpp} mb{L.micro_batch} "
                                f"{L.recompute[:4]} z{L.zero} {L.precision}{' sp' if L.sp else ''}",
                         measured=ri.measured, predicted=pred, err=(pred - ri.measured) / ri.measured,
                         mem_gib=plan.memory_gib, fits=plan.feasible, status="ok"))
    return rows


def summary(rows):
    errs = np.array([abs(r["err"]) for r in rows if r.get("status") == "ok"])
    return dict(runs=len(errs), median_abs_err=float(np.median(errs)), mean_abs_err=float(np.mean(errs)),
                within_10pct=float(np.mean(errs <= 0.10)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--format", choices=("table", "csv"), default="table")
    a = ap.parse_args(argv)
    import pandas as pd
    rows = run(a.csv)
    df = pd.DataFrame(rows)
    if a.format == "csv":
        print(df.to_csv(index=False))
    else:
        with pd.option_context("display.width", 250, "display.max_rows", 500, "display.max_colwidth", 60):
            print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    s = summary(rows)
    skipped = sum(1 for r in rows if r.get("status") != "ok")
    print(f"\nSUMMARY runs={s['runs']} skipped={skipped} median_abs_err={s['median_abs_err']:.1%} "
          f"mean_abs_err={s['mean_abs_err']:.1%} within_10%={s['within_10pct']:.0%}")


if __name__ == "__main__":
    main()
