"""Invariants of the vectorized cost model (hypothesis property tests)."""
import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner.costmodel import MEMORY_TERMS, TIME_TERMS, evaluate
from planner.profiles import load_hardware
from planner.layout import RECOMPUTE, Candidates, Layout, Recompute
from planner.rules import _module_misfit
from planner.model_io import load_model

H100 = load_hardware("h100-sxm")


def _knobs(n, **given):
    """LayerKnobs of n rows (planner.costmodel.knobs): one 8-GPU data-parallel layer in bf16 at 4K
    unless `given` says otherwise (a value for every row, or a list of n)."""
    from planner.costmodel.knobs import LayerKnobs
    from planner.layout import Precision
    cols = dict(tp=1, pp=1, dp=8, cp=1, ep=1, etp=1, micro_batch=1, seq_len=4096, sp=False,
                precision=Precision.BF16, cp_comm=0, overlap_tp=True, overlap_ep=True, shard_group=1)
    cols.update(given)
    return LayerKnobs.of({c: (list(v) if isinstance(v, (list, tuple)) else [v] * n) for c, v in cols.items()})
MODELS = {n: load_model(n) for n in ("gpt-20b", "llama-3-8b", "mixtral-8x7b", "deepseek-v3")}


def _recompute_for(m) -> list:
    """The recompute policies the default stack runs for `m` (rules.recompute_modules_model)."""
    return [r for r in RECOMPUTE if not _module_misfit(Recompute.of(r), m)]


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
                  sp=draw(st.booleans()) and tp > 1, recompute=draw(st.sampled_from(_recompute_for(m))),
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
        v = getattr(ev.detail.time, k)[0]
        assert np.isfinite(v) and v >= 0, (k, v)
    for k in MEMORY_TERMS:
        v = getattr(ev.detail.memory, k)[0]
        assert np.isfinite(v) and v >= 0, (k, v)
    assert ev.step_time_s[0] > 0 and 0 < ev.detail.mfu[0] < 1


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
    fa = ea.detail.hardware_flops_step[0] - ea.detail.recompute_flops_step[0]
    fb = eb.detail.hardware_flops_step[0] - eb.detail.recompute_flops_step[0]
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
    return evaluate(m, H100, Layout(**base).to_candidates()).memory_bytes[0]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_memory_does_not_grow_with_tp_or_zero(name):
    m = MODELS[name]
    tps = [t for t in (1, 2, 4, 8) if m.heads % t == 0 and (m.mla or m.kv_heads % t == 0)]
    for sp in (False, True):
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
    a = evaluate(m, H100, L.to_candidates()).memory_bytes[0]
    import dataclasses
    b = evaluate(m, H100, dataclasses.replace(L, pp=pp2).to_candidates()).memory_bytes[0]
    assert b <= a * 1.0001


def test_vectorized_equals_one_at_a_time():
    m = MODELS["mixtral-8x7b"]
    ls = [Layout(tp=2, pp=2, dp=4, ep=4, global_batch=64, micro_batch=2, sp=True, zero=1),
          Layout(tp=1, pp=4, dp=2, cp=2, ep=2, global_batch=64, vpp=2, schedule="interleaved", recompute="full"),
          Layout(tp=4, pp=1, dp=4, ep=8, etp=4, global_batch=64, zero=3, precision="fp8")]
    together = evaluate(m, H100, Candidates.from_layouts(ls))
    for i, L in enumerate(ls):
        alone = evaluate(m, H100, L.to_candidates())
        for get in (lambda e: e.step_time_s, lambda e: e.memory_bytes, lambda e: e.detail.hardware_flops_step):
            assert get(together)[i] == pytest.approx(get(alone)[0], rel=1e-12)


def _shared(cluster, by=4.0):
    import dataclasses
    return dataclasses.replace(cluster, gpu=dataclasses.replace(cluster.gpu, shared_by=by))


