"""Predicted against measured: one check per quantity and rank group (pipeline stage), with
tolerances: FLOPs, state bytes and collective calls/bytes exact (padding included: Megatron's
ZeRO-1/2 buffers and FSDP2's per-parameter chunks, planner/costmodel/shapes.py), activation
bytes within 10%."""
from __future__ import annotations

import json
import math
from statistics import mean

EXACT = 1e-9          # relative: measured means of integers
ACTIVATIONS = 0.10


def _rel(pred, meas):
    if pred == meas:
        return 0.0
    return abs(meas - pred) / max(abs(pred), 1e-30)


def _check(quantity, stage, predicted, measured, tol, abs_tol=0.0, **extra):
    rel = _rel(predicted, measured)
    ok = rel <= tol or abs(measured - predicted) <= abs_tol
    d = dict(quantity=quantity, group=f"pp{stage}" if stage is not None else "all",
             stage=stage, predicted=float(predicted), measured=float(measured), rel_err=rel,
             tol=tol, ok=bool(ok))
    d.update(extra)
    return d


def _mean_steps(rank, key):
    """Mean over counted steps of a dict-valued per-step record."""
    steps = rank[key]
    keys = set().union(*steps) if steps else set()
    return {k: mean(s.get(k, 0) for s in steps) for k in keys}


def _ranked(quantity, stage, predicted, by_rank: dict, tol, ep_mean=False, **extra) -> list:
    """Checks of one quantity on the ranks of a stage: one check when every rank measured the
    same (or, where expert routing makes ranks differ, on the expert group's mean, said so),
    else one per rank, so that per-rank errors cannot cancel in a mean."""
    vals = list(by_rank.values())
    if ep_mean or len(set(vals)) <= 1:
        return [_check(quantity, stage, predicted, mean(vals), tol, ranks="ep-mean" if ep_mean else "all",
                       **extra)]
    return [_check(quantity, stage, predicted, v, tol, rank=r, **extra) for r, v in by_rank.items()]


def _state_of(r) -> dict:
    d = {}
    for k, v in r["state"].items():
        what = k.split("|")[1]
        d[what] = d.get(what, 0) + v
    return d


def _stage_checks(st, ranks, pf, lay) -> list:
    """FLOPs, state bytes, collectives and saved activations of one pipeline stage's ranks."""
    ep_routed = lay["ep"] > 1
    out = []
    mf = {r["rank"]: _mean_steps(r, "flops") for r in ranks}
    for ph in sorted(set(pf) | set().union(*mf.values())):
        if ph in ("forward", "backward", "recompute"):
            out += _ranked(f"flops.{ph}", st.stage, pf.get(ph, 0.0), {k: m.get(ph, 0) for k, m in mf.items()},
                           EXACT, ep_routed)
    state = {r["rank"]: _state_of(r) for r in ranks}
    for what in ("weights", "gradients", "optimizer"):
        measured = {k: s.get(what, 0) for k, s in state.items()}
        if what == "optimizer" and st.optimizer_by_shard_rank:
            # FSDP2: the last ranks of the shard group (dp x cp, dp outer) hold fewer rows
            shard_of = {r["rank"]: r["coords"]["dp"] * lay["cp"] + r["coords"]["cp"] for r in ranks}
            out += [_check(f"memory.{what}_bytes", st.stage, st.optimizer_by_shard_rank[shard_of[k]], v, EXACT,
                           rank=k, shard_rank=shard_of[k]) for k, v in measured.items()]
            continue
        out += _ranked(f"memory.{what}_bytes", st.stage, st.state[what], measured, EXACT)
    mc = {r["rank"]: _mean_steps(r, "coll_calls") for r in ranks}
    mb = {r["rank"]: _mean_steps(r, "coll_bytes") for r in ranks}
    for key in sorted({f"{g}|{k}" for g, k in st.collectives} | set().union(*mc.values())):
        g, kind = key.split("|")
        p = st.collectives.get((g, kind), {"calls": 0, "bytes": 0})
        routed = ep_routed and g == "ep"
        out += _ranked("collective.calls", st.stage, p["calls"], {k: m.get(key, 0) for k, m in mc.items()}, EXACT,
                       group_label=g, kind=kind)
        out += _ranked("collective.bytes", st.stage, p["bytes"], {k: m.get(key, 0) for k, m in mb.items()}, EXACT,
                       routed, group_label=g, kind=kind)
    for layer in st.layers:
        per = {r["rank"]: mean(v for step in r["acts"] for v in step.get(str(layer), [0.0])) for r in ranks}
        out += _ranked("activations.bytes_per_microbatch", st.stage, st.activations[layer], per, ACTIVATIONS,
                       ep_routed and layer in st.moe_layers, layer=layer, moe=layer in st.moe_layers)
    return out


