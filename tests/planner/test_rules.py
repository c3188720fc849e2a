"""planner/rules.py, the one owner of layout validity: a table of layouts each breaking one rule
(and the rule that must say so), every rule with a source, the search never proposing what the
rules refuse, and a fixed knob that cannot work refused in one line."""
import numpy as np
import pytest

from planner import rules
from planner.candidates import iter_candidates
from planner.errors import PlannerError
from planner.layout import Layout
from planner.model_io import load_model
from planner.model_spec import ModelSpec
from planner.stacks import STACKS

LLAMA8 = load_model("llama-3-8b")        # 32 layers, 32 heads, 8 KV heads
DSV3 = load_model("deepseek-v3")         # 61 layers, MLA, 256 experts
MIXTRAL = load_model("mixtral-8x7b")     # 32 layers, 8 experts
GQA6 = ModelSpec(name="gqa6", layers=4, hidden=768, heads=12, kv_heads=6, ffn_hidden=2048, vocab=32000,
                 mlp="swiglu")


def L(**k):
    base = dict(micro_batch=1, global_batch=64, seq_len=4096, zero=1)
    base.update(k)
    return Layout(**base)


# (model, layout, stack, the rule that must refuse it, a phrase of its message)
TABLE = [
    (LLAMA8, L(tp=3, dp=1), "megatron-core", "heads_tp", "does not divide the 32 attention heads"),
    (GQA6, L(tp=4, dp=1), "megatron-core", "kv_heads_tp", "6 KV heads"),
    (LLAMA8, L(pp=64, dp=1, global_batch=64), "megatron-core", "pp_layers", "exceeds the 32 layers"),
    (LLAMA8, L(cp=4, seq_len=4100), "megatron-core", "cp_seq", "divisible by 2*cp = 8"),
    (LLAMA8, L(tp=2, sp=True, seq_len=4097), "megatron-core", "sp_seq", "divisible by --tp 2"),
    (LLAMA8, L(ep=2, dp=2), "megatron-core", "ep_dense", "needs a mixture-of-experts"),
    (MIXTRAL, L(ep=16, dp=16), "megatron-core", "ep_experts", "does not divide the 8 experts"),
    (MIXTRAL, L(tp=2, ep=2, dp=4), "megatron-core", "moe_tp_sp", "needs --sp"),
    (MIXTRAL, L(tp=2, ep=4, dp=1), "megatron-core", "ep_group", "must divide tp x cp x dp"),
    (LLAMA8, L(dp=8, micro_batch=3, global_batch=64), "megatron-core", "batch_mb_dp", "micro-batch x dp = 24"),
    (LLAMA8, L(pp=4, first_stage_layers=30, last_stage_layers=3), "megatron-core", "stage_layers_total",
     "leave no layers"),
    (LLAMA8, L(pp=4, first_stage_layers=3), "megatron-core", "stage_layers", "do not divide over the other 3"),
    (LLAMA8, L(pp=3), "megatron-core", "stage_layers", "do not split evenly over --pp 3"),
    # Megatron-LM 2021 splits evenly only: first stage 3 of 61 layers with vpp 4 is what its
    # TransformerConfig rejects ('number of layers at first stage ... divisible by vpp')
    (DSV3, L(pp=16, vpp=4, schedule="interleaved", first_stage_layers=5, last_stage_layers=4, ep=1, dp=1),
     "megatron-2021", "vpp_stage_layers", "splits layers evenly only"),
    (LLAMA8, L(pp=8, vpp=8, schedule="interleaved", global_batch=64), "megatron-core", "vpp_stage_layers",
     "every virtual stage must hold a layer"),
    (LLAMA8, L(pp=4, vpp=2, schedule="interleaved", dp=1, global_batch=6), "megatron-core",
     "interleaved_microbatches", "divisible by --pp 4"),
    (LLAMA8, L(pp=4, schedule="dualpipe", global_batch=4), "torchtitan", "dualpipe", "at least 2 x pp = 8"),
    (LLAMA8, L(pp=4, schedule="zbv", first_stage_layers=7, last_stage_layers=9), "torchtitan", "zbv_chunks",
     "even number of layers"),
    (LLAMA8, L(pp=2, schedule="zbv"), "megatron-core", "stack_schedule", "not run by megatron-core"),
    (LLAMA8, L(dp=8, zero=2, shard_group=3), "megatron-core", "shard_group", "must divide"),
    (LLAMA8, L(dp=8, zero=0, shard_group=4), "megatron-core", "shard_group_zero", "needs --zero 1, 2 or 3"),
    (LLAMA8, L(tp=2, dp=4, zero=0), "torchtitan", "stack_replicate_1d", "only without TP, PP or CP"),
    (LLAMA8, L(pp=2, dp=4, zero=2), "deepspeed", "stack_zero_pp", "does not combine --zero 2 with pipeline"),
    (LLAMA8, L(dp=8, zero=1), "torchtitan", "stack_zero", "--zero 1 is not run by torchtitan"),
    (LLAMA8, L(cp=2, cp_comm="a2a", dp=4), "torchtitan", "stack_cp_comm", "--cp-comm a2a is not run"),
    # what each export target cannot run (issue 15)
    (LLAMA8, L(dp=8, zero=3, shard_group=4), "deepspeed", "stack_hsdp", "no hybrid sharding"),
    (LLAMA8, L(cp=2, pp=2, dp=2, zero=1, cp_comm="a2a"), "deepspeed", "stack_cp_pp",
     "does not combine context parallelism"),
    (MIXTRAL, L(tp=2, ep=2, etp=2, dp=2, zero=3), "torchtitan", "stack_etp", "no expert tensor parallelism"),
    (load_model("gpt-oss-120b"), L(tp=2, ep=4, etp=2, dp=4), "megatron-core", "etp_bias", "linear biases"),
    # activation offloading (Megatron-Core TransformerConfig __post_init__)
    (LLAMA8, L(dp=8, offload_layers=32), "megatron-core", "offload_layers", "at most 31 can be offloaded"),
    (LLAMA8, L(pp=2, dp=4, offload_layers=8), "megatron-core", "offload_pp", "--pp 1 only"),
    (LLAMA8, L(dp=8, recompute="full", offload_layers=8), "megatron-core", "offload_recompute", "--recompute none"),
    (LLAMA8, L(dp=8, zero=3, offload_layers=8), "torchtitan", "offload_where", "no activation offloading"),
]