def test_shared_processors_compose_the_step_from_mean_busy_time():
    """Ranks that time-share processors (a CPU calibrated by validate): no bubble, nothing hidden
    by overlap, and the step is the stages' mean busy time, not the slowest stage's."""
    from planner.engine import evaluate_layout
    m = load_model("llama-3-8b")
    own, shared = H100, _shared(H100)
    L = Layout(tp=2, pp=4, dp=2, micro_batch=1, global_batch=16, seq_len=4096, zero=1, sp=True)
    a, b = evaluate_layout(m, own, L), evaluate_layout(m, shared, L)
    assert a.time_breakdown_s["bubble"] > 0 and b.time_breakdown_s["bubble"] == 0
    # same compute on every rank: the mean of the stages is at most the slowest one's
    assert b.time_breakdown_s["compute"] <= a.time_breakdown_s["compute"] + 1e-12
    # overlap switches change nothing when nothing can be hidden
    import dataclasses
    no_ovl = dataclasses.replace(L, overlap_tp=False, overlap_dp=False, overlap_pp=False)
    assert evaluate_layout(m, shared, no_ovl).step_time_s == pytest.approx(b.step_time_s)
    assert evaluate_layout(m, own, no_ovl).step_time_s > a.step_time_s
    # pp > 1: each rank's share of the sends is 2 (pp-1)/pp exchanges per micro-batch
    assert b.time_breakdown_s["pp_comm"] > 0


def test_shared_by_below_one_is_refused():
    import dataclasses
    from planner.errors import PlannerError
    with pytest.raises(PlannerError, match="shared_by"):
        dataclasses.replace(H100.gpu, shared_by=0.5)


def test_optimizer_efficiency_times_the_optimizer_step_alone():
    """A calibrated profile may carry Adam's own fraction of HBM bandwidth (validate calibrate's
    layer probe times the step apart); without it the optimizer runs at the elementwise one."""
    import dataclasses
    from planner.engine import evaluate_layout
    m = load_model("llama-3-8b")
    L = Layout(tp=2, dp=4, micro_batch=1, global_batch=8, seq_len=4096, zero=1)
    base = evaluate_layout(m, H100, L)
    e = H100.efficiency
    half = dataclasses.replace(H100, efficiency=dataclasses.replace(e, optimizer=e.hbm / 2))
    got = evaluate_layout(m, half, L)
    assert got.time_breakdown_s["optimizer"] == pytest.approx(2 * base.time_breakdown_s["optimizer"])
    assert got.time_breakdown_s["compute"] == pytest.approx(base.time_breakdown_s["compute"])


def test_sequence_parallel_pays_its_all_gather_and_reduce_scatter_fits():
    """Under SP each TP all-reduce is an all-gather + a reduce-scatter: with collectives fitted
    apart (a calibrated profile), those fits, not the all-reduce's, time it."""
    import dataclasses
    from planner.engine import evaluate_layout
    m = load_model("llama-3-8b")
    lv = H100.levels[0]
    slow = dataclasses.replace(lv, fits=(("all_gather", lv.latency, lv.bandwidth / 4),
                                         ("reduce_scatter", lv.latency, lv.bandwidth / 4)))
    c = dataclasses.replace(H100, levels=(slow,) + H100.levels[1:])
    L = Layout(tp=8, dp=1, micro_batch=1, global_batch=4, seq_len=4096, zero=1, sp=True, overlap_tp=False)
    no_sp = dataclasses.replace(L, sp=False)
    # bundled profile: the two are the same ring traffic
    assert evaluate_layout(m, H100, L).time_breakdown_s["tp_comm"] == pytest.approx(
        evaluate_layout(m, H100, no_sp).time_breakdown_s["tp_comm"], rel=1e-9)
    # slow all-gather and reduce-scatter fits: SP pays them, the plain all-reduce does not
    assert evaluate_layout(m, c, L).time_breakdown_s["tp_comm"] > 3 * evaluate_layout(m, c, no_sp).time_breakdown_s["tp_comm"]


@pytest.mark.parametrize("name,stack,gpus", [("llama-3-70b", "megatron-core", 256), ("mixtral-8x7b", "torchtitan", 64),
                                             ("deepseek-v3", "megatron-core", 512), ("gpt-1.7b", "deepspeed", 16)])
