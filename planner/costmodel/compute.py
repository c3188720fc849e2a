"""Phase 1, compute: per-layer forward/backward times and FLOPs of one micro-batch on one rank
(GEMMs on a roofline, flash or unfused attention, fused elementwise kernels, kernel launches),
and the embedding and logits stages."""
from __future__ import annotations

import numpy as np

from .. import flops as F
from ..hardware import Cluster
from ..layout import Precision, Recompute
from ..model_spec import ModelSpec
from ..stacks import Stack
from . import elementwise as E
from .knobs import LayerKnobs
from .records import Record, record, full

# kernels per layer forward (backward launches about twice as many): dense layer = 2 norms, QKV,
# RoPE, attention, out-proj, 2 residual adds, fc1, activation, fc2, plus 4 TP collectives (counted
# from Megatron-Core TransformerLayer with TE modules); an MoE block adds router GEMM, top-k,
# softmax, token histogram, permute, 2 grouped GEMMs, activation, unpermute, 2 all-to-alls and
# their metadata copies (Megatron-Core MoELayer with the all-to-all dispatcher)
KERNELS_DENSE_FWD = 16
KERNELS_MOE_FWD = 28
ATTN_BWD_FACTOR = 2.5       # FlashAttention-2 backward = 2.5x forward FLOPs (Dao 2023 sec. 3.1.2: 5 GEMMs vs 2)


@record
class LayerCompute(Record):
    """Seconds and FLOPs of one layer (or the embedding/logits) for one micro-batch on one rank."""
    lin_peak: np.ndarray       # dense peak FLOP/s of the precision the linear layers run in
    core_flops: np.ndarray     # core attention forward FLOPs as executed (causal / (tp cp); full if unfused)
    gemm_flops_dense: np.ndarray   # forward GEMM FLOPs of a dense layer
    gemm_flops_moe: np.ndarray     # forward GEMM FLOPs of an MoE layer (busiest rank's routed tokens)
    t_core_f: np.ndarray       # core attention forward
    t_core_b: np.ndarray       # core attention backward
    t_attn_gemm: np.ndarray    # QKV + output projection forward
    t_dense_mlp: np.ndarray    # dense MLP GEMMs forward
    t_attn_f: np.ndarray       # attention block forward (GEMMs, core, shared elementwise)
    t_moe_f: np.ndarray        # MoE block forward
    f_dense: np.ndarray        # whole layer forward
    f_moe: np.ndarray
    b_dense: np.ndarray        # whole layer backward
    b_moe: np.ndarray
    w_dense: np.ndarray        # weight-gradient share of the backward (zero-bubble schedules)
    w_moe: np.ndarray
    t_emb: np.ndarray          # embedding lookup, forward (backward costs the same)
    lg_f: np.ndarray           # logits GEMM forward
    logits_f: np.ndarray       # logits + cross entropy forward
    logits_b: np.ndarray       # logits + cross entropy backward
    logits_flops: np.ndarray   # logits GEMM forward FLOPs
    rc_dense: np.ndarray       # rows by Recompute code: a dense layer's recompute, seconds
    rc_moe: np.ndarray         # the same for an MoE layer
    fl_rc_dense: np.ndarray    # and their FLOPs
    fl_rc_moe: np.ndarray


def gemm_time(cluster: Cluster, stack: Stack, flops, m, n, k, peak):
    """Roofline GEMM time: flops / (peak * eff(m, n, k)), eff a saturating curve in the smallest
    dimension (hardware.Efficiency); bounded below by the HBM time of A, B and C."""
    e = cluster.efficiency
    x = np.minimum(np.minimum(m, n), k)
    eff = peak[1] * stack.gemm * x / (x + e.gemm_half_dim)
    t_compute = flops / (peak[0] * eff)
    t_mem = 2.0 * (m * k + k * n + m * n) / (cluster.gpu.hbm_bandwidth * e.hbm)
    return np.maximum(t_compute, t_mem)


