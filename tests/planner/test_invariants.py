"""Invariant properties of the model (issue 7), beyond tests/test_costmodel.py: there, four models
on H100 with hand-built layouts; here, layouts drawn from the planner's own candidate generator
(every schedule, virtual and uneven stages, expert TP, CP variants, HSDP, precisions), every
hardware profile and stack, overlap switches and MoE skew.

- every reported time and memory term is finite and non-negative;
- hardware FLOPs per step, recompute apart, do not depend on the layout, the GPU count or the
  hardware;
- bytes sent equal bytes received across each collective (tests/planner/traffic_sim.py plays the
  ring and pairwise algorithms; the cost model's volume terms and planner/step.py's per-rank
  collectives are held against it);
- memory per GPU does not increase with TP, PP or the ZeRO stage;
- every layout a search reports as feasible fits in its profile's HBM.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from planner import collectives as C
from planner.candidates import iter_candidates
from planner.costmodel import MEMORY_TERMS, TIME_TERMS, evaluate
from planner.engine import default_global_batch, evaluate_layout, search
from planner.profiles import list_hardware, load_hardware
from planner.layout import Candidates, Layout
from planner.model_io import load_model
from planner.rules import Context
from planner.stacks import STACKS
from planner.step import predict as step_predict
from tests.planner import traffic_sim as traffic

PROFILES = {n: load_hardware(n) for n in list_hardware()}
MODELS = {n: load_model(n) for n in ("gpt-175b", "llama-3.1-405b", "mixtral-8x22b", "qwen3-30b-a3b",
                                     "gpt-oss-120b", "nemotron-4-340b", "mpt-7b", "deepseek-v3", "gpt-1.7b")}
RNG_SEED = 20261123


def sample_candidates(model, cluster, gpus, n, seed, fixed=None, overlap=None, seq_len=None, global_batch=None,
                      stack="torchtitan"):
    """`n` layouts drawn at random (fixed seed) from every valid layout the search would score for
    `stack` (torchtitan runs the most schedules: 1F1B, interleaved, ZB-V)."""
    seq = seq_len or model.seq_len or 4096
    gb = global_batch or default_global_batch(seq, gpus)
    precs = tuple(p for p in ("bf16", "fp8", "fp16") if p in cluster.gpu.peak_flops)
    fx = {"precision": list(precs), **(fixed or {})}
    ctx = Context(model, gpus, seq, gb, STACKS[stack], precs, cluster.name)
    rng = np.random.default_rng(seed)
    parts, seen = [], 0
    for c in iter_candidates(ctx, fx, overlap or {}):
        # up to n from each chunk, then n of those, each weighted by its chunk's size
        idx = rng.choice(len(c), size=min(n, len(c)), replace=False)
        parts.append((c.take(idx), np.full(len(idx), len(c) / len(idx))))
        seen += len(c)
    cols = {k: np.concatenate([p.cols[k] for p, _ in parts]) for k in parts[0][0].cols}
    w = np.concatenate([x for _, x in parts])
    pick = rng.choice(len(w), size=min(n, len(w)), replace=False, p=w / w.sum())
    return Candidates(cols).take(pick)


# ---- finite and non-negative ---------------------------------------------------------------------
CASES = [(hw, m, g) for hw, pairs in {
    "a100-sxm-40gb": [("gpt-1.7b", 16), ("mpt-7b", 64)],
    "a100-sxm-80gb": [("gpt-175b", 256), ("mixtral-8x22b", 64)],
    "h100-sxm": [("gpt-oss-120b", 128), ("qwen3-30b-a3b", 48)],
    "h200-sxm": [("deepseek-v3", 256), ("nemotron-4-340b", 96)],
    "h800-sxm": [("deepseek-v3", 128)],
    "b200": [("llama-3.1-405b", 512), ("qwen3-30b-a3b", 24)],
    "gb200-nvl72": [("llama-3.1-405b", 576), ("mixtral-8x22b", 144)],
    "mi300x": [("gpt-175b", 64), ("gpt-oss-120b", 40)],
}.items() for m, g in pairs]


@pytest.mark.parametrize("hw,model,gpus", CASES, ids=[f"{h}-{m}-{g}" for h, m, g in CASES])
def test_every_term_finite_and_non_negative(hw, model, gpus):
    m, c = MODELS[model], PROFILES[hw]
    rng = np.random.default_rng(RNG_SEED + gpus)
    overlap = {k: bool(rng.integers(2)) for k in ("overlap_tp", "overlap_dp", "overlap_pp", "overlap_ep")}
    cands = sample_candidates(m, c, gpus, 400, RNG_SEED + gpus, overlap=overlap)
    for stack in STACKS.values():
        imb, cf = (float(rng.uniform(1, 2)), float(rng.choice([0.0, 1.25]))) if m.moe else (1.0, 0.0)
        ev = evaluate(m, c, cands, stack, imb, cf)
        for k in TIME_TERMS:
            v = getattr(ev.detail.time, k)
            assert np.all(np.isfinite(v)) and np.all(v >= 0), (stack.name, k, v.min())
        for k in MEMORY_TERMS:
            v = getattr(ev.detail.memory, k)
            assert np.all(np.isfinite(v)) and np.all(v >= 0), (stack.name, k, v.min())
        for k in ("step_time_s", "tokens_per_s_per_gpu", "mfu", "hfu", "model_flops_step", "hardware_flops_step",
                  "memory_bytes"):
            v = getattr(ev, k) if hasattr(ev, k) else getattr(ev.detail, k)
            assert np.all(np.isfinite(v)) and np.all(v > 0), (stack.name, k)
        assert np.all(ev.detail.recompute_flops_step >= 0) and np.all(ev.detail.mfu < 1)
        np.testing.assert_allclose(sum(getattr(ev.detail.time, k) for k in TIME_TERMS), ev.step_time_s, rtol=1e-9)
        np.testing.assert_allclose(sum(getattr(ev.detail.memory, k) for k in MEMORY_TERMS), ev.memory_bytes, rtol=1e-9)
        # the ranking pass (detail=False) agrees with the detailed one
        fast = evaluate(m, c, cands, stack, imb, cf, detail=False)
        np.testing.assert_allclose(fast.step_time_s, ev.step_time_s, rtol=1e-9)
        np.testing.assert_allclose(fast.memory_bytes, ev.memory_bytes, rtol=1e-9)


# ---- FLOPs do not depend on the layout -----------------------------------------------------------
@pytest.mark.parametrize("model", ["gpt-oss-120b", "qwen3-30b-a3b", "nemotron-4-340b", "mpt-7b"])
def test_flops_per_step_independent_of_layout_gpus_and_hardware(model):
    """Same model, global batch and sequence: every layout on 8, 16 or 64 GPUs of every profile
    (schedules, virtual and uneven stages, expert TP, CP variants included) does the same
    hardware FLOPs per step once recompute is taken out."""
    m = MODELS[model]
    seq, gb = 4096, 64
    totals = []
    for i, (hw, c) in enumerate(sorted(PROFILES.items())):
        for gpus in (8, 16, 64):
            cands = sample_candidates(m, c, gpus, 60, RNG_SEED + i, seq_len=seq, global_batch=gb)
            ev = evaluate(m, c, cands, STACKS["megatron-core"])
            totals.append(ev.detail.hardware_flops_step - ev.detail.recompute_flops_step)
            np.testing.assert_allclose(ev.detail.model_flops_step, ev.detail.model_flops_step[0], rtol=1e-12)
    t = np.concatenate(totals)
    np.testing.assert_allclose(t, t[0], rtol=1e-9)


# ---- bytes sent equal bytes received -------------------------------------------------------------
@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(st.sampled_from(sorted(traffic.COLLECTIVES)), st.integers(1, 24),
       st.floats(1.0, 1e12, allow_nan=False, allow_infinity=False))
def test_every_collective_sends_what_it_receives(kind, n, nbytes):
    t = traffic.play(kind, n, nbytes)
    assert sum(t.sent) == pytest.approx(sum(t.received), rel=1e-12)
    # ring and pairwise algorithms are symmetric: each rank sends what it receives
    for s, r in zip(t.sent, t.received):
        assert s == pytest.approx(r, rel=1e-12)
    # the steps the latency terms of collectives.py count: 2(n-1) for all-reduce, n-1 otherwise
    assert t.steps == (0 if n == 1 else (2 if kind == "all_reduce" else 1) * (n - 1))


@pytest.mark.parametrize("hw", sorted(PROFILES))
@pytest.mark.parametrize("n", [2, 3, 4, 8, 16, 64])
def test_cost_model_volumes_are_what_the_algorithms_send(hw, n):
    """The bandwidth terms of collectives.py (time x bus bandwidth, latency removed) are the bytes
    each rank sends in the played algorithm."""
    c = PROFILES[hw]
    S = 3.0e9
    g = C.Group(c, np.array([float(n)]), 1.0)
    coef = g.coefficients()
    for kind, key in (("all_reduce", "ar"), ("all_gather", "ag"), ("reduce_scatter", "rs")):
        a, b = f"a_{key}", f"b_{key}"
        per_rank = traffic.play(kind, n, S).sent
        moved = (coef[a][0] * S + coef[b][0] - coef[b][0]) * g.bw[key][0]
        for x in per_rank:
            assert moved == pytest.approx(x, rel=1e-9), (kind, n)
        t = getattr(g, kind)(S)[0]
        assert (t - coef[b][0]) * g.bw[key][0] == pytest.approx(per_rank[0], rel=1e-9)
    # all-to-all inside one innermost domain: one level, time = sent / level bandwidth + latency
    d0 = c.domain_sizes[0]
    if d0 and n <= d0:
        lv = c.levels[0]
        bw = lv.bandwidth * c.efficiency.network / lv.oversubscription
        if lv.algorithm == "mesh":
            bw = bw / max(lv.domain - 1, 1) * max(n - 1, 1)
        t = float(C.all_to_all(c, S, n, 1))
        assert (t - lv.latency * (n - 1)) * bw == pytest.approx(traffic.play("all_to_all", n, S).sent[0], rel=1e-9)
    # p2p: the message, once
    t = float(C.p2p(c, S, 1)[()]) if np.ndim(C.p2p(c, S, 1)) == 0 else float(C.p2p(c, S, np.array([1.0]))[0])
    assert (t - c.levels[0].latency) * c.levels[0].bandwidth * c.efficiency.network / c.levels[0].oversubscription \
        == pytest.approx(traffic.p2p(S).sent[0], rel=1e-9)


def even_stages(m, L: Layout):
    """`L` with its stage split written as even (first/last 0), or None if it is uneven (the
    generator writes an even split as 0/0, an uneven one explicitly)."""
    even = m.layers // L.pp
    if L.pp == 1 or (m.layers % L.pp == 0 and L.first_stage_layers in (0, even) and L.last_stage_layers in (0, even)):
        return dataclasses.replace(L, first_stage_layers=0, last_stage_layers=0)
    return None


def _group_size(layout: Layout, group: str) -> int:
    return {"tp": layout.tp, "cp": layout.cp, "ep": layout.ep, "dp": layout.dp * layout.cp,
            "edp": layout.tp * layout.cp * layout.dp // layout.ep, "embd": 2}[group]


@pytest.mark.parametrize("model", ["mixtral-8x22b", "qwen3-30b-a3b", "llama-3.1-405b", "mpt-7b"])
def test_predicted_collectives_balance_sent_and_received(model):
    """Every collective planner/step.py predicts for a step, played on its group, moves as many bytes
    out of the group's ranks as into them; the pipeline's and the CP ring's sends over all stages
    equal their receives."""
    m = MODELS[model]
    cands = sample_candidates(m, PROFILES["h100-sxm"], 64, 400, RNG_SEED,
                              fixed={"schedule": ["1f1b", "interleaved"], "etp": 1})
    played = 0
    for i in range(len(cands)):
        L = even_stages(m, cands.layout(i))
        if L is None:
            continue
        stages = step_predict(m, L, STACKS["torchtitan"])
        for pair in (("send", "recv"),):
            for group in ("pp", "cp"):
                out = sum(sc.collectives.get((group, pair[0]), {"bytes": 0})["bytes"] for sc in stages)
                into = sum(sc.collectives.get((group, pair[1]), {"bytes": 0})["bytes"] for sc in stages)
                assert out == pytest.approx(into, rel=1e-12), (L, group)
        for sc in stages:
            for (group, kind), d in sc.collectives.items():
                if kind in ("send", "recv") or not d["calls"]:
                    continue
                n = _group_size(L, group)
                t = traffic.play(kind, n, d["bytes"] / d["calls"])
                assert sum(t.sent) == pytest.approx(sum(t.received), rel=1e-12), (L, group, kind)
                played += 1
        if played > 300:
            break
    assert played > 50


def test_step_zero3_under_interleaving():
    """Found by the test above (with the older per-rank counts): an FSDP unit layout under the
    interleaved schedule."""
    L = Layout(tp=2, sp=True, pp=2, dp=4, vpp=2, schedule="interleaved", zero=3, global_batch=64, seq_len=4096)
    assert step_predict(MODELS["mixtral-8x22b"], L, STACKS["torchtitan"])


# ---- memory per GPU does not increase with TP, PP or ZeRO ----------------------------------------
MONO_CASES = [("a100-sxm-80gb", "gpt-175b", 256), ("b200", "mixtral-8x22b", 64), ("mi300x", "qwen3-30b-a3b", 32),
              ("gb200-nvl72", "llama-3.1-405b", 288), ("h200-sxm", "nemotron-4-340b", 128)]


def _mem(m, c, layouts, stack):
    return evaluate(m, c, Candidates.from_layouts(layouts), stack).memory_bytes


def _shards(L: Layout):
    """(dense, expert) ZeRO shard group sizes, as costmodel.py forms them."""
    dense = min(L.shard_group, L.dp * L.cp) if L.shard_group else L.dp * L.cp
    return dense, min(dense, L.tp * L.cp * L.dp // (L.ep * L.etp))


def monotone_pairs(m, layouts):
    """(layout, the same with one knob raised, knob) for TP x2, PP x2 and ZeRO +1, where the
    invariant holds physically:
    - PP: with the micro-batches in flight held (global batch = dp x micro-batch x pp, so 1F1B's
      first stage keeps pp of them either way). With more in flight the first stage keeps more
      copies of the embedding output (Korthikanti et al. 2022 sec. 4.3: p in-flight micro-batches),
      which can outgrow the weights it sheds -- real, not a fault.
    - ZeRO 2 -> 3: FSDP holds two gathered layers beside its shard, which costs more than it saves
      when 2 / (layers per stage) > 1 - 1/shard: real too (e.g. 3 layers per stage, shard of 2).
      A shard group of one rank gathers nothing.
    - Not PP from a layout that offloads activations: offloading runs with pp 1 only (Megatron-Core),
      so a second stage would bring them back to the GPU."""
    attn = m.heads if m.mla else m.kv_heads
    out = []
    for L in layouts:
        if m.heads % (2 * L.tp) == 0 and attn % (2 * L.tp) == 0 and L.etp == 1:
            out.append((L, dataclasses.replace(L, tp=2 * L.tp), "tp"))
        if m.layers % (2 * L.pp) == 0 and not L.offload_layers:
            held = dataclasses.replace(L, global_batch=L.dp * L.micro_batch * L.pp)
            out.append((held, dataclasses.replace(held, pp=2 * L.pp), "pp"))
        sd, se = _shards(L)
        per_stage = m.layers / L.pp
        if L.zero < 2 or (L.zero == 2 and all(g == 1 or 2 / per_stage <= 1 - 1 / g for g in (sd, se))):
            out.append((L, dataclasses.replace(L, zero=L.zero + 1), "zero"))
    return out


@pytest.mark.parametrize("hw,model,gpus", MONO_CASES, ids=[f"{h}-{m}" for h, m, _ in MONO_CASES])
def test_memory_does_not_increase_with_tp_pp_or_zero(hw, model, gpus):
    m, c = MODELS[model], PROFILES[hw]
    cands = sample_candidates(m, c, gpus, 300, RNG_SEED, fixed={"schedule": "1f1b"}, stack="megatron-core")
    base = [L for L in (even_stages(m, cands.layout(i)) for i in range(len(cands))) if L is not None]
    pairs = monotone_pairs(m, base)
    assert {k for *_, k in pairs} == {"tp", "pp", "zero"} and len(pairs) > 200
    for stack in (STACKS["megatron-core"], STACKS["torchtitan"]):
        # torchtitan's FSDP2 under a pipeline holds the stage's weights gathered and its
        # gradients unsharded in fp32 (stacks.fsdp_pp_unsharded), and its TP makes a full-vocab
        # embedding gradient (tp_embedding_grad_bytes): raising PP over ZeRO-3 or ZeRO to 3
        # under PP, or TP from 1,
        # can cost memory there -- real, not a fault
        staged = lambda p: p[1].zero == 3 and p[1].pp > 1 and p[2] in ("pp", "zero")  # noqa: E731
        ps = [p for p in pairs if not (stack.fsdp_pp_unsharded and staged(p))
              and not (stack.tp_embedding_grad_bytes and p[2] == "tp" and p[0].tp == 1)]
        a = _mem(m, c, [p[0] for p in ps], stack)
        b = _mem(m, c, [p[1] for p in ps], stack)
        bad = [(p[2], p[0], x, y) for p, x, y in zip(ps, a, b) if y > x * (1 + 1e-9)]
        assert not bad, (stack.name, len(bad), bad[:2])


def test_zero3_group_of_one_adds_no_gathered_layers():
    """Found by the test above: ZeRO-3's two prefetched layers were charged where the shard group
    is one rank (here dp x cp = 1), where nothing is gathered."""
    m, c = MODELS["qwen3-30b-a3b"], PROFILES["mi300x"]
    L = Layout(tp=2, pp=16, dp=1, ep=2, micro_batch=2, global_batch=1024, seq_len=4096, zero=2)
    a, b = _mem(m, c, [L, dataclasses.replace(L, zero=3)], STACKS["megatron-core"])
    assert b <= a


# ---- a feasible layout fits --------------------------------------------------------------------
SEARCHES = [("gpt-20b", "a100-sxm-40gb", 16, {}), ("llama-3-70b", "h100-sxm", 64, {}),
            ("qwen3-30b-a3b", "b200", 32, {}), ("mixtral-8x7b", "mi300x", 16, {"recompute": "none"}),
            ("llama-3.1-405b", "gb200-nvl72", 144, {"tp": 8}), ("gpt-oss-120b", "h200-sxm", (16, 64), {})]


@pytest.mark.parametrize("model,hw,gpus,fixed", SEARCHES, ids=[f"{m}-{h}-{g}" for m, h, g, _ in SEARCHES])
def test_feasible_layouts_fit_in_hbm(model, hw, gpus, fixed):
    m, c = load_model(model), PROFILES[hw]
    res = search(m, c, gpus, top=40, fixed=dict(fixed), tokens=1e12)
    hbm = c.gpu.hbm_bytes / 2 ** 30
    assert res.plans, "expected feasible layouts"
    for p in res.plans + res.pareto:
        # fits, or is tight: over HBM by less than the stack's memory uncertainty, and said so
        assert p.feasible and p.hbm_gib == pytest.approx(hbm)
        assert p.memory_gib <= p.hbm_gib if p.fit == "yes" else p.memory_gib <= p.hbm_gib * 1.1 and p.fit == "tight"
        assert sum(p.memory_breakdown_gib.values()) == pytest.approx(p.memory_gib, rel=1e-9)
    # the search's figures are the layout's own: predicting it alone gives the same memory
    for p in res.plans[:10]:
        assert evaluate_layout(m, c, p.layout).memory_gib == pytest.approx(p.memory_gib, rel=1e-9)
    if res.closest_infeasible is not None:
        assert res.closest_infeasible.memory_gib > hbm