def test_the_search_peak_is_the_breakdown_total(name, stack, gpus):
    """The search ranks on footprint.rank_total (the base plus the largest moment), the kept plans
    on rank_memory's breakdown: one memory model, so the two totals agree on every candidate."""
    from planner import rules
    from planner.candidates import iter_candidates
    from planner.stacks import STACKS
    m, st = load_model(name), STACKS[stack]
    ctx = rules.context_for(m, Layout(dp=gpus, global_batch=2 * gpus, micro_batch=1, seq_len=4096), st)
    n = 0
    for c in itertools.islice(iter_candidates(ctx, {"gpus": [gpus]}, chunk=20000), 6):
        fast = evaluate(m, H100, c, st, detail=False).memory_bytes
        full = evaluate(m, H100, c, st, detail=True).memory_bytes
        np.testing.assert_allclose(fast, full, rtol=1e-12)
        n += len(fast)
    assert n > 100


@pytest.mark.parametrize("name,stack,gpus", [("llama-3-70b", "megatron-core", 64), ("deepseek-v3", "megatron-core", 256)])
def test_fits_only_times_exactly_the_layouts_that_fit(name, stack, gpus):
    """The search's ranking pass (fits_only) scores memory first and times only the layouts that
    fit or are tight: the same step time as the full pass on those, infinite on the rest, and
    the same memory and feasibility on all."""
    from planner import rules
    from planner.candidates import iter_candidates
    from planner.stacks import STACKS
    m, st = load_model(name), STACKS[stack]
    ctx = rules.context_for(m, Layout(dp=gpus, global_batch=2 * gpus, micro_batch=1, seq_len=4096), st)
    seen = 0
    for c in itertools.islice(iter_candidates(ctx, {"gpus": [gpus]}, chunk=20000), 4):
        full = evaluate(m, H100, c, st, detail=False)
        fast = evaluate(m, H100, c, st, detail=False, fits_only=True)
        np.testing.assert_array_equal(fast.feasible, full.feasible)
        np.testing.assert_allclose(fast.memory_bytes, full.memory_bytes, rtol=1e-12)
        ok = full.feasible
        np.testing.assert_allclose(fast.step_time_s[ok], full.step_time_s[ok], rtol=1e-12)
        assert np.all(np.isinf(fast.step_time_s[~ok])) and np.all(fast.tokens_per_s_per_gpu[~ok] == 0)
        seen += bool(ok.any() and (~ok).any())
    assert seen, "no chunk had both layouts that fit and layouts that do not"


def test_sdpa_attention_is_flash_attention_2_where_the_gpu_gives_it_less():
    """torchtitan calls PyTorch SDPA (FlashAttention-2): on Hopper it is held to the profile's
    sdpa_attention (FlashAttention-2's forward + backward in the FlashAttention-3 paper) while Transformer Engine's kernel reaches
    attention_max; on Ampere, where no cap is given, both reach attention_max."""
    import dataclasses
    from planner.costmodel.compute import attention_efficiency
    from planner.stacks import STACKS
    tt, mc = dataclasses.replace(STACKS["torchtitan"], gemm=1.0), STACKS["megatron-core"]
    e = H100.efficiency
    # Shah et al. 2024 Figs. 5-6, head dim 128, 4k: FA2 forward 368, backward 310 TFLOP/s (backward 2.5x the FLOPs)
    assert e.sdpa_attention == round(3.5 / (1 / 368 + 2.5 / 310) / 989.4, 2) < e.attention_max
    assert attention_efficiency(e, tt) == e.sdpa_attention * tt.attention
    assert attention_efficiency(e, mc) == e.attention_max
    a100 = load_hardware("a100-sxm-80gb").efficiency
    assert a100.sdpa_attention is None and attention_efficiency(a100, tt) == a100.attention_max * tt.attention


