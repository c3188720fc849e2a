"""Render a SearchResult as an aligned table, JSON or CSV (no pandas needed for table/JSON)."""
from __future__ import annotations

import json
import math

from .costmodel import TIME_TERMS
from .layout import LAYOUT_FIELDS
from .results import flat_rows

TERM_LABEL = {"compute": "compute", "recompute": "recompute", "tp_comm": "TP", "cp_comm": "CP",
              "ep_comm": "EP", "pp_comm": "PP", "dp_comm": "DP", "bubble": "bubble",
              "optimizer": "optimizer", "overhead": "overhead", "offload": "offload"}


def _top_terms(p, n=3):
    tot = p.step_time_s
    items = sorted(((v, k) for k, v in p.time_breakdown_s.items() if k != "compute" and v > 0), reverse=True)
    return " ".join(f"{TERM_LABEL[k]} {v / tot:.0%}" for v, k in items[:n] if v / tot >= 0.005) or "-"


# knobs always shown, then knobs shown only when they differ among the rows printed (rows that
# differ only in a hidden knob would otherwise look identical)
_ALWAYS = (("tp", "tp"), ("pp", "pp"), ("dp", "dp"), ("cp", "cp"), ("ep", "ep"), ("vpp", "vpp"),
           ("sched", "schedule"), ("sp", "sp"), ("mb", "micro_batch"), ("recomp", "recompute"), ("zero", "zero"),
           ("prec", "precision"))
_WHEN_DIFFERENT = (("etp", "etp"), ("cp_comm", "cp_comm"), ("shard", "shard_group"),
                   ("first_L", "first_stage_layers"), ("last_L", "last_stage_layers"),
                   ("ovl_tp", "overlap_tp"), ("ovl_dp", "overlap_dp"), ("ovl_pp", "overlap_pp"),
                   ("ovl_ep", "overlap_ep"))
# knobs shown whenever any row printed uses them (0 = off)
_WHEN_SET = (("offload", "offload_layers"),)


def _knob(v) -> str:
    return ("on" if v else "-") if isinstance(v, bool) else str(v)


def knob_columns(plans) -> list:
    """[(header, layout field)]: the fixed set, plus every other knob whose value differs among `plans`."""
    cols = list(_ALWAYS)
    for head, f in _WHEN_DIFFERENT:
        if len({getattr(p.layout, f) for p in plans}) > 1:
            cols.append((head, f))
    cols += [(head, f) for head, f in _WHEN_SET if any(getattr(p.layout, f) for p in plans)]
    return cols


def _range(p) -> str:
    r = p.tokens_per_s_per_gpu_range
    if not r or r[0] != r[0]:
        return "-"
    return f"{r[0]:,.0f}-{r[1]:,.0f}"


def to_table(res, model, cluster, stack, a=None, goodput=None) -> str:
    from .stacks import compiled, grad_dtype
    grads = (", bf16 grads" if grad_dtype(stack) == "bf16" else "") + (", compiled" if compiled(stack) else "")
    lines = [f"{model.name} on {res.gpus} x {cluster.name} ({stack.name}{grads}) | seq {res.seq_len}, "
             f"global batch {res.global_batch} seqs | {res.evaluated:,} layouts scored, {res.feasible:,} fit, "
             f"{res.search_seconds:.2f} s"]
    knobs = knob_columns(res.plans)
    cols = ["#", "gpus", *(h for h, _ in knobs), "step_s", "tok/s/gpu", "80% range", "MFU", "mem_GiB", "fit",
            "where time goes"]
    has_cost = any(p.cost_usd is not None for p in res.plans)
    if has_cost:
        cols[-1:-1] = ["days", "cost_$M"]
    rows = []
    for i, p in enumerate(res.plans, 1):
        r = [str(i), str(p.gpus), *(_knob(getattr(p.layout, f)) for _, f in knobs),
             f"{p.step_time_s:.3f}", f"{p.tokens_per_s_per_gpu:,.0f}", _range(p), f"{p.mfu:.1%}", f"{p.memory_gib:.1f}",
             p.fit]
        if has_cost:
            r += [f"{p.time_to_train_s / 86400:.1f}", f"{p.cost_usd / 1e6:.2f}"]
        r.append(_top_terms(p))
        rows.append(r)
    w = [max(len(c), *(len(r[j]) for r in rows)) for j, c in enumerate(cols)]
    fmt = lambda r: "  ".join(x.ljust(w[j]) if j == len(cols) - 1 else x.rjust(w[j]) for j, x in enumerate(r))  # noqa
    lines.append(fmt(cols))
    lines.extend(fmt(r) for r in rows)
    lines.extend(_best_lines(res.best, goodput))
    return "\n".join(lines)


def _best_lines(b, goodput) -> list:
    tot = b.step_time_s
    out = ["", "best layout, time per step: " + ", ".join(
        f"{TERM_LABEL[k]} {v:.3f}s ({v / tot:.0%})" for k, v in b.time_breakdown_s.items() if v > 0),
        f"best layout, memory per GPU ({b.memory_gib:.1f} of {b.hbm_gib:.1f} GiB): " + ", ".join(
        f"{k} {v:.1f}" for k, v in b.memory_breakdown_gib.items() if v > 0.05)]
    if goodput is not None:
        out.append(f"goodput: {goodput.goodput:.1%} (system MTBF {goodput.system_mtbf_h:.2f} h, checkpoint every "
                   f"{goodput.checkpoint_interval_min:.1f} min, {goodput.checkpoint_write_s:.0f} s to write)")
    return out


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(res, model, cluster, stack, a=None, goodput=None) -> str:
    from .stacks import compiled, grad_dtype
    out = {"model": model.name, "hardware": cluster.name, "gpus": res.gpus, "stack": stack.name,
           "grad_dtype": grad_dtype(stack), "compile": compiled(stack),
           "seq_len": res.seq_len, "global_batch": res.global_batch,
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
