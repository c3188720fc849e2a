"""Emitted Megatron-LM scripts against Megatron-LM's recorded parser and the validation rules
dtplanner mirrors (megatron_rules.py, each with its file and line at d98e8a64), over a case table
like the one the emits were first tried on: dense, MoE, vpp, CP, ZeRO-1/2/3, HSDP, fp8, recompute
modes, uneven stages, GB200. The rule checker is itself held to known rejections."""
import pytest

from planner.engine import search
from planner.export import MEGATRON_COMMIT, emit
from planner.model_io import load_model
from planner.profiles import load_hardware

from . import megatron_rules as R

# name -> (model, gpus, hardware, fixed knobs)
CASES = {
    "llama8b-tp8-pp4": ("llama-3-8b", 64, "h100-sxm", dict(tp=8, pp=4)),
    "llama70b-vpp": ("llama-3-70b", 512, "h100-sxm", dict(tp=8, pp=4, vpp=5)),
    "llama70b-hsdp-zero3": ("llama-3-70b", 256, "h100-sxm", dict(tp=8, pp=1, zero=3, shard_group=8)),
    "llama70b-hsdp-zero1": ("llama-3-70b", 256, "h100-sxm", dict(tp=8, pp=4, zero=1, shard_group=8)),
    "llama70b-zero2": ("llama-3-70b", 256, "h100-sxm", dict(tp=8, zero=2)),
    "llama405b-cp2-full": ("llama-3.1-405b", 2048, "h100-sxm", dict(cp=2, recompute="full")),
    "llama405b-selective": ("llama-3.1-405b", 1024, "h100-sxm", dict(recompute="selective", tp=8, pp=16)),
    "gpt175b-fp16": ("gpt-175b", 1024, "a100-sxm-80gb", dict(precision="fp16")),
    "gpt20b-fp8": ("gpt-20b", 64, "h100-sxm", dict(precision="fp8")),
    "mixtral-ep8": ("mixtral-8x7b", 64, "h100-sxm", dict(ep=8)),
    "qwen3-30b": ("qwen3-30b-a3b", 64, "h100-sxm", {}),
    "deepseek-v3-2048": ("deepseek-v3", 2048, "h100-sxm", {}),
    "deepseek-v3-uneven-vpp": ("deepseek-v3", 2048, "h100-sxm", dict(pp=16, vpp=2, first_stage_layers=3, last_stage_layers=2)),
    "llama8b-gb200": ("llama-3-8b", 72, "gb200-nvl72", dict(tp=2)),
    "gpt-oss-120b": ("gpt-oss-120b", 64, "b200", {}),
}


def _emit(model, gpus, hw, fixed):
    m, cl = load_model(model), load_hardware(hw)
    res = search(m, cl, gpus, fixed=fixed, top=1)
    assert res.best is not None, res.empty_reason
    text, _ = emit(res.best, m, "megatron", cl)
    return text, res.best


@pytest.mark.parametrize("name", list(CASES))
def test_megatron_accepts_the_emitted_script(name):
    model, gpus, hw, fixed = CASES[name]
    text, plan = _emit(model, gpus, hw, fixed)
    assert f"commit {MEGATRON_COMMIT[:12]}" in text
    argv = R.emitted_args(text)
    assert R.check(argv, gpus) == []
    a = R.parse(argv)
    L = plan.layout
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.context_parallel_size) == (L.tp, L.pp, L.cp)
    if L.shard_group and L.shard_group < L.dp * L.cp:     # HSDP is stated, not dropped
        assert a.num_distributed_optimizer_instances == L.dp * L.cp // L.shard_group


def test_fp8_weights_are_emitted_as_the_memory_model_counts_them():
    """Under fp8 with the distributed optimizer the planner counts weights in fp8 only
    (Stack.fp8_param_gather); the script must ask Megatron for exactly that."""
    text, plan = _emit("gpt-20b", 64, "h100-sxm", dict(precision="fp8", zero=1))
    a = R.parse(R.emitted_args(text))
    assert plan.layout.zero == 1 and a.fp8 == "hybrid" and a.fp8_param_gather and a.use_distributed_optimizer


def test_bf16_gradients_are_emitted_as_megatron_parses_them():
    """plan --grad-dtype bf16 counts 2-byte gradients; the script asks Megatron for exactly that
    (--grad-reduce-in-bf16, which turns accumulate_allreduce_grads_in_fp32 off), and only then."""
    from planner.stacks import STACKS, with_grad_dtype
    m, cl = load_model("llama-3-8b"), load_hardware("h100-sxm")
    stack = with_grad_dtype(STACKS["megatron-core"], "bf16")
    plan = search(m, cl, 64, fixed=dict(tp=8, precision="bf16"), top=1, stack=stack).best
    argv = R.emitted_args(emit(plan, m, "megatron", cl, stack=stack)[0])
    assert R.check(argv, 64) == [] and R.parse(argv).grad_reduce_in_bf16
    plain = R.emitted_args(emit(plan, m, "megatron", cl)[0])
    assert not R.parse(plain).grad_reduce_in_bf16


def test_rope_base_is_emitted_as_megatron_parses_it():
    a = R.parse(R.emitted_args(_emit("mixtral-8x7b", 64, "h100-sxm", {})[0]))
    assert a.rotary_base == 1_000_000
    a = R.parse(R.emitted_args(_emit("llama-3-8b", 64, "h100-sxm", {})[0]))
    assert a.rotary_base == 500_000