def linear_peak(cluster: Cluster, prec) -> tuple:
    """(dense peak FLOP/s, GEMM efficiency ceiling) of the precision codes `prec`."""
    gpu, e = cluster.gpu, cluster.efficiency
    pk = lambda p: gpu.peak_flops.get(p, gpu.peak_flops.get("bf16"))  # noqa: E731
    fp8, fp16 = prec == Precision.FP8, prec == Precision.FP16
    pk16 = pk("fp16") if "fp16" in gpu.peak_flops else pk("bf16")
    return (np.where(fp8, pk("fp8"), np.where(fp16, pk16, pk("bf16"))),
            np.where(fp8, e.gemm_max.get("fp8", e.gemm_max["bf16"]),
                     np.where(fp16, e.gemm_max.get("fp16", e.gemm_max["bf16"]), e.gemm_max["bf16"])))


def attention_efficiency(e, stack: Stack) -> float:
    """Fused attention's fraction of the bf16 peak: the profile's (Transformer Engine / cuDNN), or
    FlashAttention-2's where the stack runs SDPA and the GPU gives it less (Shah et al. 2024,
    FlashAttention-3, Figs. 5-6: FlashAttention-2's forward + backward reaches 33% of the H100's
    peak), times the stack's factor."""
    eff = e.attention_max
    if stack.attention_kernel == "sdpa" and e.sdpa_attention is not None:
        eff = min(eff, e.sdpa_attention)
    return eff * stack.attention


def _attention(model: ModelSpec, cluster: Cluster, stack: Stack, k: LayerKnobs, g):
    """(t_attn_gemm, core FLOPs, t_core_f, t_core_b) of one layer."""
    tp, cp, b, s, T = k.tp, k.cp, k.b, k.s, k.tokens
    e, h = cluster.efficiency, model.hidden
    a = F.attention_gemm_flops(model, T)
    t_gemm = (g(a["attn_qkv"] / tp, T, (model.q_dim + 2 * model.kv_dim) / tp, h)
              + g(a["attn_out"] / tp, T, h, model.v_dim / tp))
    # causal core attention, load-balanced over CP ranks (Megatron-Core CP splits each sequence
    # into 2cp chunks, pairing early and late chunks)
    core = F.attention_core_flops(model, b * s, s, causal=True) / (tp * cp) * F.mean_attended(model, s)
    attn_peak = cluster.gpu.peak_flops.get("bf16")
    if stack.flash_attention:
        t_f = core / (attn_peak * attention_efficiency(e, stack))
        return t_gemm, core, t_f, ATTN_BWD_FACTOR * t_f
    # unfused attention (Megatron-LM 2021): QK^T and AV as batched GEMMs over the full s x s
    # (no causal skipping), each with the head dimension as one GEMM side, plus the fused
    # scale-mask-softmax and dropout over the [b, a/t, s, s] scores: read 2 + write 2 bytes for
    # softmax, read 2 + write 2 + mask 1 for dropout (Korthikanti et al. 2022 sec. 4.1 tensors)
    hd = model.q_dim / model.heads
    full_core = 2 * core
    bmm_peak = (np.full(k.n, attn_peak), np.full(k.n, e.gemm_max["bf16"]))
    t_bmm = gemm_time(cluster, stack, full_core, s / cp, s, hd, bmm_peak)
    hbm = cluster.gpu.hbm_bandwidth * e.hbm
    scores = b * (model.heads / tp) * (s / cp) * s * (4 + (5 if model.dropout else 0))
    return (t_gemm, full_core, t_bmm + scores * stack.elementwise / hbm,
            2 * t_bmm + 2 * scores * stack.elementwise / hbm)


def _mlp_time(model, g, tp, ffn, tokens):
    """Forward GEMM time of a (possibly gated) MLP of width ffn, split over tp."""
    fl = F.mlp_flops(model, tokens, ffn)
    mm, h = model.mlp_matrices, model.hidden
    return (g(fl * (mm - 1) / mm / tp, tokens, (mm - 1) * ffn / tp, h)
            + g(fl / mm / tp, tokens, h, ffn / tp))