def test_records_are_frozen_typed_and_gather_by_candidate():
    """@record (costmodel/records.py): fields in declared order, positional or by name, a class
    default, every field required otherwise, frozen like a frozen dataclass; take/concat/named
    work field by field on the last axis."""
    from dataclasses import FrozenInstanceError
    from planner.costmodel.records import Record, record

    @record
    class R(Record):
        a: np.ndarray
        b: np.ndarray
        c: object = None

    r = R(np.arange(3.0), b=np.arange(3.0) * 10)
    assert r.c is None and list(r.named()) == ["a", "b", "c"]
    assert R(1, 2, 3).c == 3 and "R(a=1, b=2, c=3)" == repr(R(1, 2, 3))
    with pytest.raises(FrozenInstanceError):
        r.a = np.zeros(3)
    with pytest.raises(FrozenInstanceError):
        del r.b
    for bad in (lambda: R(np.zeros(1)), lambda: R(1, 2, 3, 4), lambda: R(1, a=2, b=3), lambda: R(1, 2, d=3)):
        with pytest.raises(TypeError):
            bad()
    t = r.take(np.array([2, 0]))
    assert t.a.tolist() == [2.0, 0.0] and t.b.tolist() == [20.0, 0.0] and t.c is None
    both = R.concat([r, t])
    assert both.a.tolist() == [0.0, 1.0, 2.0, 2.0, 0.0]


def test_deepspeed_gathers_behind_modules_over_max_live_parameters_are_not_prefetched():
    """DeepSpeed prefetches a module's ZeRO-3 parameters during the previous module only while
    fewer than stage3_max_live_parameters (1e9) are gathered: GPT-530B's QKV (1.26e9) and fc1/fc2
    (1.68e9 each) block the prefetch of the module after them; GPT-175B's linears (<= 6.0e8) never do."""
    from planner.costmodel.state import unprefetched
    big, small = load_model("gpt-530b"), load_model("gpt-175b")
    h = big.hidden
    fwd, bwd = unprefetched(big, np.array([1.0]), 1e9)
    # forward: out (behind QKV), fc2 (behind fc1), next QKV (behind fc2); backward: fc1, out, fc2
    assert fwd[0] == pytest.approx((h * h + 4 * h * h + 3 * h * h) / (12 * h * h), rel=1e-3)
    assert bwd[0] == pytest.approx((4 * h * h + h * h + 4 * h * h) / (12 * h * h), rel=1e-3)
    assert unprefetched(small, np.array([1.0]), 1e9)[0][0] == 0.0
    assert unprefetched(big, np.array([8.0]), 1e9)[0][0] == 0.0     # TP shards are small enough
    assert unprefetched(big, np.array([1.0]), float("inf")) == (0.0, 0.0)


def test_unprefetched_gathers_add_to_the_step_without_changing_the_bytes_moved():
    """The same ZeRO-3 traffic, but the part DeepSpeed cannot prefetch is paid in full: the step is
    longer under 'deepspeed' than with the limit lifted, by at most that traffic's time."""
    import dataclasses
    from planner.engine import evaluate_layout
    from planner.stacks import STACKS
    a100 = load_hardware("a100-sxm-80gb")
    m = load_model("gpt-530b")
    L = Layout(dp=640, micro_batch=4, global_batch=2560, seq_len=2048, zero=3, recompute="full", precision="fp16")
    ds = STACKS["deepspeed"]
    lifted = dataclasses.replace(ds, zero3_max_live_params=float("inf"))
    got, free = evaluate_layout(m, a100, L, stack=ds), evaluate_layout(m, a100, L, stack=lifted)
    assert got.time_breakdown_s["compute"] == pytest.approx(free.time_breakdown_s["compute"])
    assert got.time_breakdown_s["dp_comm"] > free.time_breakdown_s["dp_comm"] * 1.5