@pytest.mark.parametrize("argv, world, rule", [
    (["--num-layers", "61", "--pipeline-model-parallel-size", "16", "--decoder-first-pipeline-num-layers", "3",
      "--decoder-last-pipeline-num-layers", "2", "--num-virtual-stages-per-pipeline-rank", "2"], 2048, "T:2306"),
    (["--num-layers", "32", "--pipeline-model-parallel-size", "4", "--num-virtual-stages-per-pipeline-rank", "3"],
     64, "get_num_layers_to_build"),
    (["--num-layers", "32", "--pipeline-model-parallel-layout", "Ett|tt", "--pipeline-model-parallel-size", "2"],
     64, "T:2290"),
    (["--num-layers", "32", "--use-distributed-optimizer", "--num-distributed-optimizer-instances", "3"], 8, "P:922"),
    (["--num-layers", "32", "--context-parallel-size", "3", "--seq-length", "8192"], 24, "A:1336"),
    (["--num-layers", "32", "--recompute-granularity", "full"], 8, "T:1901"),
    (["--num-layers", "32", "--tensor-model-parallel-size", "3"], 8, "A:432"),
    (["--num-layers", "32", "--bf16", "--fp8-format", "hybrid", "--fp8-param-gather"], 8, "--fp8-param-gather"),
    (["--num-layers", "32", "--recompute-granularity", "selective", "--recompute-modules", "mla_up_proj"], 8, "T:1969"),
    (["--num-layers", "32", "--recompute-granularity", "selective", "--recompute-modules", "moe_act"], 8, "T:1964"),
    (["--num-layers", "32", "--moe-grouped-gemm", "--fp8-format", "hybrid", "--recompute-granularity", "selective",
      "--recompute-modules", "layernorm", "moe_act"], 8, "T:2000"),
])
def test_the_mirrored_rules_reject_what_megatron_rejects(argv, world, rule):
    base = {"--num-attention-heads": "32", "--micro-batch-size": "1", "--global-batch-size": "64",
            "--seq-length": "4096"}
    full = argv + [x for k, v in base.items() if k not in argv for x in (k, v)]
    assert any(b.startswith(rule) or rule in b for b in R.check(full, world))


@pytest.mark.parametrize("pad", [False, True])
def test_an_expert_capacity_is_emitted_not_dropped(pad):
    """A plan made with --capacity-factor (and --pad-to-capacity) is emitted with Megatron's own
    flags, which its parser takes and its TransformerConfig rules accept."""
    m, cl = load_model("mixtral-8x7b"), load_hardware("h100-sxm")
    res = search(m, cl, 64, top=1, capacity_factor=1.25, pad_to_capacity=pad)
    text, _ = emit(res.best, m, "megatron", cl, capacity_factor=1.25, pad_to_capacity=pad)
    argv = R.emitted_args(text)
    assert R.check(argv, 64) == []
    a = R.parse(argv)
    assert a.moe_expert_capacity_factor == 1.25 and a.moe_pad_expert_input_to_capacity is pad
    # the mirrored rule: padding without a capacity is refused by Megatron
    assert any("T:1862" in r for r in R.check([x for x in argv if x not in ("--moe-expert-capacity-factor", "1.25")]
                                               + ["--moe-pad-expert-input-to-capacity"], 64))


@pytest.mark.parametrize("model, gpus, hw, precision, recompute", [
    ("deepseek-v3", 1024, "h100-sxm", "fp8", "selective:mla_up_proj+mlp"),
    ("deepseek-v3", 256, "gb200-nvl72", "bf16", "selective:mla_up_proj"),
    ("gpt-oss-120b", 64, "h100-sxm", "bf16", "selective:layernorm+moe_act"),
    ("qwen3-30b-a3b", 16, "h100-sxm", "fp8", "selective:moe_act"),
])
def test_a_recompute_module_list_is_emitted_as_megatron_takes_it(model, gpus, hw, precision, recompute):
    """A plan recomputing Megatron-Core modules (the lists NVIDIA's recipes run) is emitted as
    --recompute-granularity selective --recompute-modules <each>, which the parser splits into
    the same list and TransformerConfig's rules accept (fp8 with moe_act/layernorm: not delayed)."""
    text, plan = _emit(model, gpus, hw, dict(precision=precision, recompute=recompute))
    argv = R.emitted_args(text)
    assert R.check(argv, gpus) == []
    a = R.parse(argv)
    assert a.recompute_granularity == "selective"
    assert a.recompute_modules == plan.layout.recompute.split(":")[1].split("+")


def test_activation_offloading_is_emitted_as_megatron_takes_it():
    """A plan offloading activations (Megatron-Core --cpu-offloading-num-layers, as NVIDIA's GB200
    recipes run Llama 3 70B under Megatron-FSDP) is emitted with that flag, which the parser takes
    and TransformerConfig's rules accept (pp 1, no recompute, fewer layers than the model); the
    mirrored rules refuse what Megatron refuses."""
    text, plan = _emit("llama-3-70b", 64, "gb200-nvl72",
                       dict(tp=1, pp=1, cp=1, zero=3, micro_batch=2, precision="fp8", offload_layers=40))
    argv = R.emitted_args(text)
    assert R.check(argv, 64) == []
    assert R.parse(argv).cpu_offloading_num_layers == 40 == plan.layout.offload_layers
    assert any("T:1891" in b for b in R.check(argv + ["--pipeline-model-parallel-size", "2"], 64))
    assert any("T:1896" in b for b in R.check(argv + ["--recompute-granularity", "selective"], 64))
    assert any("T:1884" in b for b in R.check(argv + ["--cpu-offloading-num-layers", "80"], 64))