def _moe(model: ModelSpec, cluster: Cluster, stack: Stack, k: LayerKnobs, g, load):
    """(forward time, weight-gradient GEMM time, forward GEMM FLOPs) of an MoE block on the rank
    with the busiest experts; load: its routed tokens over the mean (routing.routed_load)."""
    mo, h, T, tp, ep, etp = model.moe, model.hidden, k.tokens, k.tp, k.ep, k.etp
    e = cluster.efficiency
    local = T / tp
    routed = local * mo.top_k * load              # tokens through this rank's experts
    tok_per_expert = routed * ep / mo.experts * etp
    fl_e = F.mlp_flops(model, routed, mo.expert_ffn_hidden)
    mm = model.mlp_matrices
    t_experts = (g(fl_e * (mm - 1) / mm, tok_per_expert, (mm - 1) * mo.expert_ffn_hidden / etp, h)
                 + g(fl_e / mm, tok_per_expert, h, mo.expert_ffn_hidden / etp)) / e.grouped_gemm
    t_shared = (_mlp_time(model, g, tp, mo.shared_expert_ffn_hidden * mo.shared_experts, T)
                if mo.shared_experts else 0.0)
    t_router = g(2 * local * h * mo.experts, local, mo.experts, h)
    act_rw = 3 if model.gated else 2
    ew = (2 * routed * h * 2 * 2                    # permute + unpermute copies (r+w)
          + _sorts(model, k) * 2 * routed * etp * h * 2 * 2
          + _expert_act_bytes(model, k, load)
          + (2 * T * mo.shared_experts * mo.shared_expert_ffn_hidden / tp * act_rw))
    # fp8 casts are counted passes: no elementwise factor (as in _elementwise)
    casts = _expert_fp8_cast_bytes(model, stack, k, load) + _shared_fp8_cast_bytes(model, stack, k)
    hbm = cluster.gpu.hbm_bandwidth * e.hbm
    gemm_w = t_experts + t_shared + t_router      # weight-gradient GEMMs = forward GEMMs
    flops = (fl_e + 2 * local * h * mo.experts
             + (F.mlp_flops(model, T, mo.shared_expert_ffn_hidden * mo.shared_experts) / tp
                if mo.shared_experts else 0.0))
    return gemm_w + (ew * stack.elementwise + casts) / hbm, gemm_w, flops


def _expert_launches(model: ModelSpec, stack: Stack, k: LayerKnobs):
    """Kernels an MoE block's experts launch per forward beyond the two grouped GEMMs that
    KERNELS_MOE_FWD counts, on a stack whose grouped GEMM is one GEMM per local expert (Transformer
    Engine GroupedLinear: general_grouped_gemm over multi-stream cuBLAS, and under fp8 one input
    quantization per expert, fused_multi_quantize; transformer_engine/pytorch/module/grouped_linear.py
    _GroupedLinear.forward): fc1 and fc2 each launch (1 + fp8) kernels per local expert."""
    if not model.moe or stack.expert_launches != "per_expert":
        return 0.0
    per_linear = 1 + (k.precision == Precision.FP8)
    return 2 * per_linear * model.moe.experts / k.ep - 2


def _sorts(model: ModelSpec, k: LayerKnobs):
    """1 where a rank holds more than one expert: Megatron-Core's all-to-all dispatcher then sorts
    the received token chunks by local expert after the dispatch and unsorts them before the
    combine, one more copy of every routed token each way (token_dispatcher.py
    MoEAlltoAllTokenDispatcher.dispatch_postprocess / combine_preprocess, sort_chunks_by_idxs;
    one fused kernel each under --moe-permute-fusion; torchtitan's expert_parallel.py _token_dispatch /
    _token_combine permute and unpermute the received tokens the same way)."""
    return (model.moe.experts / k.ep > 1).astype(float)


