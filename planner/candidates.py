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


def knob_table(model: ModelSpec, fixed: dict, precisions) -> dict:
    """The non-degree knobs. Schedules and vpp are expanded here and masked per degree row."""
    def axis(name, values):
        v = fixed.get(name)
        if v is None:
            return list(values)
        return list(v) if isinstance(v, (list, tuple)) else [v]
    sp = axis("sp", [True, False])
    rec = axis("recompute", RECOMPUTE)
    zero = axis("zero", (0, 1, 2, 3))
    prec = axis("precision", precisions)
    sched = axis("schedule", SCHEDULES)
    cpc = axis("cp_comm", CP_COMM)
    vpp_vals = axis("vpp", [1, 2, 3, 4, 6, 8])
    rows = []
    for s_, r, z, p, sc, cc, v in itertools.product(sp, rec, zero, prec, sched, cpc, vpp_vals):
        if (sc == "interleaved") != (v > 1):
            continue
        rows.append((s_, RECOMPUTE.index(r), z, PRECISIONS.index(p), SCHEDULES.index(sc), CP_COMM.index(cc), v))
    a = np.array(rows, dtype=np.int64).reshape(-1, 7)
    return {"sp": a[:, 0].astype(bool), "recompute": a[:, 1].astype(np.int8), "zero": a[:, 2],
            "precision": a[:, 3].astype(np.int8), "schedule": a[:, 4].astype(np.int8),
            "cp_comm": a[:, 5].astype(np.int8), "vpp": a[:, 6]}


def iter_candidates(model: ModelSpec, gpus: int, seq_len: int, global_batch: int, fixed: dict,
                    precisions, overlap: dict, chunk: int = 262144):
    """Yield Candidates chunks of every valid layout (after masking redundant combinations)."""
    deg = degree_table(model, gpus, seq_len, global_batch, fixed)
    knob = knob_table(model, fixed, precisions)
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
        fl, ll = fixed.get("first_stage_layers") or 0, fixed.get("last_stage_layers") or 0
        ngiven = (fl > 0) + (ll > 0)
        rest, nrest = L - fl - ll, np.maximum(pp - ngiven, 1)
        ok &= (rest % nrest == 0) & (rest > 0) | ((pp == ngiven) & (rest == 0))   # stage layer counts
        ok &= ((rest // nrest) % cols["vpp"] == 0)                                # virtual chunks
        ok &= (cols["schedule"] != 1) | (nmb % pp == 0)                           # Megatron interleaved
        ok &= (cols["schedule"] != 4) | ((pp % 2 == 0) & (nmb >= pp))              # DualPipe: even pp
        ok &= (cols["schedule"] != 3) | ((rest // nrest) % 2 == 0)                # ZB-V: 2 chunks per rank
        if not ok.any():
            continue
        cols = {k: v[ok] for k, v in cols.items()}
        n = int(ok.sum())
        cols["global_batch"] = np.full(n, global_batch, np.int64)
        cols["seq_len"] = np.full(n, seq_len, np.int64)
        cols["shard_group"] = np.full(n, fixed.get("shard_group") or 0, np.int64)
        cols["first_stage_layers"] = np.full(n, fixed.get("first_stage_layers") or 0, np.int64)
        cols["last_stage_layers"] = np.full(n, fixed.get("last_stage_layers") or 0, np.int64)
        for k in ("overlap_tp", "overlap_dp", "overlap_pp"):
            cols[k] = np.full(n, overlap.get(k, True), bool)
        yield Candidates(cols)


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
        if not fixed.get("first_stage_layers") and not fixed.get("last_stage_layers") and model.layers % pp:
            raise PlannerError(f"--pp {pp} does not divide the {model.layers} layers of {model.name}; "
                               "use --first-stage-layers/--last-stage-layers for uneven stages")
        vpp = fixed.get("vpp")
        if vpp and (model.layers // pp) % vpp:
            raise PlannerError(f"--vpp {vpp} does not divide the {model.layers // pp} layers per stage "
                               f"of {model.name} at --pp {pp}")
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