def build(cfg: dict, per_rank: list, stages: list, ref_checks: list, plan=None,
          notes=(), flops=None) -> dict:
    """Checks of every rank against planner/step.py's RankCounts of its stage (`stages`); `flops`:
    each stage's FLOPs as the run's counter counts them (api.counted_flops)."""
    lay = cfg["layout"]
    checks = []
    by_stage = {}
    for r in per_rank:
        by_stage.setdefault(r["coords"]["pp"], []).append(r)
    for st in stages:
        if by_stage.get(st.stage):
            checks += _stage_checks(st, by_stage[st.stage], flops[st.stage] if flops is not None else st.flops, lay)
    checks.extend(ref_checks)
    # step time: predicted by the planner (its hardware profile), measured here -- reported,
    # not checked (issue 5's calibration makes the two comparable)
    times = []
    for r in per_rank:
        t = r["timed_times"] or r["step_times"]
        if t:
            times.append(mean(t))
    measured_step = max(times) if times else None
    measured_breakdown = _measured_breakdown(per_rank)
    out = {
        "model": cfg["model"]["name"],
        "layout": lay,
        "world": len(per_rank),
        "dtype": cfg["dtype"],
        "steps": cfg["steps"],
        "ok": all(c["ok"] for c in checks),
        "checks": checks,
        "step_time_s": {"predicted": plan.step_time_s if plan is not None else None,
                        "measured": measured_step,
                        "measured_from": "uninstrumented steps" if per_rank and per_rank[0]["timed_times"]
                        else "instrumented steps",
                        "hardware": getattr(plan, "_hardware", None)},
        "time_breakdown": {
            "predicted_s": dict(plan.time_breakdown_s) if plan is not None else None,
            "predicted": _predicted_split(plan),
            "measured": measured_breakdown},
        "notes": list(notes),
    }
    # what a breakdown of the measured step needs (issue 5): per stage, the collective bytes by
    # phase and the wall time of every rank
    out["details"] = {"stages": [
        {"stage": s, "ranks": [r["rank"] for r in rs],
         "step_time_s": [mean(r["timed_times"] or r["step_times"]) for r in rs],
         "collective_bytes_by_phase": {k: mean(_mean_steps(r, "coll_phase").get(k, 0) for r in rs)
                                       for k in sorted(set().union(*(_mean_steps(r, "coll_phase")
                                                                     for r in rs)))}}
        for s, rs in sorted(by_stage.items())]}
    mm = [r.get("max_memory_allocated") for r in per_rank if r.get("max_memory_allocated")]
    if mm:
        out["memory"] = {"max_memory_allocated_bytes": max(mm),
                         "predicted_peak_bytes": plan.memory_gib * 1024 ** 3 if plan else None}
    return out


def _predicted_split(plan):
    if plan is None:
        return None
    from .calibrate.predict import split
    return split(plan.time_breakdown_s)


