"""Why the best layout won: its time and memory breakdowns, why each runner-up lost, and what
happens to the best layout when one knob is changed (which neighbours stop fitting, and which
memory term overflows).

    explain_dict(res, model, cluster, stack) -> dict   (JSON-safe; what `plan --format json
                                                        --explain` embeds)
    explain_text(res, model, cluster, stack) -> str    (what `plan --explain` prints)

Everything is derived from the cost model's named breakdowns (costmodel.TIME_TERMS and
MEMORY_TERMS) and from where each parallel group sits in the cluster's network levels
(Cluster.domain_sizes, innermost first); nothing about a particular machine is hard-coded.

Comparisons between layouts are made per token (GPU-seconds per token = 1 / tokens/s/GPU, split
by term in proportion to the step), so runners-up on other GPU counts compare fairly; for one
GPU count and batch this is the step-time difference as a share of the best layout's step.
"""
from __future__ import annotations

import math

from .costmodel import MEMORY_TERMS, TIME_TERMS
from .layout import LAYOUT_FIELDS, Layout, Recompute
from .neighbours import evaluate_neighbours, neighbours, valid, with_pp  # noqa: F401 (explain's API)
from .stacks import compiled, get_stack

TIME_LABEL = {
    "compute": "compute (forward + backward)",
    "recompute": "activation recompute",
    "tp_comm": "exposed TP communication",
    "cp_comm": "CP comm. (exposed + slowdown)",
    "ep_comm": "exposed EP all-to-all",
    "pp_comm": "PP sends (exposed + slowdown)",
    "dp_comm": "DP comm. (exposed + slowdown)",
    "bubble": "pipeline bubble",
    "optimizer": "optimizer step",
    "overhead": "per-step overhead",
    "offload": "exposed offload (host copies)",
}
MEMORY_LABEL = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "optimizer states",
    "activations": "activations",
    "logits": "loss tensors (fp32 logits + grad)",
    "buffers": "communication buffers",
    "fragmentation": "allocator reserve (fragmentation)",
    "reserved": "reserved (CUDA context, NCCL, cuBLAS)",
}
# knobs shown when two layouts differ, in the order a user reads a layout
_DIFF_KNOBS = ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "schedule", "sp", "micro_batch", "recompute",
               "zero", "shard_group", "precision", "cp_comm", "first_stage_layers", "last_stage_layers",
               "overlap_tp", "overlap_dp", "overlap_pp", "offload_layers")
MAX_RUNNERS_UP = 5
TIE = 0.001          # relative differences below this are reported as ties


# ----------------------------------------------------------------------------------- helpers

def _f(x, nd=6):
    """A JSON-safe float (None for NaN/inf), rounded for readability."""
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def _layout_dict(L: Layout) -> dict:
    return {k: (v if not hasattr(v, "item") else v.item()) for k, v in
            ((k, getattr(L, k)) for k in LAYOUT_FIELDS)}


def _short(L: Layout) -> str:
    s = f"tp={L.tp} pp={L.pp} dp={L.dp}"
    if L.cp > 1:
        s += f" cp={L.cp}"
    if L.ep > 1:
        s += f" ep={L.ep}"
    if L.vpp > 1:
        s += f" vpp={L.vpp}"
    if L.pp > 1:
        s += f" {L.schedule}"
    s += (f" sp={'on' if L.sp else 'off'} mb={L.micro_batch} recompute={L.recompute} "
          f"zero={L.zero} {L.precision}")
    return s + (f" offload={L.offload_layers} layers" if L.offload_layers else "")


def _fmt_val(k, v):
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _diff(L: Layout, B: Layout, gpus=None, best_gpus=None) -> list:
    """[(knob, this, best)] for every knob that differs."""
    out = []
    if gpus is not None and best_gpus is not None and gpus != best_gpus:
        out.append(("gpus", gpus, best_gpus))
    for k in _DIFF_KNOBS:
        a, b = getattr(L, k), getattr(B, k)
        if a != b:
            out.append((k, a, b))
    return out


def _diff_text(diff) -> str:
    if not diff:
        return "same layout"
    return ", ".join(f"{k}={_fmt_val(k, a)} (best {_fmt_val(k, b)})" for k, a, b in diff)