def test_per_expert_grouped_gemms_launch_a_kernel_per_local_expert(monkeypatch):
    """Transformer Engine's GroupedLinear runs one cuBLAS GEMM per local expert (and under fp8
    one input quantization per expert): an MoE layer's forward pays 2 x (1 + fp8) launches per
    local expert beyond the two grouped GEMMs counted; a one-kernel grouped GEMM pays none (the
    quantizations' bytes: test_te_experts_quantize_their_operands_under_fp8)."""
    import dataclasses
    from planner.costmodel import compute as C
    from planner.costmodel.compute import layer_compute
    monkeypatch.setattr(C, "_expert_fp8_cast_bytes", lambda *a: 0.0)
    from planner.layout import Precision
    from planner.stacks import STACKS
    m = load_model("deepseek-v3")                     # 256 routed experts
    k = _knobs(4, ep=[8, 8, 32, 32], precision=[Precision.BF16, Precision.FP8] * 2)
    te = STACKS["megatron-core"]
    one = dataclasses.replace(te, expert_launches="grouped")
    extra = (layer_compute(m, H100, te, k, np.ones(4)).f_moe - layer_compute(m, H100, one, k, np.ones(4)).f_moe)
    local = 256 / np.array([8, 8, 32, 32])
    np.testing.assert_allclose(extra, (2 * np.array([1, 2, 1, 2]) * local - 2) * te.kernel_overhead_s, rtol=1e-9)
    assert STACKS["torchtitan"].expert_launches == "grouped"       # torch._grouped_mm


def test_a_rank_with_several_experts_sorts_its_received_tokens_both_ways(monkeypatch):
    """Megatron-Core's all-to-all dispatcher sorts the received chunks by local expert after the
    dispatch and unsorts them before the combine (sort_chunks_by_idxs), where a rank holds more than
    one expert: two more copies of every routed token (read + write, 16-bit) and two kernels per MoE
    layer forward; a rank with one expert skips both."""
    from planner.costmodel import compute as C
    from planner.stacks import STACKS
    m = load_model("mixtral-8x7b")                    # 8 experts, top 2
    ep = np.array([8, 4, 2])
    k = _knobs(3, ep=list(ep))
    st = STACKS["megatron-core"]
    got = C.layer_compute(m, H100, st, k, np.ones(3)).f_moe
    monkeypatch.setattr(C, "_sorts", lambda model, k: np.zeros(k.n))
    without = C.layer_compute(m, H100, st, k, np.ones(3)).f_moe
    routed = 4096 * m.moe.top_k
    copies = 2 * routed * m.hidden * 2 * 2 * st.elementwise / (H100.gpu.hbm_bandwidth * H100.efficiency.hbm)
    np.testing.assert_allclose(got - without, np.where(ep < 8, copies + 2 * st.kernel_overhead_s, 0.0),
                               rtol=1e-9, atol=1e-15)


def test_te_experts_quantize_their_operands_under_fp8(monkeypatch):
    """Transformer Engine's GroupedLinear quantizes each expert's input in forward and its output
    gradient in backward, reading 2 B and writing 1 B row-wise and 1 B column-wise per element:
    4 T (K + N) bytes per linear over forward and backward, a third of it in forward. Not in bf16,
    and not on a stack whose experts are one grouped kernel (torchtitan)."""
    from planner.costmodel import compute as C
    from planner.layout import Precision
    from planner.stacks import STACKS
    m = load_model("mixtral-8x7b")                    # 8 experts, top 2, gated (fc1 out = 2 f)
    k = _knobs(2, ep=4, precision=[Precision.BF16, Precision.FP8])
    hbm = H100.gpu.hbm_bandwidth * H100.efficiency.hbm
    # a stack factor on fused elementwise traffic leaves the counted casts alone
    for stk, on in ((dataclasses.replace(STACKS["megatron-core"], elementwise=1.5), True),
                   (STACKS["torchtitan"], False)):
        got = C.layer_compute(m, H100, stk, k, np.ones(2)).f_moe
        with monkeypatch.context() as mp:
            mp.setattr(C, "_expert_fp8_cast_bytes", lambda *a: 0.0)
            without = C.layer_compute(m, H100, stk, k, np.ones(2)).f_moe
        rows, h, f = 4096 * m.moe.top_k, m.hidden, m.moe.expert_ffn_hidden
        casts = 4 * rows * ((h + 2 * f) + (f + h)) / 3 / hbm         # counted passes: no stack factor
        np.testing.assert_allclose(got - without, [0.0, casts if on else 0.0], rtol=1e-9, atol=1e-15)


