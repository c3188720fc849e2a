"""validate/calibrate/speed.py: which calibration items are re-measured, the speed factor from
them, and the profile rescaled by it (processor-set rates only; a named link stays)."""
from __future__ import annotations

import dataclasses
from statistics import median

import pytest

from planner.layout import Layout
from planner.model_spec import ModelSpec
from planner.profiles import load_hardware
from validate.calibrate.measure import build_plan
from validate.calibrate.predict import predict
from validate.calibrate.speed import at_speed, probe_items, speed_ratios


def test_probe_items_are_the_largest_gemm_copy_and_one_layer_step():
    plan = build_plan(world=2, local=2, device="cpu", quick=False)
    got = [it for _, it in probe_items(plan)]
    gemms = [it for it in plan if it["kind"] == "gemm" and it["dtype"] == "float32"]
    assert got[0] == max(gemms, key=lambda it: it["m"] * it["n"] * it["k"])
    assert got[1]["kind"] == "memory" and got[1]["op"] == "copy"
    assert got[1]["bytes"] == max(it["bytes"] for it in plan if it["kind"] == "memory")
    assert got[2]["kind"] == "overhead" and got[2]["layers"] == 1 and got[2].get("tp", 1) == 1
    assert got[2].get("hidden") == max(it.get("hidden", 0) for it in plan if it["kind"] == "overhead")


def _points(seconds_per_rank, cores=4):
    plan = [{"kind": "gemm"}, {"kind": "memory"}, {"kind": "overhead"}]
    prov = {"device_type": "cpu", "cpu_cores": cores, "ranks_per_machine": len(seconds_per_rank)}
    return {"plan": plan, "provenance": prov,
            "results": [[{"seconds": s, "cpu_s": s / 2} for s in row] for row in seconds_per_rank]}


def test_speed_ratios_are_ratios_of_the_calibrations_item_costs():
    pts = _points([[1.0, 2.0, 4.0], [3.0, 2.0, 4.0]])           # a rank per core: median wall 2, 2, 4
    items = list(enumerate(pts["plan"]))
    now = [[{"seconds": s, "cpu_s": 9.0} for s in (2.6, 2.6, 5.2)]] * 2
    assert speed_ratios(pts, items, now) == pytest.approx([1.3, 1.3, 1.3])
    # one item disturbed (x3) does not move the median
    now = [[{"seconds": s, "cpu_s": 9.0} for s in (6.0, 2.6, 5.2)]] * 2
    assert median(speed_ratios(pts, items, now)) == pytest.approx(1.3)
    # ranks sharing cores (2 ranks on 1 core): CPU seconds, whatever the wall clock says
    pts = _points([[1.0, 2.0, 4.0], [3.0, 2.0, 4.0]], cores=1)   # cpu 0.5/1.5, 1, 2: means 1, 1, 2
    now = [[{"seconds": 99.0, "cpu_s": c} for c in (1.5, 1.5, 3.0)]] * 2
    assert speed_ratios(pts, items, now) == pytest.approx([1.5, 1.5, 1.5])


def test_at_speed_scales_processor_rates_and_keeps_a_named_link():
    cl = load_hardware("h100-sxm")
    cl = dataclasses.replace(cl, efficiency=dataclasses.replace(cl.efficiency, kernel_overhead=5e-6,
                                                                step_overhead=1e-3))
    spec = ModelSpec(name="t", layers=4, hidden=1024, heads=8, kv_heads=8, ffn_hidden=4096, vocab=32000)
    lay = Layout(tp=8, dp=2, micro_batch=1, global_batch=16, seq_len=2048)
    def evaluate_layout(spec, cl, lay):      # as validate predicts a run (eager stack, host overheads)
        return predict(spec, lay, cl)[0]
    base = evaluate_layout(spec, cl, lay)
    inner, outer = cl.levels[0].name, cl.levels[-1].name
    twice = evaluate_layout(spec, at_speed(cl, 2.0), lay)
    for k in ("compute", "tp_comm", "dp_comm", "overhead"):
        assert twice.time_breakdown_s[k] == pytest.approx(2 * base.time_breakdown_s[k], rel=1e-9), k
    kept = at_speed(cl, 2.0, fixed_levels=(inner, outer))
    assert kept.levels == cl.levels
    held = evaluate_layout(spec, kept, lay)
    assert held.time_breakdown_s["compute"] == pytest.approx(2 * base.time_breakdown_s["compute"], rel=1e-9)
    assert held.time_breakdown_s["dp_comm"] == pytest.approx(base.time_breakdown_s["dp_comm"], rel=1e-9)
    assert at_speed(cl, 1.0) == cl
