"""The search: enumerate candidates in chunks, score them in one vectorized pass per chunk, keep
the best (and the Pareto front of a GPU range), and return a SearchResult."""
from __future__ import annotations

import time

import numpy as np

from . import pareto as P
from . import rules
from .candidates import count, degree_table, explain_empty, iter_candidates, prepare
from .costmodel import Evaluation, SearchCache, Settings, evaluate
from .errors import PlannerError
from .pareto import pareto_mask
from .hardware import Cluster
from .layout import Candidates, Layout
from .model_spec import ModelSpec
from .query import (DEFAULT_SEQ_LEN, OBJECTIVES, Query, default_global_batch, gpu_counts,  # noqa: F401
                    make_query)
from .results import Plan, SearchResult, plan_from_eval
from .stacks import STACKS, Stack

# layouts one search may score; more is refused (issue 7: answer or refuse within 10 s). Calibrated on
# a 2-core CPU: 1.1-1.5M layouts/s for one GPU count (10M: ~8 s with start-up and the count; deepseek-v3
# is 5.6M on 2,048 GPUs, 8.2M and 6 s on 16,384, 816 MiB peak), ~0.65M/s over a range, which also keeps
# a Pareto front (4M: ~6 s). Raise them as scoring gets faster.
MAX_LAYOUTS = 10_000_000
MAX_RANGE_LAYOUTS = 4_000_000
PRECOUNT_ROWS = 2048         # degree rows above which a search counts its layouts before scoring


def evaluate_layout(model: ModelSpec, cluster: Cluster, layout: Layout, stack: Stack | None = None,
                    tokens: float | None = None, price: float | None = None, **kw) -> Plan:
    """Predict one layout (no search); a layout that breaks a rule (planner/rules.py) is refused."""
    stack = stack or STACKS["megatron-core"]
    rules.check_layout(layout, rules.context_for(model, layout, stack, cluster))
    c = layout.to_candidates()
    return plan_from_eval(evaluate(model, cluster, c, stack, **kw), c, 0, cluster, tokens, price, stack.name,
                          model.moe is not None)


TIGHT_RANK = 1e15             # subtracted from a tight layout's score: every layout that fits ranks first


def _score(ev: Evaluation, q: Query):
    """Higher is better; with a fixed GPU count all three objectives agree. Tight layouts rank
    after every layout that fits (scores are tokens/s, per GPU-hour at most ~1e12)."""
    if q.objective == "throughput":
        s = ev.tokens_per_s_per_gpu
    elif q.objective == "time":
        s = ev.tokens_per_s_per_gpu * ev.gpus
    else:
        s = ev.tokens_per_s_per_gpu / max(q.cluster.price_per_gpu_hour if q.price is None else q.price, 1e-12)
    return np.where(ev.tight, s - TIGHT_RANK, s)


class _Scan:
    """What a search keeps while it scores chunks: the best `top`, the closest infeasible layout,
    the Pareto front, and the counts."""

    def __init__(self, q: Query):
        self.q, self.evaluated, self.feasible = q, 0, 0
        self.best, self.closest, self.fronts = [], None, []
        self.cache = SearchCache(Settings(q.model, q.cluster, q.stack, q.moe_imbalance, q.capacity_factor,
                                          pad_to_capacity=q.pad_to_capacity))

    def add(self, cands: Candidates) -> None:
        q = self.q
        if self.evaluated + len(cands) > _budget(q):
            raise _too_many(q)
        ev = evaluate(q.model, q.cluster, cands, q.stack, detail=False, cache=self.cache, fits_only=True)
        self.evaluated += len(cands)
        ok = ev.feasible
        nfeas = int(ok.sum())
        self.feasible += nfeas
        if nfeas < len(cands):
            over = np.where(ok, np.inf, ev.memory_bytes)
            j = int(np.argmin(over))
            if self.closest is None or over[j] < self.closest[0]:
                self.closest = (over[j], cands.take([j]))
        if not nfeas:
            return
        sc = np.where(ok, _score(ev, q), -np.inf)
        k = min(max(q.top, 1), nfeas)
        idx = np.argpartition(-sc, k - 1)[:k]
        idx = idx[np.isfinite(sc[idx])]
        self.best.append((sc[idx], cands.take(idx)))
        if len(self.best) > 8:                        # merge periodically to bound memory
            self.best = [_merge(self.best, max(q.top, 1))]
        self.fronts.append(P.chunk_front(ev, cands, ok))
        if len(self.fronts) > 16:
            self.fronts = [P.reduce_fronts(self.fronts, q.cluster, q.tokens, q.price)]