def test_te_dense_linears_quantize_what_no_norm_kernel_casts_under_fp8(monkeypatch):
    """Transformer Engine's Linear quantizes its input in forward unless it arrives in fp8 and every
    linear's output gradient in backward, 4 B per element (read 2, write 1 row-wise + 1 column-wise):
    the attention output before the projection and fc2's input (Megatron's bias-SwiGLU writes bf16)
    in forward; qkv, proj, fc1 (2 f wide when gated) and fc2 output gradients in backward, the
    row-parallel ones on the SP shard. qkv's and fc1's inputs come cast from LayerNormLinear's
    norm. A third counted in forward; nothing in bf16 or on torchtitan (torchao's own casts)."""
    from planner.costmodel import compute as C
    from planner.costmodel import elementwise as E
    from planner.layout import Precision
    from planner.stacks import STACKS
    m = load_model("llama-3-8b")                      # gated, GQA: q 4096, kv 1024, ffn 14336
    k = _knobs(2, tp=2, dp=4, seq_len=8192, sp=True, precision=[Precision.BF16, Precision.FP8])
    hbm = H100.gpu.hbm_bandwidth * H100.efficiency.hbm
    T, tp, h, f = 8192, 2, m.hidden, m.ffn_hidden
    att = 4 * (T * m.v_dim / tp + T * (m.q_dim + 2 * m.kv_dim) / tp + T / tp * h)
    mlp = 4 * (T * 2 * f / tp + T * f / tp + T / tp * h)
    # a stack factor on fused elementwise traffic leaves the counted casts alone
    for stk, on in ((dataclasses.replace(STACKS["megatron-core"], elementwise=1.5), True),
                   (STACKS["torchtitan"], False)):
        got = C.layer_compute(m, H100, stk, k, np.ones(2)).f_dense
        with monkeypatch.context() as mp:
            mp.setattr(E, "te_fp8_cast_bytes", lambda *a: (0.0, 0.0))
            without = C.layer_compute(m, H100, stk, k, np.ones(2)).f_dense
        want = (att + mlp) / 3 / hbm
        np.testing.assert_allclose(got - without, [0.0, want if on else 0.0], rtol=1e-9, atol=1e-15)


def test_te_shared_experts_also_cast_their_first_input_under_fp8(monkeypatch):
    """An MoE layer's shared experts are TE linears behind the layer's own pre-MLP norm (Megatron-Core
    gpt_layer_specs: pre_mlp_layernorm = TENorm with experts), so fc1's input is quantized too: 4 B per
    element of fc1's input and of fc2's, and of both output gradients, a third in forward."""
    from planner.costmodel import compute as C
    from planner.layout import Precision
    from planner.stacks import STACKS
    m = load_model("deepseek-v3")                     # one shared expert of width 2048, gated
    k = _knobs(2, ep=8, precision=[Precision.BF16, Precision.FP8])
    got = C.layer_compute(m, H100, STACKS["megatron-core"], k, np.ones(2)).f_moe
    monkeypatch.setattr(C, "_shared_fp8_cast_bytes", lambda *a: 0.0)
    without = C.layer_compute(m, H100, STACKS["megatron-core"], k, np.ones(2)).f_moe
    T, h, fs = 4096, m.hidden, m.moe.shared_expert_ffn_hidden
    want = 4 * (T * h + T * 2 * fs + T * fs + T * h) / 3 / (H100.gpu.hbm_bandwidth * H100.efficiency.hbm)
    np.testing.assert_allclose(got - without, [0.0, want], rtol=1e-9, atol=1e-15)


