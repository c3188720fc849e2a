"""Memory per GPU: model states (Rajbhandari et al. 2020, 'ZeRO', sec. 3 and 5) and
activations (Korthikanti et al. 2022, 'Reducing Activation Recomputation', sec. 4), generalised
to GQA/MLA, gated MLPs and MoE term by term. Bytes throughout.
"""
from __future__ import annotations

import numpy as np

from .model_spec import ModelSpec

ACT_BYTES = 2  # bf16/fp16 activations


def attention_activation_bytes(m: ModelSpec, tokens, tp, sp, flash=True, kv_len=None, cp=1, act=ACT_BYTES,
                               stat=4.0, gemm_in=None):
    """Activations one attention block saves for backward (Korthikanti eq. 1 terms):
    LayerNorm input 2sbh, QKV input 2sbh, Q/K/V, attention core (5as^2b without flash attention;
    output + fp32 log-sum-exp with it), output-projection input, dropout mask sbh.
    `tokens` = b*s/cp on this rank; SP shards the LayerNorm/dropout region by tp. `act`, `stat`:
    bytes per activation / per softmax statistic (bf16 and fp32 in mixed precision); `gemm_in`:
    per element of a linear layer's saved input (the QKV and output-projection inputs), `act`
    unless the stack keeps it in fp8 (Stack.fp8_saved_input_bytes)."""
    h = m.hidden
    gi = act if gemm_in is None else gemm_in
    spdiv = np.where(sp, tp, 1)
    kv_dim = (m.q_dim + m.v_dim) // 2 if m.mla else m.kv_heads * m.head_dim
    replicated = tokens * h * (act + gi + (1 if m.dropout else 0)) / spdiv  # LN in, QKV in, mask
    if m.mla:   # the low-rank latents on the SP shard: each LoRA norm's input and output (DeepSeek-V3
        # sec. 2.1.1; Megatron-Core multi_latent_attention.py runs the down-projections on the shard)
        replicated = replicated + 2 * act * tokens * (m.mla.q_lora_rank + m.mla.kv_lora_rank) / spdiv
    qkv = act * tokens * (m.q_dim + 2 * kv_dim) / tp
    out_in = gi * tokens * m.v_dim / tp
    if flash:
        core = stat * tokens * m.heads / tp  # fp32 log-sum-exp per head (FlashAttention-2 alg. 1)
    else:
        s = kv_len if kv_len is not None else tokens
        # softmax output act, dropout mask 1, dropout output act (Korthikanti eq. 1: 5as^2b in fp16)
        core = (2 * act + 1 if m.dropout else act) * m.heads * tokens * s / tp
    return replicated + qkv + out_in, core


def mlp_activation_bytes(m: ModelSpec, tokens, tp, sp, ffn=None, act=ACT_BYTES, gated_tensors=3, gemm_in=None):
    """Dense MLP (Korthikanti eq. 1: 19sbh for ffn = 4h): LN input 2sbh, fc1 input 2sbh,
    activation input and output, dropout mask sbh. A gated MLP keeps `gated_tensors` f-wide
    tensors: 3 with a fused SwiGLU (fc1's gate+up output and fc2's input; Megatron-Core
    bias_swiglu_impl), 4 in eager PyTorch (w1 and w3 outputs, silu output, their product).
    fc1's and fc2's inputs take `gemm_in` bytes per element (attention_activation_bytes)."""
    f = m.ffn_hidden if ffn is None else ffn
    gi = act if gemm_in is None else gemm_in
    spdiv = np.where(sp, tp, 1)
    replicated = tokens * m.hidden * (act + gi + (1 if m.dropout else 0)) / spdiv
    inner = tokens * f * (act * ((gated_tensors if m.gated else 2) - 1) + gi) / tp
    return replicated + inner


def moe_activation_bytes(m: ModelSpec, tokens, tp, sp, etp=1, imbalance=1.0, act=ACT_BYTES, stat=4.0,
                         gated_tensors=3, gemm_in=None):
    """MoE block: LN and router input on the SP shard, the permuted token copies (top_k per
    token) that feed the grouped expert GEMMs, the expert activations, and shared experts."""
    e = m.moe
    spdiv = np.where(sp, tp, 1)
    local = tokens / tp  # MoE with TP requires SP in Megatron-Core: tokens are sharded by tp
    replicated = tokens * m.hidden * (act + act + (1 if m.dropout else 0)) / spdiv  # the router's input stays 16-bit
    routed = local * e.top_k * imbalance
    # permuted expert inputs, expert activations, and the expert outputs the unpermute keeps for
    # the routing-probability gradient (Megatron-Core moe_utils.unpermute), plus int64 routing maps.
    # Under expert TP fc1 keeps the input gathered over the etp group (etp x routed tokens,
    # token_dispatcher dispatch_postprocess) and each rank runs those tokens on ffn/etp columns:
    # its intermediates are routed x ffn, whatever etp (measured by validate: tests/validate)
    # the grouped GEMMs' inputs (fc1's gathered tokens, fc2's activation) take `gemm_in` bytes
    gi = act if gemm_in is None else gemm_in
    g = gated_tensors if m.gated else 2
    experts = routed * (act * m.hidden + gi * etp * m.hidden + e.expert_ffn_hidden * (act * (g - 1) + gi))
    experts = experts + 8.0 * routed
    shared = (tokens * e.shared_experts * e.shared_expert_ffn_hidden * (act * (g - 1) + gi) / tp
              if e.shared_experts else 0.0)
    probs = stat * local * e.experts  # fp32 router logits/probabilities
    return replicated + experts + shared + probs


