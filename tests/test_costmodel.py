"""Invariants of the vectorized cost model (hypothesis property tests)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner.costmodel import MEMORY_TERMS, TIME_TERMS, evaluate
from planner.hardware import load_hardware
from planner.layout import Candidates, Layout
from planner.model_io import load_model

H100 = load_hardware("h100-sxm")
MODELS = {n: load_model(n) for n in ("gpt-20b", "llama-3-8b", "mixtral-8x7b", "deepseek-v3")}


def layouts(draw, model_name):
    m = MODELS[model_name]
    pow2 = st.sampled_from([1, 2, 4, 8])
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if m.heads % t == 0 and (m.mla or m.kv_heads % t == 0)]))
    pp = draw(st.sampled_from([p for p in (1, 2, 4) if m.layers % p == 0] or [1]))
    cp = draw(st.sampled_from([1, 2]))
    dp = draw(pow2)
    ep = draw(st.sampled_from([e for e in (1, 2, 4, 8) if m.moe and m.moe.experts % e == 0 and (tp * cp * dp) % e == 0] or [1]))
    mb = draw(st.sampled_from([1, 2]))
    nmb = draw(st.sampled_from([1, 2, 4, 8]))
    return Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, micro_batch=mb, global_batch=mb * dp * nmb, seq_len=4096,
                  sp=draw(st.booleans()) and tp > 1, recompute=draw(st.sampled_from(["none", "selective", "full"])),
                  zero=draw(st.sampled_from([0, 1, 2, 3])), precision=draw(st.sampled_from(["bf16", "fp8"])))


@st.composite
def model_and_layout(draw):
    name = draw(st.sampled_from(sorted(MODELS)))
    return name, layouts(draw, name)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_and_layout())
def test_terms_finite_and_non_negative(ml):
    name, L = ml
    ev = evaluate(MODELS[name], H100, L.to_candidates())
    for k in TIME_TERMS:
        v = ev[f"time_{k}_s"][0]
        assert np.isfinite(v) and v >= 0, (k, v)
    for k in MEMORY_TERMS:
        v = ev[f"mem_{k}_bytes"][0]
        assert np.isfinite(v) and v >= 0, (k, v)
    assert ev["step_time_s"][0] > 0 and 0 < ev["mfu"][0] < 1


@settings(max_examples=100, deadline=None)
@given(model_and_layout(), model_and_layout())
def test_flops_per_step_do_not_depend_on_layout_apart_from_recompute(a, b):
    """Total hardware FLOPs per step, summed from the per-GPU split, are the same for any two
    layouts of the same model and batch (recompute FLOPs removed)."""
    name = a[0]
    la = a[1]
    lb = layouts_like(b[1], MODELS[name], la)
    m = MODELS[name]
    ea = evaluate(m, H100, la.to_candidates())
    eb = evaluate(m, H100, lb.to_candidates())
    fa = ea["hardware_flops_step"][0] - ea["recompute_flops_step"][0]
    fb = eb["hardware_flops_step"][0] - eb["recompute_flops_step"][0]
    assert fa == pytest.approx(fb, rel=1e-9)


def layouts_like(other, m, ref):
    """A second valid layout of the same global batch, reusing `other`'s degrees where valid."""
    tp = other.tp if (m.heads % other.tp == 0 and (m.mla or m.kv_heads % other.tp == 0)) else 1
    pp = other.pp if m.layers % other.pp == 0 else 1
    dp = 1
    ep = other.ep if (m.moe and m.moe.experts % other.ep == 0 and (tp * other.cp * dp) % other.ep == 0) else 1
    return Layout(tp=tp, pp=pp, dp=dp, cp=other.cp, ep=ep, micro_batch=1, global_batch=ref.global_batch * ref.micro_batch // ref.micro_batch,
                  seq_len=ref.seq_len, sp=other.sp and tp > 1, recompute=other.recompute, zero=other.zero)


def _mem(m, **kw):
    base = dict(tp=1, pp=1, dp=8, cp=1, micro_batch=1, global_batch=64, seq_len=4096, zero=0, recompute="none")
    base.update(kw)
    return evaluate(m, H100, Layout(**base).to_candidates())["memory_bytes"][0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_memory_does_not_grow_with_tp_or_zero(name):
    m = MODELS[name]
    tps = [t for t in (1, 2, 4, 8) if m.heads % t == 0 and (m.mla or m.kv_heads % t == 0)]
    for sp in (False, True):
        mems = [_mem(m, tp=t, dp=8 // t, sp=sp and t > 1) for t in tps]
        # hold dp fixed to isolate tp: same dp, more GPUs
        mems_fixed_dp = [_mem(m, tp=t, dp=8, sp=sp and t > 1) for t in tps]
        assert all(x >= y - 1 for x, y in zip(mems_fixed_dp, mems_fixed_dp[1:])), mems_fixed_dp
    zs = [_mem(m, zero=z) for z in (0, 1, 2, 3)]
    assert all(x >= y for x, y in zip(zs, zs[1:])), zs


@settings(max_examples=60, deadline=None)
@given(model_and_layout(), st.sampled_from([1, 2, 4]))
def test_memory_does_not_grow_with_pp(ml, factor):
    name, L = ml
    m = MODELS[name]
    pp2 = L.pp * factor
    if m.layers % pp2:
        return
    a = evaluate(m, H100, L.to_candidates())["memory_bytes"][0]
    import dataclasses
    b = evaluate(m, H100, dataclasses.replace(L, pp=pp2).to_candidates())["memory_bytes"][0]
    assert b <= a * 1.0001


def test_vectorized_equals_one_at_a_time():
    m = MODELS["mixtral-8x7b"]
    ls = [Layout(tp=2, pp=2, dp=4, ep=4, global_batch=64, micro_batch=2, sp=True, zero=1),
          Layout(tp=1, pp=4, dp=2, cp=2, ep=2, global_batch=64, vpp=2, schedule="interleaved", recompute="full"),
          Layout(tp=4, pp=1, dp=4, ep=8, etp=4, global_batch=64, zero=3, precision="fp8")]
    together = evaluate(m, H100, Candidates.from_layouts(ls))
    for i, L in enumerate(ls):
        alone = evaluate(m, H100, L.to_candidates())
        for k in ("step_time_s", "memory_bytes", "hardware_flops_step"):
            assert together[k][i] == pytest.approx(alone[k][0], rel=1e-12)
