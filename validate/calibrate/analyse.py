"""Calibration measurements to fits: every fit with its residuals and the points (medians over
ranks) it was made from; collectives per network level (calibrate/fit.py's estimators)."""
from __future__ import annotations

from statistics import median

from . import fit

PREC_KEY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
UNRESOLVED_S = 1e-6     # measure.py floors a loaded collective's extra time at 1e-7 s


def _by_item(plan, per_rank):
    """[(item, [result of every rank])]."""
    return [(it, [r[i] for r in per_rank]) for i, it in enumerate(plan)]


def _group_time(it, res):
    """A collective's time: the slowest member of each group (the collective ends when its last
    member is done), median over the groups that ran at once."""
    by_group = {}
    for r in res:
        if r.get("seconds") is None:
            return None
        by_group.setdefault(tuple(r["group_ranks"]), []).append(r["seconds"])
    return median(max(v) for v in by_group.values())


def shared_by(prov) -> float:
    """Ranks per core when the ranks of a machine share its CPU cores (1.0 on GPUs: a rank owns its
    device). The ranks of one machine, not of one host: emulated hosts (network namespaces) share
    the cores of the machine they run on."""
    if prov.get("device_type") == "cuda":
        return 1.0
    cores = prov.get("cpu_cores") or 1
    ranks = prov.get("ranks_per_machine", prov.get("ranks_per_host", 1))
    return max(ranks * prov.get("threads_per_rank", 1) / cores, 1.0)


def by_cpu(res, shared: float, cpu_key="cpu_s") -> bool:
    """Whether item_cost costs these results by CPU seconds: ranks share cores and every rank
    measured `cpu_key`."""
    return shared > 1 and bool(res) and all(r.get(cpu_key) is not None for r in res)


def item_cost(res, shared: float, wall_key="seconds", cpu_key="cpu_s"):
    """(seconds, per-rank seconds) of a compute item from its ranks' results: on ranks sharing
    cores, each rank's CPU seconds x ranks per core (what the item takes from a machine every rank
    keeps busy; a rank's wall clock depends on when the others stop); else the ranks' median wall
    time."""
    if by_cpu(res, shared, cpu_key):
        per = [r[cpu_key] * shared for r in res]
        return sum(per) / len(per), per
    per = [r[wall_key] for r in res if r.get(wall_key) is not None]
    return (median(per) if per else None), per


def analyse(plan, per_rank, prov, base=None, collectives="auto") -> dict:
    """Every fit, with its residuals, and the points it was made from (medians over ranks)."""
    shared = shared_by(prov)
    out = {"points": _points(_by_item(plan, per_rank), shared, prov.get("ranks_per_host", 1)),
           "time_basis": (f"CPU seconds x {shared:g} ranks per core" if shared > 1 else "wall time")}
    P = out["points"]
    out["gemm"] = _gemm_fits(P, prov, base)
    # ---- attention, per precision measured
    out["attention"] = {}
    for dt in dict.fromkeys(p["dtype"] for p in P["attention"]):
        key = PREC_KEY.get(dt, dt)
        if key not in out["gemm"]:
            continue
        pts = [(p["forward_flops"], p["seconds"]) for p in P["attention"] if p["dtype"] == dt]
        out["attention"][key] = fit.fit_attention(pts, out["gemm"][key]["peak_flops"])
    out["memory"] = fit.fit_memory([(p["op"], p["bytes_moved"], p["seconds"]) for p in P["memory"]])
    out["overhead"] = fit.fit_overhead({p["layers"]: p["seconds"] for p in P["overhead"]})
    out.update(_collective_fits(P, shared, collectives, prov.get("backend") == "gloo"))
    return out