def _expert_fp8_cast_bytes(model: ModelSpec, stack: Stack, k: LayerKnobs, load):
    """HBM bytes per forward of Transformer Engine GroupedLinear's fp8 quantizations of the experts'
    GEMM operands on the busiest rank (transformer_engine/pytorch/module/grouped_linear.py
    _GroupedLinear: forward split_quantize of the input, backward of the output gradient, each read
    at 2 B and written row-wise and column-wise at 1 B each, the column-wise copy for the weight
    gradient): 4 T (K + N) per linear of K inputs and N outputs, fc1 and fc2, counted a third in
    forward as the planner splits elementwise work (backward = 2x forward). Dense and shared-expert
    linears: elementwise.te_fp8_cast_bytes; torchtitan's experts of 2024 run in bf16."""
    if not model.moe or stack.expert_launches != "per_expert":
        return 0.0
    mo, h = model.moe, model.hidden
    rows = k.tokens / k.tp * mo.top_k * load * k.etp          # token copies through the rank's experts
    f = mo.expert_ffn_hidden / k.etp
    fc1_fc2 = E.TE_CAST_BYTES * rows * ((h + (model.mlp_matrices - 1) * f) + (f + h)) / 3.0
    return np.where(k.precision == Precision.FP8, fc1_fc2, 0.0)


def _shared_fp8_cast_bytes(model: ModelSpec, stack: Stack, k: LayerKnobs):
    """HBM bytes per forward of TE's fp8 quantizations in an MoE layer's shared experts
    (Megatron-Core SharedExpertMLP: TE linears after the layer's separate pre-MLP TENorm, so fc1's
    input is cast too; elementwise.te_mlp_cast_bytes), a third counted in forward."""
    mo = model.moe
    if not mo.shared_experts or stack.fp8_casts != "fused":
        return 0.0
    b = E.te_mlp_cast_bytes(model, k, mo.shared_expert_ffn_hidden * mo.shared_experts, fc1_input=True)
    return np.where(k.precision == Precision.FP8, b / 3.0, 0.0)


def _expert_act_bytes(model: ModelSpec, k: LayerKnobs, load):
    """HBM bytes of the experts' activation forward on the busiest rank: read 2f (gated) or f, write f
    per routed token (Megatron-Core moe/experts.py, bias + activation fused)."""
    mo = model.moe
    routed = k.tokens / k.tp * mo.top_k * load
    return 2 * routed * mo.expert_ffn_hidden / k.etp * (3 if model.gated else 2)


def _elementwise(model: ModelSpec, cluster: Cluster, stack: Stack, k: LayerKnobs):
    """(shared, dense-MLP) elementwise seconds per layer forward, as the stack runs them
    (elementwise.layer_bytes); the `elementwise` multiplier scales TE-style fused counts only."""
    hbm = cluster.gpu.hbm_bandwidth * cluster.efficiency.hbm
    common, dense = E.layer_bytes(model, k, stack.elementwise_ops)
    scale = stack.elementwise if stack.elementwise_ops == "fused" else 1.0
    # fp8 casts are counted passes: no elementwise factor
    dyn_att, dyn_mlp = E.dynamic_fp8_cast_bytes(model, stack.fp8_casts, k)
    te_att, te_mlp = E.te_fp8_cast_bytes(model, stack.fp8_casts, k)
    return (common * scale + dyn_att + te_att) / hbm, (dense * scale + dyn_mlp + te_mlp) / hbm


