"""How fast this machine runs now against its calibration: a few of the calibration's own items
measured again beside a run, and the profile's processor-set rates rescaled by the ratio.

A calibrated profile holds the rates of the moment it was measured. On a machine whose speed
moves (a shared virtual machine: the two-host rehearsal's two 'hosts' share two cores whose share
of the physical host changed by 15-35% between a calibration and the layouts run minutes later,
benchmarks/two_hosts.py runs 9 and 10), a prediction from those rates tests the clock of the
calibration as much as the cost model. This re-measures, on every rank at once and with the
calibration's own code (measure.Rank) and window, three of its items -- the largest fp32 GEMM,
the largest streaming copy and the single-layer training step at the largest probe size -- and
returns the median over the three of (cost now / cost at calibration), each costed over the
ranks as the calibration costs it (analyse.item_cost). `at_speed` divides the rates the ranks'
processors set by it. Nothing is fitted: the factor is a measurement, taken beside a run, of the
same items the profile was fitted to.
"""
from __future__ import annotations

import dataclasses
import json
from statistics import median


def probe_items(plan: list) -> list:
    """[(index in the calibration plan, item)]: the largest fp32 GEMM, the largest copy and the
    one-layer training step without TP at the largest hidden size the calibration probed."""
    def pick(pred, size):
        cands = [(size(it), i) for i, it in enumerate(plan) if pred(it)]
        return max(cands)[1] if cands else None
    picks = (pick(lambda it: it["kind"] == "gemm" and it["dtype"] == "float32",
                  lambda it: it["m"] * it["n"] * it["k"]),
             pick(lambda it: it["kind"] == "memory" and it["op"] == "copy", lambda it: it["bytes"]),
             pick(lambda it: it["kind"] == "overhead" and it.get("tp", 1) == 1 and it["layers"] == 1,
                  lambda it: it.get("hidden", 0) * it.get("seq", 16)))
    return [(i, plan[i]) for i in picks if i is not None]


def load_points(profile_path: str) -> dict:
    from .command import points_path
    return json.loads(points_path(profile_path).read_text())


def measure_speed(points: dict, device) -> tuple | None:
    """Every rank calls this at once (it runs collectives). Rank 0 gets (the machine's speed
    factor now against the calibration, > 1: slower now; {item kind: its ratio}), the others None."""
    import torch.distributed as dist
    from .measure import Rank
    items = probe_items(points["plan"])
    prov = points["provenance"]
    rank = Rank(device, float(prov.get("window") or (0.15 if prov.get("quick") else 0.4)))   # command.run's default
    now = [{k: v for k, v in rank.run(it).items() if k in ("seconds", "cpu_s")} for _, it in items]
    got = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(now, got, dst=0)
    if dist.get_rank() != 0:
        return None
    ratios = speed_ratios(points, items, got)
    return median(ratios), {it["kind"]: r for (_, it), r in zip(items, ratios)}


def speed_ratios(points: dict, items: list, now_per_rank: list) -> list:
    """Per item: its cost now over its cost at calibration, each over every rank as the
    calibration costs an item (analyse.item_cost: CPU seconds x ranks per core on shared cores,
    where a rank's wall clock depends on when the others stop; else the median wall time)."""
    from .analyse import item_cost, shared_by
    shared = shared_by(points["provenance"])
    cal = points["results"]
    return [item_cost([now[j] for now in now_per_rank], shared)[0] / item_cost([rk[i] for rk in cal], shared)[0]
            for j, (i, _) in enumerate(items)]


def at_speed(cluster, factor: float, fixed_levels=()):
    """The profile as the machine runs `factor` times slower (< 1: faster): the peaks, the memory
    bandwidth, the host overheads and every network level not named in `fixed_levels` (a link whose
    rate a shaper or a NIC sets, not the ranks' processors) rescaled; nothing else changes."""
    g, e = cluster.gpu, cluster.efficiency

    def slower(v):
        return None if v is None else v * factor
    gpu = dataclasses.replace(g, peak_flops={k: v / factor for k, v in g.peak_flops.items()},
                              hbm_bandwidth=g.hbm_bandwidth / factor)
    eff = dataclasses.replace(e, kernel_overhead=slower(e.kernel_overhead), step_overhead=slower(e.step_overhead),
                              tp_layer_overhead=slower(e.tp_layer_overhead))
    levels = tuple(lv if lv.name in fixed_levels else dataclasses.replace(
        lv, bandwidth=lv.bandwidth / factor, latency=lv.latency * factor,
        fits=tuple((op, lat * factor, bw / factor) for op, lat, bw in lv.fits)) for lv in cluster.levels)
    return dataclasses.replace(cluster, gpu=gpu, efficiency=eff, levels=levels)