def layer_activation_bytes(m: ModelSpec, tokens, tp, sp, recompute, moe_layer, flash=True,
                           kv_len=None, etp=1, imbalance=1.0, act=ACT_BYTES, stat=4.0, gated_tensors=3,
                           selective_kind="core", gemm_in=None):
    """Bytes one layer keeps per micro-batch under a recompute policy (codes: 0 none,
    1 selective, 2 full). Full recompute keeps only the layer input 2sbh (/t with SP),
    Korthikanti sec. 4.2.2; selective drops the attention core (sec. 5), or, with
    selective_kind "op", keeps what torchtitan's op-level SAC keeps (op_sac_layer_bytes)."""
    attn, core = attention_activation_bytes(m, tokens, tp, sp, flash, kv_len, act=act, stat=stat, gemm_in=gemm_in)
    mlp = moe_activation_bytes(m, tokens, tp, sp, etp, imbalance, act, stat, gated_tensors, gemm_in) if moe_layer else \
        mlp_activation_bytes(m, tokens, tp, sp, act=act, gated_tensors=gated_tensors, gemm_in=gemm_in)
    full_layer = attn + core + mlp
    ckpt = act * tokens * m.hidden / np.where(sp, tp, 1)
    if selective_kind == "op":
        selective = ckpt + op_sac_layer_bytes(m, tokens, tp, sp, moe_layer, act, stat)
    else:
        selective = attn + mlp        # core attention (scores, or flash's log-sum-exp) recomputed
    return np.select([recompute == 0, recompute == 1], [full_layer, selective], ckpt), full_layer


def recompute_module_bytes(m: ModelSpec, tokens, tp, sp, modules: tuple, moe_layer, etp=1, imbalance=1.0,
                           act=ACT_BYTES, gated_tensors=3, gemm_in=None):
    """Bytes of one layer's kept activations that Megatron-Core's selective recompute of `modules`
    drops (transformer_config.py recompute_modules; each a CheckpointWithoutOutput whose output is
    freed once consumed and made again in backward): mla_up_proj the up-projected Q, K, V
    (multi_latent_attention.py recompute_up_proj), layernorm both norms' outputs (the QKV and the
    fc1 / router inputs; transformer_layer.py recompute_input/pre_mlp_layernorm), moe_act the
    experts' activation output, fc2's input (moe/experts.py), mlp a dense layer's MLP beyond its
    input (transformer_layer.py recompute_mlp: dense layers only). core_attn: layer_activation_bytes."""
    gi = act if gemm_in is None else gemm_in
    spdiv = np.where(sp, tp, 1)
    g = gated_tensors if m.gated else 2
    drop = 0.0
    if "mla_up_proj" in modules and m.mla:
        drop = drop + act * tokens * (m.q_dim + m.q_dim + m.v_dim) / tp
    if "layernorm" in modules:
        drop = drop + tokens * m.hidden * (gi + (act if moe_layer else gi)) / spdiv
    if "moe_act" in modules and moe_layer:
        drop = drop + tokens / tp * m.moe.top_k * imbalance * m.moe.expert_ffn_hidden * gi
    if "mlp" in modules and not moe_layer:
        drop = drop + tokens * m.ffn_hidden * (act * (g - 1) + gi) / tp
    return drop


def _mm_outputs(m: ModelSpec, T, tp, sp, moe_layer) -> list:
    """Elements of each aten.mm output of one layer's forward, in execution order, on one TP rank
    under DTensor TP: column-parallel outputs are split over tp, row-parallel ones are the full
    sequence's partial sums; MLA's down-projections and the MoE router run replicated."""
    Tl = T / np.where(sp, tp, 1)
    if m.mla:
        a = m.mla
        q = ([T * a.q_lora_rank, T * m.heads * (a.qk_nope_head_dim + a.qk_rope_head_dim) / tp] if a.q_lora_rank
             else [T * m.heads * (a.qk_nope_head_dim + a.qk_rope_head_dim) / tp])
        attn = q + [T * (a.kv_lora_rank + a.qk_rope_head_dim),
                    T * m.heads * (a.qk_nope_head_dim + a.v_head_dim) / tp, T * m.hidden]
    else:
        kv = m.kv_heads * m.head_dim / tp
        attn = [T * m.q_dim / tp, T * kv, T * kv, T * m.hidden]
    def ffn(tokens, f, split):  # noqa: E306
        return [tokens * f / split] * (2 if m.gated else 1) + [tokens * m.hidden]
    if not moe_layer:
        return attn + ffn(T, m.ffn_hidden, tp)
    e = m.moe
    shared = ffn(Tl, e.shared_experts * e.shared_expert_ffn_hidden, 1) if e.shared_experts else []
    return attn + [Tl * e.experts] + shared