def layer_compute(model: ModelSpec, cluster: Cluster, stack: Stack, k: LayerKnobs, moe_load) -> LayerCompute:
    """Phase 1 over the rows of the layer table; moe_load: routed tokens over the mean
    (routing.routed_load)."""
    n, T, tp = k.n, k.tokens, k.tp
    peak = linear_peak(cluster, k.precision)
    g = lambda fl, mm, nn, kk: gemm_time(cluster, stack, fl, mm, nn, kk, peak)  # noqa: E731
    t_attn_gemm, core, t_core_f, t_core_b = _attention(model, cluster, stack, k, g)
    t_dense_mlp = _mlp_time(model, g, tp, model.ffn_hidden, T)
    t_ew_common, t_ew_dense = _elementwise(model, cluster, stack, k)
    a = F.attention_gemm_flops(model, T)
    fl_attn_gemm = (a["attn_qkv"] + a["attn_out"]) / tp
    if model.moe:
        t_moe_f, t_moe_w, fl_moe = _moe(model, cluster, stack, k, g, moe_load)
    else:
        t_moe_f = t_moe_w = fl_moe = np.zeros(n)
    # fixed per-kernel launch/sync cost: what FLOP and byte counts miss for small layers
    # (+ an eager TP stack's host cost per TP-sharded layer: DTensor dispatch, measured by calibrate)
    k_tp = np.where(tp > 1, stack.tp_layer_overhead_s, 0.0)
    x_att, x_mlp = E.extra_kernels(model, stack.elementwise_ops)
    k_dense = (KERNELS_DENSE_FWD + x_att + x_mlp) * stack.kernel_overhead_s + k_tp
    k_moe = ((KERNELS_DENSE_FWD - 3 + x_att + KERNELS_MOE_FWD + _expert_launches(model, stack, k)
              + (2 * _sorts(model, k) if model.moe else 0.0))
             * stack.kernel_overhead_s + k_tp)
    t_attn_f = t_attn_gemm + t_core_f + t_ew_common
    # embedding (first stage): lookup r+w; logits + vocab-parallel cross entropy (last stage):
    # GEMM fwd + 2x bwd, fp32 logits read/written ~4 times (Megatron fused_vocab_parallel_cross_entropy)
    hbm = cluster.gpu.hbm_bandwidth * cluster.efficiency.hbm
    # the output layer stays in 16 bits under fp8: Megatron's output_layer is a plain
    # ColumnParallelLinear outside TE's fp8 autocast, torchtitan's Float8 conversion skips it
    # (filter_fqns = ["output"])
    peak16 = linear_peak(cluster, np.where(k.precision == Precision.FP8, Precision.BF16, k.precision))
    lg_f = gemm_time(cluster, stack, F.logits_flops(model, T) / tp, T, model.vocab / tp, model.hidden, peak16)
    ce = 4 * 4.0 * T * model.vocab / tp / hbm * stack.elementwise
    return LayerCompute(*full(
        n, peak[0], core, fl_attn_gemm + F.mlp_flops(model, T) / tp, fl_attn_gemm + fl_moe,
        t_core_f, t_core_b, t_attn_gemm, t_dense_mlp, t_attn_f, t_moe_f,
        t_attn_f + t_dense_mlp + t_ew_dense + k_dense, t_attn_f + t_moe_f + k_moe,
        # backward: GEMMs 2x (input grad + weight grad), core 2.5x, elementwise 2x
        2 * (t_attn_gemm + t_dense_mlp) + t_core_b + 2 * (t_ew_common + t_ew_dense) + 2 * k_dense,
        2 * (t_attn_gemm + t_moe_f) + t_core_b + 2 * t_ew_common + 2 * k_moe,
        t_attn_gemm + t_dense_mlp, t_attn_gemm + t_moe_w,
        2 * 2.0 * T * model.hidden / hbm * 3, lg_f, lg_f + ce / 2, 2 * lg_f + ce / 2,
        F.logits_flops(model, T) / tp),
        *_recompute(model, cluster, stack, g, k, core, (t_attn_gemm, t_dense_mlp, t_core_f, t_ew_dense),
                    t_attn_f + t_dense_mlp + t_ew_dense + k_dense, t_attn_f + t_moe_f + k_moe,
                    fl_attn_gemm + F.mlp_flops(model, T) / tp, fl_attn_gemm + fl_moe, moe_load))


