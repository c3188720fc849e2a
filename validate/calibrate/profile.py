"""From calibration measurements to fits (analyse) and to a complete hardware profile
(build_profile) in the schema of hwprofiles/*.toml: every number a {value, source} table whose
source says how it was measured, on which host, when, with which torch and backend.

What a calibration cannot measure (the price, memory the framework reserves, MoE grouped-GEMM
efficiency, network levels the ranks did not span) comes from --base, marked as not measured,
or gets a neutral value that says so.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass

from planner.hardware import PROFILE_DIR

from . import fit
from .analyse import shared_by



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


@dataclass(frozen=True)
class _Ctx:
    """What every section of a calibrated profile cites: the run and the base profile."""
    name: str
    prov: dict
    bd: dict | None          # the base profile as a TOML dict
    bname: str | None
    base: object             # the base Cluster (network efficiency of kept levels)
    cuda: bool
    who: str                 # 'measured by validate calibrate on <host> <date>, torch ..., backend ...'
    share: str               # on a CPU: whose share of the cores the rates are
    not_measured: str = "not measured by validate calibrate"


def build_profile(name: str, fits: dict, prov: dict, base=None) -> dict:
    """A complete profile dict (hwprofiles schema) from the fits."""
    bname = base.name if base is not None else None
    cuda = prov["device_type"] == "cuda"
    who = (f"measured by validate calibrate on {prov['host']} {prov['date']}, torch {prov['torch']}, "
           f"backend {prov['backend']}, {prov['world']} ranks ({prov['ranks_per_host']} per host)")
    share = ("" if cuda else
             f"; on a CPU the {prov.get('ranks_per_machine', prov['ranks_per_host'])} ranks of this "
             f"machine share its {prov['cpu_cores']} cores "
             f"({prov['threads_per_rank']} thread each), so this is one rank's share with every rank busy")
    x = _Ctx(name, prov, _base_dict(base), bname, base, cuda, who, share)
    d = {"name": name,
         "description": (f"calibrated: {prov['world']} x {prov['device']} ({prov['backend']}) on "
                         f"{prov['host']}, {prov['date']}, torch {prov['torch']}"
                         + (f"; unmeasured values from {bname}" if bname else "")),
         "calibration": {"date": prov["date"], "host": prov["host"], "device": prov["device"],
                         "torch": prov["torch"], "backend": prov["backend"],
                         "points": f"{name}.points.json (raw points, fits and residuals)",
                         "base": bname or ""},
         "price_per_gpu_hour": _price(x)}
    d["gpu"], peaks, hbm_eff = _gpu(x, fits)
    d["network"] = _network(x, fits)
    d["efficiency"] = _efficiency(x, fits, peaks, hbm_eff)
    _probes(x, d, fits)
    return d


def _price(x: _Ctx) -> dict:
    bd, bname, not_measured = x.bd, x.bname, x.not_measured
    if bd is not None:
        pr = bd["price_per_gpu_hour"]
        return _num(pr["value"] if isinstance(pr, dict) else pr,
                                       f"from base profile {bname} ({not_measured}): "
                                       + (pr.get("source", "") if isinstance(pr, dict) else ""))
    return _num(0.0, f"{not_measured}: no price known for this machine; set it "
                     "(USD per rank-hour) for cost objectives")


def _gpu(x: _Ctx, fits: dict) -> tuple:
    """([gpu] table, peaks, HBM efficiency of the streaming kernels)."""
    bd, bname, cuda, prov, who, share, not_measured = x.bd, x.bname, x.cuda, x.prov, x.who, x.share, x.not_measured
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
        gpu["shared_by"] = _num(sb, f"ranks per core: "
                                    f"{prov.get('ranks_per_machine', prov['ranks_per_host'])} ranks x "
                                    f"{prov['threads_per_rank']} thread on {prov['cpu_cores']} cores "
                                    f"(os.cpu_count()); the rates above are one rank's share, {who}")
    return gpu, peaks, hbm_eff


def _network(x: _Ctx, fits: dict) -> list:
    """[[network]] levels: the fitted ones, then the base profile's levels the ranks did not span."""
    bd, bname, base, cuda, prov, who = x.bd, x.bname, x.base, x.cuda, x.prov, x.who
    not_measured = x.not_measured
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
                      f"collective's copies displace the ranks' compute, its waits do not"
                      + ("; across hosts at least its wall time back to back (the link carries the "
                         "bytes, not the cores)" if lv["level"] > 0 else "")}.get(
            cond, "timed back to back")
        src = (f"fitted jointly (weighted least squares on relative error) to {j['n']} collectives {how} "
               f"(all-reduce, all-gather, reduce-scatter, all-to-all, send/recv; groups of "
               f"{', '.join(map(str, lv['groups']))} {where}, every group at once) under the planner's "
               f"ring formulas{' (reduce-scatter with the all-reduce traffic gloo gives it)' if prov['backend'] == 'gloo' else ''}, "
               f"{who}; {resid}")
        ent = {"name": lv_names.get(lv["level"], f"level{lv['level']}"),
               "domain": {"value": dom, "source": ("0 = whole cluster (outermost level)" if dom == 0 else
                                                   f"ranks per host in the calibration ({dom})")},
               "bandwidth": _num(j["bandwidth_bytes_per_s"], "bus bandwidth per rank per direction, "
                                 + src + bw_note),
               "latency": _num(j["latency_s"], "seconds per ring step, " + src),
               # gloo runs one flat ring over a group's ranks; NCCL rings are hierarchical
               "algorithm": "flat-ring" if prov["backend"] == "gloo" else "ring",
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
    return nets


def _efficiency(x: _Ctx, fits: dict, peaks: dict, hbm_eff: float) -> dict:
    """[efficiency]: GEMM, attention, memory, network and host-overhead fits."""
    bd, bname, base, cuda, who, share, name = x.bd, x.bname, x.base, x.cuda, x.who, x.share, x.name
    not_measured = x.not_measured
    mem = fits["memory"]
    base_eff = base.efficiency.network if base is not None else 1.0
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
    return eff


def _probes(x: _Ctx, d: dict, fits: dict) -> None:
    """The layer and TP probes' fits into d["efficiency"] (they read the profile built so far)."""
    eff, who, share = d["efficiency"], x.who, x.share
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
        of, term = (("of the rank's own thread's CPU (gloo's threads run the TP collectives, costed by the "
                     "network fits) ", "compute term"), ("", "step less its optimizer (kernels, TP collectives "
                     "on the fitted network)"))[tpf.get("basis") != "thread"]
        eff["tp_layer_overhead"] = _num(tpf["tp_layer_overhead_s"], (
            f"host seconds per tensor-parallel layer forward (backward 2x) of eager DTensor TP (parallel "
            f"styles + SP, as validate runs TP) beyond its kernels and collectives: the tiny transformer's "
            f"forward + backward at tp {tpf['tp']} with 1 and 3 layers, per layer "
            f"{tpf['measured_per_layer_s']:.4g} s {of}against the planner's {term} "
            f"{tpf['planner_per_layer_s']:.4g} s without it, the difference / 3"
            + ("; measured below the planner's terms, so 0" if tpf["clamped"] else "") + f"; {who}{share}"))


def fit_tp_probe(d: dict, probe: list, dtype: str = "float32") -> dict:
    """The host cost per TP-sharded layer that makes the planner's per-layer forward + backward of
    the tiny probe at tp > 1 equal the measured one (linear: forward 1x, backward 2x). Measured by
    the rank's own thread (ranks sharing cores: gloo's threads run the collectives, costed by the
    levels' fits) it is held to the planner's compute term; else to its step less the optimizer."""
    from planner.profiles import cluster_from_dict
    from planner.layout import Layout
    from .measure import probe_spec
    from .predict import predict
    cl = cluster_from_dict(d, "calibrated")
    by = {p["layers"]: p for p in probe}
    lo_l, hi_l = min(by), max(by)
    tp = by[lo_l]["tp"]
    own = all(p.get("fwd_bwd_basis") == "thread" for p in probe)
    meas = (by[hi_l]["fwd_bwd_s"] - by[lo_l]["fwd_bwd_s"]) / (hi_l - lo_l)
    lay = Layout(tp=tp, sp=True, micro_batch=1, global_batch=1, seq_len=by[lo_l].get("seq", 16), zero=0)

    def step(L):
        p = predict(probe_spec(by[L]), lay, cl, None, dtype)[0]
        if own:
            return p.time_breakdown_s.get("compute", 0.0)
        return p.step_time_s - p.time_breakdown_s.get("optimizer", 0.0)
    pred0 = (step(hi_l) - step(lo_l)) / (hi_l - lo_l)
    x = max((meas - pred0) / 3.0, 0.0)
    return {"tp": tp, "tp_layer_overhead_s": x, "measured_per_layer_s": meas, "planner_per_layer_s": pred0,
            "clamped": meas < pred0, "basis": "thread" if own else "step"}


def fit_layer_probe(d: dict, probe: list, dtype: str = "float32") -> dict:
    """The profile's hbm efficiency that makes the planner's per-layer time (the difference of
    1- and 3-layer steps, as validate runs them: calibrate_predict) equal the measured one."""
    import dataclasses

    from planner.profiles import cluster_from_dict
    from planner.layout import Layout
    from .measure import probe_spec
    from .predict import predict
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


