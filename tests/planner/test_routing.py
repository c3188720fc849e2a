"""planner/costmodel/routing.py: the routed load under imbalance, capacity and padding, and that
every phase that moves or computes routed tokens reads it."""
import math

import numpy as np
import pytest

from planner import evaluate_layout, load_hardware, load_model
from planner.costmodel.routing import expert_capacity, routed_load
from planner.errors import PlannerError
from planner.layout import Layout
from planner.step import predict


def test_dropless_dropping_and_padding():
    assert routed_load(1.3, 0.0, False, 4096, 2, 8) == 1.3                 # dropless: the imbalance
    assert routed_load(1.3, 1.1, False, 4096, 2, 8) == 1.1                 # dropped beyond capacity
    assert routed_load(1.0, 1.25, False, 4096, 2, 8) == 1.0                # balanced: nothing to drop
    # padded: exactly the capacity, Megatron's get_capacity(tokens * top_k, experts, cf)
    for tokens, k, e, cf in ((4096, 2, 8, 1.25), (1000, 2, 64, 1.1), (7, 1, 4, 1.0)):
        cap = math.ceil((tokens * k / e) * cf)
        assert expert_capacity(tokens, k, e, cf) == cap
        assert routed_load(1.0, cf, True, tokens, k, e) == pytest.approx(cap / (tokens * k / e), rel=1e-15)
    # a capacity over the local tokens: the mask is all ones, every expert takes every token
    assert expert_capacity(8, 2, 2, 2.0) == 8
    np.testing.assert_array_equal(expert_capacity(np.array([8.0, 4096.0]), 2, 8, 1.0), [2.0, 1024.0])


def _ep_bytes(model, layout, **kw):
    ranks = predict(model, layout, **kw)
    return ranks[0].collectives[("ep", "all_to_all")]["bytes"]


def test_capacity_reaches_compute_activations_and_the_all_to_all():
    """Dropped tokens are neither dispatched nor computed (the all-to-all used to ignore the
    capacity); padded ones are both."""
    m, h100 = load_model("mixtral-8x7b"), load_hardware("h100-sxm")
    L = Layout(tp=1, pp=1, dp=8, ep=8, micro_batch=1, global_batch=64, seq_len=4096, zero=1)
    base = _ep_bytes(m, L, moe_imbalance=1.5)
    assert _ep_bytes(m, L, moe_imbalance=1.5, capacity_factor=1.2) == pytest.approx(base * 1.2 / 1.5, rel=1e-12)
    padded = _ep_bytes(m, L, moe_imbalance=1.0, capacity_factor=1.2, pad_to_capacity=True)
    assert padded == pytest.approx(_ep_bytes(m, L) * 1.2, rel=1e-3)
    p0, p1 = (evaluate_layout(m, h100, L, moe_imbalance=1.5, capacity_factor=cf) for cf in (0.0, 1.2))
    assert p1.time_breakdown_s["compute"] < p0.time_breakdown_s["compute"]
    assert p1.memory_breakdown_gib["activations"] < p0.memory_breakdown_gib["activations"]
    p2 = evaluate_layout(m, h100, L, capacity_factor=1.2, pad_to_capacity=True)
    p3 = evaluate_layout(m, h100, L)
    assert p2.time_breakdown_s["ep_comm"] > p3.time_breakdown_s["ep_comm"]
    assert p2.memory_breakdown_gib["activations"] > p3.memory_breakdown_gib["activations"]


def test_padding_needs_a_capacity():
    from planner import search
    with pytest.raises(PlannerError, match="--pad-to-capacity .* needs --capacity-factor > 0"):
        search(load_model("mixtral-8x7b"), load_hardware("h100-sxm"), 64, pad_to_capacity=True)


@pytest.mark.parametrize("fmt", ["torchtitan", "deepspeed"])
def test_a_capacity_is_refused_where_the_target_cannot_express_it(fmt):
    from planner import search
    from planner.export import emit
    m, c = load_model("mixtral-8x7b"), load_hardware("h100-sxm")
    best = search(m, c, 64, top=1, capacity_factor=1.25).best
    with pytest.raises(PlannerError, match=f"--capacity-factor cannot be expressed in a {fmt} configuration"):
        emit(best, m, fmt, c, capacity_factor=1.25)


def test_expert_tp_gathers_the_routed_copies_in_its_own_group():
    """Under expert TP the dispatcher gathers the tokens its etp group received (top_k copies of
    each local token, x the routed load) and reduce-scatters the experts' partial outputs, once
    each per pass, in the etp group -- not one more full-activation pair in the TP group."""
    m = load_model("mixtral-8x7b")
    kw = dict(tp=2, sp=True, pp=1, dp=4, ep=2, micro_batch=1, global_batch=64, seq_len=4096, zero=1)
    with_etp, without = (predict(m, Layout(etp=e, **kw))[0].collectives for e in (2, 1))
    nmb, layers, hidden, act = 64 // 4, m.layers, m.hidden, 2.0
    routed = act * (4096 / 2) * m.moe.top_k * hidden            # one rank's routed copies, bf16
    for kind in ("all_gather", "reduce_scatter"):
        got = with_etp[("etp", kind)]
        assert got["calls"] == 2 * layers * nmb                  # forward and backward
        assert got["bytes"] == pytest.approx(got["calls"] * 2 * routed, rel=1e-12)   # etp x routed
        assert ("etp", kind) not in without
        assert with_etp[("tp", kind)] == without[("tp", kind)]     # the TP group's traffic is the same


def test_expert_tp_keeps_the_gathered_input_not_a_smaller_intermediate():
    """fc1 keeps the input gathered over the etp group (etp x the routed tokens) and each rank's
    intermediates are etp x routed tokens on ffn/etp columns: the same as without expert TP. So
    expert TP adds (etp - 1) x routed x hidden; it does not divide the intermediates (validate's
    tests/validate/test_run.py::test_expert_tensor_parallel measures it)."""
    from planner.memory import moe_activation_bytes
    m = load_model("mixtral-8x7b")
    one, two, four = (moe_activation_bytes(m, 4096, 2, True, etp=e) for e in (1, 2, 4))
    routed = 4096 / 2 * m.moe.top_k
    assert two - one == pytest.approx(2.0 * routed * m.hidden, rel=1e-12)
    assert four - one == pytest.approx(3 * 2.0 * routed * m.hidden, rel=1e-12)