def op_sac_layer_bytes(m: ModelSpec, tokens, tp, sp, moe_layer, act=ACT_BYTES, stat=4.0):
    """What torchtitan's op-level selective AC keeps of one layer beyond its input
    (torchtitan activation_checkpoint.py _apply_op_sac, save list of Dec 2024): every other aten.mm
    output (the 1st, 3rd, ...; biased linears run addmm and keep nothing), the SDPA output and
    log-sum-exp, and each reduce-scatter output under SP (the attention's and the MLP's)."""
    mms = 0.0 if m.bias else sum(_mm_outputs(m, tokens, tp, sp, moe_layer)[0::2])
    sdpa = tokens * m.v_dim / tp * act + tokens * m.heads / tp * stat
    rs = np.where(sp & (tp > 1), (1 if moe_layer else 2) * tokens * m.hidden / tp, 0.0)
    return mms * act + sdpa + rs * act


def korthikanti_layer_bytes(s, b, h, a, t, sp: bool, recompute: str):
    """Korthikanti et al. 2022 eqs. (2)-(5), bytes per layer (GPT, MHA, ffn 4h, dropout)."""
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    if sp and recompute == "selective":
        return s * b * h * 34 / t
    if sp:
        return s * b * h * (34 / t + 5 * a * s / (h * t))
    if recompute == "selective":
        return s * b * h * (10 + 24 / t)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def model_state_bytes(params, dp_shard, zero, grad_bytes=4, weight_bytes=2, optimizer_bytes=12, zero3_shard=None):
    """Weights, gradients and optimizer states per GPU (Rajbhandari et al. 2020 sec. 3.1/5.1):
    mixed-precision Adam keeps fp16/bf16 weights (2), gradients (2 in the paper; Megatron keeps
    fp32 main grads, 4) and K=12 bytes of fp32 master weight, momentum and variance. ZeRO-1
    shards the optimizer states, ZeRO-2 also the gradients, ZeRO-3 also the weights over
    the dp_shard ranks. ZeRO-1/2 shards are equal slices of the flat buffer padded to a multiple
    of the group (Megatron-Core param_and_grad_buffer.py; validate/parallel.py Bucket); FSDP2
    (ZeRO-3) shards each parameter's first dimension (torch.chunk) into padded chunks: zero3_shard,
    the elements one rank allocates (costmodel/shapes.py; params / dp_shard when not given)."""
    zero = np.asarray(zero)
    g_ = np.maximum(dp_shard, 1)
    flat = np.where((zero == 1) | (zero == 2), np.ceil(params / g_) * g_, params)
    z3 = params / g_ if zero3_shard is None else zero3_shard
    w = np.where(zero >= 3, z3, params) * weight_bytes
    g = np.where(zero >= 3, z3, flat / np.where(zero >= 2, g_, 1)) * grad_bytes
    o = np.where(zero >= 3, z3, flat / np.where(zero >= 1, g_, 1)) * optimizer_bytes
    return w, g, o


def norm_statistics_bytes(m: ModelSpec, tokens, tp, sp, stat=4.0):
    """The two norms' saved statistics per layer: rstd (RMSNorm) or mean and rstd (LayerNorm) in
    fp32 per token of the rank's (SP-sharded) sequence -- Transformer Engine and PyTorch's fused
    norms keep them for backward; Korthikanti et al. count the norm input only."""
    return 2 * tokens / np.where(sp, tp, 1) * (2 if m.bias else 1) * stat


def gathered_inputs_bytes(m: ModelSpec, tokens, tp, sp, moe_layer, act=ACT_BYTES):
    """What a stack that keeps the all-gathered input of each column-parallel linear under SP
    saves beyond the shard Megatron keeps (PyTorch ColwiseParallel after SequenceParallel, as
    torchtitan runs it; Megatron re-gathers in backward, tensor_parallel/layers.py
    LinearWithGradAccumulationAndAsyncCommunication): QKV and fc1 inputs; in an MoE layer the
    attention's, and the shared experts' whole gathered input (the router keeps the shard)."""
    shared = bool(moe_layer and m.moe and m.moe.shared_experts)
    extra = ((1 if moe_layer else 2) * (tokens - tokens / tp) + (tokens if shared else 0)) * m.hidden * act
    return np.where(sp, extra, 0.0)