def test_every_rule_names_its_source():
    names = [n for n, _, _ in rules.rule_table()]
    assert len(names) == len(set(names))
    for name, knobs, source in rules.rule_table():
        assert knobs and source.strip(), name


@pytest.mark.parametrize("model,layout,stack,rule,phrase", TABLE, ids=[f"{r}-{i}" for i, (*_, r, _) in enumerate(TABLE)])
def test_rule_table(model, layout, stack, rule, phrase):
    ctx = rules.context_for(model, layout, STACKS[stack])
    bad = rules.violations(layout, ctx)
    assert rule in [r.name for r, _ in bad], [r.name for r, _ in bad]
    assert phrase in dict((r.name, m) for r, m in bad)[rule]
    with pytest.raises(PlannerError):
        rules.check_layout(layout, ctx)


@pytest.mark.parametrize("model,layout,stack", [
    (LLAMA8, L(tp=8, pp=4, vpp=2, schedule="interleaved", dp=2, sp=True), "megatron-core"),
    (DSV3, L(tp=2, pp=8, vpp=4, schedule="interleaved", ep=64, dp=64, sp=True, first_stage_layers=7,
             last_stage_layers=6, global_batch=1024), "megatron-core"),      # DeepSeek-V3's NeMo layout
    (LLAMA8, L(pp=4, schedule="zbv", dp=2, zero=3), "torchtitan"),
    (MIXTRAL, L(tp=2, sp=True, ep=8, dp=8), "megatron-core"),
    (LLAMA8, L(dp=8, zero=3, offload_layers=31), "megatron-core"),
])
def test_valid_layouts_pass(model, layout, stack):
    assert rules.violations(layout, rules.context_for(model, layout, STACKS[stack])) == []


@pytest.mark.parametrize("model,gpus,stack", [(DSV3, 256, "megatron-core"), (LLAMA8, 64, "torchtitan"),
                                              (MIXTRAL, 32, "deepspeed"), (LLAMA8, 64, "megatron-2021")])
def test_the_search_proposes_only_what_the_rules_accept(model, gpus, stack):
    ctx = rules.Context(model, gpus, 4096, 512, STACKS[stack], ("bf16", "fp8", "fp16"))
    rng = np.random.default_rng(1)
    seen = 0
    for c in iter_candidates(ctx, {"precision": ["bf16", "fp8"]}):
        for i in rng.choice(len(c), size=min(40, len(c)), replace=False):
            lay = c.layout(int(i))
            assert rules.violations(lay, rules.context_for(model, lay, STACKS[stack])) == [], lay
            seen += 1
    assert seen > 20


def test_check_fixed_names_the_knob():
    ctx = rules.Context(LLAMA8, 64, 4096, 512, STACKS["megatron-core"])
    with pytest.raises(PlannerError, match="--tp 3 does not divide --gpus 64"):
        rules.check_fixed(ctx, {"tp": 3})
    with pytest.raises(PlannerError, match="--schedule dualpipe is not run by megatron-core"):
        rules.check_fixed(ctx, {"schedule": "dualpipe"})
    rules.check_fixed(ctx, {"tp": 8, "pp": 4})      # possible: no error


def test_stage_layers_even_and_given():
    first, mid, last = rules.stage_layers(61, np.array([8, 8, 2]), np.array([7, 0, 31]), np.array([6, 0, 30]))
    assert first.tolist() == [7, -1, 31] and mid.tolist() == [8, -1, 0] and last.tolist() == [6, -1, 30]


def test_offloading_needs_the_gpus_host_link():
    """Without gpu.host_bandwidth in the profile the copies cannot be timed: refused in one line."""
    import dataclasses
    from planner.profiles import load_hardware
    cl = load_hardware("h100-sxm")
    lay = L(dp=8, offload_layers=8)
    assert rules.violations(lay, rules.context_for(LLAMA8, lay, STACKS["megatron-core"], cl)) == []
    bare = dataclasses.replace(cl, gpu=dataclasses.replace(cl.gpu, host_bandwidth=0.0))
    bad = rules.violations(lay, rules.context_for(LLAMA8, lay, STACKS["megatron-core"], bare))
    assert [r.name for r, _ in bad] == ["offload_where"] and "gpu.host_bandwidth" in bad[0][1]
