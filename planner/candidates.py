"""Enumerate valid layouts as numpy columns, without Python loops that grow with the space.

Every knob's axis (divisors for degrees, the listed values for the rest) is first filtered by
the rules of planner/rules.py that read that knob alone; degrees are combined by broadcasting
and masked by the rules that read them; the pipeline knobs (schedule, vpp, stage split) are
crossed with the degree rows and masked; the per-layer knobs (sp, precision, cp_comm) and the
per-step knobs (recompute, zero) are crossed last, in chunks, and masked by the rules that read
them. What is valid is decided by rules.py alone; this module only decides what is searched.
"""
from __future__ import annotations

import math

import numpy as np

from . import rules
from .arrays import distinct
from .errors import PlannerError
from .layout import CP_COMM, RECOMPUTE, SCHEDULES, Candidates, Precision
from .rules import Context, divisors
from .frozen import frozen

MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
MAX_VPP = 64                 # virtual stages per rank searched (126 layers on pp 2: one layer per chunk)
# Bounds that keep absurd but well-formed input answerable in seconds and bounded memory:
MAX_DEGREE_ROWS = 1 << 17    # (tp, pp, cp, dp, ep, etp, micro-batch) rows of one search; the
                             # catalog's largest is 53,568 (deepseek-v3 on 2^30 GPUs)
_MAX_CROSS = 1 << 24         # elements of one intermediate cross product (128 MiB per column)
_DEGREES = ("tp", "pp", "cp", "dp", "ep", "etp", "micro_batch")
_LAYER_KNOBS = ("sp", "precision", "cp_comm")
_STEP_KNOBS = ("recompute", "zero", "offload_layers")


def _too_large(ctx: Context, rows) -> PlannerError:
    return PlannerError(
        f"the search space of {ctx.model.name} on {ctx.gpus} GPUs is too large ({rows} combinations of tp, pp, "
        f"cp, dp, ep, etp and micro-batch; at most {MAX_DEGREE_ROWS:,}); hold some of --tp, --pp, --cp, "
        "--ep, --micro-batch fixed")


def _cross(ctx, *arrays):
    """Cartesian product of 1-D arrays as flat columns, refusing products too large to hold."""
    if math.prod(len(a) for a in arrays) > _MAX_CROSS:
        raise _too_large(ctx, f"more than {MAX_DEGREE_ROWS:,}")
    return [g.ravel() for g in np.meshgrid(*arrays, indexing="ij")]


def _axis(ctx: Context, fixed: dict, name: str, default, dtype=np.int64, searched=True):
    """The values of one knob: fixed (a value or a list), else the default list (only its first
    value when the knob cannot matter), filtered by the rules that read this knob alone."""
    v = fixed.get(name)
    if v is None:
        vals = list(default) if searched else list(default)[:1]
    else:
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
    if name in rules.CODES:
        vals = [rules.CODES[name].index(x) if isinstance(x, str) else x for x in vals]
    a = np.array(vals, dtype=dtype)
    return a[rules.mask({name: a}, ctx)] if len(a) else a


def _filter(cols: dict, ctx: Context, new) -> dict:
    ok = rules.mask(cols, ctx, involving=new)
    return {k: v[ok] for k, v in cols.items()}