def _recompute(model, cluster, stack, g, k, core, parts, f_dense, f_moe, fl_dense, fl_moe, load):
    """(dense, moe seconds; dense, moe FLOPs) of one layer's recompute, rows by Recompute code.
    Megatron: selective re-runs core attention (Korthikanti et al. 2022 sec. 5), full the whole
    layer (its CheckpointFunction replays the forward), a module list those modules
    (_module_recompute). torchtitan: op-level SAC re-runs the unsaved GEMMs and every elementwise
    op but not SDPA (flops.op_sac_recompute_fraction); full AC is torch.utils.checkpoint
    non-reentrant, which stops replaying once the saved tensors backward needs exist: a dense
    layer's last GEMM (w2) is not re-run (Stack.full_recompute_skips_last_gemm)."""
    t_attn_gemm, t_mlp, t_core_f, _ = parts
    if stack.selective == "op":
        fd, fm = F.op_sac_recompute_fraction(model, False), F.op_sac_recompute_fraction(model, True) \
            if model.moe else 0.0
        ew = f_dense - t_attn_gemm - t_mlp - t_core_f
        sel = (fd * (t_attn_gemm + t_mlp) + ew, f_moe - t_core_f - (1 - fd) * t_attn_gemm,
               fd * fl_dense, fm * fl_moe)
    else:
        sel = (t_core_f, t_core_f, core, core)
    w2_f = F.mlp_flops(model, k.tokens) / model.mlp_matrices / k.tp
    w2_t = g(w2_f, k.tokens, model.hidden, model.ffn_hidden / k.tp)
    skip = stack.full_recompute_skips_last_gemm
    full_ = (f_dense - (w2_t if skip else 0.0), f_moe, fl_dense + core - (w2_f if skip else 0.0), fl_moe + core)
    zero = np.zeros(k.n)
    by = {Recompute.NONE: (zero,) * 4, Recompute.SELECTIVE: sel, Recompute.FULL: full_}
    rows = [by.get(r) or _module_recompute(model, cluster, stack, g, k, r.modules, parts, load) for r in Recompute]
    return tuple(np.stack(full(k.n, *[row[i] for row in rows])) for i in range(4))


def _module_recompute(model, cluster, stack, g, k, modules, parts, load):
    """(dense, moe seconds; dense, moe FLOPs) of a Megatron-Core module list's forward, made
    again in backward (memory.recompute_module_bytes says what each drops): the MLA up-projection
    GEMMs, the dense MLP (GEMMs and activation), the norms (read + write each, as _elementwise
    prices them) and the experts' activation (read 2f, write f per routed token, as _moe). The
    collectives inside (an SP all-gather of MLA's latents) are not repeated."""
    T, tp, h = k.tokens, k.tp, model.hidden
    _, t_mlp, _, t_ew_dense = parts
    hbm = cluster.gpu.hbm_bandwidth * cluster.efficiency.hbm
    t, fl, ew = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    if "mla_up_proj" in modules and model.mla:
        a = model.mla
        qk, kvo = a.qk_nope_head_dim + a.qk_rope_head_dim, a.qk_nope_head_dim + a.v_head_dim
        fq, fkv = (x / tp for x in F.mla_up_proj_flops(model, T))
        up = (g(fq, T, model.heads * qk / tp, a.q_lora_rank or h)
              + g(fkv, T, model.heads * kvo / tp, a.kv_lora_rank))
        t, fl = [x + up for x in t], [x + fq + fkv for x in fl]
    if "mlp" in modules:
        t[0], fl[0] = t[0] + t_mlp + t_ew_dense, fl[0] + F.mlp_flops(model, T) / tp
    if "layernorm" in modules:
        ew = [x + E.norm_bytes(model, k) for x in ew]
    if "moe_act" in modules and model.moe:
        ew[1] = ew[1] + _expert_act_bytes(model, k, load)
    return (t[0] + ew[0] * stack.elementwise / hbm, t[1] + ew[1] * stack.elementwise / hbm, fl[0], fl[1])
