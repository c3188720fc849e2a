"""planner/step.py: the per-rank step read from the cost model agrees with the planner's
whole-model formulas, is consistent across ranks, and moves with the cost model's own terms
(no torch needed)."""
import math

import pytest

from planner import flops as F
from planner.costmodel import traffic as X
from planner.costmodel.elements import ElementBytes
from planner.errors import PlannerError
from planner.layout import Layout
from planner.model_spec import MLASpec, ModelSpec, MoESpec
from planner.stacks import STACKS
from planner.step import predict, virtual_stages

LLAMA = ModelSpec(name="tiny", layers=4, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=128,
                  mlp="swiglu")
GPT = ModelSpec(name="tinygpt", layers=4, hidden=32, heads=4, kv_heads=4, ffn_hidden=128, vocab=128,
                mlp="gelu", tied_embeddings=True, bias=True)
MOE = ModelSpec(name="tinymoe", layers=4, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=128,
                mlp="swiglu", moe=MoESpec(experts=4, top_k=2, expert_ffn_hidden=32, shared_experts=1,
                                          dense_layers=1))

MLA = ModelSpec(name="tinymla", layers=4, hidden=32, heads=4, kv_heads=4, ffn_hidden=64, vocab=128, mlp="swiglu",
                mla=MLASpec(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                             q_lora_rank=24),
                moe=MoESpec(experts=4, top_k=2, expert_ffn_hidden=32, shared_experts=1, dense_layers=1))


def L(**k):
    base = dict(micro_batch=1, global_batch=8, seq_len=16, zero=1)
    base.update(k)
    return Layout(**base)