def degree_table(ctx: Context, fixed: dict) -> dict:
    """All valid (tp, pp, cp, dp, ep, etp, micro_batch) for ctx.gpus, honouring fixed values."""
    m, d = ctx.model, divisors(ctx.gpus)
    # search policy: TP beyond the KV heads replicates K and V on every TP rank (valid in
    # Megatron-Core, rarely worth it); searched only when --tp asks for it
    tp_d = d if (m.mla or fixed.get("tp") is not None) else d[d <= m.kv_heads]
    tp, pp = _cross(ctx, _axis(ctx, fixed, "tp", tp_d), _axis(ctx, fixed, "pp", d))
    t = _filter({"tp": tp, "pp": pp}, ctx, ("tp", "pp"))
    i, cp = _cross(ctx, np.arange(len(t["tp"])), _axis(ctx, fixed, "cp", d))
    t = _filter({"tp": t["tp"][i], "pp": t["pp"][i], "cp": cp}, ctx, ("cp",))
    t["dp"] = ctx.gpus // (t["tp"] * t["pp"] * t["cp"])
    t = _filter(t, ctx, ("dp",))
    if fixed.get("dp") is not None:
        ok = t["dp"] == fixed["dp"]
        t = {k: v[ok] for k, v in t.items()}
    # expert parallel (carved out of tp*cp*dp, Megatron-Core): ep divides the experts and the
    # GPUs, hence gcd(experts, gpus), without enumerating the divisors of a huge expert count;
    # expert TP is searched at 1 and at the layout's TP (Megatron's default ETP = TP)
    ep_ax = _axis(ctx, fixed, "ep", divisors(math.gcd(m.moe.experts, ctx.gpus)) if m.moe else [1])
    etp_ax = _axis(ctx, fixed, "etp", distinct(np.concatenate([[1], d])) if m.moe else [1])
    i, ep, etp = _cross(ctx, np.arange(len(t["tp"])), ep_ax, etp_ax)
    t = {k: v[i] for k, v in t.items()}
    t.update(ep=ep, etp=etp)
    if m.moe and fixed.get("etp") is None:
        t = {k: v[(t["etp"] == 1) | (t["etp"] == t["tp"])] for k, v in t.items()}
    t = _filter(t, ctx, ("ep", "etp"))
    i, mb = _cross(ctx, np.arange(len(t["tp"])), _axis(ctx, fixed, "micro_batch", MICRO_BATCHES))
    t = {k: v[i] for k, v in t.items()}
    t["micro_batch"] = mb
    t = _filter(t, ctx, ("micro_batch",))
    if len(t["tp"]) > MAX_DEGREE_ROWS:
        raise _too_large(ctx, f"{len(t['tp']):,}")
    return t


# How layers are split over pipeline ranks (searched):
#   0  even when pp divides the layers, else balanced: middle ranks get ceil(L/pp), the first and
#      last share the remainder (Megatron --decoder-first/last-pipeline-num-layers)
#   1  account for the embedding and the loss as one layer each: (L+2)/pp per rank, first and
#      last get one layer fewer (Megatron --account-for-embedding-in-pipeline-split and
#      --account-for-loss-in-pipeline-split)
#   2  account for the loss only: the last rank gets one layer fewer
SPLITS = (0, 1, 2)