def micro_batches(L: Layout) -> int:
    """Micro-batches per step per pipeline: global batch / (dp x micro-batch)."""
    return max(L.global_batch // max(L.dp * L.micro_batch, 1), 1)


def group_level(cluster, size: int, stride: int):
    """Index of the outermost network level a group of `size` ranks at rank stride `stride` spans
    (Megatron rank order, tp innermost), or None for a group of one. Domains are read off the
    cluster (Cluster.domain_sizes, 0 = the whole cluster)."""
    if size <= 1:
        return None
    for i, d in enumerate(cluster.domain_sizes):
        if d == 0 or min(size, max(1, d // max(stride, 1))) >= size:
            return i
    return len(cluster.levels) - 1


def placement(L: Layout, cluster) -> dict:
    """Which network level each parallel group of the layout spans (tp innermost, then cp,
    dp, pp; ep carved out of tp x cp x dp with expert-TP innermost, as in Megatron-Core)."""
    groups = {"tp": (L.tp, 1), "cp": (L.cp, L.tp), "dp": (L.dp, L.tp * L.cp),
              "pp": (L.pp, L.tp * L.cp * L.dp), "ep": (L.ep, L.etp)}
    out = {}
    for g, (size, stride) in groups.items():
        li = group_level(cluster, size, stride)
        if li is None:
            continue
        lv = cluster.levels[li]
        out[g] = {"size": int(size), "level": lv.name, "level_index": li,
                  "within_innermost_domain": li == 0}
    return out


def _dom(cluster):
    """(innermost level name, its GPU count, the next level's name)."""
    lv0 = cluster.levels[0]
    d0 = cluster.domain_sizes[0] or 0
    nxt = cluster.levels[1].name if len(cluster.levels) > 1 else lv0.name
    return lv0.name, d0, nxt


def _share(p, k):
    return p.time_breakdown_s[k] / p.step_time_s if p.step_time_s > 0 else 0.0


def _per_token(p, k):
    """GPU-seconds per token attributable to time term k."""
    return _share(p, k) / p.tokens_per_s_per_gpu


def _pct(x) -> str:
    return f"{x:.1%}" if abs(x) < 0.095 else f"{x:.0%}"


def _cause(term, p, b, cluster, delta=None) -> str:
    """Why term `term` is larger in layout p than in the best layout b, in words. `delta` is the
    term's growth per token as a share of the best layout's step."""
    L, B = p.layout, b.layout
    name0, d0, nxt = _dom(cluster)
    share = _share(p, term)
    cost = f"{TIME_LABEL[term]} costs {_pct(share)} of the step (best: {_pct(_share(b, term))})"
    if term == "tp_comm":
        if d0 and L.tp > d0:
            return (f"tp={L.tp} crosses the {name0} domain of {d0} GPUs: TP all-reduce over {nxt} "
                    f"costs {_pct(share)} of the step (best: {_pct(_share(b, term))})")
        if L.tp > 1 and not L.sp and B.sp:
            return f"sp off keeps TP all-reduces un-overlapped with the GEMMs: {cost}"
        if L.tp > B.tp:
            return f"tp={L.tp} (best {B.tp}) adds TP all-reduces on every layer: {cost}"
        return cost
    if term == "cp_comm":
        if d0 and L.tp * L.cp > d0:
            return (f"cp={L.cp} x tp={L.tp} spans beyond the {name0} domain of {d0} GPUs: the K/V exchange "
                    f"runs over {nxt} and {cost}")
        return f"cp={L.cp} ({L.cp_comm}) exchanges K/V every layer: {cost}"
    if term == "ep_comm":
        if d0 and L.ep * L.etp > d0:
            return (f"ep={L.ep} crosses the {name0} domain of {d0} GPUs: token dispatch all-to-all over "
                    f"{nxt}: {cost}")
        return f"ep={L.ep} token dispatch/combine all-to-all: {cost}"
    if term == "pp_comm":
        v = f" x vpp={L.vpp} chunk hand-offs" if L.vpp > 1 else ""
        return f"pp={L.pp}{v} activation send/recv: {cost}"
    if term == "bubble":
        m = micro_batches(L)
        v = f", vpp={L.vpp}" if L.vpp > 1 else ""
        return (f"pp={L.pp} ({L.schedule}{v}) with {m} micro-batches per step: {cost}")
    if term == "dp_comm":
        lvl = group_level(cluster, L.dp * L.cp, L.tp)
        where = f" over {cluster.levels[lvl].name}" if lvl is not None else ""
        if L.zero == 3:
            return (f"ZeRO-3 re-gathers parameters every micro-batch ({micro_batches(L)} per step){where}: {cost}")
        if L.zero == 2:
            return (f"ZeRO-2 reduce-scatters gradients every micro-batch ({micro_batches(L)} per step){where}: "
                    f"{cost}")
        if L.dp * L.cp > B.dp * B.cp:
            return f"dp={L.dp} gradient reduction{where} is not hidden by the last backward: {cost}"
        return f"zero={L.zero} gradient reduction{where} is not hidden: {cost}"
    if term == "recompute":
        mods = Recompute.of(L.recompute).modules
        what = ("core attention" if L.recompute == "selective" else "every layer's forward" if not mods
                else f"Megatron-Core's {', '.join(mods)}")
        return f"recompute={L.recompute} re-runs {what} in backward: {cost}"
    if term == "optimizer":
        if L.zero == 0 and B.zero > 0:
            return f"zero=0 keeps the whole Adam state on every DP rank: {cost}"
        return f"optimizer step over the parameters this rank owns: {cost}"
    if term == "compute":
        if delta is not None:
            cost = f"compute grows by {_pct(delta)} of the best step"
        if L.precision != B.precision:
            return f"{L.precision} instead of {B.precision} linear layers: {cost}"
        if L.tp * L.etp > B.tp * B.etp:
            return f"tp={L.tp} splits every GEMM {L.tp} ways into smaller, less efficient kernels: {cost}"
        if L.tp > 1 and B.sp and not L.sp:
            return f"sp off repeats the LayerNorm and dropout work on every TP rank: {cost}"
        if L.ep < B.ep:
            return f"ep={L.ep} (best {B.ep}) leaves each rank {B.ep // max(L.ep, 1)}x the experts to compute: {cost}"
        if L.micro_batch < B.micro_batch:
            return f"micro_batch={L.micro_batch} (best {B.micro_batch}) gives smaller GEMMs: {cost}"
        if L.cp > B.cp:
            return f"cp={L.cp} shortens each rank's sequence into smaller GEMMs: {cost}"
        if (L.pp, L.first_stage_layers, L.last_stage_layers) != (B.pp, B.first_stage_layers, B.last_stage_layers):
            return f"the slowest pipeline stage carries more work: {cost}"
        return cost
    if term == "offload":
        return (f"offload_layers={L.offload_layers} copies those layers' activations to host memory and back "
                f"(host link {cluster.gpu.host_bandwidth / 1e9:.0f} GB/s per direction): {cost}")
    return cost


def _reasons(p, b, cluster, n=2) -> tuple:
    """(slower_by, reasons, gains): the one or two time terms that made p lose to b, each with
    its per-token delta as a share of the best step, and the biggest term p saves."""
    if p.tokens_per_s_per_gpu <= 0 or b.tokens_per_s_per_gpu <= 0:
        return float("inf"), [], []
    slower = b.tokens_per_s_per_gpu / p.tokens_per_s_per_gpu - 1.0
    deltas = {k: (_per_token(p, k) - _per_token(b, k)) * b.tokens_per_s_per_gpu for k in TIME_TERMS}
    losing = sorted(((d, k) for k, d in deltas.items() if d > 0), reverse=True)
    total_loss = sum(d for d, _ in losing)
    reasons = []
    for d, k in losing[:n]:
        if reasons and d < 0.25 * total_loss:
            break
        reasons.append({"term": k, "label": TIME_LABEL[k], "delta_of_best_step": _f(d),
                        "share_of_step": _f(_share(p, k)), "best_share_of_step": _f(_share(b, k)),
                        "text": _cause(k, p, b, cluster, d)})
    gains = [{"term": k, "label": TIME_LABEL[k], "delta_of_best_step": _f(d)}
             for d, k in sorted(((d, k) for k, d in deltas.items() if d < 0))[:1]]
    return slower, reasons, gains


def _time_rows(p) -> list:
    return [{"term": k, "label": TIME_LABEL[k], "seconds": _f(v), "share": _f(v / p.step_time_s if p.step_time_s else 0)}
            for k, v in ((k, p.time_breakdown_s[k]) for k in TIME_TERMS)]


def _memory_rows(p) -> list:
    tot = p.memory_gib or 1.0
    return [{"term": k, "label": MEMORY_LABEL[k], "gib": _f(v), "share": _f(v / tot)}
            for k, v in ((k, p.memory_breakdown_gib[k]) for k in MEMORY_TERMS)]


def _overflow(p, base) -> dict:
    """Which memory term pushed p over HBM, relative to the fitting base layout."""
    over = p.memory_gib - p.hbm_gib
    grow = {k: p.memory_breakdown_gib[k] - base.memory_breakdown_gib[k] for k in MEMORY_TERMS}
    term = max(grow, key=grow.get)
    if grow[term] <= 0.05:   # nothing grew (should not happen for a neighbour of a fitting layout)
        term = max(p.memory_breakdown_gib, key=p.memory_breakdown_gib.get)
    was, now = base.memory_breakdown_gib[term], p.memory_breakdown_gib[term]
    growing = sorted(((g, k) for k, g in grow.items() if g > 0.05), reverse=True)
    parts = [f"{MEMORY_LABEL[term]} {was:.1f} -> {now:.1f} GiB ({now - was:+.1f})"]
    for g, k in growing[1:2]:
        if g >= 0.25 * grow[term]:
            parts.append(f"{MEMORY_LABEL[k]} {base.memory_breakdown_gib[k]:.1f} -> "
                         f"{p.memory_breakdown_gib[k]:.1f} GiB ({g:+.1f})")
    text = (f"needs {p.memory_gib:.1f} GiB per GPU, {over:.1f} GiB over the {p.hbm_gib:.1f} GiB HBM: "
            + "; ".join(parts))
    return {"term": term, "label": MEMORY_LABEL[term], "over_gib": _f(over), "term_gib": _f(now),
            "term_best_gib": _f(was), "term_delta_gib": _f(now - was), "text": text}


# ----------------------------------------------------------------------------------- public

def _margin(p, stack) -> str:
    """How sure the fit is: a tight layout's overflow, or the headroom against the memory model's
    own uncertainty (Stack.memory_uncertainty, benchmarks/memory.py) and which term's error
    would use it up."""
    u = getattr(stack, "memory_uncertainty", 0.10)
    b = p.memory_breakdown_gib
    big = max(("activations", "logits", "weights", "gradients", "optimizer"), key=lambda k: b.get(k, 0.0))
    room = p.hbm_gib - p.memory_gib
    if p.fit == "tight":
        return (f"tight: predicted {-room:.1f} GiB ({-room / p.hbm_gib:.1%}) over the {p.hbm_gib:.1f} GiB HBM, "
                f"within the memory model's +-{u:.0%}; it runs only if {MEMORY_LABEL[big]} "
                f"({b[big]:.1f} GiB) are {-room:.1f} GiB smaller than predicted")
    if room < u * p.memory_gib:
        return (f"close: {room:.1f} GiB free, less than the memory model's +-{u:.0%}; {MEMORY_LABEL[big]} "
                f"{room / max(b[big], 1e-9):.0%} above the prediction would push it over")
    return f"fits: {room:.1f} GiB free ({room / p.memory_gib:.0%} of the prediction; the model's uncertainty +-{u:.0%})"


def _basis(p) -> str:
    """What the throughput range rests on (planner/uncertainty.py)."""
    from .uncertainty import TABLE
    r, k = p.tokens_per_s_per_gpu_range, p.range_basis
    if not r or k not in TABLE:
        return "no cross-validated residuals yet (benchmarks/accuracy.py --cross-validate --write-ranges)"
    lo, hi, n = TABLE[k]
    return (f"80% range {r[0]:,.0f}-{r[1]:,.0f} tokens/s per GPU: the 10th-90th percentile of "
            f"measured/predicted ({lo:+.0%} .. {hi:+.0%} in log terms) over {n} published runs of class '{k}', "
            f"each predicted by parameters fitted without its own source")


def _stack_of(res, stack):
    """The Stack to explain under: the one given (or named), else the search's own."""
    if stack is None or isinstance(stack, str):
        return get_stack(stack or res.stack or "megatron-core")
    return stack


def explain_dict(res, model, cluster, stack=None) -> dict:
    """The explanation as plain data (JSON-safe): best layout, its breakdowns and group placement,
    the runners-up with the terms that made them lose, and the one-knob neighbours (infeasible
    ones name the memory term that overflowed). `stack`: a Stack, its name, or None for the one
    the search ran under (res.stack)."""
    stack = _stack_of(res, stack)
    best = res.best
    out = {"model": model.name, "hardware": cluster.name, "stack": getattr(stack, "name", None),
           "compile": compiled(stack),
           "domains": [{"level": lv.name, "gpus": int(d) if d else None}
                       for lv, d in zip(cluster.levels, cluster.domain_sizes)]}
    if best is None:
        cl = res.closest_infeasible
        out["best"] = None
        if cl is not None:
            out["closest_infeasible"] = {"layout": _layout_dict(cl.layout), "gpus": cl.gpus,
                                         "memory_gib": _f(cl.memory_gib), "hbm_gib": _f(cl.hbm_gib),
                                         "memory_breakdown": _memory_rows(cl), "why": cl.overflow()}
        return out
    L = best.layout
    out["best"] = {
        "layout": _layout_dict(L), "gpus": int(best.gpus), "summary": _short(L),
        "micro_batches_per_step": micro_batches(L),
        "step_time_s": _f(best.step_time_s), "tokens_per_s_per_gpu": _f(best.tokens_per_s_per_gpu, 3),
        "mfu": _f(best.mfu), "memory_gib": _f(best.memory_gib), "hbm_gib": _f(best.hbm_gib),
        "headroom_gib": _f(best.hbm_gib - best.memory_gib), "fit": best.fit, "margin": _margin(best, stack),
        "tokens_per_s_per_gpu_range": list(best.tokens_per_s_per_gpu_range or ()), "range_basis": _basis(best),
        "time_breakdown": _time_rows(best), "memory_breakdown": _memory_rows(best),
        "placement": placement(L, cluster),
    }
    if best.time_to_train_s is not None:
        out["best"]["time_to_train_days"] = _f(best.time_to_train_s / 86400)
    if best.cost_usd is not None:
        out["best"]["cost_usd"] = _f(best.cost_usd, 2)
    runners, seen = [], {L}
    for rank, p in enumerate(res.plans[1:], 2):
        if p.layout in seen:
            continue
        seen.add(p.layout)
        slower, reasons, gains = _reasons(p, best, cluster)
        diff = _diff(p.layout, L, p.gpus, best.gpus)
        runners.append({"rank": rank, "layout": _layout_dict(p.layout), "gpus": int(p.gpus),
                        "differs": [{"knob": k, "value": a, "best": b} for k, a, b in diff],
                        "differs_text": _diff_text(diff), "slower_by": _f(slower),
                        "tie": bool(abs(slower) < TIE), "step_time_s": _f(p.step_time_s),
                        "tokens_per_s_per_gpu": _f(p.tokens_per_s_per_gpu, 3), "memory_gib": _f(p.memory_gib),
                        "reasons": reasons, "gains": gains})
        if len(runners) >= MAX_RUNNERS_UP:
            break
    out["runners_up"] = runners
    base, nbs = evaluate_neighbours(model, cluster, best, stack)
    rows = []
    for desc, p in nbs:
        row = {"change": desc, "layout": _layout_dict(p.layout), "fits": bool(p.feasible),
               "memory_gib": _f(p.memory_gib), "hbm_gib": _f(p.hbm_gib),
               "tokens_per_s_per_gpu": _f(p.tokens_per_s_per_gpu, 3)}
        if p.feasible:
            slower, reasons, _ = _reasons(p, base, cluster, n=1)
            row["slower_by"] = _f(slower)
            row["reasons"] = reasons
        else:
            row["overflow"] = _overflow(p, base)
        rows.append(row)
    out["neighbours"] = rows
    out["infeasible_neighbours"] = [r for r in rows if not r["fits"]]
    return out


def _bar(share, width=24):
    n = share * width
    full = int(n)
    return "#" * full + ("+" if n - full >= 0.5 else "")


def explain_text(res, model, cluster, stack=None) -> str:
    """The explanation as aligned text for the terminal."""
    d = explain_dict(res, model, cluster, stack)
    lines = []
    b = d.get("best")
    if b is None:
        lines.append(f"no layout of {model.name} fits on {res.gpus} x {cluster.name}")
        ci = d.get("closest_infeasible")
        if ci:
            lines.append(f"closest: {_short(res.closest_infeasible.layout)}: {ci['why']}")
            for r in ci["memory_breakdown"]:
                if r["gib"] and r["gib"] > 0.05:
                    lines.append(f"  {r['label']:<42} {r['gib']:8.1f} GiB")
        return "\n".join(lines)
    best = res.best
    L = best.layout
    lines.append(f"Why this layout: {model.name} on {best.gpus} x {cluster.name}"
                 f"{' (' + d['stack'] + (', compiled' if d['compile'] else '') + ')' if d['stack'] else ''}")
    lines.append(f"  {_short(L)}, {micro_batches(L)} micro-batches per step")
    lines.append(f"  step {best.step_time_s:.3f} s, {best.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
                 f"MFU {best.mfu:.1%}")
    doms = ", ".join(f"{x['level']} ({x['gpus']} GPUs)" if x["gpus"] else f"{x['level']} (whole cluster)"
                     for x in d["domains"])
    pl = ", ".join(f"{g.upper()} {v['size']} {'within' if v['within_innermost_domain'] else 'spans'} {v['level']}"
                   for g, v in b["placement"].items())
    lines.append(f"  network levels: {doms}")
    if pl:
        lines.append(f"  groups: {pl}")
    lines.append("")
    lines.append(f"Time per step ({best.step_time_s:.3f} s); {b['range_basis']}")
    for r in b["time_breakdown"]:
        if not r["seconds"]:
            continue
        lines.append(f"  {r['label']:<30} {r['seconds']:9.3f} s {r['share']:6.1%}  {_bar(r['share'])}")
    phi = cluster.efficiency.overlap_slowdown
    if phi and cluster.gpu.shared_by == 1 and any(r["seconds"] for r in b["time_breakdown"] if r["term"] in ("dp_comm", "cp_comm", "pp_comm")):
        lines.append(f"  (slowdown: DP, CP and PP traffic hidden behind compute still costs {phi:.1%} of its time, "
                     f"NCCL's kernels sharing the SMs; Lee et al. 2025, arXiv 2507.03114)")
    lines.append("")
    lines.append(f"Memory per GPU ({best.memory_gib:.1f} of {best.hbm_gib:.1f} GiB HBM, "
                 f"{best.hbm_gib - best.memory_gib:.1f} GiB free)")
    lines.append(f"  {b['margin']}")
    for r in b["memory_breakdown"]:
        if not r["gib"] or r["gib"] < 0.05:
            continue
        lines.append(f"  {r['label']:<42} {r['gib']:7.1f} GiB {r['share']:6.1%}  {_bar(r['share'])}")
    if d["runners_up"]:
        lines.append("")
        lines.append("Runners-up (why each lost)")
        for r in d["runners_up"]:
            head = "ties with the best" if r["tie"] else f"{r['slower_by']:.1%} slower per token"
            lines.append(f"  #{r['rank']} {r['differs_text']}: {head}")
            for why in r["reasons"]:
                if not r["tie"]:
                    lines.append(f"      {why['text']}")
            for g in r["gains"]:
                if not r["tie"] and g["delta_of_best_step"] and g["delta_of_best_step"] < -0.005:
                    lines.append(f"      (saves {-g['delta_of_best_step']:.1%} of the step on {g['label']})")
    fit = sorted((r for r in d["neighbours"] if r["fits"]), key=lambda r: r["slower_by"])
    nofit = sorted((r for r in d["neighbours"] if not r["fits"]), key=lambda r: r["overflow"]["over_gib"])
    if fit:
        lines.append("")
        lines.append("One knob changed from the best layout: fits, but slower")
        for r in fit:
            why = r["reasons"][0]["text"] if r.get("reasons") else ""
            s = r["slower_by"]
            head = (f"{s:.1%} slower" if s >= TIE else
                    f"{-s:.1%} faster (outside the searched space)" if s <= -TIE else "same speed")
            lines.append(f"  {r['change']}: {head}" + (f"; {why}" if why and s >= TIE else ""))
    if nofit:
        lines.append("")
        lines.append("One knob changed from the best layout: does not fit")
        for r in nofit:
            lines.append(f"  {r['change']}: {r['overflow']['text']}")
    return "\n".join(lines)


__all__ = ["explain_dict", "explain_text", "neighbours", "placement", "group_level", "micro_batches", "valid",
           "with_pp",
           "TIME_LABEL", "MEMORY_LABEL"]
