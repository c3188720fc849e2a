"""FLOPs of one transformer layer and of the embedding/logits, term by term.

Per-term counts are 2*m*n*k per GEMM (one multiply-add = 2 FLOP), as in Kaplan et al. 2020
Table 1 and nanoGPT's transformer_sizing.ipynb. Forward only; backward GEMMs cost 2x forward
(input-gradient + weight-gradient GEMMs, Narayanan et al. 2021 sec. 5.1). All functions take
`tokens` (an array or scalar: tokens processed by the whole model replica in a micro-batch) and
`kv_len` (the attended sequence length) and return full-model FLOPs, before any parallel split.
"""
from __future__ import annotations

from .model_spec import ModelSpec


def mla_up_proj_flops(m: ModelSpec, tokens) -> tuple:
    """(q, kv) up-projection GEMM FLOPs of MLA, forward (DeepSeek-V3 sec. 2.1.1 eqs. (2), (4), (8)):
    q from its LoRA rank (or from h without one: the q projection itself), k/v from the kv LoRA rank."""
    a = m.mla
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    return (2 * tokens * (a.q_lora_rank or m.hidden) * m.heads * qk,
            2 * tokens * a.kv_lora_rank * m.heads * (a.qk_nope_head_dim + a.v_head_dim))


def attention_gemm_flops(m: ModelSpec, tokens) -> dict:
    """Projection GEMMs of attention (forward)."""
    h = m.hidden
    if m.mla:
        a = m.mla
        # DeepSeek-V3 sec. 2.1.1 eqs. (1)-(11): low-rank q and kv paths
        q_up, kv_up = mla_up_proj_flops(m, tokens)
        q = q_up + (2 * tokens * h * a.q_lora_rank if a.q_lora_rank else 0)
        kv = 2 * tokens * h * (a.kv_lora_rank + a.qk_rope_head_dim) + kv_up
        return {"attn_qkv": q + kv, "attn_out": 2 * tokens * m.v_dim * h}
    kv_dim = m.kv_heads * m.head_dim
    # Q, K, V projections (GQA: K and V have kv_heads heads) and output projection
    return {"attn_qkv": 2 * tokens * h * (m.q_dim + 2 * kv_dim),
            "attn_out": 2 * tokens * m.v_dim * h}


def attention_core_flops(m: ModelSpec, tokens, kv_len, causal: bool = True):
    """QK^T and attention-times-V (forward): 2*s*kv*(d_qk + d_v) per head; causal masks half
    (FlashAttention-2 paper, Dao 2023, sec. 4.1 FLOP count)."""
    f = 2 * tokens * kv_len * (m.q_dim + m.v_dim)
    return f * 0.5 if causal else f


def mean_attended(m: ModelSpec, seq_len) -> float:
    """Average attended length factor over layers relative to full causal attention: layers with a
    sliding window of w attend to at most w keys (Beltagy et al. 2020 'Longformer' sec. 3.1);
    returned as the multiplier on the full-attention core FLOPs."""
    w, nw = getattr(m, "sliding_window", None), getattr(m, "sliding_window_layers", None)
    if not w:
        return 1.0
    nw = m.layers if nw is None else nw
    import numpy as np
    s = np.asarray(seq_len, dtype=float)
    # causal full attention averages s/2 keys per query; windowed ~ w (for s >> w), at most s/2
    frac = np.minimum(w, s / 2) / (s / 2)
    return (nw * frac + (m.layers - nw)) / m.layers


def mlp_flops(m: ModelSpec, tokens, ffn: int | None = None):
    """Dense MLP: 2 matrices (gelu/relu2) or 3 (gated: swiglu/geglu), Shazeer 2020 'GLU Variants'."""
    f = m.ffn_hidden if ffn is None else ffn
    return 2 * tokens * m.mlp_matrices * m.hidden * f


def moe_flops(m: ModelSpec, tokens) -> dict:
    """MoE block: router GEMM, top_k routed experts per token, shared experts (DeepSeekMoE,
    Dai et al. 2024 eq. 3; Switch Transformer, Fedus et al. 2021 sec. 2.1)."""
    e = m.moe
    return {"router": 2 * tokens * m.hidden * e.experts,
            "experts": e.top_k * mlp_flops(m, tokens, e.expert_ffn_hidden),
            "shared_experts": e.shared_experts * mlp_flops(m, tokens, e.shared_expert_ffn_hidden)}