def _points(items, shared, local=1) -> dict:
    """The measured points by kind, each item's time over its ranks."""
    P = {"gemm": [], "attention": [], "memory": [], "overhead": [], "layer_probe": [], "tp_probe": [],
         "collective": []}

    def cost(res, wall_key, cpu_key):
        return item_cost(res, shared, wall_key, cpu_key)

    for it, res in items:
        k = it["kind"]
        if k == "collective":
            t = _group_time(it, res)
            cpu = [r["cpu_s"] for r in res if r.get("cpu_s") is not None]
            # members per host of a group across hosts (planner/collectives.py's k_in)
            pool = max(1, min(it["group"], local // it["stride"])) if it["level"] > 0 else 1
            P["collective"].append(dict(it, seconds=t, skipped=res[0].get("skipped"), pool=pool,
                                        cpu_s=(sum(cpu) / len(cpu)) if (cpu and t) else None))
            continue
        s, secs = cost(res, "seconds", "cpu_s")
        if k == "gemm":
            P["gemm"].append(dict(it, seconds=s, flops_per_s=res[0]["flops"] / s,
                                  per_rank_flops_per_s=[res[0]["flops"] / x for x in secs]))
        elif k == "attention":
            P["attention"].append(dict(it, seconds=s, forward_flops=res[0]["forward_flops"]))
        elif k == "memory":
            P["memory"].append(dict(it, seconds=s, bytes_moved=res[0]["bytes_moved"],
                                    bytes_per_s=res[0]["bytes_moved"] / s))
        elif k == "overhead":
            tp_probe = it.get("tp", 1) > 1
            # a TP probe on shared cores: the calling thread's CPU alone -- gloo runs the TP
            # collectives on its own threads while the rank waits, and those are costed by the
            # network levels' fits, as a layout's are (the process's CPU counted them twice)
            own = tp_probe and by_cpu(res, shared, "fwd_bwd_thread_cpu_s")
            fb, _ = cost(res, "fwd_bwd_s", "fwd_bwd_thread_cpu_s" if own else "fwd_bwd_cpu_s")
            ob, _ = cost(res, "opt_s", "opt_cpu_s")
            where = "tp_probe" if tp_probe else "layer_probe" if it.get("hidden") else "overhead"
            P[where].append(dict(it, seconds=s, fwd_bwd_s=fb, opt_s=ob,
                                 **({"fwd_bwd_basis": "thread" if own else "step"} if tp_probe else {})))
    return P


def _gemm_fits(P, prov, base) -> dict:
    """GEMM peak per precision (the base profile's datasheet peak on a GPU, else the best rate
    observed), then the efficiency curve; the primary precision fits the half-dimension."""
    cuda = prov["device_type"] == "cuda"
    primary = "bfloat16" if cuda else "float32"
    out = {}
    base_peaks = base.gpu.peak_flops if (base is not None and cuda) else {}
    dts = list(dict.fromkeys(p["dtype"] for p in P["gemm"]))
    dts.sort(key=lambda d: d != primary)
    half = None
    for dt in dts:
        pts = [(p["m"], p["n"], p["k"], p["seconds"]) for p in P["gemm"] if p["dtype"] == dt]
        best = max(p["flops_per_s"] for p in P["gemm"] if p["dtype"] == dt)
        key = PREC_KEY.get(dt, dt)
        peak, peak_from = (base_peaks[key], "base") if key in base_peaks else (best, "best observed")
        f = fit.fit_gemm(pts, peak, half_dim=half)
        if half is None:
            half = f["gemm_half_dim"]
        f.update(peak_from=peak_from, best_observed=best, precision=key, points=len(pts))
        out[key] = f
    return out


def _collective_fits(P, shared, collectives, gloo=False) -> dict:
    """An alpha-beta fit per (level, op, group size) and the planner's two level parameters
    fitted jointly over every op and group size of the level, per measuring condition. gloo:
    reduce-scatter fitted to the all-reduce's formula (planner/collectives.gloo_rs_as_all_reduce)."""
    by = {}
    for cond in sorted({bool(p.get("loaded")) for p in P["collective"]}):
        by["loaded" if cond else "idle"] = _levels([p for p in P["collective"] if bool(p.get("loaded")) == cond], gloo)
    if shared > 1:
        # ranks sharing cores: a collective costs a training step the CPU its ranks spend on it
        # (every group at once: the mean rank's CPU seconds x ranks per core), not its wait. Across
        # hosts a link carries the bytes, not the cores: there its wall time back to back is a floor
        # (a link slower than the copies bounds the collective however idle the cores are)
        cpu_pts = [dict(p, seconds=_cpu_cost(p, shared)) for p in P["collective"]
                   if not p.get("loaded") and p.get("cpu_s")]
        if cpu_pts:
            by["cpu"] = _levels(cpu_pts, gloo)
    if collectives in (None, "auto"):
        collectives = "cpu" if "cpu" in by else "loaded"
    use = collectives if collectives in by else next(iter(by))
    return {"levels_by_condition": by, "collectives_used": use, "levels": by[use]}


def _cpu_cost(p, shared) -> float:
    """A collective's cost to a step on shared cores: CPU seconds x ranks per core; at least its
    wall time on a level that crosses hosts (validate/README.md, "Calibration")."""
    cpu = p["cpu_s"] * shared
    return max(cpu, p["seconds"] or 0.0) if p["level"] > 0 else cpu


def _levels(points, gloo=False) -> list:
    out = []
    levels = sorted({p["level"] for p in points})
    for lv in levels:
        # a point at the floor (a loaded collective no slower than its GEMMs alone, within their
        # noise) is unresolved, not free: left out of the fits and listed with the skipped ones
        pts = [p for p in points if p["level"] == lv and p["seconds"] and p["seconds"] > UNRESOLVED_S]
        per = {}
        for p in pts:
            per.setdefault((p["op"], p["group"], p.get("pool", 1)), []).append((p["bytes"], p["seconds"]))
        ab = {}
        for (op, g, pool), v in sorted(per.items()):
            if len(v) >= 2:
                r = fit.fit_alpha_beta([x for x, _ in v], [y for _, y in v])
                r.update(op=op, group=g, pool=pool, planner=fit.per_op_planner_params(op, g, r, pool, gloo))
                ab[f"{op}/{g}"] = r
        joint = fit.fit_level([(p["op"], p["group"], p["bytes"], p["seconds"], p.get("pool", 1)) for p in pts], gloo)
        by_op = {}
        for op in dict.fromkeys(p["op"] for p in pts):
            sub = [(p["op"], p["group"], p["bytes"], p["seconds"], p.get("pool", 1)) for p in pts if p["op"] == op]
            if len(sub) >= 2:
                by_op[op] = fit.fit_level(sub, gloo)
        out.append({"level": lv, "groups": sorted({p["group"] for p in pts}),
                    "alpha_beta": ab, "joint": joint, "by_op": by_op,
                    "skipped": [p for p in points if p["level"] == lv
                                and not (p["seconds"] and p["seconds"] > UNRESOLVED_S)]})
    return out

