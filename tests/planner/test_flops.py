"""FLOP formulas against published figures: 6ND (Kaplan et al. 2020) and Narayanan et al. 2021 eq. 3."""
import pytest

from planner import flops as F
from planner.model_io import load_model
from planner.model_spec import ModelSpec


def gpt(l, h, V=51200, a=None):
    return ModelSpec("g", layers=l, hidden=h, heads=a or h // 128, kv_heads=a or h // 128, ffn_hidden=4 * h,
                     vocab=V, mlp="gelu")


@pytest.mark.parametrize("l,h,a", [(24, 2304, 24), (96, 12288, 96), (128, 25600, 160)])
def test_narayanan_eq3_reproduced_exactly(l, h, a):
    """fwd + bwd + recompute fwd (4x forward) of the layers, 3x of the logits, non-causal attention."""
    m = gpt(l, h, a=a)
    B, s = 512, 2048
    terms = F.forward_flops_per_token_terms(m, s, causal=False)
    mine = (4 * (sum(terms.values()) - terms["logits"]) + 3 * terms["logits"]) * B * s
    assert mine == pytest.approx(F.narayanan_flops_per_iteration(B, s, l, h, 51200), rel=1e-12)


def test_korthikanti_model_flops_reproduced():
    m = gpt(96, 12288, a=96)
    B, s = 1536, 2048
    assert F.model_flops_per_token(m, s, causal=False) * B * s == pytest.approx(
        F.korthikanti_model_flops_per_iteration(B, s, 96, 12288, 51200), rel=1e-12)


@pytest.mark.parametrize("name", ["llama-3-8b", "llama-3-70b", "gpt-175b", "llama-3.1-405b"])
def test_6nd_for_dense_models(name):
    """Model FLOPs per token ~ 6N (Kaplan et al. 2020 eq. 2.1) once the attention-score term
    (which 6N omits) is removed; embedding lookups carry no FLOPs, so N excludes the input embedding."""
    m = load_model(name)
    s = 2048
    terms = F.forward_flops_per_token_terms(m, s)
    no_core = 3 * (sum(terms.values()) - terms["attn_core"])
    n = m.total_params() - m.embedding_params() - m.param_counts()["norms"]
    if m.tied_embeddings:
        n += m.embedding_params()
    assert no_core == pytest.approx(6 * n, rel=0.001)


def test_6nd_for_moe_uses_active_params():
    m = load_model("mixtral-8x7b")
    terms = F.forward_flops_per_token_terms(m, 4096)
    no_core = 3 * (sum(terms.values()) - terms["attn_core"])
    n = m.active_params() - m.embedding_params() - m.param_counts()["norms"]
    assert no_core == pytest.approx(6 * n, rel=0.001)


def test_causal_halves_attention_core():
    m = load_model("llama-3-8b")
    assert F.attention_core_flops(m, 10, 8192, causal=True) * 2 == F.attention_core_flops(m, 10, 8192, causal=False)


def test_gqa_reduces_kv_projection_flops():
    mha = ModelSpec("a", 2, 4096, 32, 32, 14336, 1000, "swiglu")
    gqa = ModelSpec("b", 2, 4096, 32, 8, 14336, 1000, "swiglu")
    f1 = F.attention_gemm_flops(mha, 1)["attn_qkv"]
    f2 = F.attention_gemm_flops(gqa, 1)["attn_qkv"]
    assert f1 == 2 * 4096 * (4096 * 3) and f2 == 2 * 4096 * (4096 + 2 * 1024)
