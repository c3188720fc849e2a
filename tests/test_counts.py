"""planner/counts.py: per-rank predicted counts agree with the planner's whole-model formulas,
and are consistent across ranks (no torch needed)."""
import math

import pytest

from planner import flops as F
from planner.counts import ElementBytes, check, chunks_of, local_params, predict
from planner.errors import PlannerError
from planner.layout import Layout
from planner.model_spec import ModelSpec, MoESpec

LLAMA = ModelSpec(name="tiny", layers=4, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=128,
                  mlp="swiglu")
GPT = ModelSpec(name="tinygpt", layers=4, hidden=32, heads=4, kv_heads=4, ffn_hidden=128, vocab=128,
                mlp="gelu", tied_embeddings=True, bias=True)
MOE = ModelSpec(name="tinymoe", layers=4, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=128,
                mlp="swiglu", moe=MoESpec(experts=4, top_k=2, expert_ffn_hidden=32, shared_experts=1,
                                          dense_layers=1))


def L(**k):
    base = dict(micro_batch=1, global_batch=8, seq_len=16, zero=1)
    base.update(k)
    return Layout(**base)


@pytest.mark.parametrize("model", [LLAMA, GPT, MOE])
@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_stage_params_sum_to_the_model(model, pp, vpp):
    lay = L(pp=pp, vpp=vpp, dp=1)
    total = 0
    for r in range(pp):
        for ch in chunks_of(model, lay, r):
            d, e = local_params(model, lay, ch)
            total += d + e
    # tied embeddings split over stages keep a second copy on the last stage (Megatron)
    extra = model.embedding_params() if (model.tied_embeddings and pp > 1) else 0
    assert total == model.total_params() + extra


def test_tp_splits_all_but_norms_and_row_biases():
    one = sum(sum(local_params(GPT, L(), c)) for c in chunks_of(GPT, L(), 0))
    two = sum(sum(local_params(GPT, L(tp=2), c)) for c in chunks_of(GPT, L(tp=2), 0))
    h, layers = GPT.hidden, GPT.layers
    replicated = layers * (GPT.norm_params() + 2 * h) + 2 * h   # norms, wo/w2 biases, final norm
    assert two == (one - replicated) / 2 + replicated


@pytest.mark.parametrize("lay", [L(), L(tp=2, sp=True), L(cp=2), L(pp=2), L(tp=2, cp=2, pp=2)])
def test_flops_match_the_planners_per_token_terms(lay):
    """Summed over all ranks, the counted forward FLOPs are the planner's non-causal per-token
    terms times the tokens of a step, with attention at (cp+1)/2cp of the full score matrix."""
    stages = predict(LLAMA, lay)
    ranks_per_stage = lay.tp * lay.cp * lay.dp
    fwd = sum(s.flops["forward"] for s in stages) * ranks_per_stage
    terms = F.forward_flops_per_token_terms(LLAMA, lay.seq_len, causal=False)
    tokens = lay.global_batch * lay.seq_len
    core = terms.pop("attn_core") * tokens * (lay.cp + 1) / (2 * lay.cp)
    assert fwd == pytest.approx(sum(terms.values()) * tokens + core, rel=1e-12)
    bwd = sum(s.flops["backward"] for s in stages) * ranks_per_stage
    assert bwd == pytest.approx(2 * sum(terms.values()) * tokens + 2.5 * core, rel=1e-12)


def test_moe_flops_use_top_k_experts():
    stages = predict(MOE, L(dp=2, ep=2))
    T = 16
    per_mb = sum(F.attention_gemm_flops(MOE, T).values()) * 4 + F.mlp_flops(MOE, T) \
        + 3 * sum(F.moe_flops(MOE, T).values()) + F.logits_flops(MOE, T) \
        + 4 * F.attention_core_flops(MOE, T, 16, causal=False)
    assert stages[0].flops["forward"] == pytest.approx(per_mb * 4)


def test_recompute_adds_forward_or_core():
    base = predict(LLAMA, L())[0].flops
    full = predict(LLAMA, L(recompute="full"))[0].flops
    sel = predict(LLAMA, L(recompute="selective"))[0].flops
    logits = F.logits_flops(LLAMA, 16) * 8
    assert full["recompute"] == pytest.approx(base["forward"] - logits)
    assert sel["recompute"] == pytest.approx(4 * 8 * F.attention_core_flops(LLAMA, 16, 16, causal=False))


