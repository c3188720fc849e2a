"""The calibration's fits as a table for the terminal."""
from __future__ import annotations

from .analyse import shared_by
from .profile import _pct


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
                 f"(tp {tq['tp']}: {tq['measured_per_layer_s'] * 1e3:.1f} ms per layer measured"
                 + (" by the rank's own thread" if tq.get("basis") == "thread" else "") + ", "
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

