"""The search: enumerate candidates in chunks, score them in one vectorized pass per chunk, keep
the best, and return dataclasses and pandas DataFrames."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .candidates import MAX_GPUS, check_fixed, degree_table, explain_empty, iter_candidates
from .costmodel import MEMORY_TERMS, TIME_TERMS, evaluate
from .errors import PlannerError
from .hardware import Cluster
from .layout import LAYOUT_FIELDS, Candidates, Layout
from .model_spec import ModelSpec
from .stacks import STACKS, Stack
from .units import GiB

OBJECTIVES = ("throughput", "cost", "time")
# layouts one search may score; more is refused (issue 7: answer or refuse within 10 s). Calibrated on
# a 2-core CPU: 0.9-1.1M layouts/s for one GPU count (6M: ~7 s with start-up and the count; deepseek-v3
# fits up to 2,048 GPUs), ~0.65M/s over a range, which also keeps a Pareto front (4M: ~6 s). Raise
# them as scoring gets faster.
MAX_LAYOUTS = 6_000_000
MAX_RANGE_LAYOUTS = 4_000_000
PRECOUNT_ROWS = 2048         # degree rows above which a search counts its layouts before scoring
MAX_TOP = 10_000             # plans one search returns with breakdowns
MAX_INT = 1 << 53            # integers the float64 cost model represents exactly
DEFAULT_SEQ_LEN = 4096
DEFAULT_BATCH_TOKENS = 4 * 1024 * 1024   # default global batch: 4Mi tokens (GPT-3's 3.2M, Llama-3's 4M-16M)


def default_global_batch(seq_len: int, gpus: int = 1) -> int:
    """4Mi tokens, or one sequence per 8 GPUs if that is more, rounded up to a power of two
    (Llama 3 405B: 2,048 x 8K sequences = 16M tokens on 16K GPUs, Dubey et al. 2024 sec. 3.3)."""
    gb = max(1, DEFAULT_BATCH_TOKENS // seq_len, -(-gpus // 8))
    return 1 << (gb - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """One evaluated layout with its predictions and named breakdowns."""
    layout: Layout
    gpus: int
    step_time_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    model_tflops_per_gpu: float
    memory_gib: float
    feasible: bool
    time_breakdown_s: dict
    memory_breakdown_gib: dict
    hbm_gib: float
    time_to_train_s: float | None = None
    cost_usd: float | None = None
    hardware_tflops_per_gpu: float | None = None   # incl. recompute and flash-attention backward
    hfu: float | None = None

    def to_dict(self) -> dict:
        d = {k: getattr(self.layout, k) for k in LAYOUT_FIELDS}
        d.update(gpus=self.gpus, step_time_s=self.step_time_s, tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
                 mfu=self.mfu, model_tflops_per_gpu=self.model_tflops_per_gpu,
                 hardware_tflops_per_gpu=self.hardware_tflops_per_gpu, hfu=self.hfu, memory_gib=self.memory_gib,
                 feasible=self.feasible, memory_breakdown_gib=dict(self.memory_breakdown_gib),
                 time_breakdown_s=dict(self.time_breakdown_s))
        if self.time_to_train_s is not None:
            d["time_to_train_s"] = self.time_to_train_s
            d["time_to_train_days"] = self.time_to_train_s / 86400
        if self.cost_usd is not None:
            d["cost_usd"] = self.cost_usd
        return d

    def overflow(self) -> str:
        """Why this layout does not fit, naming the largest memory term."""
        over = self.memory_gib - self.hbm_gib
        term, val = max(self.memory_breakdown_gib.items(), key=lambda kv: kv[1])
        return (f"needs {self.memory_gib:.1f} GiB per GPU, {over:.1f} GiB over the {self.hbm_gib:.1f} GiB HBM; "
                f"largest term: {term} {val:.1f} GiB")


@dataclass
class SearchResult:
    model: str
    hardware: str
    gpus: int
    evaluated: int
    feasible: int
    search_seconds: float
    plans: list = field(default_factory=list)        # best first, feasible only
    closest_infeasible: Plan | None = None
    pareto: list = field(default_factory=list)
    empty_reason: str | None = None   # no layout at all: which fixed knobs clash (candidates.explain_empty)

    @property
    def best(self) -> Plan | None:
        return self.plans[0] if self.plans else None

    def to_dataframe(self):
        """The ranked layouts, one row each, breakdowns flattened to time_*_s / mem_*_gib columns."""
        import pandas as pd
        from .report import flat_rows
        return pd.DataFrame(flat_rows(self.plans))

    def pareto_frame(self):
        """The Pareto front over time-to-train, cost and peak memory per GPU (all minimised),
        fastest first, as a DataFrame."""
        import pandas as pd
        from .report import flat_rows
        return pd.DataFrame(flat_rows(self.pareto))


def plan_from_eval(ev: dict, cands: Candidates, i: int, cluster: Cluster, tokens: float | None = None,
                   price: float | None = None) -> Plan:
    world = int(ev["gpus"][i])
    tps = float(ev["tokens_per_s_per_gpu"][i])
    ttt = cost = None
    if tokens:
        ttt = tokens / (tps * world)
        cost = ttt / 3600 * world * (cluster.price_per_gpu_hour if price is None else price)
    return Plan(layout=cands.layout(i), gpus=world, step_time_s=float(ev["step_time_s"][i]),
                tokens_per_s_per_gpu=tps, mfu=float(ev["mfu"][i]),
                model_tflops_per_gpu=float(ev["model_tflops_per_gpu"][i]),
                memory_gib=float(ev["memory_bytes"][i]) / GiB, feasible=bool(ev["feasible"][i]),
                time_breakdown_s={k: float(ev[f"time_{k}_s"][i]) for k in TIME_TERMS},
                memory_breakdown_gib={k: float(ev[f"mem_{k}_bytes"][i]) / GiB for k in MEMORY_TERMS},
                hbm_gib=cluster.gpu.hbm_bytes / GiB, time_to_train_s=ttt, cost_usd=cost,
                hardware_tflops_per_gpu=float(ev["hardware_flops_step"][i] / ev["step_time_s"][i] / world / 1e12),
                hfu=float(ev["hfu"][i]))


def evaluate_layout(model: ModelSpec, cluster: Cluster, layout: Layout, stack: Stack | None = None,
                    tokens: float | None = None, price: float | None = None, **kw) -> Plan:
    """Predict one layout (no search)."""
    c = layout.to_candidates()
    ev = evaluate(model, cluster, c, stack, **kw)
    return plan_from_eval(ev, c, 0, cluster, tokens, price)


def _score(ev, objective, cluster, price):
    # higher is better; with a fixed GPU count all three agree
    tps_gpu = ev["tokens_per_s_per_gpu"]
    if objective == "throughput":
        return tps_gpu
    if objective == "time":
        return tps_gpu * ev["gpus"]
    p = cluster.price_per_gpu_hour if price is None else price
    return tps_gpu / max(p, 1e-12)


def search(model: ModelSpec, cluster: Cluster, gpus, seq_len: int | None = None,
           global_batch: int | None = None, fixed: dict | None = None, top: int = 10,
           objective: str = "throughput", precisions=None, stack: Stack | str | None = None,
           tokens: float | None = None, price: float | None = None, overlap: dict | None = None,
           moe_imbalance: float = 1.0, capacity_factor: float = 0.0) -> SearchResult:
    """Search every valid layout of `model` on `gpus` GPUs (an int, or a (lo, hi) range searched
    over its powers of two and multiples of the innermost domain) and return the best `top`."""
    t0 = time.perf_counter()
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    if objective not in OBJECTIVES:
        raise PlannerError(f"unknown objective '{objective}'; valid: {', '.join(OBJECTIVES)}")
    _check_inputs(model, seq_len, global_batch, fixed, top, tokens, price, moe_imbalance, capacity_factor)
    if isinstance(stack, str):
        from .stacks import get_stack
        stack = get_stack(stack)
    stack = stack or STACKS["megatron-core"]
    # what the stack cannot run is not searched (a user's explicit choice is still honoured)
    fixed.setdefault("zero", list(stack.zero_stages))
    fixed.setdefault("schedule", list(stack.schedules))
    seq_len = seq_len or model.seq_len or DEFAULT_SEQ_LEN
    global_batch = global_batch or default_global_batch(seq_len, max(gpu_counts(gpus, cluster)))
    if precisions is None:
        precisions = [p for p in ("bf16", "fp8") if p in cluster.gpu.peak_flops]
    counts = gpu_counts(gpus, cluster)
    for g in counts:
        if len(counts) == 1:
            check_fixed(model, g, seq_len, global_batch, fixed)
    _check_space(model, gpus, counts, seq_len, global_batch, fixed, precisions, overlap or {})
    keep = max(top, 1)
    best_c = []
    evaluated = feasible = 0
    closest = None  # (memory overflow, cands, index, ev)
    pareto_pts = []
    for g in counts:
        for cands in iter_candidates(model, g, seq_len, global_batch, fixed, precisions, overlap or {}):
            if evaluated + len(cands) > _budget(counts):
                raise _too_many(model, gpus, counts)
            ev = evaluate(model, cluster, cands, stack, moe_imbalance, capacity_factor, detail=False)
            evaluated += len(cands)
            ok = ev["feasible"]
            nfeas = int(ok.sum())
            feasible += nfeas
            if nfeas < len(cands):
                over = np.where(ok, np.inf, ev["memory_bytes"])
                j = int(np.argmin(over))
                if closest is None or over[j] < closest[0]:
                    closest = (over[j], cands.take([j]), {k: v[[j]] for k, v in ev.items()})
            if not nfeas:
                continue
            sc = np.where(ok, _score(ev, objective, cluster, price), -np.inf)
            k = min(keep, nfeas)
            idx = np.argpartition(-sc, k - 1)[:k]
            idx = idx[np.isfinite(sc[idx])]
            sub = cands.take(idx)
            subev = {kk: v[idx] for kk, v in ev.items()}
            best_c.append((sc[idx], sub, subev))
            pareto_pts.append(_pareto_chunk(ev, cands, ok, tokens or 1e12, cluster, price))
            if len(pareto_pts) > 16:
                pareto_pts = [_pareto_reduce(pareto_pts, cluster, tokens, price)]
        # merge periodically to bound memory
        if len(best_c) > 8:
            best_c = [_merge(best_c, keep)]
    empty_reason = None
    if evaluated == 0 and len(counts) == 1:    # a fixed knob impossible on its own raises; a clash is said
        empty_reason = explain_empty(model, counts[0], seq_len, global_batch, fixed, precisions)
    # the few kept candidates are scored again with their breakdowns
    full = lambda cands: evaluate(model, cluster, cands, stack, moe_imbalance, capacity_factor)  # noqa: E731
    plans = []
    if best_c:
        sc, cands, _ = _merge(best_c, keep)
        order = np.argsort(-sc, kind="stable")[:top]
        cands = cands.take(order)
        ev = full(cands)
        plans = [plan_from_eval(ev, cands, i, cluster, tokens, price) for i in range(len(cands))]
    closest_plan = None
    if closest is not None:
        closest_plan = plan_from_eval(full(closest[1]), closest[1], 0, cluster, tokens, price)
    pareto = []
    if pareto_pts:
        red = _pareto_reduce(pareto_pts, cluster, tokens, price)
        if red is not None:
            pc = red[0]
            pev = full(pc)
            pareto = [plan_from_eval(pev, pc, i, cluster, tokens or 1e12, price) for i in range(len(pc))]
    return SearchResult(model=model.name, hardware=cluster.name,
                        gpus=counts[0] if len(counts) == 1 else int(plans[0].gpus) if plans else counts[-1],
                        evaluated=evaluated, feasible=feasible,
                        search_seconds=time.perf_counter() - t0, plans=plans,
                        closest_infeasible=closest_plan, pareto=pareto, empty_reason=empty_reason)


def _merge(parts, keep):
    sc = np.concatenate([p[0] for p in parts])
    cols = {k: np.concatenate([p[1].cols[k] for p in parts]) for k in parts[0][1].cols}
    ev = {k: np.concatenate([p[2][k] for p in parts]) for k in parts[0][2]}
    k = min(keep, len(sc))
    idx = np.argpartition(-sc, k - 1)[:k]
    return sc[idx], Candidates({kk: v[idx] for kk, v in cols.items()}), {kk: v[idx] for kk, v in ev.items()}


def _budget(counts) -> int:
    return MAX_LAYOUTS if len(counts) == 1 else MAX_RANGE_LAYOUTS


def _too_many(model, gpus, counts) -> PlannerError:
    return PlannerError(f"the search space of {model.name} on {_gpus_text(gpus)} GPUs has more than "
                        f"{_budget(counts):,} layouts; hold some of --tp, --pp, --cp, --ep, --micro-batch, "
                        "--precision, --recompute, --zero fixed, or narrow --gpus")


def _check_space(model, gpus, counts, seq_len, global_batch, fixed, precisions, overlap) -> None:
    """Refuse up front a search over more than MAX_LAYOUTS layouts. Where the space may be that
    large (a GPU range, or many degree rows) the layouts are counted first: generating them costs
    a small fraction of scoring them. (The search loop checks the same bound as it goes.)"""
    if len(counts) == 1 and len(degree_table(model, counts[0], seq_len, global_batch, fixed)["tp"]) <= PRECOUNT_ROWS:
        return
    total = 0
    for g in counts:
        for c in iter_candidates(model, g, seq_len, global_batch, fixed, precisions, overlap):
            total += len(c)
            if total > _budget(counts):
                raise _too_many(model, gpus, counts)


def _gpus_text(gpus) -> str:
    return str(gpus) if isinstance(gpus, (int, np.integer)) else "-".join(map(str, gpus))


def _check_int(name: str, v, lo: int = 1, hi: int = MAX_INT) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise PlannerError(f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise PlannerError(f"{name} must be between {lo} and {hi:,}, got {v}")


def _check_inputs(model, seq_len, global_batch, fixed, top, tokens, price, moe_imbalance, capacity_factor):
    """Refuse, in one line, numbers the search cannot represent or that make no sense (they would
    overflow int64 columns or give inf/NaN predictions)."""
    import math
    from .layout import INT_KNOBS
    for name, v in (("--seq-len", seq_len), ("--global-batch", global_batch)):
        if v is not None:
            _check_int(name, v)
    _check_int("--top", top, 1, MAX_TOP)
    for k in INT_KNOBS:
        for v in (fixed[k] if isinstance(fixed.get(k), (list, tuple)) else [fixed.get(k)]):
            if v is not None:
                _check_int(f"--{k.replace('_', '-')}", v, 0 if k in ("zero", "shard_group", "first_stage_layers",
                                                                       "last_stage_layers") else 1)
    for name, v, lo in (("--tokens", tokens, 0.0), ("--price", price, 0.0), ("--moe-imbalance", moe_imbalance, 1.0),
                        ("--capacity-factor", capacity_factor, 0.0)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.number))
                              or not math.isfinite(v) or v < lo):
            raise PlannerError(f"{name} must be a finite number >= {lo:g}, got {v!r}")
    if model.moe and moe_imbalance > model.moe.experts / model.moe.top_k:
        # all tokens on one expert: load experts/top_k times the mean, the most there can be
        raise PlannerError(f"--moe-imbalance {moe_imbalance:g} is more than {model.name} allows: at most "
                           f"experts / top_k = {model.moe.experts / model.moe.top_k:g} (every token on one expert)")


def gpu_counts(gpus, cluster: Cluster) -> list:
    """A single count, or for a (lo, hi) range the counts clusters are allocated in: the ends of
    the range, powers of two, and the innermost domain size times powers of two (e.g. 72 x 2^k
    on NVL72) that lie in it."""
    if isinstance(gpus, (int, np.integer)) and not isinstance(gpus, bool):
        if gpus < 1:
            raise PlannerError(f"--gpus must be >= 1, got {gpus}")
        if gpus > MAX_GPUS:
            raise PlannerError(f"--gpus {gpus} is more than the planner searches (at most {MAX_GPUS:,})")
        return [int(gpus)]
    try:
        lo, hi = (x for x in gpus)
    except (TypeError, ValueError):
        raise PlannerError(f"--gpus must be a count or a (LO, HI) range, got {gpus!r}") from None
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise PlannerError(f"--gpus range ends must be integers, got {gpus!r}")
    lo, hi = int(lo), int(hi)
    if lo < 1 or hi < lo:
        raise PlannerError(f"--gpus range must be LO-HI with 1 <= LO <= HI, got {lo}-{hi}")
    if hi > MAX_GPUS:
        raise PlannerError(f"--gpus range {lo}-{hi} goes beyond what the planner searches (at most {MAX_GPUS:,})")
    dom = next((d for d in cluster.domain_sizes if d), 8)
    out = {lo, hi}
    for base in {1, dom}:
        k = base
        while k <= hi:
            if k >= lo:
                out.add(k)
            k *= 2
    return sorted(out)


def _pareto_chunk(ev, cands, ok, tokens, cluster, price):
    """Reduce a chunk to its Pareto-optimal feasible points over (time, cost, memory).

    Within one GPU count cost is proportional to time, so the chunk's front is the 2-D front of
    (step time, memory). Exact pre-filter: a point slower than the leanest point, or heavier than
    the fastest one, is dominated by that point; the rest is swept in time order."""
    idx = np.nonzero(ok)[0]
    if not len(idx):
        return None
    t = 1.0 / (ev["tokens_per_s_per_gpu"][idx] * ev["gpus"][idx])   # time per token: time-to-train order
    mem = ev["memory_bytes"][idx]
    fast, lean = int(np.argmin(t)), int(np.argmin(mem))
    keep = (t <= t[lean]) & (mem <= mem[fast])
    idx, t, mem = idx[keep], t[keep], mem[keep]
    order = np.lexsort((mem, t))
    run_min = np.minimum.accumulate(mem[order])
    prev = np.concatenate([[np.inf], run_min[:-1]])
    idx = idx[order[mem[order] < prev]]
    return cands.take(idx), {k: v[idx] for k, v in ev.items()}


def _pareto_reduce(parts, cluster, tokens, price):
    """Merge chunk fronts into one front (still as candidates + arrays)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    cols = {k: np.concatenate([p[0].cols[k] for p in parts]) for k in parts[0][0].cols}
    ev = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    tk = tokens or 1e12
    ttt = tk / (ev["tokens_per_s_per_gpu"] * ev["gpus"])
    p = cluster.price_per_gpu_hour if price is None else price
    cost = ttt / 3600 * ev["gpus"] * p
    pts = np.stack([ttt, cost, ev["memory_bytes"]], axis=1)
    keep = np.nonzero(pareto_mask(pts))[0]
    # equal objective vectors do not dominate each other: keep one of each
    _, first = np.unique(np.round(pts[keep], 9), axis=0, return_index=True)
    keep = keep[np.sort(first)]
    keep = keep[np.argsort(ttt[keep], kind="stable")]
    return Candidates({k: v[keep] for k, v in cols.items()}), {k: v[keep] for k, v in ev.items()}


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """True for rows not dominated by any other row (all objectives minimised)."""
    n = len(points)
    if n == 0:
        return np.zeros(0, bool)
    order = np.lexsort(points.T[::-1])
    pts = points[order]
    keep = np.ones(n, bool)
    # block-wise dominance check: O(n^2 / block) memory-bounded
    for start in range(0, n, 2048):
        blk = pts[start:start + 2048]
        le = np.all(pts[None, :, :] <= blk[:, None, :], axis=2)
        lt = np.any(pts[None, :, :] < blk[:, None, :], axis=2)
        keep[start:start + len(blk)] = ~np.any(le & lt, axis=1)
    out = np.zeros(n, bool)
    out[order] = keep
    return out
