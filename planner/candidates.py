"""Enumerate layouts as numpy columns, without Python loops that grow with the space.

Degrees (tp, pp, cp, dp, ep, etp, micro_batch) come from divisor tables combined by broadcasting
and masked for validity; the remaining knobs (sp, recompute, zero, precision, schedule/vpp,
cp_comm) form a second table; the two are crossed in chunks so memory stays bounded.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from .errors import PlannerError
from .layout import Candidates, CP_COMM, PRECISIONS, RECOMPUTE, SCHEDULES
from .model_spec import ModelSpec

MAX_MICRO_BATCH = 32
# Bounds that keep absurd but well-formed input answerable in seconds and bounded memory:
MAX_GPUS = 1 << 24           # 16,777,216 GPUs: 16x the largest clusters built (~10^6 GPUs)
MAX_DEGREE_ROWS = 1 << 17    # (tp, pp, cp, dp, ep, etp, micro-batch) rows of one search; the
                             # catalog's largest is 53,568 (deepseek-v3 on 2^30 GPUs)
_MAX_CROSS = 1 << 24         # elements of one intermediate cross product (128 MiB per column)


def divisors(n: int) -> np.ndarray:
    n = int(n)
    if not 1 <= n <= 1 << 40:   # trial division up to sqrt(n): 2^20 candidates at most
        raise PlannerError(f"cannot enumerate the divisors of {n}: expected 1 to {1 << 40}")
    small = np.arange(1, math.isqrt(n) + 1, dtype=np.int64)
    small = small[n % small == 0]
    return np.unique(np.concatenate([small, n // small]))


def _too_large(model: ModelSpec, gpus: int, rows) -> PlannerError:
    return PlannerError(
        f"the search space of {model.name} on {gpus} GPUs is too large ({rows} combinations of tp, pp, "
        f"cp, dp, ep, etp and micro-batch; at most {MAX_DEGREE_ROWS:,}); hold some of --tp, --pp, --cp, "
        "--ep, --micro-batch fixed")


def _guarded_cross(model, gpus, *arrays):
    """_cross, refusing products too large to hold (hostile shapes with thousands of divisors)."""
    size = math.prod(len(a) for a in arrays)
    if size > _MAX_CROSS:
        raise _too_large(model, gpus, f"more than {MAX_DEGREE_ROWS:,}")
    return _cross(*arrays)


def _cross(*arrays):
    """Cartesian product of 1-D arrays as a list of flat columns (numpy broadcasting)."""
    grids = np.meshgrid(*arrays, indexing="ij")
    return [g.ravel() for g in grids]


def degree_table(model: ModelSpec, gpus: int, seq_len: int, global_batch: int, fixed: dict) -> dict:
    """All valid (tp, pp, cp, dp, ep, etp, micro_batch) for `gpus`, honouring fixed values."""
    d = divisors(gpus)

    def axis(name, default):
        v = fixed.get(name)
        if v is None:
            return default
        return np.array(list(v) if isinstance(v, (list, tuple)) else [v], dtype=np.int64)

    attn_groups = model.heads if model.mla else model.kv_heads
    tp_ax = axis("tp", d[(model.heads % d == 0) & (attn_groups % d == 0)])
    pp_ax = axis("pp", d[d <= model.layers])
    cp_ax = axis("cp", d[(seq_len % (2 * d) == 0) | (d == 1)])
    # (tp, pp) pairs first, then x cp: the same rows in the same order as one three-way cross,
    # without materialising it (a divisor-rich count has hundreds of divisors per axis)
    tp, pp = _guarded_cross(model, gpus, tp_ax, pp_ax)
    ok = gpus % (tp * pp) == 0
    tp, pp = tp[ok], pp[ok]
    i, cp = _guarded_cross(model, gpus, np.arange(len(tp)), cp_ax)
    tp, pp = tp[i], pp[i]
    ok = gpus % (tp * pp * cp) == 0
    tp, pp, cp = tp[ok], pp[ok], cp[ok]
    dp = gpus // (tp * pp * cp)
    if fixed.get("dp") is not None:
        ok = dp == fixed["dp"]
        tp, pp, cp, dp = tp[ok], pp[ok], cp[ok], dp[ok]
    # expert parallel (carved out of tp*cp*dp, Megatron-Core) and expert-tensor parallel
    if model.moe:
        # ep divides the experts and tp*cp*dp, hence gcd(experts, gpus): the same valid values
        # without enumerating the divisors of a huge expert count
        ep_ax = axis("ep", divisors(math.gcd(model.moe.experts, gpus)))
        etp_vals = np.unique(np.concatenate([[1], tp_ax]))
        etp_ax = axis("etp", etp_vals)
    else:
        ep_ax = axis("ep", np.array([1]))
        etp_ax = axis("etp", np.array([1]))
    i, ep, etp = _guarded_cross(model, gpus, np.arange(len(tp)), ep_ax, etp_ax)
    tp, pp, cp, dp = tp[i], pp[i], cp[i], dp[i]
    ok = ((tp * cp * dp) % (ep * etp) == 0)
    if model.moe:
        ok &= (model.moe.experts % ep == 0) & (model.moe.expert_ffn_hidden % etp == 0)
        ok &= (etp == 1) | (etp == tp) | np.array(fixed.get("etp") is not None)
    if fixed.get("dp") is not None and fixed.get("ep") is None and model.moe is None:
        pass
    tp, pp, cp, dp, ep, etp = (x[ok] for x in (tp, pp, cp, dp, ep, etp))
    mb_ax = axis("micro_batch", np.array([1, 2, 4, 8, 16, 32], dtype=np.int64))
    i, mb = _guarded_cross(model, gpus, np.arange(len(tp)), mb_ax)
    tp, pp, cp, dp, ep, etp = (x[i] for x in (tp, pp, cp, dp, ep, etp))
    ok = (global_batch % (dp * mb) == 0)
    if int(ok.sum()) > MAX_DEGREE_ROWS:
        raise _too_large(model, gpus, f"{int(ok.sum()):,}")
    return {k: v[ok] for k, v in dict(tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp, micro_batch=mb).items()}


def _axis(fixed, name, values, relevant=True):
    v = fixed.get(name)
    if v is None:
        return list(values) if relevant else list(values)[:1]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def pipe_table(fixed: dict, pipelined: bool) -> dict:
    """(schedule, vpp, split) combinations; only 1F1B / vpp 1 / split 0 without pipelining."""
    sched = _axis(fixed, "schedule", SCHEDULES, pipelined)
    vpp_vals = _axis(fixed, "vpp", [1, 2, 3, 4, 6, 8], pipelined)
    given = fixed.get("first_stage_layers") or fixed.get("last_stage_layers")
    splits = [0] if (given or not pipelined) else list(SPLITS)
    rows = [(SCHEDULES.index(sc), v, sl) for sc, v, sl in itertools.product(sched, vpp_vals, splits)
            if (sc == "interleaved") == (v > 1)]
    a = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return {"schedule": a[:, 0].astype(np.int8), "vpp": a[:, 1], "split": a[:, 2].astype(np.int8)}


def layer_knob_table(fixed: dict, precisions, context: bool, tensor: bool) -> dict:
    """(sp, precision, cp_comm): knobs that change per-layer cost."""
    rows = list(itertools.product(_axis(fixed, "sp", [False, True], tensor), _axis(fixed, "precision", precisions),
                                  _axis(fixed, "cp_comm", CP_COMM, context)))
    return {"sp": np.array([r[0] for r in rows], bool),
            "precision": np.array([PRECISIONS.index(r[1]) for r in rows], np.int8),
            "cp_comm": np.array([CP_COMM.index(r[2]) for r in rows], np.int8)}


def step_knob_table(fixed: dict) -> dict:
    """(recompute, zero): knobs that change only how per-layer costs add up."""
    rows = list(itertools.product(_axis(fixed, "recompute", RECOMPUTE), _axis(fixed, "zero", (0, 1, 2, 3))))
    return {"recompute": np.array([RECOMPUTE.index(r[0]) for r in rows], np.int8),
            "zero": np.array([r[1] for r in rows], np.int64)}


# How layers are split over pipeline stages (searched):
#   0  even when pp divides the layers, else balanced: middle stages get ceil(L/pp), the first and
#      last share the remainder (Megatron --decoder-first/last-pipeline-num-layers)
#   1  account for the embedding and the loss as one layer each: (L+2)/pp per stage, first and
#      last get one layer fewer (Megatron --account-for-embedding-in-pipeline-split and
#      --account-for-loss-in-pipeline-split)
#   2  account for the loss only: the last stage gets one layer fewer
SPLITS = (0, 1, 2)


def stage_split(L: int, pp, split, fixed: dict):
    """(first, last) stage layer counts per row; validity is checked by the caller."""
    pp = np.asarray(pp)
    fl, ll = fixed.get("first_stage_layers") or 0, fixed.get("last_stage_layers") or 0
    if fl or ll:
        ngiven = (fl > 0) + (ll > 0)
        even = (L - fl - ll) // np.maximum(pp - ngiven, 1)
        return (np.full(pp.shape, fl) if fl else even), (np.full(pp.shape, ll) if ll else even)
    mid0 = -(-L // pp)                               # ceil(L / pp)
    rest = L - (pp - 2) * mid0
    bal_first = np.where(L % pp == 0, L // pp, -(-rest // 2))
    bal_last = np.where(L % pp == 0, L // pp, rest - (-(-rest // 2)))
    m1 = (L + 2) // pp
    m2 = (L + 1) // pp
    first = np.select([split == 0, split == 1], [bal_first, m1 - 1], m2)
    last = np.select([split == 0, split == 1], [bal_last, m1 - 1], m2 - 1)
    # split 1 and 2 exist only where they divide exactly
    bad = ((split == 1) & ((L + 2) % pp != 0)) | ((split == 2) & ((L + 1) % pp != 0)) | ((split > 0) & (pp < 2))
    # a split that lands on the same layer counts as split 0 is the same layout: drop it
    bad |= (split > 0) & (first == bal_first) & (last == bal_last)
    first = np.where(bad, -1, first)
    return first, last


def iter_candidates(model: ModelSpec, gpus: int, seq_len: int, global_batch: int, fixed: dict,
                    precisions, overlap: dict, chunk: int = 131072):
    """Yield Candidates chunks of every valid layout.

    Per class of degree rows (pp > 1, cp > 1, tp > 1; at most 8 classes): the valid (degree row,
    pipeline knobs) pairs are found on that small table; they are crossed with the per-layer knobs
    (sp, precision, cp_comm) and the per-step knobs (recompute, zero), all of which are valid for
    every pair, so no generated row is thrown away. Each chunk carries the table of distinct
    per-layer rows (degrees x per-layer knobs) and each candidate's index into it."""
    deg_all = degree_table(model, gpus, seq_len, global_batch, fixed)
    sg = fixed.get("shard_group") or 0
    if sg and len(deg_all["tp"]):
        ok = (deg_all["dp"] * deg_all["cp"]) % sg == 0                # HSDP shard groups tile dp*cp
        deg_all = {k: v[ok] for k, v in deg_all.items()}
    if len(deg_all["tp"]) == 0:
        return
    L = model.layers
    steps = step_knob_table(fixed)
    cls = (deg_all["pp"] > 1) * 4 + (deg_all["cp"] > 1) * 2 + (deg_all["tp"] > 1)
    for key in np.unique(cls):       # at most 8 classes: the loop does not grow with the space
        sel = cls == key
        deg = {k: v[sel] for k, v in deg_all.items()}
        pipe = pipe_table(fixed, bool(key & 4))
        lk = layer_knob_table(fixed, precisions, bool(key & 2), bool(key & 1))
        # valid (degree row, pipeline knobs) pairs
        di, pi = (x.ravel() for x in np.meshgrid(np.arange(len(deg["tp"])), np.arange(len(pipe["vpp"])),
                                                 indexing="ij"))
        pp, vpp, split, sched = deg["pp"][di], pipe["vpp"][pi], pipe["split"][pi], pipe["schedule"][pi]
        nmb = global_batch // (deg["dp"][di] * deg["micro_batch"][di])
        first, last = stage_split(L, pp, split, fixed)
        mid = np.where(pp > 2, (L - first - last) // np.maximum(pp - 2, 1), 0)
        ok = np.where(pp == 1, True, (first >= 1) & (last >= 1))
        ok &= np.where(pp > 2, ((L - first - last) % np.maximum(pp - 2, 1) == 0) & (mid >= 1), True)
        ok &= np.where(pp == 2, first + last == L, True)
        ok &= (pp > 1) | (split == 0)                                     # splits need stages
        per_stage = np.where(pp > 2, mid, np.where(pp == 2, first, L))
        ok &= (per_stage % vpp == 0)                                      # virtual chunks
        ok &= (sched != 1) | (nmb % pp == 0)                              # Megatron interleaved
        ok &= (sched != 4) | ((pp % 2 == 0) & (nmb >= pp))                # DualPipe: even pp
        ok &= (sched != 3) | (per_stage % 2 == 0)                         # ZB-V: 2 chunks per rank
        di, pi = di[ok], pi[ok]
        first, last = np.where(pp[ok] > 1, first[ok], 0), np.where(pp[ok] > 1, last[ok], 0)
        if not len(di):
            continue
        # table of distinct per-layer rows: degree rows x per-layer knobs
        nl = len(lk["sp"])
        ti, li = (x.ravel() for x in np.meshgrid(np.arange(len(deg["tp"])), np.arange(nl), indexing="ij"))
        table = {k: v[ti] for k, v in deg.items()}
        table.update({k: v[li] for k, v in lk.items()})
        m = len(ti)
        table["seq_len"] = np.full(m, seq_len, np.int64)
        table["shard_group"] = np.full(m, sg, np.int64)
        table["overlap_tp"] = np.full(m, overlap.get("overlap_tp", True), bool)
        table["overlap_ep"] = np.full(m, overlap.get("overlap_ep", True), bool)
        ns = len(steps["zero"])
        total = len(di) * nl * ns
        for start in range(0, total, chunk):
            idx = np.arange(start, min(start + chunk, total), dtype=np.int64)
            v, r = idx // (nl * ns), idx % (nl * ns)
            lsel, ssel = r // ns, r % ns
            d = di[v]
            cols = {k: x[d] for k, x in deg.items()}
            cols.update({k: x[pi[v]] for k, x in pipe.items() if k != "split"})
            cols.update({k: x[lsel] for k, x in lk.items()})
            cols.update({k: x[ssel] for k, x in steps.items()})
            n = len(idx)
            cols["first_stage_layers"] = first[v].astype(np.int64)
            cols["last_stage_layers"] = last[v].astype(np.int64)
            cols["global_batch"] = np.full(n, global_batch, np.int64)
            cols["seq_len"] = np.full(n, seq_len, np.int64)
            cols["shard_group"] = np.full(n, sg, np.int64)
            for k in ("overlap_tp", "overlap_dp", "overlap_pp", "overlap_ep"):
                cols[k] = np.full(n, overlap.get(k, True), bool)
            yield Candidates(cols, table, d * nl + lsel)


def check_fixed(model: ModelSpec, gpus: int, seq_len: int, global_batch: int, fixed: dict):
    """Explain, in one line, why the user's fixed degrees admit no layout."""
    fixed = {k: v for k, v in fixed.items() if not isinstance(v, (list, tuple))}
    if gpus > MAX_GPUS:
        raise PlannerError(f"--gpus {gpus} is more than the planner searches (at most {MAX_GPUS:,})")
    tp, pp, cp, dp = (fixed.get(k) for k in ("tp", "pp", "cp", "dp"))
    prod = 1
    for name, v in (("tp", tp), ("pp", pp), ("cp", cp), ("dp", dp)):
        if v is not None:
            prod *= v
            if gpus % v:
                raise PlannerError(f"--{name} {v} does not divide --gpus {gpus}; valid: {_listing(divisors(gpus))}")
    if gpus % prod:
        raise PlannerError(f"the fixed degrees multiply to {prod}, which does not divide --gpus {gpus}")
    if all(v is not None for v in (tp, pp, cp, dp)) and prod != gpus:
        raise PlannerError(f"tp*pp*cp*dp = {prod} but --gpus is {gpus}")
    if tp is not None:
        if model.heads % tp:
            raise PlannerError(f"--tp {tp} does not divide the {model.heads} attention heads of {model.name}")
        if not model.mla and model.kv_heads % tp:
            raise PlannerError(f"--tp {tp} does not divide the {model.kv_heads} KV heads of {model.name} "
                               f"(Megatron needs kv_heads % tp == 0)")
    fl, ll = fixed.get("first_stage_layers") or 0, fixed.get("last_stage_layers") or 0
    if fl + ll > model.layers or ((fl > 0) != (ll > 0) and fl + ll >= model.layers):
        raise PlannerError(f"--first-stage-layers/--last-stage-layers ({fl}/{ll}) leave no layers for the other "
                           f"stages: {model.name} has {model.layers} layers")
    if pp is not None:
        if pp > model.layers:
            raise PlannerError(f"--pp {pp} exceeds the {model.layers} layers of {model.name}")
        if fl + ll > model.layers or (pp == 1 and (fl or ll)):
            raise PlannerError(f"--first-stage-layers/--last-stage-layers ({fl}/{ll}) do not fit {model.layers} "
                               f"layers over --pp {pp}")
        ngiven = (fl > 0) + (ll > 0)
        if ngiven and pp > ngiven and (model.layers - fl - ll) % (pp - ngiven):
            raise PlannerError(f"the {model.layers - fl - ll} layers left after --first/--last-stage-layers do not "
                               f"divide over the other {pp - ngiven} stages")
    if cp is not None and cp > 1 and seq_len % (2 * cp):
        raise PlannerError(f"--cp {cp} needs --seq-len divisible by 2*cp = {2 * cp}, got {seq_len}")
    ep = fixed.get("ep")
    if ep is not None and ep > 1:
        if not model.moe:
            raise PlannerError(f"--ep {ep} needs a mixture-of-experts model; {model.name} is dense")
        if model.moe.experts % ep:
            raise PlannerError(f"--ep {ep} does not divide the {model.moe.experts} experts of {model.name}")
    etp = fixed.get("etp")
    if etp is not None and etp > 1:
        if not model.moe:
            raise PlannerError(f"--etp {etp} needs a mixture-of-experts model; {model.name} is dense")
        if model.moe.expert_ffn_hidden % etp:
            raise PlannerError(f"--etp {etp} does not divide the expert FFN width {model.moe.expert_ffn_hidden} "
                               f"of {model.name}")
        if gpus % etp:
            raise PlannerError(f"--etp {etp} does not divide --gpus {gpus}; valid: {_listing(divisors(gpus))}")
    if ep is not None and etp is not None and gpus % (ep * etp):
        raise PlannerError(f"--ep {ep} x --etp {etp} = {ep * etp} does not divide --gpus {gpus} "
                           "(expert parallelism is carved out of tp x cp x dp)")
    vpp = fixed.get("vpp")
    if vpp == 1 and fixed.get("schedule") == "interleaved":
        raise PlannerError("--schedule interleaved needs --vpp 2 or more (virtual stages per rank), got --vpp 1")
    if vpp is not None and vpp > 1:
        if pp == 1:
            raise PlannerError(f"--vpp {vpp} needs pipeline parallelism (--pp 2 or more), got --pp 1")
        if vpp >= model.layers:
            raise PlannerError(f"--vpp {vpp}: each pipeline stage must hold a multiple of {vpp} layers, and "
                               f"{model.name} has {model.layers} layers (vpp must be below that)")
    sg = fixed.get("shard_group")
    if sg and (gpus % sg or (dp is not None and cp is not None and (dp * cp) % sg)):
        raise PlannerError(f"--shard-group {sg} must divide the data-parallel ranks dp x cp "
                           f"({dp * cp if dp is not None and cp is not None else f'a divisor of --gpus {gpus}'})")
    mb = fixed.get("micro_batch")
    if mb is not None and dp is not None and global_batch % (mb * dp):
        raise PlannerError(f"--global-batch {global_batch} is not divisible by micro-batch x dp = {mb * dp}")
    if dp is not None and global_batch % dp:
        raise PlannerError(f"--global-batch {global_batch} is not divisible by dp = {dp}")
    if mb is not None and global_batch % mb:
        raise PlannerError(f"--global-batch {global_batch} is not divisible by --micro-batch {mb}; valid "
                           f"micro-batches up to {MAX_MICRO_BATCH}: "
                           f"{_listing([d for d in range(1, MAX_MICRO_BATCH + 1) if global_batch % d == 0])}")


def _listing(values, most: int = 24) -> str:
    """'1, 2, 4' -- or the first and last few of a long list, with the count."""
    v = [str(int(x)) for x in values]
    if len(v) <= most:
        return ", ".join(v)
    return f"{', '.join(v[:most - 4])}, ..., {', '.join(v[-3:])} ({len(v)} values)"


# knobs that decide whether a layout exists (the others -- sp, recompute, zero, precision, cp_comm --
# are valid with every layout)
_VALIDITY_KNOBS = ("tp", "pp", "dp", "cp", "ep", "etp", "vpp", "micro_batch", "schedule",
                   "first_stage_layers", "last_stage_layers", "shard_group")
_HINTS = {
    "vpp": "each pipeline stage must hold a multiple of vpp layers",
    "micro_batch": "the global batch must split into dp x micro-batch",
    "first_stage_layers": "the layers left must split evenly over the other stages",
    "last_stage_layers": "the layers left must split evenly over the other stages",
    "shard_group": "the shard group must divide dp x cp",
    "etp": "ep x etp must divide tp x cp x dp",
    "ep": "ep x etp must divide tp x cp x dp",
}
_SCHEDULE_HINTS = {"dualpipe": "DualPipe needs an even pp and at least pp micro-batches",
                   "zbv": "ZB-V needs an even number of layers per stage",
                   "interleaved": "interleaving needs the micro-batches per step divisible by pp"}


def explain_empty(model: ModelSpec, gpus: int, seq_len: int, global_batch: int, fixed: dict,
                  precisions=("bf16",)) -> str | None:
    """Why no layout satisfies the constraints, when the knobs the user fixed are the cause.

    A knob that admits no layout of this model on this many GPUs on its own (every other knob
    free) is an error, as in check_fixed: raise a one-line PlannerError naming it, why where that
    is simple to say, and the values that would work. A combination of knobs, each possible alone,
    is an empty search result, not an error (a sweep over strategies relies on that): return a
    one-line reason naming the knobs that clash. None when nothing fixed is to blame."""
    free = {k: v for k, v in fixed.items() if isinstance(v, (list, tuple))}   # the stack's lists
    given = [k for k in _VALIDITY_KNOBS if fixed.get(k) is not None and k not in free]

    def admits(fx) -> bool:
        return next(iter_candidates(model, gpus, seq_len, global_batch, fx, precisions, {}), None) is not None

    if not given or not admits(free):
        return None     # nothing fixed, or the model and GPU count admit no layout at all
    flag = lambda k: f"--{k.replace('_', '-')} {fixed[k]}"  # noqa: E731
    hint = lambda k: _SCHEDULE_HINTS.get(fixed[k]) if k == "schedule" else _HINTS.get(k)  # noqa: E731
    where = f"no layout of {model.name} on {gpus} GPUs"
    alone = next((k for k in given if not admits({**free, k: fixed[k]})), None)
    if alone is not None:
        k, seen, rows = alone, set(), 0
        for c in iter_candidates(model, gpus, seq_len, global_batch, free, precisions, {}):
            col = c.cols[k]
            seen.update(SCHEDULES[int(x)] if k == "schedule" else int(x) for x in np.unique(col))
            rows += len(col)
            if rows > 4_000_000:
                break
        vals = sorted(seen, key=lambda x: (isinstance(x, str), x))
        raise PlannerError(f"{where} has {flag(k)}{f' ({hint(k)})' if hint(k) else ''}; "
                           f"valid{' values include' if rows > 4_000_000 else ''}: "
                           f"{', '.join(map(str, vals)) if k == 'schedule' else _listing(vals)}")
    without = lambda k: {kk: v for kk, v in fixed.items() if kk != k}  # noqa: E731
    release = [k for k in given if admits(without(k))]     # each of these alone would admit layouts
    clash = release or given
    hints = "; ".join(dict.fromkeys(h for h in map(hint, clash) if h))
    return (f"{where} has {' and '.join(flag(k) for k in clash)} together{f' ({hints})' if hints else ''}"
            + ("; releasing any one of them admits layouts" if release else ""))