def test_offloaded_layers_leave_the_gpu_and_their_copies_are_timed():
    """--offload-layers N keeps N fewer layers' activations on the GPU at the peak (validate memory
    holds that to the tracker) and adds what its host copies cannot hide: each copy beside the
    next layer's forward (out) and backward (in), plus their HBM reads and writes."""
    import dataclasses
    from planner.costmodel.offload import host_copy
    from planner.costmodel.terms import layer_terms, Settings
    from planner.layout import Candidates
    from planner.stacks import STACKS
    m, cl = load_model("llama-3-70b"), load_hardware("gb200-nvl72")
    base = Layout(tp=1, pp=1, dp=64, micro_batch=2, global_batch=256, seq_len=8192, zero=3, precision="fp8")
    lays = [dataclasses.replace(base, offload_layers=n) for n in (0, 20, 40)]
    ev = evaluate(m, cl, Candidates.from_layouts(lays), STACKS["megatron-core"])
    act = ev.detail.memory.activations
    per_layer = (act[0] - act[1]) / 20
    np.testing.assert_allclose(act[0] - act[2], 40 * per_layer, rtol=1e-9)
    off = ev.detail.time.offload
    assert off[0] == 0.0 and 0 < off[1] < off[2]
    # the same from the formula: 2 micro-batches x N layers x (exposed out + exposed in + HBM)
    c = Candidates.from_layouts(lays[:1])
    lt = layer_terms(Settings(m, cl, STACKS["megatron-core"]), {k: c.cols[k] for k in c.cols})
    hc, lc = host_copy(cl, lt.acts), lt.compute
    one = (max(hc.link_dense[0] - lc.f_dense[0], 0) + max(hc.link_dense[0] - lc.b_dense[0], 0)
           + 2 * hc.hbm_dense[0])
    np.testing.assert_allclose(off[1:], 2 * np.array([20, 40]) * one, rtol=1e-9)
    assert hc.link_dense[0] == lt.acts.dense[0][0] / cl.gpu.host_bandwidth      # Recompute.NONE row


def test_the_search_offloads_only_where_memory_asks_for_it():
    """Llama 3 70B on GB200 under Megatron-FSDP at micro-batch 2, cp 1 (NVIDIA's FP8-CS recipe)
    does not fit without recompute: offloading layers beats full recompute; where everything fits,
    offloading only costs, and the best layout keeps every activation on the GPU."""
    from planner.engine import search
    m, cl = load_model("llama-3-70b"), load_hardware("gb200-nvl72")
    fixed = dict(tp=1, pp=1, cp=1, zero=3, micro_batch=2, precision="fp8")
    best = search(m, cl, 64, seq_len=8192, global_batch=256, fixed=fixed, top=1).best.layout
    assert best.offload_layers > 0 and best.recompute == "none"
    small = search(m, cl, 64, seq_len=2048, global_batch=256, fixed=fixed, top=1).best.layout
    assert small.offload_layers == 0


def _slowdown(cluster, phi):
    import dataclasses
    return dataclasses.replace(cluster, efficiency=dataclasses.replace(cluster.efficiency, overlap_slowdown=phi))


def test_hidden_dp_traffic_slows_the_compute_beside_it():
    """A gradient reduce-scatter the last backward hides costs overlap_slowdown of its own time
    (NCCL's kernels share the SMs); not overlapped, it costs its whole time; nothing else moves."""
    import dataclasses
    from planner.engine import evaluate_layout
    m = load_model("llama-3-8b")
    L = Layout(tp=1, dp=64, micro_batch=2, global_batch=128, seq_len=4096, zero=1)
    free = evaluate_layout(m, _slowdown(H100, 0.0), L)
    assert free.time_breakdown_s["dp_comm"] == 0.0              # wholly hidden by the backward
    whole = evaluate_layout(m, H100, dataclasses.replace(L, overlap_dp=False)).time_breakdown_s["dp_comm"]
    assert whole > 0
    phi = H100.efficiency.overlap_slowdown
    got = evaluate_layout(m, H100, L)
    assert 0 < phi < 1
    assert got.time_breakdown_s["dp_comm"] == pytest.approx(phi * whole, rel=1e-9)
    for term in ("compute", "tp_comm", "bubble", "optimizer"):
        assert got.time_breakdown_s[term] == pytest.approx(free.time_breakdown_s[term])