def _measured_breakdown(per_rank):
    """Compute vs communication wait of the timed (uninstrumented) steps: the slowest rank's, and
    the mean over ranks. Wait = time blocked in Work.wait / wait_tensor (incl. waiting for a slower
    peer); compute = the rest of the step; cpu = the rank's main-thread CPU seconds (below the
    wall time when ranks share cores)."""
    rows = []
    for r in per_rank:
        if not r.get("timed_comm_wait"):
            continue
        st, w = mean(r["timed_times"]), mean(r["timed_comm_wait"])
        rows.append({"rank": r["rank"], "step_s": st, "compute_s": st - w, "comm_wait_s": w,
                     "cpu_s": mean(r["timed_cpu"]) if r.get("timed_cpu") else None,
                     "process_cpu_s": mean(r["timed_process_cpu"]) if r.get("timed_process_cpu") else None})
    if not rows:
        return None
    slow = max(rows, key=lambda x: x["step_s"])
    avg = {k: mean(x[k] for x in rows) for k in ("step_s", "compute_s", "comm_wait_s")}
    for k in ("cpu_s", "process_cpu_s"):
        if all(x[k] is not None for x in rows):
            avg[k] = mean(x[k] for x in rows)
    return {"slowest_rank": slow, "mean_over_ranks": avg}


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float) and (v != v):
        return "nan"
    a = abs(v)
    if a >= 1e6 or (0 < a < 1e-3):
        return f"{v:.4g}"
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.6g}"


def to_table(rep: dict) -> str:
    lay = rep["layout"]
    head = (f"validate {rep['model']} on {rep['world']} ranks: tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} "
            f"cp={lay['cp']} ep={lay['ep']} vpp={lay['vpp']} sp={lay['sp']} mb={lay['micro_batch']} "
            f"gb={lay['global_batch']} seq={lay['seq_len']} recompute={lay['recompute']} zero={lay['zero']} "
            f"({rep['dtype']}, {rep['steps']} counted step(s))")
    rows = [("quantity", "group", "predicted", "measured", "rel_err", "")]
    for c in rep["checks"]:
        q = c["quantity"]
        grp = c["group"]
        if "kind" in c:
            q = f"{q} {c['group_label']}/{c['kind']}"
        if "layer" in c:
            q = f"{q} layer {c['layer']}"
        if "step" in c:
            q = f"{q} step {c['step']}"
        rows.append((q, grp, _fmt(c["predicted"]), _fmt(c["measured"]), f"{c['rel_err']:.2e}",
                     "ok" if c["ok"] else "FAIL"))
    w = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = [head, ""]
    for i, r in enumerate(rows):
        lines.append("  ".join(s.ljust(w[j]) if j < 2 else s.rjust(w[j]) for j, s in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * x for x in w))
    st = rep["step_time_s"]
    lines.append("")
    lines.append(f"step time: predicted {_fmt(st['predicted'])} s ({st.get('hardware') or 'planner profile'}), "
                 f"measured {_fmt(st['measured'])} s ({st['measured_from']})"
                 + (f", error {100 * (st['predicted'] - st['measured']) / st['measured']:+.1f}%"
                    if st['predicted'] and st['measured'] else "") + "; reported, not checked")
    tb = rep.get("time_breakdown") or {}
    if tb.get("predicted") and tb.get("measured"):
        p, m = tb["predicted"], tb["measured"]["mean_over_ranks"]
        lines.append(f"  compute: predicted {_fmt(p['compute_s'])} s, measured {_fmt(m['compute_s'])} s; "
                     f"communication wait (incl. bubble): predicted {_fmt(p['comm_wait_s'])} s, "
                     f"measured {_fmt(m['comm_wait_s'])} s (mean over ranks)")
        terms = ", ".join(f"{k} {_fmt(v)}" for k, v in tb["predicted_s"].items() if v)
        lines.append(f"  predicted terms (s): {terms}")
    for n in st.get("prediction_notes", []):
        lines.append(f"  note: {n}")
    if "memory" in rep:
        m = rep["memory"]
        lines.append(f"GPU memory: max_memory_allocated {_fmt(m['max_memory_allocated_bytes'])} B, "
                     f"planner peak {_fmt(m['predicted_peak_bytes'])} B")
    for n in rep["notes"]:
        lines.append(f"note: {n}")
    bad = [c for c in rep["checks"] if not c["ok"]]
    lines.append(f"{len(rep['checks']) - len(bad)}/{len(rep['checks'])} checks passed"
                 + ("" if not bad else f"; FAILED: {', '.join(sorted({c['quantity'] for c in bad}))}"))
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    def clean(o):
        if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    return json.dumps(clean(rep), indent=2)
