"""Predict every published run and compare with its measured tokens/s per GPU.

    python benchmarks/accuracy.py [--csv PATH] [--format table|csv]
    python benchmarks/accuracy.py --cross-validate [--jobs 2] [--iters 150] [--start shipped|neutral] [--write-ranges]

Each run's stated layout is fixed; unstated knobs are searched (benchmarks/published.py). Plain
mode prints a row per run and a summary with the shipped parameters (fitted on these same runs):
median and mean absolute error, the share within 10%. A run the planner refuses counts as a miss.

--cross-validate refits every global parameter with one source left out and predicts that
source's runs, for every source (benchmarks/crossval.py): the honest figure. It prints both
columns, the summary broken down by stack, precision, GPU generation, scale and dense/MoE, and
the coverage of the 80% prediction ranges (planner/uncertainty.py); --write-ranges rewrites
those ranges from the cross-validated residuals.
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
        if plan is None:       # refused for memory: a miss, counted as a 100% error
            rows.append(dict(row_id=r["row_id"], model=r["model"][:22], measured=ri.measured, err=1.0,
                             status="refused"))
            continue
        pred = plan.tokens_per_s_per_gpu
        L = plan.layout
        rows.append(dict(row_id=r["row_id"], model=r["model"][:22], gpu=ri.hardware, n=ri.gpus, stack=ri.stack,
                         layout=f"tp{L.tp} pp{L.pp} dp{L.dp} cp{L.cp} ep{L.ep} v{L.vpp} mb{L.micro_batch} "
                                f"{L.recompute.replace('selective:', 'sel:') if ':' in L.recompute else L.recompute[:4]} z{L.zero} {L.precision}{' sp' if L.sp else ''}"
                                f"{f' off{L.offload_layers}' if L.offload_layers else ''}",
                         measured=ri.measured, predicted=pred, err=(pred - ri.measured) / ri.measured,
                         mem_gib=plan.memory_gib, fits=plan.feasible, status="ok"))
    return rows


def summary(rows):
    errs = np.array([abs(r["err"]) for r in rows if r.get("status") in ("ok", "refused")])
    return dict(runs=len(errs), median_abs_err=float(np.median(errs)), mean_abs_err=float(np.mean(errs)),
                within_10pct=float(np.mean(errs <= 0.10)),
                refused=sum(1 for r in rows if r.get("status") == "refused"))


def cross_validated(a) -> None:
    import pandas as pd
    import crossval
    import fitting
    rows = fitting.load_rows(a.csv)
    meas = np.array([r.measured for r in rows])
    fitted = fitting.predict(fitting.current(), rows)
    cv, fits = crossval.cross_validate(rows, a.iters, a.jobs, log=lambda m: print(m, file=sys.stderr, flush=True),
                                       csv_path=a.csv, start=a.start)
    ef, ec = crossval.errors(fitted, meas), crossval.errors(cv, meas)
    df = pd.DataFrame([dict(row_id=r.row_id, model=r.model.name[:22], gpu=r.hardware, n=r.inputs.gpus, stack=r.stack,
                            source=r.source[:28], measured=m, predicted=f, err=f / m - 1, cv_predicted=c,
                            cv_err=c / m - 1) for r, m, f, c in zip(rows, meas, fitted, cv)])
    with pd.option_context("display.width", 250, "display.max_rows", 500):
        print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print("\nby class (cross-validated):")
    for axis, v, s in crossval.breakdown(rows, ec, cv):
        print(f"  {axis:10s} {v:14s} {s}")
    cover, width = crossval.coverage(rows, cv, meas)
    print(f"\nSUMMARY fitted (on these runs): {crossval.summary(ef, fitted)}")
    print(f"SUMMARY cross-validated (leave one source out): {crossval.summary(ec, cv)}")
    print(f"SUMMARY 80% ranges: {cover:.0%} of measured values inside (nested, leave one source out); "
          f"median width {width:.2f}x the prediction")
    if a.write_ranges:
        crossval.write_table(crossval.table(rows, cv, meas))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--format", choices=("table", "csv"), default="table")
    ap.add_argument("--cross-validate", action="store_true", help="leave-one-source-out refits (minutes)")
    ap.add_argument("--iters", type=int, default=150, help="Nelder-Mead iterations per round (each fold restarts until it stops improving: fitting.fit)")
    ap.add_argument("--jobs", type=int, default=2, help="folds fitted at once")
    ap.add_argument("--start", choices=("shipped", "neutral"), default="shipped",
                    help="each fold's starting parameters: the shipped fit, or the planner's data-free defaults")
    ap.add_argument("--write-ranges", action="store_true", help="rewrite planner/uncertainty.py's TABLE")
    a = ap.parse_args(argv)
    if a.cross_validate:
        cross_validated(a)
        return
    import pandas as pd
    rows = run(a.csv)
    df = pd.DataFrame(rows)
    if a.format == "csv":
        print(df.to_csv(index=False))
    else:
        with pd.option_context("display.width", 250, "display.max_rows", 500, "display.max_colwidth", 60):
            print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    s = summary(rows)
    skipped = sum(1 for r in rows if r.get("status") not in ("ok", "refused"))
    print(f"\nSUMMARY runs={s['runs']} skipped={skipped} median_abs_err={s['median_abs_err']:.1%} "
          f"mean_abs_err={s['mean_abs_err']:.1%} within_10%={s['within_10pct']:.0%} "
          f"refused={s['refused']} (a refused run counts as a 100% miss; these figures are on the runs the "
          f"parameters were fitted to: --cross-validate gives the honest ones)")


if __name__ == "__main__":
    main()
