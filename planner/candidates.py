"""Enumerate layouts as numpy columns, without Python loops that grow with the space.

Degrees (tp, pp, cp, dp, ep, etp, micro_batch) come from divisor tables combined by broadcasting
and masked for validity; the remaining knobs (sp, recompute, zero, precision, schedule/vpp,
cp_comm) form a second table; the two are crossed in chunks so memory stays bounded.
"""
from __future__ import annotations

import itertools

import numpy as np

from .errors import PlannerError
from .layout import BOOL_KNOBS, CODE_KNOBS, INT_KNOBS, Candidates, CP_COMM, PRECISIONS, RECOMPUTE, SCHEDULES
from .model_spec import ModelSpec

MAX_MICRO_BATCH = 32


def divisors(n: int) -> np.ndarray:
    n = int(n)
    small = np.arange(1, int(np.sqrt(n)) + 1, dtype=np.int64)
    small = small[n % small == 0]
    return np.unique(np.concatenate([small, n // small]))


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
    tp, pp, cp = _cross(tp_ax, pp_ax, cp_ax)
    prod = tp * pp * cp
    ok = gpus % prod == 0
    tp, pp, cp = tp[ok], pp[ok], cp[ok]
    dp = gpus // (tp * pp * cp)
    if fixed.get("dp") is not None:
        ok = dp == fixed["dp"]
        tp, pp, cp, dp = tp[ok], pp[ok], cp[ok], dp[ok]
    # expert parallel (carved out of tp*cp*dp, Megatron-Core) and expert-tensor parallel
    if model.moe:
        ep_ax = axis("ep", divisors(model.moe.experts))
        etp_vals = np.unique(np.concatenate([[1], tp_ax]))
        etp_ax = axis("etp", etp_vals)
    else:
        ep_ax = axis("ep", np.array([1]))
        etp_ax = axis("etp", np.array([1]))
    i, ep, etp = _cross(np.arange(len(tp)), ep_ax, etp_ax)
    tp, pp, cp, dp = tp[i], pp[i], cp[i], dp[i]
    ok = ((tp * cp * dp) % (ep * etp) == 0)
    if model.moe:
        ok &= (model.moe.experts % ep == 0) & (model.moe.expert_ffn_hidden % etp == 0)
        ok &= (etp == 1) | (etp == tp) | np.array(fixed.get("etp") is not None)
    if fixed.get("dp") is not None and fixed.get("ep") is None and model.moe is None:
        pass
    tp, pp, cp, dp, ep, etp = (x[ok] for x in (tp, pp, cp, dp, ep, etp))
    mb_ax = axis("micro_batch", np.array([1, 2, 4, 8, 16, 32], dtype=np.int64))
    i, mb = _cross(np.arange(len(tp)), mb_ax)
    tp, pp, cp, dp, ep, etp = (x[i] for x in (tp, pp, cp, dp, ep, etp))
    ok = (global_batch % (dp * mb) == 0)
    return {k: v[ok] for k, v in dict(tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp, micro_batch=mb).items()}


def knob_table(model: ModelSpec, fixed: dict, precisions, pipelined=True, context=True, tensor=True) -> dict:
    """The non-degree knobs for one class of degree rows: knobs that cannot matter in that class
    (schedules without pp, CP variants without cp, SP without tp) are not generated at all."""
    def axis(name, values, relevant=True):
        v = fixed.get(name)
        if v is None:
            return list(values) if relevant else list(values)[:1]
        return list(v) if isinstance(v, (list, tuple)) else [v]
    sp = axis("sp", [False, True], tensor)
    rec = axis("recompute", RECOMPUTE)
    zero = axis("zero", (0, 1, 2, 3))
    prec = axis("precision", precisions)
    sched = axis("schedule", SCHEDULES, pipelined)
    cpc = axis("cp_comm", CP_COMM, context)
    vpp_vals = axis("vpp", [1, 2, 3, 4, 6, 8], pipelined)
    given = fixed.get("first_stage_layers") or fixed.get("last_stage_layers")
    splits = [0] if (given or not pipelined) else list(SPLITS)
    rows = []
    for s_, r, z, p, sc, cc, v, sl in itertools.product(sp, rec, zero, prec, sched, cpc, vpp_vals, splits):
        if (sc == "interleaved") != (v > 1):
            continue
        rows.append((s_, RECOMPUTE.index(r), z, PRECISIONS.index(p), SCHEDULES.index(sc), CP_COMM.index(cc), v, sl))
    a = np.array(rows, dtype=np.int64).reshape(-1, 8)
    return {"sp": a[:, 0].astype(bool), "recompute": a[:, 1].astype(np.int8), "zero": a[:, 2],
            "precision": a[:, 3].astype(np.int8), "schedule": a[:, 4].astype(np.int8),
            "cp_comm": a[:, 5].astype(np.int8), "vpp": a[:, 6], "split": a[:, 7].astype(np.int8)}


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
    first = np.where(bad, -1, first)
    return first, last


def iter_candidates(model: ModelSpec, gpus: int, seq_len: int, global_batch: int, fixed: dict,
                    precisions, overlap: dict, chunk: int = 262144):
    """Yield Candidates chunks of every valid layout (after masking redundant combinations)."""
    deg_all = degree_table(model, gpus, seq_len, global_batch, fixed)
    if len(deg_all["tp"]) == 0:
        return
    cls = (deg_all["pp"] > 1) * 4 + (deg_all["cp"] > 1) * 2 + (deg_all["tp"] > 1)
    for key in np.unique(cls):       # at most 8 classes: the loop does not grow with the space
        sel = cls == key
        deg = {k: v[sel] for k, v in deg_all.items()}
        knob = knob_table(model, fixed, precisions, pipelined=bool(key & 4), context=bool(key & 2),
                          tensor=bool(key & 1))
        yield from _cross_chunks(model, deg, knob, global_batch, seq_len, fixed, overlap, chunk)


def _cross_chunks(model, deg, knob, global_batch, seq_len, fixed, overlap, chunk):
    nd, nk = len(deg["tp"]), len(knob["sp"])
    if nd == 0 or nk == 0:
        return
    total = nd * nk
    for start in range(0, total, chunk):
        idx = np.arange(start, min(start + chunk, total), dtype=np.int64)
        di, ki = idx // nk, idx % nk
        cols = {k: v[di] for k, v in deg.items()}
        cols.update({k: v[ki] for k, v in knob.items()})
        tp, pp, cp = cols["tp"], cols["pp"], cols["cp"]
        nmb = global_batch // (cols["dp"] * cols["micro_batch"])
        L = model.layers
        ok = np.ones(len(idx), bool)
        ok &= ~(cols["sp"] & (tp == 1)) | np.array(fixed.get("sp") is not None)   # SP needs tp > 1
        ok &= (cp > 1) | (cols["cp_comm"] == 0)                                   # cp variant only with cp
        ok &= (pp > 1) | (cols["schedule"] == 0)                                  # schedules need pp > 1
        first, last = stage_split(L, pp, cols["split"], fixed)
        mid = np.where(pp > 2, (L - first - last) // np.maximum(pp - 2, 1), 0)
        ok &= np.where(pp == 1, True, (first >= 1) & (last >= 1))
        ok &= np.where(pp > 2, ((L - first - last) % np.maximum(pp - 2, 1) == 0) & (mid >= 1), True)
        ok &= np.where(pp == 2, first + last == L, True)
        ok &= (pp > 1) | (cols["split"] == 0)                                     # splits need stages
        sg = fixed.get("shard_group") or 0
        if sg:
            ok &= (cols["dp"] * cp) % sg == 0                                     # HSDP shard groups tile dp*cp
        per_stage = np.where(pp > 2, mid, np.where(pp == 2, first, L))
        ok &= (per_stage % cols["vpp"] == 0)                                      # virtual chunks
        ok &= (cols["schedule"] != 1) | (nmb % pp == 0)                           # Megatron interleaved
        ok &= (cols["schedule"] != 4) | ((pp % 2 == 0) & (nmb >= pp))              # DualPipe: even pp
        ok &= (cols["schedule"] != 3) | (per_stage % 2 == 0)                      # ZB-V: 2 chunks per rank
        if not ok.any():
            continue
        cols = {k: v[ok] for k, v in cols.items()}
        n = int(ok.sum())
        cols["global_batch"] = np.full(n, global_batch, np.int64)
        cols["seq_len"] = np.full(n, seq_len, np.int64)
        cols["shard_group"] = np.full(n, fixed.get("shard_group") or 0, np.int64)
        first, last = stage_split(L, cols["pp"], cols["split"], fixed)
        cols["first_stage_layers"] = np.where(cols["pp"] > 1, first, 0).astype(np.int64)
        cols["last_stage_layers"] = np.where(cols["pp"] > 1, last, 0).astype(np.int64)
        del cols["split"]
        for k in ("overlap_tp", "overlap_dp", "overlap_pp"):
            cols[k] = np.full(n, overlap.get(k, True), bool)
        yield Candidates(cols, deg, di[ok])


def check_fixed(model: ModelSpec, gpus: int, seq_len: int, global_batch: int, fixed: dict):
    """Explain, in one line, why the user's fixed degrees admit no layout."""
    fixed = {k: v for k, v in fixed.items() if not isinstance(v, (list, tuple))}
    tp, pp, cp, dp = (fixed.get(k) for k in ("tp", "pp", "cp", "dp"))
    prod = 1
    for name, v in (("tp", tp), ("pp", pp), ("cp", cp), ("dp", dp)):
        if v is not None:
            prod *= v
            if gpus % v:
                raise PlannerError(f"--{name} {v} does not divide --gpus {gpus}; valid: {', '.join(map(str, divisors(gpus)))}")
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
    if pp is not None:
        if pp > model.layers:
            raise PlannerError(f"--pp {pp} exceeds the {model.layers} layers of {model.name}")
        fl, ll = fixed.get("first_stage_layers") or 0, fixed.get("last_stage_layers") or 0
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
    mb = fixed.get("micro_batch")
    if mb is not None and dp is not None and global_batch % (mb * dp):
        raise PlannerError(f"--global-batch {global_batch} is not divisible by micro-batch x dp = {mb * dp}")
    if dp is not None and global_batch % dp:
        raise PlannerError(f"--global-batch {global_batch} is not divisible by dp = {dp}")
