"""The search: brute-force equivalence, objectives, ranges, Pareto front, fixed knobs."""
import dataclasses
import itertools

import numpy as np
import pytest

from planner.errors import PlannerError

from planner.costmodel import evaluate
from planner.engine import evaluate_layout, gpu_counts, pareto_mask, search
from planner.profiles import load_hardware
from planner.layout import Candidates, Layout
from planner.model_io import load_model

H100 = load_hardware("h100-sxm")


def brute_force_best(model, gpus, seq, gb, precision="bf16"):
    """Every layout by plain nested loops (independent of planner/candidates.py), evaluated in one
    batch (test_costmodel.py holds a batch equal to one layout at a time)."""
    L = model.layers
    layouts = []
    divs = [d for d in range(1, gpus + 1) if gpus % d == 0]
    for tp, pp, cp in itertools.product(divs, divs, divs):
        if gpus % (tp * pp * cp) or model.heads % tp or model.kv_heads % tp or pp > L:
            continue
        if cp > 1 and seq % (2 * cp):
            continue
        dp = gpus // (tp * pp * cp)
        splits = []
        if pp == 1:
            splits = [(0, 0)]
        else:
            if L % pp == 0:
                splits.append((L // pp, L // pp))
            if (L + 2) % pp == 0 and (L + 2) // pp > 1:
                splits.append(((L + 2) // pp - 1, (L + 2) // pp - 1))
            if (L + 1) % pp == 0 and (L + 1) // pp > 1:
                splits.append(((L + 1) // pp, (L + 1) // pp - 1))
        for mb in (1, 2, 4, 8, 16, 32):
            if gb % (dp * mb):
                continue
            nmb = gb // (dp * mb)
            for (fl, ll), sp, rec, zero, vpp in itertools.product(
                    splits, (False, True), ("none", "selective", "full"), (0, 1, 2, 3), (1, 2, 3, 4, 6, 8)):
                if sp and tp == 1:
                    continue
                mid = (L - fl - ll) // (pp - 2) if pp > 2 else (fl if pp == 2 else L)
                if pp > 2 and ((L - fl - ll) % (pp - 2) or mid < 1):
                    continue
                if vpp > 1 and (pp == 1 or mid % vpp or nmb % pp):
                    continue
                sched = "interleaved" if vpp > 1 else "1f1b"
                lay = Layout(tp=tp, pp=pp, dp=dp, cp=cp, vpp=vpp, sp=sp, micro_batch=mb, global_batch=gb,
                             seq_len=seq, recompute=rec, zero=zero, precision=precision, schedule=sched,
                             first_stage_layers=fl, last_stage_layers=ll)
                layouts.append(lay)
    ev = evaluate(model, H100, Candidates.from_layouts(layouts))
    score = np.where(ev.feasible, ev.tokens_per_s_per_gpu, -1.0)
    i = int(np.argmax(score))
    return float(score[i]), layouts[i]


def test_vectorized_search_matches_brute_force():
    model = load_model("gpt-1.7b")
    gpus, seq, gb = 8, 2048, 32      # every knob still varies
    bf_score, bf_layout = brute_force_best(model, gpus, seq, gb)
    res = search(model, H100, gpus, seq_len=seq, global_batch=gb, precisions=["bf16"],
                 fixed={"schedule": ["1f1b", "interleaved"]}, top=1)
    assert res.best.tokens_per_s_per_gpu == pytest.approx(bf_score, rel=1e-9)
    assert res.best.layout.tp == bf_layout.tp and res.best.layout.pp == bf_layout.pp


@pytest.mark.parametrize("objective", ["throughput", "cost", "time"])
def test_time_and_cost_consistent_with_tokens_per_s(objective):
    model = load_model("llama-3-8b")
    tokens = 1e12
    res = search(model, H100, (16, 128), tokens=tokens, objective=objective, top=20, price=2.0)
    for p in res.plans:
        assert p.time_to_train_s == pytest.approx(tokens / (p.tokens_per_s_per_gpu * p.gpus))
        assert p.cost_usd == pytest.approx(p.time_to_train_s / 3600 * p.gpus * 2.0)
    key = {"throughput": lambda p: -p.tokens_per_s_per_gpu, "cost": lambda p: p.cost_usd,
           "time": lambda p: p.time_to_train_s}[objective]
    vals = [key(p) for p in res.plans]
    assert vals == sorted(vals)
    if objective == "time":
        assert res.best.gpus == 128          # more GPUs finish sooner
    assert len({p.gpus for p in res.pareto}) >= 2   # the front trades time against cost


def test_gpu_range_counts():
    assert gpu_counts((1024, 32768), H100) == [1024, 2048, 4096, 8192, 16384, 32768]
    nvl = load_hardware("gb200-nvl72")
    assert 72 * 4 in gpu_counts((256, 600), nvl) and 256 in gpu_counts((256, 600), nvl)


def test_pareto_mask_basic():
    pts = np.array([[1, 5, 1], [2, 4, 1], [3, 6, 2], [1, 5, 1]], float)
    assert pareto_mask(pts).tolist() == [True, True, False, True]


def test_pareto_frame_front_is_non_dominated():
    res = search(load_model("llama-3-8b"), H100, 64, top=3)
    df = res.pareto_frame()
    assert len(df) >= 2
    t, m = df["step_time_s"].to_numpy(), df["memory_gib"].to_numpy()
    assert np.all(np.diff(t) >= 0) and np.all(np.diff(m) < 0)   # faster costs memory


def test_fixed_knobs_held_and_uneven_stages_searched():
    m = load_model("llama-3.1-405b")          # 126 layers: pp 8 needs an uneven split
    res = search(m, H100, 512, fixed={"tp": 8, "pp": 8}, top=5)
    assert res.plans and all(p.layout.tp == 8 and p.layout.pp == 8 for p in res.plans)
    for p in res.plans:
        L = p.layout
        mid = (126 - L.first_stage_layers - L.last_stage_layers) / 6
        assert mid == int(mid) and L.first_stage_layers <= mid and L.last_stage_layers <= mid


def test_hsdp_shard_group_reduces_dp_traffic_and_costs_memory():
    """HSDP keeps the per-micro-batch gathers inside the node and costs optimizer memory. Where a
    node-spanning ring runs over one NIC (Stack.pooled_nics off) that saves DP time; where NCCL's
    channels drive every NIC of the node (pooled), the node-spanning ring is about as fast as NVLink
    and the replica all-reduce makes HSDP no faster (what its hidden traffic costs,
    Efficiency.overlap_slowdown, shows it)."""
    import dataclasses
    from planner.stacks import STACKS
    m = load_model("llama-3-70b")
    base = dict(tp=1, pp=1, dp=256, micro_batch=1, global_batch=256, seq_len=8192, zero=3, recompute="full")
    one_nic = dataclasses.replace(STACKS["megatron-core"], pooled_nics=False)
    full = evaluate_layout(m, H100, Layout(**base), stack=one_nic)
    hsdp = evaluate_layout(m, H100, Layout(**base, shard_group=8), stack=one_nic)
    assert hsdp.memory_breakdown_gib["optimizer"] > full.memory_breakdown_gib["optimizer"]
    assert hsdp.time_breakdown_s["dp_comm"] < full.time_breakdown_s["dp_comm"]
    assert hsdp.step_time_s < full.step_time_s
    pooled_full, pooled_hsdp = evaluate_layout(m, H100, Layout(**base)), evaluate_layout(m, H100, Layout(**base, shard_group=8))
    assert pooled_full.time_breakdown_s["dp_comm"] < full.time_breakdown_s["dp_comm"]
    assert pooled_hsdp.step_time_s >= pooled_full.step_time_s


def test_no_overlap_switches_are_honoured():
    m = load_model("llama-3-70b")
    # interleaved: the schedule whose steady-state sends Megatron overlaps (--overlap-p2p-communication)
    lay = dict(tp=8, pp=4, vpp=2, dp=8, micro_batch=1, global_batch=256, seq_len=8192, sp=True, zero=1)
    on = evaluate_layout(m, H100, Layout(**lay))
    for k, term in (("overlap_tp", "tp_comm"), ("overlap_dp", "dp_comm"), ("overlap_pp", "pp_comm")):
        off = evaluate_layout(m, H100, Layout(**lay, **{k: False}))
        assert off.time_breakdown_s[term] > on.time_breakdown_s[term], k


def test_cp_variants_differ_and_imbalance_slows_moe():
    m = load_model("llama-3-8b")
    base = dict(tp=1, cp=8, dp=1, micro_batch=1, global_batch=8, seq_len=131072, recompute="full", zero=1)
    t = {v: evaluate_layout(m, H100, Layout(**base, cp_comm=v)).time_breakdown_s["cp_comm"]
         for v in ("p2p", "allgather", "a2a")}
    assert len(set(round(x, 9) for x in t.values())) == 3
    mx = load_model("mixtral-8x7b")
    lay = Layout(tp=1, pp=1, dp=8, ep=8, micro_batch=1, global_batch=64, seq_len=4096, zero=1, recompute="full")
    assert (evaluate_layout(mx, H100, lay, moe_imbalance=1.5).step_time_s
            > evaluate_layout(mx, H100, lay).step_time_s)
    # a capacity factor caps the busiest expert's load (tokens beyond it are dropped)
    assert (evaluate_layout(mx, H100, lay, moe_imbalance=1.5, capacity_factor=1.1).step_time_s
            < evaluate_layout(mx, H100, lay, moe_imbalance=1.5).step_time_s)


def test_every_schedule_a_stack_runs_is_searchable():
    from planner.stacks import STACKS
    m = load_model("llama-3-70b")
    for stack in STACKS.values():
        for sched in stack.schedules:
            res = search(m, H100, 256, fixed={"schedule": sched, "pp": 8}, top=1, stack=stack)
            assert res.best is not None and res.best.layout.schedule == sched, (stack.name, sched)


@pytest.mark.parametrize("sched", ["zb-h1", "dualpipe"])
def test_a_schedule_the_stack_does_not_run_is_a_one_line_error(sched):
    """issue 15: megatron-core runs 1F1B and interleaved only; a fixed schedule it does not run is
    refused, naming what it runs."""
    with pytest.raises(PlannerError, match=f"--schedule {sched} is not run by megatron-core; it runs 1f1b, "
                                           "interleaved"):
        search(load_model("llama-3-70b"), H100, 256, fixed={"schedule": sched, "pp": 8}, top=1)


def test_search_on_ranks_sharing_processors():
    """A profile calibrated on shared CPU cores (gpu.shared_by > 1) ranks layouts with the same
    composition as evaluate_layout: no bubble anywhere, and the fast path agrees with the detail."""
    import dataclasses
    from planner.engine import evaluate_layout, search
    from planner.profiles import load_hardware
    from planner.model_io import load_model
    h = load_hardware("h100-sxm")
    c = dataclasses.replace(h, gpu=dataclasses.replace(h.gpu, shared_by=4.0))
    m = load_model("llama-3-8b")
    res = search(m, c, 16, top=5)
    assert res.plans
    for p in res.plans:
        assert p.time_breakdown_s["bubble"] == 0
        assert evaluate_layout(m, c, p.layout).step_time_s == pytest.approx(p.step_time_s, rel=1e-9)


@pytest.mark.parametrize("recompute", ["selective", "selective:mla_up_proj", "selective:mla_up_proj+mlp",
                                       "selective:moe_act", "selective:layernorm+moe_act"])
def test_search_and_one_layout_agree_on_a_recompute_module_list(recompute):
    """The search (per-row tables gathered at each candidate's recompute code) and one layout
    (by_code over the same rows) price a Megatron-Core module list alike, and the list costs time
    and saves memory against no recompute."""
    m = load_model("deepseek-v3")
    fixed = dict(tp=2, pp=8, dp=64, ep=64, vpp=4, sp=True, micro_batch=1, zero=1, first_stage_layers=7,
                 last_stage_layers=6, recompute=recompute, precision="fp8")
    res = search(m, H100, 1024, seq_len=4096, global_batch=8192, top=1, precisions=["fp8"], fixed=fixed)
    p = res.best or res.closest_infeasible
    one = evaluate_layout(m, H100, p.layout)
    assert p.step_time_s == pytest.approx(one.step_time_s, rel=1e-12)
    assert p.memory_gib == pytest.approx(one.memory_gib, rel=1e-12)
    none = evaluate_layout(m, H100, dataclasses.replace(p.layout, recompute="none"))
    assert one.time_breakdown_s["recompute"] > 0 and one.memory_gib < none.memory_gib
