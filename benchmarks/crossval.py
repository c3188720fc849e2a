"""Cross-validated accuracy of the throughput model on the published runs: leave-one-source-out
refits of every global parameter (fitting.py), the miss classes, and the coverage of the
prediction ranges (planner/uncertainty.py) those residuals make.

Used by `python benchmarks/accuracy.py --cross-validate`; `--write-ranges` regenerates
planner/uncertainty.py from the residuals."""
from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor

import numpy as np

import fitting
from planner import uncertainty as U

MISS = 1.0          # a refused run counts as a 100% miss in every summary


def _fold(args):
    src, start, iters, csv_path = args
    rows = fitting.load_rows(csv_path)
    train = [r for r in rows if r.source != src]
    p = fitting.fit(train, start, iters)
    test = [r for r in rows if r.source == src]
    return src, p, fitting.predict(p, test)


def cross_validate(rows, iters=150, jobs=2, log=None, csv_path=None, start: str = "shipped") -> tuple:
    """(cross-validated predictions in row order, {source: parameters}); each fold in its own
    process reloads the runs (csv_path) and fits without one source, starting from the shipped
    values (fitted to every run: faster to converge) or from fitting.neutral() (no run's influence)."""
    start = fitting.current() if start == "shipped" else fitting.neutral()
    sources = sorted({r.source for r in rows})
    pred = np.full(len(rows), np.nan)
    fits = {}
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        for src, p, pr in ex.map(_fold, [(s, start, iters, csv_path) for s in sources]):
            if log:
                log(f"fold done: {src}")
            fits[src] = p
            pred[[i for i, r in enumerate(rows) if r.source == src]] = pr
    return pred, fits


def errors(pred, meas) -> np.ndarray:
    """|predicted / measured - 1| per run, refused runs (nan) as MISS."""
    return np.where(np.isfinite(pred), np.abs(np.where(np.isfinite(pred), pred, 1.0) / meas - 1), MISS)


def summary(e, pred=None) -> str:
    e = np.asarray(e)
    refused = int(np.sum(~np.isfinite(pred))) if pred is not None else 0
    return (f"runs={len(e)} median={np.median(e):.1%} mean={np.mean(e):.1%} within_10%={np.mean(e <= 0.10):.0%} "
            f"refused={refused} (counted as {MISS:.0%} misses)")


def classes(rows) -> list:
    """The uncertainty class of every run (uncertainty.RunClass: stack, precision, generation,
    scale, dense/MoE)."""
    return [U.RunClass.of(r.stack, r.inputs.fixed["precision"], fitting.FAMILY[r.hardware], r.inputs.gpus,
                          r.model.moe is not None) for r in rows]


def breakdown(rows, e, pred) -> list:
    """(axis, value, summary) lines of the error by stack, precision, generation, scale, dense/MoE."""
    cls = classes(rows)
    out = []
    for axis in ("stack", "precision", "generation", "scale", "kind"):
        for v in sorted({getattr(c, axis) for c in cls}):
            idx = [i for i, c in enumerate(cls) if getattr(c, axis) == v]
            out.append((axis, v, summary(e[idx], pred[idx])))
    return out


def coverage(rows, pred, meas) -> tuple:
    """Share of measured values inside their 80% range, each run's range made from the
    cross-validated residuals of the other sources' runs (nested: no run sees its own source)."""
    cls = classes(rows)
    logres = np.log(meas / np.where(np.isfinite(pred), pred, np.nan))
    inside, widths = [], []
    for i, r in enumerate(rows):
        if not np.isfinite(pred[i]):
            inside.append(False)
            continue
        others = [(cls[j], logres[j]) for j in range(len(rows)) if rows[j].source != r.source and np.isfinite(logres[j])]
        lo, hi = U.quantiles_for(cls[i], others)
        inside.append(lo <= logres[i] <= hi)
        widths.append(math.exp(hi) - math.exp(lo))
    return float(np.mean(inside)), float(np.median(widths))


def table(rows, pred, meas) -> dict:
    """{class key: (q_lo, q_hi, n)} of the log residuals, for planner/uncertainty.py."""
    cls = classes(rows)
    logres = np.log(meas / np.where(np.isfinite(pred), pred, np.nan))
    pairs = [(c, x) for c, x in zip(cls, logres) if np.isfinite(x)]
    return U.build_table(pairs)


def write_table(table: dict) -> None:
    """Rewrite the TABLE literal at the end of planner/uncertainty.py."""
    from pathlib import Path
    path = Path(U.__file__)
    text = path.read_text()
    head = text[: text.index("TABLE: dict = ")]
    body = "TABLE: dict = {\n" + "".join(f"    {k!r}: {v!r},\n" for k, v in table.items()) + "}\n"
    path.write_text(head + body)
    print(f"wrote {len(table)} classes to {path}")