def logits_flops(m: ModelSpec, tokens):
    """Output projection to the vocabulary (Narayanan et al. 2021 eq. 3, 2*s*h*V per sequence)."""
    return 2 * tokens * m.hidden * m.vocab


def forward_flops_per_token_terms(m: ModelSpec, seq_len: int, causal: bool = True) -> dict:
    """Whole-model forward FLOPs per token, by term (for reports and the 6ND check)."""
    t = 1.0
    a = attention_gemm_flops(m, t)
    terms = {"attn_qkv": m.layers * a["attn_qkv"], "attn_out": m.layers * a["attn_out"],
             "attn_core": m.layers * attention_core_flops(m, t, seq_len, causal) * mean_attended(m, seq_len),
             "mlp": m.dense_layers * mlp_flops(m, t)}
    if m.moe:
        mo = moe_flops(m, t)
        for k, v in mo.items():
            terms["moe_" + k] = m.moe_layers * v
    terms["logits"] = logits_flops(m, t)
    return terms


def model_flops_per_token(m: ModelSpec, seq_len: int, causal: bool = True) -> float:
    """Model FLOPs (MFU basis: forward + backward = 3x forward, no recompute) per token."""
    return 3.0 * sum(forward_flops_per_token_terms(m, seq_len, causal).values())


def narayanan_flops_per_iteration(batch, seq, layers, hidden, vocab):
    """Narayanan et al. 2021 eq. (3): 96*B*s*l*h^2*(1 + s/6h + V/16lh), counts the activation-
    recompute forward pass and non-causal attention (GPT with ffn = 4h, MHA)."""
    return 96 * batch * seq * layers * hidden ** 2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def korthikanti_model_flops_per_iteration(batch, seq, layers, hidden, vocab):
    """Korthikanti et al. 2022 appendix A: 72*B*s*l*h^2*(1 + s/6h + V/12lh) (model FLOPs)."""
    return 72 * batch * seq * layers * hidden ** 2 * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))


def _linears(m: ModelSpec, moe_layer: bool) -> list:
    """(fan_in, fan_out, one per token) of each linear of a layer in execution order (torchtitan's
    model: separate q/k/v; MLA's down- and up-projections; the MoE router and shared expert)."""
    h = m.hidden
    if m.mla:
        a = m.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        q = [(h, a.q_lora_rank), (a.q_lora_rank, m.heads * qk)] if a.q_lora_rank else [(h, m.heads * qk)]
        attn = q + [(h, a.kv_lora_rank + a.qk_rope_head_dim),
                    (a.kv_lora_rank, m.heads * (a.qk_nope_head_dim + a.v_head_dim)), (m.v_dim, h)]
    else:
        kv = m.kv_heads * m.head_dim
        attn = [(h, m.q_dim), (h, kv), (h, kv), (m.v_dim, h)]

    def ffn(f):
        return [(h, f)] * (2 if m.gated else 1) + [(f, h)]
    if not moe_layer:
        return attn + ffn(m.ffn_hidden)
    e = m.moe
    return attn + [(h, e.experts)] + (ffn(e.shared_experts * e.shared_expert_ffn_hidden) if e.shared_experts else [])


def op_sac_recompute_fraction(m: ModelSpec, moe_layer: bool) -> float:
    """Share of a layer's forward GEMM FLOPs torchtitan's op-level selective AC runs again: the
    aten.mm calls it does not save (every second one; torchtitan activation_checkpoint.py
    _apply_op_sac), all of them in a biased model (addmm is never saved), and the routed experts'
    grouped GEMMs (not on the save list)."""
    mats = [fi * fo for fi, fo in _linears(m, moe_layer)]
    rec = sum(mats) if m.bias else sum(mats[1::2])
    total = sum(mats)
    if moe_layer:
        e = m.moe
        experts = e.top_k * e.expert_ffn_hidden * m.hidden * m.mlp_matrices
        rec, total = rec + experts, total + experts
    return rec / total
