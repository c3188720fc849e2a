"""Render a SearchResult as an aligned table, JSON or CSV (no pandas needed for table/JSON)."""
from __future__ import annotations

import json
import math

from .costmodel import TIME_TERMS
from .layout import LAYOUT_FIELDS

TERM_LABEL = {"compute": "compute", "recompute": "recompute", "tp_comm": "TP", "cp_comm": "CP",
              "ep_comm": "EP", "pp_comm": "PP", "dp_comm": "DP", "bubble": "bubble",
              "optimizer": "optimizer", "overhead": "overhead"}


def _top_terms(p, n=3):
    tot = p.step_time_s
    items = sorted(((v, k) for k, v in p.time_breakdown_s.items() if k != "compute" and v > 0), reverse=True)
    return " ".join(f"{TERM_LABEL[k]} {v / tot:.0%}" for v, k in items[:n] if v / tot >= 0.005) or "-"


def _header(res, model, cluster, stack, a):
    from .engine import DEFAULT_SEQ_LEN, default_global_batch
    seq = (a.seq_len if a else None) or model.seq_len or DEFAULT_SEQ_LEN
    gb = (a.global_batch if a else None) or (res.plans[0].layout.global_batch if res.plans else
                                             default_global_batch(seq, res.gpus))
    return dict(seq_len=seq, global_batch=gb)


def to_table(res, model, cluster, stack, a=None, goodput=None) -> str:
    h = _header(res, model, cluster, stack, a)
    lines = [f"{model.name} on {res.gpus} x {cluster.name} ({stack.name}) | seq {h['seq_len']}, "
             f"global batch {h['global_batch']} seqs | {res.evaluated:,} layouts scored, {res.feasible:,} fit, "
             f"{res.search_seconds:.2f} s"]
    cols = ["#", "gpus", "tp", "pp", "dp", "cp", "ep", "vpp", "sched", "sp", "mb", "recomp", "zero", "prec",
            "step_s", "tok/s/gpu", "MFU", "mem_GiB", "where time goes"]
    has_cost = any(p.cost_usd is not None for p in res.plans)
    if has_cost:
        cols[-1:-1] = ["days", "cost_$M"]
    rows = []
    for i, p in enumerate(res.plans, 1):
        L = p.layout
        r = [str(i), str(p.gpus), str(L.tp), str(L.pp), str(L.dp), str(L.cp), str(L.ep), str(L.vpp), L.schedule,
             "on" if L.sp else "-", str(L.micro_batch), L.recompute, str(L.zero), L.precision,
             f"{p.step_time_s:.3f}", f"{p.tokens_per_s_per_gpu:,.0f}", f"{p.mfu:.1%}", f"{p.memory_gib:.1f}"]
        if has_cost:
            r += [f"{p.time_to_train_s / 86400:.1f}", f"{p.cost_usd / 1e6:.2f}"]
        r.append(_top_terms(p))
        rows.append(r)
    w = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    fmt = lambda r: "  ".join(x.ljust(w[j]) if j == len(cols) - 1 else x.rjust(w[j]) for j, x in enumerate(r))  # noqa
    lines.append(fmt(cols))
    lines.extend(fmt(r) for r in rows)
    b = res.best
    tot = b.step_time_s
    lines.append("")
    lines.append("best layout, time per step: " + ", ".join(
        f"{TERM_LABEL[k]} {v:.3f}s ({v / tot:.0%})" for k, v in b.time_breakdown_s.items() if v > 0))
    lines.append(f"best layout, memory per GPU ({b.memory_gib:.1f} of {b.hbm_gib:.1f} GiB): " + ", ".join(
        f"{k} {v:.1f}" for k, v in b.memory_breakdown_gib.items() if v > 0.05))
    if goodput is not None:
        lines.append(f"goodput: {goodput.goodput:.1%} (system MTBF {goodput.system_mtbf_h:.2f} h, checkpoint every "
                     f"{goodput.checkpoint_interval_min:.1f} min, {goodput.checkpoint_write_s:.0f} s to write)")
    return "\n".join(lines)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(res, model, cluster, stack, a=None, goodput=None) -> str:
    h = _header(res, model, cluster, stack, a)
    out = {"model": model.name, "hardware": cluster.name, "gpus": res.gpus, "stack": stack.name,
           "seq_len": h["seq_len"], "global_batch": h["global_batch"],
           "evaluated": res.evaluated, "feasible": res.feasible, "search_seconds": res.search_seconds,
           "layouts": [p.to_dict() for p in res.plans]}
    if res.pareto:
        out["pareto"] = [p.to_dict() for p in res.pareto]
    if goodput is not None:
        from dataclasses import asdict
        out["goodput"] = asdict(goodput)
        if res.best is not None and res.best.time_to_train_s is not None:
            out["goodput"]["time_to_train_s"] = res.best.time_to_train_s / goodput.goodput
    if a is not None and getattr(a, "explain", False) and res.plans:
        from .explain import explain_dict
        out["explain"] = explain_dict(res, model, cluster, stack)
    if not res.plans and res.closest_infeasible is not None:
        out["closest_infeasible"] = res.closest_infeasible.to_dict()
        out["why_infeasible"] = res.closest_infeasible.overflow()
    return json.dumps(_clean(out), indent=2)


def flat_rows(plans) -> list:
    rows = []
    for p in plans:
        d = p.to_dict()
        for k, v in d.pop("time_breakdown_s").items():
            d[f"time_{k}_s"] = v
        for k, v in d.pop("memory_breakdown_gib").items():
            d[f"mem_{k}_gib"] = v
        rows.append(d)
    return rows


def to_csv(res) -> str:
    import csv
    import io
    rows = flat_rows(res.plans)
    buf = io.StringIO()
    if rows:
        wr = csv.DictWriter(buf, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    return buf.getvalue()


__all__ = ["to_table", "to_json", "to_csv", "flat_rows", "LAYOUT_FIELDS", "TIME_TERMS"]