def search(model: ModelSpec, cluster: Cluster, gpus, seq_len: int | None = None,
           global_batch: int | None = None, fixed: dict | None = None, top: int = 10,
           objective: str = "throughput", precisions=None, stack: Stack | str | None = None,
           tokens: float | None = None, price: float | None = None, overlap: dict | None = None,
           moe_imbalance: float = 1.0, capacity_factor: float = 0.0, pad_to_capacity: bool = False) -> SearchResult:
    """Search every valid layout of `model` on `gpus` GPUs (an int, or a (lo, hi) range searched
    over its powers of two and multiples of the innermost domain) and return the best `top`."""
    t0 = time.perf_counter()
    q = make_query(model, cluster, gpus, seq_len, global_batch, fixed, top, objective, precisions, stack, tokens,
                   price, overlap, moe_imbalance, capacity_factor, pad_to_capacity)
    if q.single:
        rules.check_fixed(q.context(q.counts[0]), q.fixed)
    prepared = _check_space(q)
    scan = _Scan(q)
    for g in q.counts:
        for cands in iter_candidates(q.context(g), q.fixed, q.overlap, prepared=prepared.get(g)):
            scan.add(cands)
    empty_reason = None
    if scan.evaluated == 0 and q.single:    # a fixed knob impossible on its own raises; a clash is said
        empty_reason = explain_empty(q.context(q.counts[0]), q.fixed)
    return _result(q, scan, empty_reason, time.perf_counter() - t0)


def _result(q: Query, scan: _Scan, empty_reason, seconds) -> SearchResult:
    """The kept candidates (best, closest infeasible, Pareto front) scored again with their
    breakdowns, in one evaluation, as a SearchResult."""
    best = None
    if scan.best:
        sc, cands = _merge(scan.best, max(q.top, 1))
        best = cands.take(np.argsort(-sc, kind="stable")[:q.top])
    closest = scan.closest[1] if scan.closest is not None else None
    front = P.reduce_fronts(scan.fronts, q.cluster, q.tokens, q.price) if scan.fronts else None
    parts = [best, closest, front[0] if front is not None else None]
    kept = [p for p in parts if p is not None and len(p)]
    plans = [[] for _ in parts]
    if kept:
        allc = Candidates({k: np.concatenate([p.cols[k] for p in kept]) for k in kept[0].cols})
        ev = evaluate(q.model, q.cluster, allc, q.stack, q.moe_imbalance, q.capacity_factor,
                      pad_to_capacity=q.pad_to_capacity)
        moe, start = q.model.moe is not None, 0
        for j, p in enumerate(parts):
            if p is None or not len(p):
                continue
            tokens = q.tokens if j < 2 else (q.tokens or 1e12)
            plans[j] = [plan_from_eval(ev, allc, start + i, q.cluster, tokens, q.price, q.stack.name, moe)
                        for i in range(len(p))]
            start += len(p)
    best_plans = plans[0]
    gpus = q.counts[0] if q.single else (best_plans[0].gpus if best_plans else q.counts[-1])
    return SearchResult(model=q.model.name, hardware=q.cluster.name, gpus=gpus, evaluated=scan.evaluated,
                        feasible=scan.feasible, search_seconds=seconds, plans=best_plans,
                        closest_infeasible=plans[1][0] if plans[1] else None, pareto=plans[2],
                        empty_reason=empty_reason, seq_len=q.seq_len, global_batch=q.global_batch,
                        stack=q.stack.name)


def _merge(parts, keep):
    sc = np.concatenate([p[0] for p in parts])
    cols = {k: np.concatenate([p[1].cols[k] for p in parts]) for k in parts[0][1].cols}
    k = min(keep, len(sc))
    idx = np.argpartition(-sc, k - 1)[:k]
    return sc[idx], Candidates({kk: v[idx] for kk, v in cols.items()})


def _budget(q: Query) -> int:
    return MAX_LAYOUTS if q.single else MAX_RANGE_LAYOUTS


def _too_many(q: Query) -> PlannerError:
    return PlannerError(f"the search space of {q.model.name} on {q.gpus_text} GPUs has more than "
                        f"{_budget(q):,} layouts; hold some of --tp, --pp, --cp, --ep, --micro-batch, "
                        "--precision, --recompute, --zero fixed, or narrow --gpus")


def _check_space(q: Query) -> dict:
    """Refuse up front a search over more than MAX_LAYOUTS layouts. Where the space may be that
    large (a GPU range, or many degree rows) the layouts are counted first, from the rules' masks
    without making them. (The search loop checks the same bound as it goes.) Returns the tables
    it prepared to count ({GPU count: candidates.prepare(...)}), for the search to enumerate."""
    if q.single and len(degree_table(q.context(q.counts[0]), q.fixed)["tp"]) <= PRECOUNT_ROWS:
        return {}
    total, prepared = 0, {}
    for g in q.counts:
        prepared[g] = prepare(q.context(g), q.fixed, q.overlap)
        total += count(q.context(g), q.fixed, prepared[g])
        if total > _budget(q):
            raise _too_many(q)
    return prepared


__all__ = ["search", "evaluate_layout", "Plan", "SearchResult", "plan_from_eval", "default_global_batch", "pareto_mask",
           "gpu_counts", "DEFAULT_SEQ_LEN", "OBJECTIVES", "MAX_LAYOUTS", "MAX_RANGE_LAYOUTS"]
