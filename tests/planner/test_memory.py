"""Memory formulas against Korthikanti et al. 2022 (eqs. 1-5) and Rajbhandari et al. 2020 (ZeRO)."""
import numpy as np
import pytest

from planner import memory as M
from planner.model_spec import ModelSpec


def gpt(h=12288, a=96):
    return ModelSpec("g", layers=96, hidden=h, heads=a, kv_heads=a, ffn_hidden=4 * h, vocab=51200, dropout=True)


@pytest.mark.parametrize("t", [1, 2, 8])
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("rec", ["none", "selective", "full"])
def test_layer_activations_match_korthikanti(t, sp, rec):
    s, b, h, a = 2048, 1, 12288, 96
    m = gpt(h, a)
    code = ["none", "selective", "full"].index(rec)
    got, _ = M.layer_activation_bytes(m, s * b, t, np.array(sp), np.array(code), False, flash=False, kv_len=s)
    assert float(got) == pytest.approx(M.korthikanti_layer_bytes(s, b, h, a, t, sp, rec), rel=1e-9)


def test_korthikanti_table2_gpt3_175b():
    """Korthikanti Table 2 / sec. 4: GPT-3 175B, t=8, SP + selective: 34sbh/t per layer = 1.64 GiB
    over 96 layers... per layer 34*2048*1*12288/8 bytes."""
    assert M.korthikanti_layer_bytes(2048, 1, 12288, 96, 8, True, "selective") == 34 * 2048 * 12288 / 8


def test_flash_attention_drops_the_s_squared_term():
    m = gpt()
    a, core_flash = M.attention_activation_bytes(m, 2048, 8, np.array(True), flash=True)
    _, core = M.attention_activation_bytes(m, 2048, 8, np.array(True), flash=False, kv_len=2048)
    assert core == 5 * 96 * 2048 * 2048 / 8 and core_flash < core / 100


@pytest.mark.parametrize("nd,zero,expected", [
    # Rajbhandari et al. 2020 sec. 5.1 / Fig. 1: 7.5B params, Nd = 64, K = 12, fp16 grads:
    (64, 0, 120e9), (64, 1, 31.4e9), (64, 2, 16.6e9), (64, 3, 1.9e9)])
def test_zero_memory_figure1(nd, zero, expected):
    psi = 7.5e9
    w, g, o = M.model_state_bytes(psi, nd, zero, grad_bytes=2, weight_bytes=2, optimizer_bytes=12)
    assert float(w + g + o) == pytest.approx(expected, rel=0.02)


def test_fp8_linear_inputs_are_kept_in_one_byte():
    """Under Transformer Engine's fp8 the four linear inputs of a dense layer (QKV, output
    projection, fc1, fc2) are saved as their fp8 casts: at 1 byte instead of 2 the layer keeps
    exactly their size less (with SP: sbh/t each for QKV and fc1, b s v/t and b s f/t for the rest)."""
    m = ModelSpec("l", layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256, mlp="swiglu")
    T, t, sp = 8192, 4, np.array(True)
    bf16, _ = M.layer_activation_bytes(m, T, t, sp, np.array(0), False, gemm_in=2.0)
    fp8, _ = M.layer_activation_bytes(m, T, t, sp, np.array(0), False, gemm_in=1.0)
    assert float(bf16) == float(M.layer_activation_bytes(m, T, t, sp, np.array(0), False)[0])
    assert float(bf16 - fp8) == T * (2 * m.hidden + m.v_dim + m.ffn_hidden) / t
    full_bf16, _ = M.layer_activation_bytes(m, T, t, sp, np.array(2), False, gemm_in=2.0)
    assert float(full_bf16) == float(M.layer_activation_bytes(m, T, t, sp, np.array(2), False, gemm_in=1.0)[0])


def test_fp8_saved_inputs_follow_the_stack():
    """The cost model keeps fp8 linear inputs for Megatron-Core (TE) and bf16 ones for torchtitan
    (torchao's Float8Linear saves the high-precision input and casts again in backward)."""
    from planner.costmodel.activations import layer_activations
    from planner.costmodel.elements import ElementBytes
    from planner.costmodel.knobs import LayerKnobs
    from planner.layout import Precision
    from planner.stacks import STACKS
    m = ModelSpec("l", layers=32, hidden=4096, heads=32, kv_heads=8, ffn_hidden=14336, vocab=128256, mlp="swiglu")
    cols = dict(tp=[2, 2], pp=[1, 1], dp=[1, 1], cp=[1, 1], ep=[1, 1], etp=[1, 1], micro_batch=[1, 1],
                seq_len=[8192, 8192], sp=[True, True], precision=[Precision.BF16, Precision.FP8],
                cp_comm=[0, 0], overlap_tp=[True, True], overlap_ep=[True, True], shard_group=[1, 1])
    k = LayerKnobs.of(cols)
    saved = {}
    for name in ("megatron-core", "torchtitan"):
        st = STACKS[name]
        saved[name] = layer_activations(m, st, k, np.ones(2), ElementBytes.of_stack(st)).dense[0]  # no recompute
    te_bf16, te_fp8 = saved["megatron-core"]
    assert te_bf16 - te_fp8 == 8192 * (2 * m.hidden + m.v_dim + m.ffn_hidden) / 2
    assert saved["torchtitan"][0] == saved["torchtitan"][1]