def split_layers(L: int, pp, split):
    """(first, last, searched) per row: the given first/last rank layer counts (0 = even) of each
    split policy, and whether that policy gives a distinct layout there."""
    pp = np.asarray(pp)
    mid0 = -(-L // pp)                               # ceil(L / pp)
    rest = L - (pp - 2) * mid0
    even = L % pp == 0
    bal_first = np.where(even, 0, -(-rest // 2))
    bal_last = np.where(even, 0, rest - (-(-rest // 2)))
    m1, m2 = (L + 2) // pp, (L + 1) // pp
    first = np.select([split == 0, split == 1], [bal_first, m1 - 1], m2)
    last = np.select([split == 0, split == 1], [bal_last, m1 - 1], m2 - 1)
    exact = np.select([split == 1, split == 2], [(L + 2) % pp == 0, (L + 1) % pp == 0], True)
    same = (split > 0) & (first == np.where(even, L // pp, bal_first)) & (last == np.where(even, L // pp, bal_last))
    return first, last, exact & ((split == 0) | (pp >= 2)) & ~same


def vpp_values(layers: int, pps) -> list:
    """The virtual-stage counts worth searching for pipeline degrees `pps`: every divisor of a
    rank's layer count, or of that count plus the embedding or the loss counted as a layer
    (what _equal_chunks lets through), so 112 layers on pp 16 reach vpp 7 -- not a fixed short
    list, which had left such a model on 1F1B with a 3x larger bubble. At most MAX_VPP chunks per
    rank (search policy, bounding the space; --vpp takes any count the rules allow)."""
    counts = {c for p in pps if p > 1 for c in (layers // p - 1, layers // p, layers // p + 1) if c > 0}
    return sorted({1} | {int(d) for c in counts for d in divisors(c) if d <= MAX_VPP})


def pipe_table(ctx: Context, fixed: dict, pipelined: bool, pps=()) -> dict:
    """(schedule, vpp, split) combinations for the pipeline degrees `pps`; only 1F1B / vpp 1 /
    split 0 without pipelining."""
    sched = _axis(ctx, fixed, "schedule", SCHEDULES, searched=pipelined)
    vpp = _axis(ctx, fixed, "vpp", vpp_values(ctx.model.layers, pps), searched=pipelined)
    given = fixed.get("first_stage_layers") or fixed.get("last_stage_layers")
    split = np.array([0] if (given or not pipelined) else SPLITS)
    s, v, p = _cross(ctx, sched, vpp, split)
    return {"schedule": s.astype(np.int8), "vpp": v, "split": p.astype(np.int8)}


def knob_table(ctx: Context, fixed: dict, names, defaults, relevant) -> dict:
    """The cross of the axes of `names` (each filtered by its own rules)."""
    axes = [_axis(ctx, fixed, n, defaults[n], dtype=np.int8 if n in rules.CODES else
                  (bool if n == "sp" else np.int64), searched=relevant.get(n, True)) for n in names]
    return dict(zip(names, _cross(ctx, *axes)))


def offload_values(ctx: Context) -> tuple:
    """Activation-offload layer counts searched: none, and a quarter, half and three quarters of
    the layers where the stack offloads and the GPU's host link is known (search policy; the
    rules keep them to pp 1 without recompute, and --offload-layers takes any count)."""
    L = ctx.model.layers
    if not ctx.stack.activation_offload or ctx.host_bandwidth <= 0:
        return (0,)
    return tuple(sorted({0} | {n for n in (-(-L // 4), -(-L // 2), -(-3 * L // 4)) if 0 < n < L}))


_DEFAULTS = {"sp": (False, True), "precision": ("bf16", "fp8"), "cp_comm": CP_COMM, "recompute": RECOMPUTE,
             "zero": (0, 1, 2, 3)}


def _pairs(ctx: Context, deg: dict, pipe: dict, fixed: dict):
    """Valid (degree row, pipeline knobs) pairs: (degree index, pipe index, first, last). The
    split policies and equal chunks depend on pp alone, so the pipe rows are first kept per
    distinct pp and only those are joined to the degree rows of that pp."""
    L = ctx.model.layers
    pps = distinct(deg["pp"])
    ip, pi = (x.ravel() for x in np.meshgrid(np.arange(len(pps)), np.arange(len(pipe["vpp"])), indexing="ij"))
    pp = pps[ip]
    fl, ll = fixed.get("first_stage_layers") or 0, fixed.get("last_stage_layers") or 0
    if fl or ll:
        first, last, ok = np.full(len(ip), fl), np.full(len(ip), ll), np.ones(len(ip), bool)
    else:
        first, last, ok = split_layers(L, pp, pipe["split"][pi])
    first, last = np.where(pp > 1, first, 0), np.where(pp > 1, last, 0)
    if fixed.get("vpp") is None:
        ok &= _equal_chunks(ctx, {"pp": pp, "vpp": pipe["vpp"][pi], "first_stage_layers": first,
                                  "last_stage_layers": last})
    di, k = _join(ctx, np.searchsorted(pps, deg["pp"]), ip[ok])
    pi, first, last = pi[ok][k], first[ok][k], last[ok][k]
    cols = {name: v[di] for name, v in deg.items()}
    cols.update(schedule=pipe["schedule"][pi], vpp=pipe["vpp"][pi], first_stage_layers=first,
                last_stage_layers=last)
    ok = rules.mask(cols, ctx, involving=("schedule", "vpp", "first_stage_layers", "last_stage_layers"))
    return di[ok], pi[ok], first[ok].astype(np.int64), last[ok].astype(np.int64)


def _join(ctx: Context, left_key, right_key):
    """(left index, right index) of every pair with equal keys (an inner join of two integer
    columns, vectorised: each right row repeated over the left rows of its key)."""
    order = np.argsort(left_key, kind="stable")
    start = np.searchsorted(left_key[order], right_key, side="left")
    count = np.searchsorted(left_key[order], right_key, side="right") - start
    total = int(count.sum())
    if total > _MAX_CROSS:
        raise _too_large(ctx, f"{total:,} with their pipeline schedules")
    k = np.repeat(np.arange(len(right_key)), count)
    offset = np.arange(total) - np.repeat(np.cumsum(count) - count, count)
    return order[np.repeat(start, count) + offset], k


def _equal_chunks(ctx: Context, cols: dict):
    """Search policy (not validity): unless --vpp is given, only virtual stages of equal size are
    searched -- every rank's layers divisible by vpp, the first and last rank's counting the
    embedding and the loss as a layer where that makes them divide (Megatron
    --account-for-embedding/loss-in-pipeline-split). Unequal chunks are valid where the stack
    takes a free layout, and rarely pay: the slowest chunk sets the pace."""
    first, mid, last = rules.stage_layers(ctx.model.layers, cols["pp"], cols["first_stage_layers"],
                                          cols["last_stage_layers"])
    v, pp = cols["vpp"], cols["pp"]
    return (((first % v == 0) | ((first + 1) % v == 0)) & np.where(pp > 2, mid % v == 0, True)
            & np.where(pp > 1, (last % v == 0) | ((last + 1) % v == 0), True))


def _classes(ctx: Context, fixed: dict):
    """Per class of degree rows (pp > 1, cp > 1, tp > 1; at most 8 classes, so the loop does not
    grow with the space): (degrees, pipeline knobs, valid pairs, per-layer knobs, per-step knobs)."""
    deg_all = degree_table(ctx, fixed)
    if len(deg_all["tp"]) == 0:
        return
    cls = (deg_all["pp"] > 1) * 4 + (deg_all["cp"] > 1) * 2 + (deg_all["tp"] > 1)
    steps_all = knob_table(ctx, fixed, _STEP_KNOBS, {**_DEFAULTS, "offload_layers": offload_values(ctx)}, {})
    steps_all = {k: v[rules.mask(steps_all, ctx)] for k, v in steps_all.items()}   # e.g. offload x recompute
    for key in distinct(cls):
        deg = {k: v[cls == key] for k, v in deg_all.items()}
        # offloading runs without a pipeline only: pipelined classes never enumerate it
        keep = steps_all["offload_layers"] == 0 if key & 4 else np.ones(len(steps_all["zero"]), bool)
        steps = {k: v[keep] for k, v in steps_all.items()}
        pipe = pipe_table(ctx, fixed, bool(key & 4), distinct(deg["pp"]).tolist())
        pairs = _pairs(ctx, deg, pipe, fixed)
        if len(pairs[0]) and len(steps["zero"]):
            lk = knob_table(ctx, fixed, _LAYER_KNOBS, _DEFAULTS, {"cp_comm": bool(key & 2), "sp": bool(key & 1)})
            yield deg, pipe, pairs, lk, steps


@frozen
class ClassTables:
    """One class of degree rows made ready to enumerate (_classes): its tables, the rules' masks
    on them, and where its rows sit in the layer and rank tables every class of one GPU count
    shares (one table each, so the cost model computes phases 1-4 once per search, not per
    class). count and iter_candidates both read it, so a search that counts first
    (engine._check_space) does not build it twice."""
    deg: dict
    pipe: dict
    pairs: tuple
    lk: dict
    steps: dict
    table: dict                  # the shared layer table; this class's rows from layer_offset
    layer_offset: int
    ranks: dict                  # the shared rank table; this class's rows from rank_offset
    rank_offset: int
    rank_of: object
    layer_ok: np.ndarray
    pair_ok: np.ndarray          # [step row, pair]
    mixed: list


def prepare(ctx: Context, fixed: dict, overlap: dict | None = None) -> list:
    """The ClassTables of every class of degree rows of ctx (empty classes left out)."""
    parts = []
    for deg, pipe, pairs, lk, steps in _classes(ctx, fixed):
        table = _layer_table(ctx, fixed, overlap or {}, deg, lk)
        ranks, rank_of = _rank_table(deg, pipe, pairs, lk, steps, fixed)
        layer_ok, pair_ok, mixed = _masks(ctx, fixed, deg, pipe, lk, steps, pairs, table)
        parts.append((deg, pipe, pairs, lk, steps, table, ranks, rank_of, layer_ok, np.stack(pair_ok), mixed))
    if not parts:
        return []
    lo = np.cumsum([0] + [len(p[5]["tp"]) for p in parts])
    ro = np.cumsum([0] + [len(p[6]["tp"]) for p in parts])
    table = {k: np.concatenate([p[5][k] for p in parts]) for k in parts[0][5]}
    ranks = {k: np.concatenate([p[6][k] + (lo[i] if k == "layer_row" else 0) for i, p in enumerate(parts)])
             for k in parts[0][6]}
    return [ClassTables(deg, pipe, pairs, lk, steps, table, int(lo[i]), ranks, int(ro[i]), rank_of, layer_ok, pair_ok,
                        mixed)
            for i, (deg, pipe, pairs, lk, steps, _, _, rank_of, layer_ok, pair_ok, mixed) in enumerate(parts)]


def iter_candidates(ctx: Context, fixed: dict, overlap: dict | None = None, chunk: int = 131072,
                    prepared: list | None = None):
    """Yield Candidates chunks of every valid layout of ctx.model on ctx.gpus.

    Per class of degree rows, the valid (degree row, pipeline knobs) pairs are found on that small
    table and crossed with the per-layer knobs (sp, precision, cp_comm) and the per-step knobs
    (recompute, zero) in chunks, masked by the rules decided on the layer and pair tables. Each
    chunk carries the table of distinct per-layer rows (degrees x per-layer knobs) and the table of
    distinct per-rank rows (costmodel/ranks.py), and each candidate's index into them.
    `prepared`: prepare(ctx, fixed, overlap), where the caller has it already."""
    for ct in (prepared if prepared is not None else prepare(ctx, fixed, overlap)):
        yield from _chunks(ctx, fixed, overlap or {}, ct, chunk)


def _rank_table(deg: dict, pipe: dict, pairs, lk: dict, steps: dict, fixed: dict) -> tuple:
    """(table, index function): the distinct (degree row, pipeline knobs, SP, fp16 or not, ZeRO
    stage) rows the cost model's per-rank phase reads (costmodel/ranks.py; of the precision it
    reads only whether gradients may be 16-bit), and a candidate's row from its pair, layer-knob
    row and step-knob row."""
    di, pi, first, last = pairs
    key = lk["sp"].astype(np.int64) * 2 + (lk["precision"] == Precision.FP16)
    kvals, sidx = np.unique(key, return_inverse=True)
    zvals, zidx = np.unique(steps["zero"], return_inverse=True)
    v, s, z = (x.ravel() for x in np.meshgrid(np.arange(len(di)), np.arange(len(kvals)), np.arange(len(zvals)),
                                              indexing="ij"))
    d = di[v]
    table = {k: deg[k][d] for k in ("tp", "pp", "dp", "cp", "ep", "etp")}
    # precision folded to what phase 4 tells apart: fp16, or bf16 standing for every other
    table.update(vpp=pipe["vpp"][pi[v]], sp=kvals[s] // 2 == 1,
                 precision=np.where(kvals[s] % 2 == 1, Precision.FP16, Precision.BF16).astype(np.int8),
                 zero=zvals[z], first_stage_layers=first[v], last_stage_layers=last[v], layer_row=d * len(lk["sp"]))
    ns, nz = len(kvals), len(zvals)
    return table, lambda pair, lsel, srow: (pair * ns + sidx[lsel]) * nz + zidx[srow]


def _layer_table(ctx: Context, fixed: dict, overlap: dict, deg: dict, lk: dict) -> dict:
    """Distinct per-layer rows: degree rows x per-layer knobs (costmodel.LAYER_COLS)."""
    nl = len(lk["sp"])
    ti, li = (x.ravel() for x in np.meshgrid(np.arange(len(deg["tp"])), np.arange(nl), indexing="ij"))
    table = {k: v[ti] for k, v in deg.items()}
    table.update({k: v[li] for k, v in lk.items()})
    m = len(ti)
    table["seq_len"] = np.full(m, ctx.seq_len, np.int64)
    table["shard_group"] = np.full(m, fixed.get("shard_group") or 0, np.int64)
    table["overlap_tp"] = np.full(m, overlap.get("overlap_tp", True), bool)
    table["overlap_ep"] = np.full(m, overlap.get("overlap_ep", True), bool)
    return table


def _masks(ctx: Context, fixed: dict, deg: dict, pipe: dict, lk: dict, steps: dict, pairs, table: dict) -> tuple:
    """(layer_ok per layer-table row, pair_ok per step-knob row and pair, mixed rules): the rules
    that read per-layer knobs are decided on the layer table, those that read per-step knobs on
    the (pair, step row) table; rules reading both (none today) are left to each chunk."""
    di, pi, first, last = pairs
    layer_ok = rules.mask(table, ctx, involving=_LAYER_KNOBS + ("shard_group",))
    cols = {k: x[di] for k, x in deg.items()}
    cols.update(vpp=pipe["vpp"][pi], schedule=pipe["schedule"][pi], first_stage_layers=first, last_stage_layers=last,
                shard_group=np.full(len(di), fixed.get("shard_group") or 0, np.int64))
    pair_ok = [rules.mask({**cols, **{k: np.full(len(di), x[s], x.dtype) for k, x in steps.items()}}, ctx,
                          involving=_STEP_KNOBS) for s in range(len(steps["zero"]))]
    mixed = [r for r in rules.RULES if set(r.knobs) & set(_LAYER_KNOBS) and set(r.knobs) & set(_STEP_KNOBS)]
    return layer_ok, pair_ok, mixed


def count(ctx: Context, fixed: dict, prepared: list | None = None) -> int:
    """How many layouts iter_candidates yields, without making them (the rules' masks only)."""
    prepared = prepared if prepared is not None else prepare(ctx, fixed)
    n = 0
    for ct in prepared:
        if ct.mixed:
            return sum(len(c) for c in iter_candidates(ctx, fixed, prepared=prepared))
        per_deg = ct.layer_ok.reshape(len(ct.deg["tp"]), len(ct.lk["sp"])).sum(axis=1)
        n += int(sum(per_deg[ct.pairs[0]][ok].sum() for ok in ct.pair_ok))
    return n


def _chunks(ctx, fixed, overlap, ct: ClassTables, chunk):
    """Chunks of (degree row, pipeline knobs) pairs x per-layer knobs x per-step knobs, pair-major,
    masked by the rules decided on the layer and pair tables."""
    deg, pipe, lk, steps, rank_of = ct.deg, ct.pipe, ct.lk, ct.steps, ct.rank_of
    di, pi, first, last = ct.pairs
    layer_ok, pair_ok, mixed = ct.layer_ok, ct.pair_ok, ct.mixed
    nl, ns = len(lk["sp"]), len(steps["zero"])
    total = len(di) * nl * ns
    for start in range(0, total, chunk):
        idx = np.arange(start, min(start + chunk, total), dtype=np.int64)
        v, r = idx // (nl * ns), idx % (nl * ns)
        lsel, srow = r // ns, r % ns
        d = di[v]
        ok = pair_ok[srow, v] & layer_ok[d * nl + lsel]
        if not ok.any():
            continue
        if not ok.all():
            v, lsel, srow, d = v[ok], lsel[ok], srow[ok], d[ok]
        n = len(v)
        cols = {k: x[d] for k, x in deg.items()}
        cols.update({k: x[pi[v]] for k, x in pipe.items() if k != "split"})
        cols.update({k: x[lsel] for k, x in lk.items()})
        cols.update({k: x[srow] for k, x in steps.items()})
        cols["first_stage_layers"], cols["last_stage_layers"] = first[v], last[v]
        cols["global_batch"] = np.full(n, ctx.global_batch, np.int64)
        cols["seq_len"] = np.full(n, ctx.seq_len, np.int64)
        cols["shard_group"] = np.full(n, fixed.get("shard_group") or 0, np.int64)
        for k in ("overlap_tp", "overlap_dp", "overlap_pp", "overlap_ep"):
            cols[k] = np.full(n, overlap.get(k, True), bool)
        c = Candidates(cols, ct.table, ct.layer_offset + d * nl + lsel, ct.ranks,
                       ct.rank_offset + rank_of(v, lsel, srow))
        if mixed:
            keep = rules.mask(cols, ctx, involving=tuple(k for r in mixed for k in r.knobs))
            c = c.take(np.nonzero(keep)[0])
        if len(c):
            yield c


# knobs that decide whether a layout exists (the others -- sp, recompute, zero, precision, cp_comm --
# are searched over values the rules already filtered)
_VALIDITY_KNOBS = ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "micro_batch", "schedule",
                   "first_stage_layers", "last_stage_layers", "shard_group", "offload_layers")
_HINTS = {
    "vpp": "every virtual stage must hold a layer; stacks that split evenly need the layers divisible by "
           "pp x vpp",
    "micro_batch": "the global batch must split into dp x micro-batch",
    "first_stage_layers": "the layers left must split evenly over the other stages",
    "last_stage_layers": "the layers left must split evenly over the other stages",
    "shard_group": "the shard group must divide dp x cp",
    "offload_layers": "offloading needs --pp 1, --recompute none and fewer layers than the model has",
    "etp": "ep x etp must divide tp x cp x dp",
    "ep": "ep x etp must divide tp x cp x dp",
}
_SCHEDULE_HINTS = {"dualpipe": "DualPipe needs an even pp and at least 2 x pp micro-batches",
                   "zbv": "ZB-V needs an even number of layers per stage",
                   "interleaved": "interleaving needs the micro-batches per step divisible by pp"}


def explain_empty(ctx: Context, fixed: dict) -> str | None:
    """Why no layout satisfies the constraints, when the knobs the user fixed are the cause.

    A knob that admits no layout of this model on this many GPUs on its own (every other knob
    free) is an error: raise a one-line PlannerError naming it, why where that is simple to say,
    and the values that would work. A combination of knobs, each possible alone, is an empty
    search result, not an error (a sweep over strategies relies on that): return a one-line
    reason naming the knobs that clash. None when nothing fixed is to blame."""
    free = {k: v for k, v in fixed.items() if isinstance(v, (list, tuple))}
    given = [k for k in _VALIDITY_KNOBS if fixed.get(k) is not None and k not in free]

    def admits(fx) -> bool:
        return next(iter_candidates(ctx, fx), None) is not None

    if not given or not admits(free):
        return None     # nothing fixed, or the model and GPU count admit no layout at all
    flag = lambda k: f"--{k.replace('_', '-')} {fixed[k]}"  # noqa: E731
    hint = lambda k: _SCHEDULE_HINTS.get(fixed[k]) if k == "schedule" else _HINTS.get(k)  # noqa: E731
    where = f"no layout of {ctx.model.name} on {ctx.gpus} GPUs"
    alone = next((k for k in given if not admits({**free, k: fixed[k]})), None)
    if alone is not None:
        k, seen, rows = alone, set(), 0
        for c in iter_candidates(ctx, free):
            col = c.cols[k]
            seen.update(SCHEDULES[int(x)] if k == "schedule" else int(x) for x in distinct(col))
            rows += len(col)
            if rows > 4_000_000:
                break
        vals = sorted(seen, key=lambda x: (isinstance(x, str), x))
        raise PlannerError(f"{where} has {flag(k)}{f' ({hint(k)})' if hint(k) else ''}; "
                           f"valid{' values include' if rows > 4_000_000 else ''}: "
                           f"{', '.join(map(str, vals)) if k == 'schedule' else rules.listing(vals)}")
    without = lambda k: {kk: v for kk, v in fixed.items() if kk != k}  # noqa: E731
    release = [k for k in given if admits(without(k))]     # each of these alone would admit layouts
    clash = release or given
    hints = "; ".join(dict.fromkeys(h for h in map(hint, clash) if h))
    return (f"{where} has {' and '.join(flag(k) for k in clash)} together{f' ({hints})' if hints else ''}"
            + ("; releasing any one of them admits layouts" if release else ""))