def test_hidden_cp_ring_traffic_slows_the_attention_beside_it():
    """The K/V ring's hidden part costs overlap_slowdown of its time: linear in the factor, and at
    a factor of 1 the ring costs what it would exposed."""
    from planner.engine import evaluate_layout
    m = load_model("llama-3-8b")
    L = Layout(tp=1, cp=4, dp=2, micro_batch=1, global_batch=8, seq_len=32768, zero=1, recompute="full")
    cp = {phi: evaluate_layout(m, _slowdown(H100, phi), L).time_breakdown_s["cp_comm"] for phi in (0.0, 0.5, 1.0)}
    assert cp[1.0] > cp[0.0]
    assert cp[0.5] - cp[0.0] == pytest.approx((cp[1.0] - cp[0.0]) / 2, rel=1e-9)


def test_hidden_pipeline_sends_slow_the_compute_beside_them():
    """Interleaved steady-state sends that overlap cost overlap_slowdown of what they would cost
    exposed; fill and drain, on the critical path either way, do not change."""
    import dataclasses
    from planner.engine import evaluate_layout
    m = load_model("llama-3-8b")
    L = Layout(tp=2, pp=4, vpp=2, schedule="interleaved", dp=2, micro_batch=1, global_batch=32, seq_len=4096,
               zero=1, sp=True)
    pp = lambda cl, lay: evaluate_layout(m, cl, lay).time_breakdown_s["pp_comm"]  # noqa: E731
    free, phi = pp(_slowdown(H100, 0.0), L), pp(_slowdown(H100, 0.25), L)
    exposed = pp(_slowdown(H100, 0.0), dataclasses.replace(L, overlap_pp=False))
    assert exposed > free > 0
    assert phi - free == pytest.approx(0.25 * (exposed - free), rel=1e-9)
    assert pp(_slowdown(H100, 0.25), dataclasses.replace(L, overlap_pp=False)) == pytest.approx(exposed)


def test_torchao_dynamic_fp8_casts_add_their_counted_passes():
    """torchtitan's Float8Linear (tensorwise dynamic scaling) pays an amax pass, a cast and the
    transposed copies per GEMM operand, 7T(K+N) + 2KN bytes per linear over forward and backward
    (torchao float8_linear.py), where Transformer Engine pays 4 B per element of the inputs no norm
    kernel casts (attention output, fc2's input) and of every output gradient; bf16 pays none."""
    import dataclasses
    from planner.engine import evaluate_layout
    from planner.stacks import STACKS
    m = load_model("llama-3-8b")
    tt = STACKS["torchtitan"]
    fused = dataclasses.replace(tt, fp8_casts="fused")
    H96 = load_hardware("h100-sxm-96gb")
    L = Layout(tp=1, dp=8, micro_batch=1, global_batch=8, seq_len=8192, zero=3, precision="fp8", recompute="none")
    T, h, f = 8192, 4096, 14336
    linears = [(h, 4096 + 2 * 1024), (4096, h), (h, f), (h, f), (f, h)]
    per_layer = sum(7 * T * (K + N) + 2 * K * N for K, N in linears)     # bytes, forward + backward
    per_layer -= 4 * T * ((4096 + (4096 + 2 * 1024) + h) + (2 * f + f + h))   # TE's, the base's
    hbm = H96.gpu.hbm_bandwidth * H96.efficiency.hbm
    got = evaluate_layout(m, H96, L, stack=tt).time_breakdown_s["compute"]
    base = evaluate_layout(m, H96, L, stack=fused).time_breakdown_s["compute"]
    assert got - base == pytest.approx(32 * per_layer / hbm, rel=1e-6)
    bf16 = dataclasses.replace(L, precision="bf16")
    assert evaluate_layout(m, H96, bf16, stack=tt).step_time_s == pytest.approx(
        evaluate_layout(m, H96, bf16, stack=fused).step_time_s)