@pytest.mark.parametrize("zero, fp8_over_bf16", [(1, 1.0), (0, 2.0)])
def test_fp8_weights_replace_the_16_bit_copy_only_with_a_sharded_optimizer(zero, fp8_over_bf16):
    """Megatron-Core under NeMo's fp8 presets keeps weights in fp8 (+ TE's transpose: 2 B, as bf16)
    when the optimizer is sharded (--fp8-param-gather); with plain DDP it keeps bf16 weights and
    the fp8 weight + transpose beside them (4 B)."""
    from planner.engine import search
    from planner.model_io import load_model
    from planner.profiles import load_hardware
    m, cl = load_model("gpt-20b"), load_hardware("h100-sxm")
    w = {}
    for prec in ("bf16", "fp8"):
        res = search(m, cl, 64, fixed=dict(tp=8, pp=1, zero=zero, precision=prec, micro_batch=1, recompute="full"),
                     top=1, precisions=[prec])
        w[prec] = res.to_dataframe().iloc[0].mem_weights_gib
    assert w["fp8"] == pytest.approx(fp8_over_bf16 * w["bf16"], rel=1e-9)


def test_fp8_grouped_gemm_inputs_are_kept_in_one_byte():
    """An MoE block under TE fp8: each routed token copy's fc1 input (gathered over etp) and fc2
    input take 1 byte, the unpermute's kept output and the router's input stay 16-bit."""
    from planner.model_spec import MoESpec
    m = ModelSpec("q", layers=48, hidden=2048, heads=32, kv_heads=4, ffn_hidden=6144, vocab=151936, mlp="swiglu",
                  moe=MoESpec(experts=128, top_k=8, expert_ffn_hidden=768))
    T, tp, etp = 4096, 2, 2
    bf16 = M.moe_activation_bytes(m, T, tp, np.array(True), etp=etp, gemm_in=2.0)
    fp8 = M.moe_activation_bytes(m, T, tp, np.array(True), etp=etp, gemm_in=1.0)
    routed = T / tp * 8
    assert float(bf16) == float(M.moe_activation_bytes(m, T, tp, np.array(True), etp=etp))
    assert float(bf16 - fp8) == routed * (etp * m.hidden + 768)


@pytest.mark.parametrize("zero", [0, 1])
def test_megatron_keeps_and_reduces_fp16_gradients_in_fp16(zero):
    """Under --fp16 Megatron's gradient buffer has the parameters' dtype (arguments.py forces fp32
    accumulation only under --bf16): 2 bytes of gradient per parameter where bf16 holds 4, and half
    the DP reduction traffic; the search (rank tables) and one layout agree."""
    from planner.engine import evaluate_layout, search
    from planner.layout import Layout
    from planner.model_io import load_model
    from planner.profiles import load_hardware
    m, cl = load_model("gpt-3.6b"), load_hardware("a100-sxm-80gb")
    got = {}
    for prec in ("bf16", "fp16"):
        L = Layout(tp=2, dp=4, micro_batch=1, global_batch=32, seq_len=2048, zero=zero, precision=prec,
                   overlap_dp=False)          # the whole reduction exposed, to compare its bytes
        one = evaluate_layout(m, cl, L)
        res = search(m, cl, 8, seq_len=2048, global_batch=32, top=1, precisions=[prec],
                     fixed=dict(tp=2, pp=1, dp=4, micro_batch=1, zero=zero, recompute="none", sp=False),
                     overlap={"overlap_dp": False})
        assert res.best.memory_breakdown_gib["gradients"] == pytest.approx(one.memory_breakdown_gib["gradients"])
        got[prec] = one
    g = {p: got[p].memory_breakdown_gib["gradients"] for p in got}
    assert g["fp16"] == pytest.approx(g["bf16"] / 2, rel=1e-6)
    dp = {p: got[p].time_breakdown_s["dp_comm"] for p in got}
    assert dp["fp16"] < dp["bf16"]


def test_recompute_modules_drop_what_megatron_frees():
    """Each Megatron-Core module list drops exactly its tensors (memory.recompute_module_bytes):
    mla_up_proj MLA's up-projected Q, K, V; layernorm both norms' outputs; moe_act fc2's
    input per routed token copy; mlp a dense layer's MLP beyond its input -- and nothing where the
    module is absent (mlp in an MoE layer, moe_act in a dense one)."""
    from planner.model_spec import MLASpec, MoESpec
    m = ModelSpec("d", layers=8, hidden=1024, heads=16, kv_heads=16, ffn_hidden=4096, vocab=32000, mlp="swiglu",
                  mla=MLASpec(kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                               v_head_dim=32, q_lora_rank=256),
                  moe=MoESpec(experts=16, top_k=4, expert_ffn_hidden=256, dense_layers=2))
    T, tp, sp = 4096, 2, np.array(True)
    attn, _ = M.attention_activation_bytes(m, T, tp, sp)
    qkv = 2.0 * T * (m.q_dim + 2 * ((m.q_dim + m.v_dim) // 2)) / tp
    assert float(M.recompute_module_bytes(m, T, tp, sp, ("mla_up_proj",), True)) == qkv < float(attn)
    assert float(M.recompute_module_bytes(m, T, tp, sp, ("layernorm",), False, gemm_in=1.0)) == 2 * T * 1024 / tp
    assert float(M.recompute_module_bytes(m, T, tp, sp, ("layernorm",), True, gemm_in=1.0)) == 3 * T * 1024 / tp
    assert float(M.recompute_module_bytes(m, T, tp, sp, ("moe_act",), True, gemm_in=1.0)) == T / tp * 4 * 256
    assert M.recompute_module_bytes(m, T, tp, sp, ("moe_act",), False) == 0.0
    assert M.recompute_module_bytes(m, T, tp, sp, ("mlp",), True) == 0.0
    dense = M.mlp_activation_bytes(m, T, tp, sp)
    assert float(M.recompute_module_bytes(m, T, tp, sp, ("mlp",), False)) == float(dense) - 2 * 2.0 * T * 1024 / tp   # its LN and fc1 inputs stay
