"""From calibration measurements to fits (analyse) and to a complete hardware profile
(build_profile) in the schema of hwprofiles/*.toml: every number a {value, source} table whose
source says how it was measured, on which host, when, with which torch and backend.

What a calibration cannot measure (the price, memory the framework reserves, MoE grouped-GEMM
efficiency, network levels the ranks did not span) comes from --base, marked as not measured,
or gets a neutral value that says so.
"""
from __future__ import annotations

import tomllib
from statistics import median

from planner.hardware import PROFILE_DIR

from . import calibrate_fit as fit

UNRESOLVED_S = 1e-6     # calibrate_measure floors a loaded collective's extra time at 1e-7 s
PREC_KEY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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
    """Ranks per core when the ranks of a host share its CPU cores (1.0 on GPUs: a rank owns its
    device)."""
    if prov.get("device_type") == "cuda":
        return 1.0
    cores = prov.get("cpu_cores") or 1
    return max(prov.get("ranks_per_host", 1) * prov.get("threads_per_rank", 1) / cores, 1.0)


def analyse(plan, per_rank, prov, base=None, collectives="auto") -> dict:
    """Every fit, with its residuals, and the points it was made from (medians over ranks)."""
    items = _by_item(plan, per_rank)
    out = {"points": {"gemm": [], "attention": [], "memory": [], "overhead": [], "layer_probe": [],
                      "tp_probe": [], "collective": []}}
    P = out["points"]
    shared = shared_by(prov)

    def cost(res, wall_key, cpu_key):
        """(seconds, per-rank seconds) of a compute item: on ranks sharing cores, each rank's CPU
        seconds x ranks per core (what the item takes from a machine every rank keeps busy; a
        rank's wall clock depends on when the others stop); else the ranks' median wall time."""
        cpu = [r[cpu_key] for r in res if r.get(cpu_key) is not None]
        if shared > 1 and cpu and len(cpu) == len(res):
            per = [c * shared for c in cpu]
            return sum(per) / len(per), per
        per = [r[wall_key] for r in res if r.get(wall_key) is not None]
        return (median(per) if per else None), per

    out["time_basis"] = (f"CPU seconds x {shared:g} ranks per core" if shared > 1 else "wall time")
    for it, res in items:
        k = it["kind"]
        if k == "collective":
            t = _group_time(it, res)
            cpu = [r["cpu_s"] for r in res if r.get("cpu_s") is not None]
            P["collective"].append(dict(it, seconds=t, skipped=res[0].get("skipped"),
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
            fb, _ = cost(res, "fwd_bwd_s", "fwd_bwd_cpu_s")
            ob, _ = cost(res, "opt_s", "opt_cpu_s")
            where = ("tp_probe" if it.get("tp", 1) > 1 else
                     "layer_probe" if it.get("hidden") else "overhead")
            P[where].append(dict(it, seconds=s, fwd_bwd_s=fb, opt_s=ob))
    cuda = prov["device_type"] == "cuda"
    primary = "bfloat16" if cuda else "float32"
    # ---- GEMM: peak per precision, then the efficiency curve
    out["gemm"] = {}
    base_peaks = base.gpu.peak_flops if (base is not None and cuda) else {}
    dts = list(dict.fromkeys(p["dtype"] for p in P["gemm"]))
    dts.sort(key=lambda d: d != primary)
    half = None
    for dt in dts:
        pts = [(p["m"], p["n"], p["k"], p["seconds"]) for p in P["gemm"] if p["dtype"] == dt]
        best = max(p["flops_per_s"] for p in P["gemm"] if p["dtype"] == dt)
        key = PREC_KEY.get(dt, dt)
        if key in base_peaks:
            peak, peak_from = base_peaks[key], "base"
        else:
            peak, peak_from = best, "best observed"
        f = fit.fit_gemm(pts, peak, half_dim=half)
        if half is None:
            half = f["gemm_half_dim"]
        f.update(peak_from=peak_from, best_observed=best, precision=key, points=len(pts))
        out["gemm"][key] = f
    # ---- attention, per precision measured
    out["attention"] = {}
    for dt in dict.fromkeys(p["dtype"] for p in P["attention"]):
        key = PREC_KEY.get(dt, dt)
        if key not in out["gemm"]:
            continue
        pts = [(p["forward_flops"], p["seconds"]) for p in P["attention"] if p["dtype"] == dt]
        out["attention"][key] = fit.fit_attention(pts, out["gemm"][key]["peak_flops"])
    # ---- memory bandwidth
    out["memory"] = fit.fit_memory([(p["op"], p["bytes_moved"], p["seconds"]) for p in P["memory"]])
    # ---- host overhead
    out["overhead"] = fit.fit_overhead({p["layers"]: p["seconds"] for p in P["overhead"]})
    # ---- collectives: an alpha-beta fit per (level, op, group size), the planner's two level
    # parameters fitted jointly over every op and group size of the level
    out["levels_by_condition"] = {}
    conds = sorted({bool(p.get("loaded")) for p in P["collective"]})
    for cond in conds:
        out["levels_by_condition"]["loaded" if cond else "idle"] = _levels(
            [p for p in P["collective"] if bool(p.get("loaded")) == cond])
    shared = shared_by(prov)
    if shared > 1:
        # ranks sharing cores: a collective costs a training step the CPU its ranks spend on it
        # (every group at once: the mean rank's CPU seconds x ranks per core), not its wait
        cpu_pts = [dict(p, seconds=p["cpu_s"] * shared) for p in P["collective"]
                   if not p.get("loaded") and p.get("cpu_s")]
        if cpu_pts:
            out["levels_by_condition"]["cpu"] = _levels(cpu_pts)
    if collectives in (None, "auto"):
        collectives = "cpu" if "cpu" in out["levels_by_condition"] else "loaded"
    use = collectives if collectives in out["levels_by_condition"] else next(iter(out["levels_by_condition"]))
    out["collectives_used"] = use
    out["levels"] = out["levels_by_condition"][use]
    return out


def _levels(points) -> list:
    out = []
    levels = sorted({p["level"] for p in points})
    for lv in levels:
        # a point at the floor (a loaded collective no slower than its GEMMs alone, within their
        # noise) is unresolved, not free: left out of the fits and listed with the skipped ones
        pts = [p for p in points if p["level"] == lv and p["seconds"] and p["seconds"] > UNRESOLVED_S]
        per = {}
        for p in pts:
            per.setdefault((p["op"], p["group"]), []).append((p["bytes"], p["seconds"]))
        ab = {}
        for (op, g), v in sorted(per.items()):
            if len(v) >= 2:
                r = fit.fit_alpha_beta([x for x, _ in v], [y for _, y in v])
                r.update(op=op, group=g, planner=fit.per_op_planner_params(op, g, r))
                ab[f"{op}/{g}"] = r
        joint = fit.fit_level([(p["op"], p["group"], p["bytes"], p["seconds"]) for p in pts])
        by_op = {}
        for op in dict.fromkeys(p["op"] for p in pts):
            sub = [(p["op"], p["group"], p["bytes"], p["seconds"]) for p in pts if p["op"] == op]
            if len(sub) >= 2:
                by_op[op] = fit.fit_level(sub)
        out.append({"level": lv, "groups": sorted({p["group"] for p in pts}),
                    "alpha_beta": ab, "joint": joint, "by_op": by_op,
                    "skipped": [p for p in points if p["level"] == lv
                                and not (p["seconds"] and p["seconds"] > UNRESOLVED_S)]})
    return out


# ---------------------------------------------------------------------------------------------
def _base_dict(base):
    """The base profile's TOML as a dict (its sources kept)."""
    if base is None:
        return None
    from pathlib import Path
    p = Path(base.path)
    if not p.exists():
        p = PROFILE_DIR / base.path
    with open(p, "rb") as f:
        return tomllib.load(f)


def _num(value, source):
    return {"value": float(value), "source": source}


def _pct(x):
    return f"{100 * x:.1f}%"


def build_profile(name: str, fits: dict, prov: dict, base=None) -> dict:
    """A complete profile dict (hwprofiles schema) from the fits."""
    bd = _base_dict(base)
    bname = base.name if base is not None else None
    cuda = prov["device_type"] == "cuda"
    who = (f"measured by validate calibrate on {prov['host']} {prov['date']}, torch {prov['torch']}, "
           f"backend {prov['backend']}, {prov['world']} ranks ({prov['ranks_per_host']} per host)")
    share = ("" if cuda else
             f"; on a CPU the {prov['ranks_per_host']} ranks share {prov['cpu_cores']} cores "
             f"({prov['threads_per_rank']} thread each), so this is one rank's share with every rank busy")
    not_measured = "not measured by validate calibrate"
    d = {"name": name,
         "description": (f"calibrated: {prov['world']} x {prov['device']} ({prov['backend']}) on "
                         f"{prov['host']}, {prov['date']}, torch {prov['torch']}"
                         + (f"; unmeasured values from {bname}" if bname else "")),
         "calibration": {"date": prov["date"], "host": prov["host"], "device": prov["device"],
                         "torch": prov["torch"], "backend": prov["backend"],
                         "points": f"{name}.points.json (raw points, fits and residuals)",
                         "base": bname or ""}}
    # ---- price
    if bd is not None:
        pr = bd["price_per_gpu_hour"]
        d["price_per_gpu_hour"] = _num(pr["value"] if isinstance(pr, dict) else pr,
                                       f"from base profile {bname} ({not_measured}): "
                                       + (pr.get("source", "") if isinstance(pr, dict) else ""))
    else:
        d["price_per_gpu_hour"] = _num(0.0, f"{not_measured}: no price known for this machine; set it "
                                            "(USD per rank-hour) for cost objectives")
    # ---- gpu
    gpu = {"name": prov["device"] + ("" if cuda else f" ({prov['threads_per_rank']} thread per rank)")}
    peaks = {}
    for key, f in fits["gemm"].items():
        if f["peak_from"] == "base":
            src = bd["gpu"]["peak_flops"][key]
            peaks[key] = {"value": float(src["value"]), "sparsity": "dense",
                          "source": f"from base profile {bname} (datasheet): {src.get('source', '')}; "
                                    f"best GEMM {who}: {f['best_observed']:.4g} FLOP/s"}
        else:
            peaks[key] = {"value": float(f["peak_flops"]), "sparsity": "dense",
                          "source": f"best {key} GEMM rate observed over {f['points']} (m, n, k) shapes, "
                                    f"{who}{share}. A measured rate, not a datasheet peak"}
    if bd is not None:
        for key, ent in bd["gpu"]["peak_flops"].items():
            if key not in peaks and cuda:
                peaks[key] = dict(ent, source=f"from base profile {bname} ({not_measured}): "
                                              f"{ent.get('source', '')}")
    gpu["peak_flops"] = peaks
    if cuda:
        import torch
        total = torch.cuda.get_device_properties(0).total_memory
        gpu["hbm_bytes"] = _num(total, f"torch.cuda.get_device_properties(0).total_memory, {who}")
    else:
        total = _mem_total()
        gpu["hbm_bytes"] = _num(total / max(prov["ranks_per_host"], 1),
                                f"MemTotal of /proc/meminfo ({total} bytes) / {prov['ranks_per_host']} "
                                f"ranks per host, {who}")
    mem = fits["memory"]
    hb_base = None
    if bd is not None and cuda:
        hb_base = bd["gpu"]["hbm_bandwidth"]
    if hb_base is not None:
        gpu["hbm_bandwidth"] = _num(hb_base["value"], f"from base profile {bname} (datasheet): "
                                                      f"{hb_base.get('source', '')}")
        hbm_eff = min(mem["bandwidth_bytes_per_s"] * mem["efficiency"] / float(hb_base["value"]), 1.0)
    else:
        gpu["hbm_bandwidth"] = _num(mem["bandwidth_bytes_per_s"],
                                    f"best streaming rate (copy / add / scale of 4-byte elements, bytes "
                                    f"read + written per second) over {mem['n']} kernels and sizes, {who}{share}")
        hbm_eff = mem["efficiency"]
    if bd is not None and "reserved_bytes" in bd["gpu"]:
        rb = bd["gpu"]["reserved_bytes"]
        gpu["reserved_bytes"] = _num(rb["value"], f"from base profile {bname} ({not_measured}): "
                                                  f"{rb.get('source', '')}")
    else:
        gpu["reserved_bytes"] = _num(0.0, f"{not_measured}: memory the framework reserves is not "
                                          "known here; 0")
    sb = shared_by(prov)
    if sb > 1:
        gpu["shared_by"] = _num(sb, f"ranks per core: {prov['ranks_per_host']} ranks x "
                                    f"{prov['threads_per_rank']} thread on {prov['cpu_cores']} cores "
                                    f"(os.cpu_count()); the rates above are one rank's share, {who}")
    d["gpu"] = gpu
    # ---- network levels
    nets = []
    lv_names = ({0: "intra-node-nccl", 1: "inter-node-nccl"} if cuda else
                {0: "host-gloo", 1: "inter-host-gloo"})
    hosts = prov["hosts"]
    base_levels = bd["network"] if bd is not None else []
    base_eff = base.efficiency.network if base is not None else 1.0
    measured = fits["levels"]
    idle = {x["level"]: x for x in fits.get("levels_by_condition", {}).get("idle", [])}
    for i, lv in enumerate(measured):
        j = dict(lv["joint"])
        bw_note = ""
        if not (0 < j["bandwidth_bytes_per_s"] < float("inf")) and lv["level"] in idle:
            j["bandwidth_bytes_per_s"] = idle[lv["level"]]["joint"]["bandwidth_bytes_per_s"]
            bw_note = "; the fit had no size dependence, so the bandwidth is the back-to-back fit's"
        last = (i == len(measured) - 1) and not (hosts == 1 and len(base_levels) > 1)
        dom = 0 if last else (prov["ranks_per_host"] if i == 0 else 0)
        where = "ranks of one host" if lv["level"] == 0 else "one rank per host"
        res = j["by_op"]
        resid = "; ".join(f"{op} median |rel. residual| {_pct(v['median_abs_rel'])}"
                          for op, v in res.items())
        cond = fits.get("collectives_used", "idle")
        how = {"loaded": "each timed between chunks of GEMM work on every rank, as in a training step "
                         "(the extra time over the GEMMs alone)",
               "cpu": f"each costed as the CPU seconds a rank spends on it back to back (every thread, "
                      f"mean over ranks) x {shared_by(prov):.3g} ranks per core: on shared cores the "
                      f"collective's copies displace the ranks' compute, its waits do not"}.get(
            cond, "timed back to back")
        src = (f"fitted jointly (weighted least squares on relative error) to {j['n']} collectives {how} "
               f"(all-reduce, all-gather, reduce-scatter, all-to-all, send/recv; groups of "
               f"{', '.join(map(str, lv['groups']))} {where}, every group at once) under the planner's "
               f"ring formulas, {who}; {resid}")
        ent = {"name": lv_names.get(lv["level"], f"level{lv['level']}"),
               "domain": {"value": dom, "source": ("0 = whole cluster (outermost level)" if dom == 0 else
                                                   f"ranks per host in the calibration ({dom})")},
               "bandwidth": _num(j["bandwidth_bytes_per_s"], "bus bandwidth per rank per direction, "
                                 + src + bw_note),
               "latency": _num(j["latency_s"], "seconds per ring step, " + src),
               "algorithm": "ring",
               "oversubscription": _num(1.0, "1.0: the fitted bandwidth already includes any "
                                             "contention of the measurement (every group at once)")}
        fitd = {}
        for op, v in lv["by_op"].items():
            if not (0 < v["bandwidth_bytes_per_s"] < float("inf")):
                continue       # a degenerate fit (no size dependence): not written
            fitd[op] = {"latency": _num(v["latency_s"], f"{op} alone fitted to the planner's ring formula, "
                                                        f"{v['n']} points, median |rel. residual| "
                                                        f"{_pct(v['median_abs_rel'])}; {who}"),
                        "bandwidth": _num(v["bandwidth_bytes_per_s"],
                                          f"{op} alone, bus bandwidth per rank; {who}")}
        ent["fit"] = fitd
        nets.append(ent)
    if hosts == 1 and len(base_levels) > 1:
        for lvd in base_levels[1:]:
            e = {"name": lvd["name"], "domain": lvd["domain"], "algorithm": lvd.get("algorithm", "ring")}
            bw = lvd["bandwidth"]
            e["bandwidth"] = _num(float(bw["value"]) * base_eff,
                                  f"from base profile {bname} ({not_measured}: one host only) x its network "
                                  f"efficiency {base_eff}: {bw.get('source', '')}")
            lat = lvd["latency"]
            e["latency"] = _num(lat["value"], f"from base profile {bname} ({not_measured}): "
                                              f"{lat.get('source', '')}")
            if "oversubscription" in lvd:
                ov = lvd["oversubscription"]
                e["oversubscription"] = _num(ov["value"] if isinstance(ov, dict) else ov,
                                             f"from base profile {bname}")
            nets.append(e)
    d["network"] = nets
    # ---- efficiency
    g = fits["gemm"]
    primary = "bf16" if "bf16" in g and cuda else ("fp32" if "fp32" in g else next(iter(g)))
    eff = {"source": f"{who}{share}; points and residuals in {name}.points.json"}
    gm = {}
    for key, f in g.items():
        gmax = min(f["gemm_max"], 1.0)
        gm[key] = _num(gmax, f"GEMM ceiling as a fraction of the {key} peak above: least squares on log "
                             f"rate over {f['points']} shapes; median |rel. residual| "
                             f"{_pct(f['median_abs_rel'])}, max {_pct(f['max_abs_rel'])}")
    eff["gemm_half_dim"] = _num(g[primary]["gemm_half_dim"],
                                f"fitted with the {primary} GEMM ceiling (rate = peak x gemm_max x "
                                f"x/(x + half_dim), x the smallest GEMM dimension)")
    att = fits["attention"]
    ab = {}
    for key, f in att.items():
        v = f["attention_max"]
        ab[key] = _num(min(v, 1.0), f"causal flash attention forward + backward over {f['n']} shapes "
                                    f"as a fraction of the {key} GEMM peak (planner: backward = 2.5 x "
                                    f"forward); median |rel. residual| {_pct(f['median_abs_rel'])}"
                                    + (f"; measured {v:.3g}, capped at 1" if v > 1 else ""))
    if "bf16" in att:
        v = att["bf16"]["attention_max"]
        eff["attention_max"] = _num(min(v, 1.0), ab["bf16"]["source"])
    elif att:
        key, f = next(iter(att.items()))
        v = f["attention_max"] * f["peak_flops"] / peaks["bf16"]["value"] if "bf16" in peaks else f["attention_max"]
        eff["attention_max"] = _num(min(v, 1.0), f"the {key} flash-attention rate as a fraction of the "
                                                 f"bf16 GEMM peak (the planner times attention against "
                                                 f"bf16); measured {v:.3g}" + (", capped at 1" if v > 1 else ""))
    eff["hbm"] = _num(min(hbm_eff, 1.0), f"mean fraction of the best streaming rate that copy / add / "
                                         f"scale reach over the sizes measured; median |rel. residual| "
                                         f"{_pct(mem['median_abs_rel'])}")
    eff["network"] = _num(1.0, "1.0: the network bandwidths above are fitted achieved bus bandwidths"
                          + (f" (kept levels of {bname} carry its efficiency {base_eff} in their "
                             "bandwidth)" if bname else ""))
    if bd is not None and "grouped_gemm" in bd.get("efficiency", {}):
        gg = bd["efficiency"]["grouped_gemm"]
        eff["grouped_gemm"] = _num(gg["value"], f"from base profile {bname} ({not_measured}): {gg.get('source', '')}")
    else:
        eff["grouped_gemm"] = _num(1.0, f"{not_measured}: MoE experts as dense GEMMs of the same shape")
    ov = fits["overhead"]
    eff["kernel_overhead"] = _num(ov["kernel_overhead_s"],
                                  f"host seconds per kernel of eager PyTorch: a tiny transformer's "
                                  f"training step at 1 and 3 layers, the difference per layer "
                                  f"({ov['per_layer_s']:.4g} s) over the planner's {fit.KERNELS_PER_DENSE_LAYER} "
                                  f"kernels per dense layer; {who}{share}")
    eff["step_overhead"] = _num(ov["step_overhead_s"],
                                f"host seconds per eager training step outside the layers (embedding, "
                                f"loss, Adam step bookkeeping) from the same probe; {who}{share}")
    eff["gemm_max"] = gm
    if ab:
        eff["attention_by_precision"] = ab
    d["efficiency"] = eff
    probe = fits["points"].get("layer_probe") or []
    if len({p["layers"] for p in probe}) >= 2:
        lp = fit_layer_probe(d, probe)
        fits["layer_probe"] = lp
        stream = eff["hbm"]["value"]
        eff["hbm"] = _num(lp["hbm"], (
            f"fraction of the best streaming rate above that the elementwise work of validate's eager "
            f"transformer layer reaches in the planner's terms: a training step ({lp['measured']}) "
            f"at hidden {lp['hidden']}, sequence {lp['seq']} with 1 and 3 layers on every rank at once; "
            f"the per-layer time ({lp['measured_per_layer_s']:.4g} s) left after the planner's GEMM, "
            f"attention and per-kernel terms, over the planner's elementwise and optimizer bytes"
            + ("; the planner's terms alone exceed the measurement, so 1.0" if lp["capped"] else "")
            + f". Copy / add / scale alone reach {stream:.3g} of it; {who}{share}"))
        if not lp.get("optimizer"):
            eff["optimizer"] = _num(min(stream, 1.0), (
                "the streaming kernels' fraction (copy / add / scale): the probe's optimizer step did "
                f"not resolve as more layers cost more; {who}{share}"))
        else:
            o = lp["optimizer"]
            eff["optimizer"] = _num(o["optimizer"], (
                f"fraction of the best streaming rate above that eager Adam (torch.optim.Adam) reaches over "
                f"the planner's optimizer bytes: the same probe's optimizer step timed alone, "
                f"{o['measured_per_layer_s']:.4g} s per layer" + ("; capped at 1" if o["capped"] else "")
                + f"; {who}{share}"))
    tprobe = fits["points"].get("tp_probe") or []
    if len({p["layers"] for p in tprobe}) >= 2 and all(p.get("fwd_bwd_s") for p in tprobe):
        tpf = fit_tp_probe(d, tprobe)
        fits["tp_probe"] = tpf
        eff["tp_layer_overhead"] = _num(tpf["tp_layer_overhead_s"], (
            f"host seconds per tensor-parallel layer forward (backward 2x) of eager DTensor TP (parallel "
            f"styles + SP, as validate runs TP) beyond its kernels and collectives: the tiny transformer's "
            f"forward + backward at tp {tpf['tp']} with 1 and 3 layers, per layer "
            f"{tpf['measured_per_layer_s']:.4g} s against the planner's {tpf['planner_per_layer_s']:.4g} s "
            f"without it (kernels, TP collectives on the fitted network), the difference / 3"
            + ("; measured below the planner's terms, so 0" if tpf["clamped"] else "") + f"; {who}{share}"))
    return d


def fit_tp_probe(d: dict, probe: list, dtype: str = "float32") -> dict:
    """The host cost per TP-sharded layer that makes the planner's per-layer forward + backward of
    the tiny probe at tp > 1 equal the measured one (linear: forward 1x, backward 2x)."""
    from planner.hardware import cluster_from_dict
    from planner.layout import Layout
    from .calibrate_measure import probe_spec
    from .calibrate_predict import predict
    cl = cluster_from_dict(d, "calibrated")
    by = {p["layers"]: p for p in probe}
    lo_l, hi_l = min(by), max(by)
    tp = by[lo_l]["tp"]
    meas = (by[hi_l]["fwd_bwd_s"] - by[lo_l]["fwd_bwd_s"]) / (hi_l - lo_l)
    lay = Layout(tp=tp, sp=True, micro_batch=1, global_batch=1, seq_len=by[lo_l].get("seq", 16), zero=0)

    def step(L):
        p = predict(probe_spec(by[L]), lay, cl, None, dtype)[0]
        return p.step_time_s - p.time_breakdown_s.get("optimizer", 0.0)
    pred0 = (step(hi_l) - step(lo_l)) / (hi_l - lo_l)
    x = max((meas - pred0) / 3.0, 0.0)
    return {"tp": tp, "tp_layer_overhead_s": x, "measured_per_layer_s": meas, "planner_per_layer_s": pred0,
            "clamped": meas < pred0}


def fit_layer_probe(d: dict, probe: list, dtype: str = "float32") -> dict:
    """The profile's hbm efficiency that makes the planner's per-layer time (the difference of
    1- and 3-layer steps, as validate runs them: calibrate_predict) equal the measured one."""
    import dataclasses

    from planner.hardware import cluster_from_dict
    from planner.layout import Layout
    from .calibrate_measure import probe_spec
    from .calibrate_predict import predict
    cl = cluster_from_dict(d, "calibrated")
    by = {p["layers"]: p for p in probe}
    lo_l, hi_l = min(by), max(by)
    # forward + backward per layer when measured apart from the optimizer step (the planner times
    # Adam with its own byte count; folding the step in would charge it to the layers' elementwise
    # work), else the whole step
    fb = all(by[L].get("fwd_bwd_s") for L in (lo_l, hi_l))
    key = "fwd_bwd_s" if fb else "seconds"
    meas = (by[hi_l][key] - by[lo_l][key]) / (hi_l - lo_l)
    seq = by[lo_l]["seq"]
    lay = Layout(micro_batch=1, global_batch=1, seq_len=seq, zero=0)

    def step(c, L):
        p = predict(probe_spec(by[L]), lay, c, None, dtype)[0]
        return p.step_time_s - (p.time_breakdown_s.get("optimizer", 0.0) if fb else 0.0)

    def per_layer(e):
        c = dataclasses.replace(cl, efficiency=dataclasses.replace(cl.efficiency, hbm=e))
        t = {L: step(c, L) for L in (lo_l, hi_l)}
        return (t[hi_l] - t[lo_l]) / (hi_l - lo_l)

    capped = per_layer(1.0) >= meas
    if capped:
        e = 1.0
    else:
        a, b = 1e-4, 1.0                      # per_layer decreases with e
        if per_layer(a) < meas:
            e = a
        else:
            for _ in range(60):
                m = (a * b) ** 0.5
                if per_layer(m) > meas:
                    a = m
                else:
                    b = m
            e = (a * b) ** 0.5
    pred = per_layer(e)
    # the optimizer step per layer, measured (whole step less forward + backward) against the
    # planner's Adam bytes at that elementwise efficiency: its own efficiency (time ~ 1 / eff)
    opt = None
    if fb:
        if all(by[L].get("opt_s") for L in (lo_l, hi_l)):      # the step timed alone
            m_opt = (by[hi_l]["opt_s"] - by[lo_l]["opt_s"]) / (hi_l - lo_l)
        else:                                                  # older points: whole step less fwd+bwd
            m_opt = ((by[hi_l]["seconds"] - by[hi_l]["fwd_bwd_s"])
                     - (by[lo_l]["seconds"] - by[lo_l]["fwd_bwd_s"])) / (hi_l - lo_l)
        c = dataclasses.replace(cl, efficiency=dataclasses.replace(cl.efficiency, hbm=e, optimizer=None))
        o = {L: predict(probe_spec(by[L]), lay, c, None, dtype)[0].time_breakdown_s.get("optimizer", 0.0)
             for L in (lo_l, hi_l)}
        p_opt = (o[hi_l] - o[lo_l]) / (hi_l - lo_l)
        if m_opt > 0 and p_opt > 0:
            opt = {"optimizer": min(e * p_opt / m_opt, 1.0), "measured_per_layer_s": m_opt,
                   "capped": e * p_opt / m_opt > 1.0}
    return {"hbm": e, "capped": capped, "measured_per_layer_s": meas, "predicted_per_layer_s": pred,
            "optimizer": opt,
            "measured": "forward + backward" if fb else "forward + backward + optimizer step",
            "hidden": by[lo_l]["hidden"], "seq": seq,
            "residual": (pred - meas) / meas}


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------------------------------------
def summary_table(fits: dict, prov: dict) -> str:
    L = [f"calibration of {prov['world']} x {prov['device']} ({prov['backend']}) on {prov['host']}, "
         f"{prov['date']}, torch {prov['torch']}, {prov.get('seconds', '?')} s"
         + (f"; times are {fits['time_basis']}" if fits.get("time_basis") else "")]
    L.append("")
    L.append("fit                              value              residual |rel| median / max")
    for key, f in fits["gemm"].items():
        L.append(f"gemm {key:5s} peak ({f['peak_from']:13s}) {f['peak_flops'] / 1e9:10.2f} GFLOP/s")
        L.append(f"gemm {key:5s} gemm_max              {f['gemm_max']:10.3f}          "
                 f"{_pct(f['median_abs_rel'])} / {_pct(f['max_abs_rel'])}")
        L.append(f"gemm {key:5s} gemm_half_dim         {f['gemm_half_dim']:10.1f}")
    for key, f in fits["attention"].items():
        L.append(f"attention {key:5s} (of {key} peak)   {f['attention_max']:10.3f}          "
                 f"{_pct(f['median_abs_rel'])} / {_pct(f['max_abs_rel'])}")
    m = fits["memory"]
    L.append(f"memory bandwidth (best)          {m['bandwidth_bytes_per_s'] / 1e9:10.2f} GB/s")
    L.append(f"memory efficiency (mean/best)    {m['efficiency']:10.3f}          "
             f"{_pct(m['median_abs_rel'])} / {_pct(m['max_abs_rel'])}")
    o = fits["overhead"]
    L.append(f"host overhead per kernel         {o['kernel_overhead_s'] * 1e6:10.2f} us")
    L.append(f"host overhead per step           {o['step_overhead_s'] * 1e3:10.3f} ms")
    if fits.get("layer_probe"):
        lp = fits["layer_probe"]
        L.append(f"elementwise efficiency (layer)   {lp['hbm']:10.3f}          (layer at hidden {lp['hidden']}, "
                 f"seq {lp['seq']}: {lp['measured_per_layer_s'] * 1e3:.1f} ms measured"
                 + (", planner terms alone exceed it" if lp["capped"] else "") + ")")
        if lp.get("optimizer"):
            L.append(f"optimizer efficiency (Adam)      {lp['optimizer']['optimizer']:10.3f}          "
                     f"({lp['optimizer']['measured_per_layer_s'] * 1e3:.1f} ms per layer measured)")
    if fits.get("tp_probe"):
        tq = fits["tp_probe"]
        L.append(f"host overhead per TP layer       {tq['tp_layer_overhead_s'] * 1e3:10.3f} ms       "
                 f"(tp {tq['tp']}: {tq['measured_per_layer_s'] * 1e3:.1f} ms per layer measured, "
                 f"{tq['planner_per_layer_s'] * 1e3:.1f} ms planner without it"
                 + ("; measured below the planner: 0" if tq["clamped"] else "") + ")")
    if prov.get("device_type") != "cuda":
        L.append(f"ranks per core (shared_by)       {shared_by(prov):10.3f}")
    for cond, levels in fits.get("levels_by_condition", {"": fits["levels"]}).items():
        for lv in levels:
            L += _level_lines(cond, lv, cond == fits.get("collectives_used"))
    return "\n".join(L)


def _level_lines(cond, lv, used) -> list:
    j = lv["joint"]
    L = ["", f"{cond} collectives" + (" (used for the profile)" if used else "")
         + f", network level {lv['level']} (groups of {', '.join(map(str, lv['groups']))}): joint fit "
         f"latency {j['latency_s'] * 1e6:.1f} us/step, bandwidth {j['bandwidth_bytes_per_s'] / 1e9:.3f} GB/s, "
         f"|rel. residual| median {_pct(j['median_abs_rel'])} max {_pct(j['max_abs_rel'])}",
         "  op/group            alpha (us)   beta -> GB/s   planner lat (us/step)  planner bw (GB/s)  "
         "|res| med / max"]
    for key, r in lv["alpha_beta"].items():
        L.append(f"  {key:18s} {r['alpha_s'] * 1e6:11.1f}   {r['bandwidth_bytes_per_s'] / 1e9:12.3f}   "
                 f"{r['planner']['latency_s'] * 1e6:20.1f}  {r['planner']['bandwidth_bytes_per_s'] / 1e9:17.3f}  "
                 f"{_pct(r['median_abs_rel'])} / {_pct(r['max_abs_rel'])}")
    for op, v in j["by_op"].items():
        L.append(f"  joint-fit residual {op:15s} median {_pct(v['median_abs_rel'])}, "
                 f"mean signed {100 * v['mean_rel']:+.1f}%")
    if lv["skipped"]:
        L.append(f"  skipped (memory): {len(lv['skipped'])} points")
    return L