@pytest.mark.parametrize("model", [LLAMA, GPT, MOE])
@pytest.mark.parametrize("pp,vpp", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_rank_params_sum_to_the_model(model, pp, vpp):
    lay = L(pp=pp, vpp=vpp, dp=1)
    total = sum(r.params["dense"] + r.params["expert"] for r in predict(model, lay))
    # tied embeddings split over stages keep a second copy on the last stage (Megatron)
    extra = model.embedding_params() if (model.tied_embeddings and pp > 1) else 0
    assert total == model.total_params() + extra


def test_virtual_stages_cover_every_layer_once():
    for lay in (L(pp=2, vpp=2), L(pp=4), L(pp=2, first_stage_layers=1, last_stage_layers=3)):
        vs = virtual_stages(LLAMA, lay)
        assert sorted(i for s in vs for i in s) == list(range(LLAMA.layers))
        assert len(vs) == lay.pp * lay.vpp


def test_tp_splits_all_but_norms_and_row_biases():
    one = predict(GPT, L())[0].params["dense"]
    two = predict(GPT, L(tp=2))[0].params["dense"]
    h, layers = GPT.hidden, GPT.layers
    replicated = layers * (GPT.norm_params() + 2 * h) + 2 * h   # norms, wo/w2 biases, final norm
    assert two == (one - replicated) / 2 + replicated


@pytest.mark.parametrize("lay", [L(), L(tp=2, sp=True), L(cp=2), L(pp=2), L(tp=2, cp=2, pp=2)])
def test_flops_match_the_planners_per_token_terms(lay):
    """Summed over all ranks, forward FLOPs are the planner's causal per-token terms times the
    tokens of a step; backward is 2x GEMMs and 2.5x core attention (FlashAttention-2)."""
    stages = predict(LLAMA, lay)
    ranks_per_stage = lay.tp * lay.cp * lay.dp
    fwd = sum(s.flops["forward"] for s in stages) * ranks_per_stage
    terms = F.forward_flops_per_token_terms(LLAMA, lay.seq_len, causal=True)
    tokens = lay.global_batch * lay.seq_len
    core = terms.pop("attn_core") * tokens
    assert fwd == pytest.approx(sum(terms.values()) * tokens + core, rel=1e-12)
    assert sum(s.attention_flops["forward"] for s in stages) * ranks_per_stage == pytest.approx(core, rel=1e-12)
    bwd = sum(s.flops["backward"] for s in stages) * ranks_per_stage
    assert bwd == pytest.approx(2 * sum(terms.values()) * tokens + 2.5 * core, rel=1e-12)


def test_moe_flops_use_top_k_experts():
    stages = predict(MOE, L(dp=2, ep=2))
    T = 16
    per_mb = sum(F.attention_gemm_flops(MOE, T).values()) * 4 + F.mlp_flops(MOE, T) \
        + 3 * sum(F.moe_flops(MOE, T).values()) + F.logits_flops(MOE, T) \
        + 4 * F.attention_core_flops(MOE, T, 16, causal=True)
    assert stages[0].flops["forward"] == pytest.approx(per_mb * 4)


def test_recompute_adds_forward_or_core():
    base = predict(LLAMA, L())[0].flops
    full = predict(LLAMA, L(recompute="full"))[0].flops
    sel = predict(LLAMA, L(recompute="selective"))[0].flops
    logits = F.logits_flops(LLAMA, 16) * 8
    assert full["recompute"] == pytest.approx(base["forward"] - logits)
    assert sel["recompute"] == pytest.approx(4 * 8 * F.attention_core_flops(LLAMA, 16, 16, causal=True))


def test_a_module_list_remakes_only_its_modules():
    """Megatron-Core's mla_up_proj re-runs MLA's two up-projection GEMMs (q from its LoRA rank,
    k/v from the kv LoRA rank), mlp the dense layers' MLP; neither re-runs core attention, so no
    attention FLOPs are counted again (compute._module_recompute)."""
    base = predict(MLA, L())[0]
    up = predict(MLA, L(recompute="selective:mla_up_proj"))[0]
    upm = predict(MLA, L(recompute="selective:mla_up_proj+mlp"))[0]
    a, T, nmb = MLA.mla, 16, 8
    per_layer = 2 * T * (a.q_lora_rank * 4 * 12 + a.kv_lora_rank * 4 * 16)
    assert up.flops["recompute"] == pytest.approx(nmb * 4 * per_layer)
    assert upm.flops["recompute"] == pytest.approx(nmb * (4 * per_layer + F.mlp_flops(MLA, T)))   # 1 dense layer
    assert up.attention_flops.get("recompute", 0.0) == 0.0 and "recompute" not in base.flops
    assert up.flops["forward"] == base.flops["forward"]


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
    # 2 per layer forward + 2 backward, embedding forward, output backward, 3 for the loss (fp32)
    assert s.collectives[("tp", "all_reduce")]["calls"] == nmb * (4 * 4 + 1 + 1 + 3)
    assert s.collectives[("tp", "all_reduce")]["bytes"] == nmb * (18 * act + 3 * T * 4)
    sp = predict(LLAMA, L(tp=2, sp=True))[0]
    assert sp.collectives[("tp", "all_gather")]["calls"] == nmb * (4 * 4 + 2)
    full = predict(LLAMA, L(tp=2, recompute="full"))[0]
    assert full.collectives[("tp", "all_reduce")]["calls"] == nmb * (6 * 4 + 1 + 1 + 3)


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_state_and_traffic(zero):
    lay = L(dp=4, zero=zero)
    s = predict(LLAMA, lay, elements=ElementBytes.uniform(4, zero))[0]
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
    if zero == 3:   # FSDP: every layer gathered for forward and again for backward, the root once
        assert s.collectives[("dp", "all_gather")]["calls"] == 2 * (2 * LLAMA.layers + 1)


def test_expert_parallel_traffic():
    s = predict(MOE, L(dp=4, ep=2))[0]
    T, k, h = 16, 2, 32
    nmb, moe_layers = 2, 3
    assert s.collectives[("ep", "all_to_all")] == {"calls": 4 * moe_layers * nmb,
                                                   "bytes": 4 * moe_layers * nmb * T * k * h * 2}
    assert ("edp", "reduce_scatter") in s.collectives    # experts reduced over ep's dp group


def test_activations_are_the_cost_models_terms():
    """What a rank keeps per layer is the cost model's phase-3 term for the stack: torchtitan keeps
    more than Megatron -- the gathered linear inputs (PyTorch ColwiseParallel) and a fourth
    ffn-wide tensor of its eager SwiGLU (Megatron's fused SwiGLU keeps three)."""
    eb = ElementBytes.uniform(8, 1)
    mc = predict(LLAMA, L(tp=2, sp=True), elements=eb)[0].activations[0]
    tt = predict(LLAMA, L(tp=2, sp=True, zero=3), STACKS["torchtitan"], ElementBytes.uniform(8, 3))[0].activations[0]
    assert tt - mc == pytest.approx(2 * (16 - 8) * 32 * 8 + 16 * 64 / 2 * 8)   # gathered inputs + silu output
    full = predict(LLAMA, L(tp=2, sp=True, recompute="full"), elements=eb)[0]
    assert full.activations[0] == 16 * 32 / 2 * 8      # the layer input, sequence-sharded


def test_a_planted_error_in_a_cost_model_term_moves_the_counts(monkeypatch):
    """step.py reads the cost model: change a term there and the per-rank counts follow."""
    before = predict(LLAMA, L(tp=2))[0].collectives[("tp", "all_reduce")]["calls"]
    monkeypatch.setattr(X, "TP_PAIRS_DENSE", 1)
    after = predict(LLAMA, L(tp=2))[0].collectives[("tp", "all_reduce")]["calls"]
    assert before - after == 8 * 2 * 4        # one pair fewer per layer, forward and backward


@pytest.mark.parametrize("kw,msg", [
    (dict(ep=2), "needs a mixture-of-experts"),
    (dict(cp=3, seq_len=20), "needs --seq-len divisible"),
    (dict(tp=2, sp=True, seq_len=15, global_batch=8), "divisible by --tp"),
])
def test_invalid_layouts_are_refused_by_the_rules(kw, msg):
    with pytest.raises(PlannerError, match=msg):
        predict(LLAMA, L(**kw))


def test_element_bytes_default_is_megatron_mixed_precision():
    eb = ElementBytes()
    assert (eb.act, eb.weight, eb.grad, eb.optimizer) == (2, 2, 4, 12)
    assert ElementBytes.uniform(4, 3).optimizer == 8 and ElementBytes.uniform(4, 1).optimizer == 12
    assert math.isclose(predict(LLAMA, L())[0].state["optimizer"], LLAMA.total_params() * 12)
