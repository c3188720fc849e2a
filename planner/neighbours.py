"""The best layout's one-knob neighbours: the same layout with TP, PP, CP, EP, micro-batch,
recompute, ZeRO stage, SP, precision or offloaded layers changed (degree changes trade with DP so
the GPU count holds; a pipeline or a recompute drops offloading, which Megatron runs without
them), each valid by planner/rules.py, scored together in one cost-model call."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import rules
from .candidates import split_layers
from .costmodel import evaluate
from .errors import PlannerError
from .layout import Candidates, Layout
from .results import plan_from_eval


def valid(model, L: Layout, stack=None, cluster=None) -> bool:
    """Whether a layout passes every rule (planner/rules.py)."""
    return not rules.violations(L, rules.context_for(model, L, stack, cluster))


def with_pp(model, B: Layout, pp: int, dp: int, stack=None, cluster=None):
    """(layout, note): B with pp ranks (dp compensating), the balanced stage split for pp
    (candidates.split_layers), and 1F1B where B's virtual stages no longer fit."""
    first, last, _ = split_layers(model.layers, np.array([pp]), np.array([0]))
    kw = dict(pp=pp, dp=dp, first_stage_layers=int(first[0]) if pp > 1 else 0,
              last_stage_layers=int(last[0]) if pp > 1 else 0, offload_layers=B.offload_layers if pp == 1 else 0)
    if pp == 1 or B.pp == 1:
        kw.update(schedule="1f1b", vpp=1)
    cand = replace(B, **kw)
    note = ""
    if pp > 1 and not valid(model, cand, stack, cluster) and cand.vpp > 1:
        note = f"; 1f1b, since vpp={B.vpp} no longer fits"
        cand = replace(cand, schedule="1f1b", vpp=1)
    elif B.pp > 1 and pp == 1 and B.schedule != "1f1b":
        note = "; no pipeline schedule"
    return cand, note


def neighbours(model, cluster, best: Layout, stack=None) -> list:
    """(description, Layout) for the best layout with one knob changed; degree changes keep the
    GPU count by trading with dp (tp x2 -> dp /2)."""
    B = best
    out = []

    def add(desc, fn):
        try:
            L = fn()
        except PlannerError:
            return
        if isinstance(L, tuple):
            L, note = L
            if note:
                desc = desc[:-1] + note + ")" if desc.endswith(")") else desc + note
        if L is not None and L != B and valid(model, L, stack, cluster):
            out.append((desc, L))

    for f in (2, 0.5):
        # tp (dp compensates); expert TP follows TP when it did in the best layout
        tp, dp = int(B.tp * f), B.dp / f
        if tp >= 1 and dp >= 1 and dp == int(dp):
            etp = tp if B.etp == B.tp else B.etp
            add(f"tp {B.tp}->{tp} (dp {B.dp}->{int(dp)})",
                lambda tp=tp, dp=int(dp), etp=etp: replace(B, tp=tp, dp=dp, etp=etp,
                                                           sp=(tp > 1) and (B.sp or B.tp == 1)))
        pp, dp = int(B.pp * f), B.dp / f
        if pp >= 1 and dp >= 1 and dp == int(dp):
            add(f"pp {B.pp}->{pp} (dp {B.dp}->{int(dp)})", lambda pp=pp, dp=int(dp): with_pp(model, B, pp, dp, stack, cluster))
        cp, dp = int(B.cp * f), B.dp / f
        if cp >= 1 and dp >= 1 and dp == int(dp):
            add(f"cp {B.cp}->{cp} (dp {B.dp}->{int(dp)})", lambda cp=cp, dp=int(dp): replace(B, cp=cp, dp=dp))
        if model.moe:
            ep = int(B.ep * f)
            if ep >= 1:
                add(f"ep {B.ep}->{ep}", lambda ep=ep: replace(B, ep=ep))
        mb = int(B.micro_batch * f)
        if mb >= 1:
            add(f"micro_batch {B.micro_batch}->{mb}", lambda mb=mb: replace(B, micro_batch=mb))
    for r in ("none", "selective", "full"):
        if r != B.recompute:
            add(f"recompute {B.recompute}->{r}",
                lambda r=r: replace(B, recompute=r, offload_layers=B.offload_layers if r == "none" else 0))
    for n in sorted({0, model.layers // 2} - {B.offload_layers}):
        add(f"offload_layers {B.offload_layers}->{n}", lambda n=n: replace(B, offload_layers=n))
    zs = tuple(getattr(stack, "zero_stages", (0, 1, 2, 3))) if stack is not None else (0, 1, 2, 3)
    for z in zs:
        if z != B.zero:
            add(f"zero {B.zero}->{z}", lambda z=z: replace(B, zero=z, shard_group=B.shard_group if z else 0))
    if B.tp > 1:
        add(f"sp {'on->off' if B.sp else 'off->on'}", lambda: replace(B, sp=not B.sp))
    for prec in ("bf16", "fp8"):
        if prec != B.precision and prec in cluster.gpu.peak_flops:
            add(f"precision {B.precision}->{prec}", lambda prec=prec: replace(B, precision=prec))
    return out


def evaluate_neighbours(model, cluster, best_plan, stack):
    nb = neighbours(model, cluster, best_plan.layout, stack)
    if not nb:
        return None, []
    cands = Candidates.from_layouts([best_plan.layout] + [L for _, L in nb])
    ev = evaluate(model, cluster, cands, stack)
    base = plan_from_eval(ev, cands, 0, cluster)
    return base, [(desc, plan_from_eval(ev, cands, i + 1, cluster)) for i, (desc, _) in enumerate(nb)]