def test_point_to_point_is_symmetric():
    """Every send on one rank is a receive on another: pipeline sends of stage r are receives of
    stage r+1, and the CP ring sends what it receives."""
    for lay in (L(pp=2), L(pp=4), L(pp=2, vpp=2), L(cp=2, pp=2, tp=2, sp=True)):
        stages = predict(LLAMA, lay)
        sends = sum(s.collectives[("pp", "send")]["bytes"] for s in stages)
        recvs = sum(s.collectives[("pp", "recv")]["bytes"] for s in stages)
        assert sends == recvs
        if lay.cp > 1:
            for s in stages:
                assert s.collectives[("cp", "send")] == s.collectives[("cp", "recv")]


def test_tp_collectives_per_layer_and_pass():
    s = predict(LLAMA, L(tp=2))[0]
    nmb, T, h = 8, 16, 32
    act = T * h * 2
    # 2 per layer forward + 2 backward, embedding forward, output backward, 3 for the loss
    assert s.collectives[("tp", "all_reduce")]["calls"] == nmb * (4 * 4 + 1 + 1 + 3)
    assert s.collectives[("tp", "all_reduce")]["bytes"] == nmb * (18 * act + 3 * T * 2)
    sp = predict(LLAMA, L(tp=2, sp=True))[0]
    assert sp.collectives[("tp", "all_gather")]["calls"] == nmb * (4 * 4 + 2)
    full = predict(LLAMA, L(tp=2, recompute="full"))[0]
    assert full.collectives[("tp", "all_reduce")]["calls"] == nmb * (6 * 4 + 1 + 1 + 3)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_state_and_traffic(zero):
    lay = L(dp=4, zero=zero)
    s = predict(LLAMA, lay, ElementBytes.uniform(4, zero))[0]
    P = LLAMA.total_params()
    w, g, o = s.state["weights"], s.state["gradients"], s.state["optimizer"]
    assert w == P * 4 / (4 if zero == 3 else 1)
    assert g == P * 4 / (4 if zero >= 2 else 1)
    assert o == P * (8 if zero == 3 else 12) / (4 if zero >= 1 else 1)
    kinds = {k for (grp, k) in s.collectives if grp == "dp"}
    assert kinds == {0: {"all_reduce"}, 1: {"reduce_scatter", "all_gather"},
                     2: {"reduce_scatter", "all_gather"}, 3: {"reduce_scatter", "all_gather"}}[zero]
    if zero == 2:   # reduce-scattered every micro-batch (DeepSpeed stage 2)
        assert s.collectives[("dp", "reduce_scatter")]["calls"] == 8 // 4


def test_expert_parallel_traffic():
    s = predict(MOE, L(dp=4, ep=2))[0]
    T, k, h = 16, 2, 32
    nmb, moe_layers = 2, 3
    assert s.collectives[("ep", "all_to_all")] == {"calls": 4 * moe_layers * nmb,
                                                   "bytes": 4 * moe_layers * nmb * T * k * h * 2}
    assert ("edp", "reduce_scatter") in s.collectives    # experts reduced over ep's dp group


def test_activations_are_the_planners_formula_plus_named_deltas():
    s = predict(LLAMA, L(tp=2, sp=True), ElementBytes.uniform(8, 1))[0]
    t = s.activation_terms[0]
    assert set(t["deltas"]) == {"norm_statistics", "sp_gathered_inputs"}
    assert s.activations[0] == t["planner"] + sum(t["deltas"].values())
    full = predict(LLAMA, L(tp=2, sp=True, recompute="full"), ElementBytes.uniform(8, 1))[0]
    assert full.activations[0] == 16 * 32 / 2 * 8      # the layer input, sequence-sharded


@pytest.mark.parametrize("kw,msg", [
    (dict(pp=3), "do not split evenly over 3 stages"),
    (dict(ep=2), "needs a mixture-of-experts"),
    (dict(cp=3, seq_len=20), "needs --seq-len divisible"),
    (dict(tp=2, sp=True, seq_len=15), "divisible by --tp"),
])
def test_check_refuses_what_it_cannot_count(kw, msg):
    with pytest.raises(PlannerError, match=msg):
        check(LLAMA, L(**kw))


def test_mla_is_refused():
    from planner.model_io import load_model
    with pytest.raises(PlannerError, match="latent attention"):
        check(load_model("deepseek-v3"), L())


def test_element_bytes_default_is_megatron_mixed_precision():
    eb = ElementBytes()
    assert (eb.act, eb.weight, eb.grad, eb.optimizer) == (2, 2, 4, 12)
    assert ElementBytes.uniform(4, 3).optimizer == 8 and ElementBytes.uniform(4, 1).optimizer == 12
    assert math.isclose(predict(LLAMA, L())[0].state["optimizer"], LLAMA.total_params() * 12)
