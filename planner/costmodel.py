"""The analytical cost model: candidates (numpy columns) in, named arrays out.

One call evaluates every candidate in a handful of array operations; no per-candidate Python.
Time is per training step (one global batch); memory is the peak per GPU over pipeline stages.
"""
from __future__ import annotations

import numpy as np

from . import collectives as C
from . import flops as F
from . import memory as M
from . import schedules as S
from .hardware import Cluster
from .layout import Candidates, RECOMPUTE
from .model_spec import ModelSpec
from .stacks import STACKS, Stack

TIME_TERMS = ("compute", "recompute", "tp_comm", "cp_comm", "ep_comm", "pp_comm", "dp_comm",
              "bubble", "optimizer", "overhead")
MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "reserved")
TP_OVERLAP_RESIDUAL = 0.2   # share of TP traffic TE userbuffer overlap leaves exposed (first/last
                            # chunk of each ring; Wang et al. 2022 'Overlap communication with dependent
                            # computation via decomposition', sec. 6: 74-85% hidden)
ADAM_BYTES_PER_PARAM = 38   # Adam step traffic per fp32 master parameter: read grad/master/m/v (16),
                            # write master/m/v (12), bf16 weight copy (2), grad-norm read (4), zero grad (4)
                            # (apex/TE FusedAdam multi_tensor_adam kernel)
ATTN_BWD_FACTOR = 2.5       # FlashAttention-2 backward = 2.5x forward FLOPs (Dao 2023 sec. 3.1.2: 5 GEMMs vs 2)


def _gemm_time(cluster: Cluster, stack: Stack, flops, m, n, k, peak):
    """Roofline GEMM time: flops / (peak * eff(m, n, k)), eff a saturating curve in the smallest
    dimension (hardware.Efficiency); bounded below by the HBM time of A, B and C."""
    e = cluster.efficiency
    x = np.minimum(np.minimum(m, n), k)
    eff = peak[1] * stack.gemm * x / (x + e.gemm_half_dim)
    t_compute = flops / (peak[0] * eff)
    t_mem = 2.0 * (m * k + k * n + m * n) / (cluster.gpu.hbm_bandwidth * e.hbm)
    return np.maximum(t_compute, t_mem)


class Evaluation(dict):
    """Named arrays, one value per candidate: step_time_s, tokens_per_s_per_gpu, mfu, ...,
    time_<term>_s for TIME_TERMS, mem_<term>_bytes for MEMORY_TERMS, memory_bytes, feasible."""


def evaluate(model: ModelSpec, cluster: Cluster, c: Candidates, stack: Stack | None = None,
             moe_imbalance: float = 1.0, capacity_factor: float = 0.0) -> Evaluation:
    stack = stack or STACKS["megatron-core"]
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    tp, pp, dp, cp = f(c.tp), f(c.pp), f(c.dp), f(c.cp)
    ep, etp, vpp, b = f(c.ep), f(c.etp), f(c.vpp), f(c.micro_batch)
    gb, s = f(c.global_batch), f(c.seq_len)
    sp = c.sp & (c.tp > 1)
    rec = c.recompute.astype(np.int64)
    fp8 = c.precision == 1
    h, L = model.hidden, model.layers
    e = cluster.efficiency
    gpu = cluster.gpu
    world = tp * pp * dp * cp
    # degree-only quantities are computed once per distinct degree row and gathered
    if c.deg_table is not None:
        dt = {k: np.asarray(v, dtype=np.float64) for k, v in c.deg_table.items()}
        di = c.deg_index
    else:
        dt = {"tp": tp, "pp": pp, "dp": dp, "cp": cp, "ep": ep, "etp": etp, "micro_batch": b}
        di = None

    def group(size_fn, stride_fn):
        return C.Group(cluster, size_fn(dt), stride_fn(dt), take=di)
    nmb = gb / (dp * b)                     # micro-batches per step per pipeline
    T = b * s / cp                          # tokens per micro-batch on one CP rank

    # peak FLOP/s and efficiency ceiling for linear layers by precision
    def peak_of(p):
        return gpu.peak_flops.get(p, gpu.peak_flops.get("bf16"))
    pk16 = peak_of("fp16") if "fp16" in gpu.peak_flops else peak_of("bf16")
    lin_peak = (np.where(fp8, peak_of("fp8"), np.where(c.precision == 2, pk16, peak_of("bf16"))),
                np.where(fp8, e.gemm_max.get("fp8", e.gemm_max["bf16"]),
                         np.where(c.precision == 2, e.gemm_max.get("fp16", e.gemm_max["bf16"]),
                                  e.gemm_max["bf16"])))
    attn_peak = peak_of("bf16")
    hbm = gpu.hbm_bandwidth * e.hbm

    # ------------------------------------------------------------------ per-layer compute
    g = lambda fl, mm, nn, kk: _gemm_time(cluster, stack, fl, mm, nn, kk, lin_peak)  # noqa: E731
    a = F.attention_gemm_flops(model, T)
    kv_dim = model.kv_heads * model.head_dim if not model.mla else model.q_dim
    t_attn_gemm = (g(a["attn_qkv"] / tp, T, (model.q_dim + 2 * kv_dim) / tp, h)
                   + g(a["attn_out"] / tp, T, h, model.v_dim / tp))
    # causal core attention, load-balanced over CP ranks (Megatron-Core CP splits each sequence
    # into 2cp chunks, pairing early and late chunks)
    core = F.attention_core_flops(model, b * s, s, causal=True) / (tp * cp) * F.mean_attended(model, s)
    if stack.flash_attention:
        t_core_f = core / (attn_peak * e.attention_max * stack.attention)
        t_core_b = ATTN_BWD_FACTOR * t_core_f
    else:
        # unfused attention (Megatron-LM 2021): QK^T and AV as batched GEMMs over the full s x s
        # (no causal skipping), each with the head dimension as one GEMM side, plus the fused
        # scale-mask-softmax and dropout over the [b, a/t, s, s] scores: read 2 + write 2 bytes for
        # softmax, read 2 + write 2 + mask 1 for dropout (Korthikanti et al. 2022 sec. 4.1 tensors)
        hd = model.q_dim / model.heads
        full = 2 * core
        bmm_peak = (np.full(len(c), attn_peak), np.full(len(c), e.gemm_max["bf16"]))
        t_bmm = _gemm_time(cluster, stack, full, s / cp, s, hd, bmm_peak)
        scores_bytes = b * (model.heads / tp) * (s / cp) * s * (4 + (5 if model.dropout else 0))
        t_core_f = t_bmm + scores_bytes * stack.elementwise / hbm
        t_core_b = 2 * t_bmm + 2 * scores_bytes * stack.elementwise / hbm
        core = full

    def mlp_time(ffn, tokens, ncopies=1.0):
        fl = F.mlp_flops(model, tokens, ffn) * ncopies
        up = (model.mlp_matrices - 1) * ffn
        return (g(fl * (model.mlp_matrices - 1) / model.mlp_matrices / tp, tokens, up / tp, h)
                + g(fl / model.mlp_matrices / tp, tokens, h, ffn / tp))

    t_dense_mlp = mlp_time(model.ffn_hidden, T)
    # elementwise traffic per layer forward, bytes (LayerNorm x2 r+w, two residual adds r2+w1,
    # activation r+w; fp8 adds a cast (r2+w1) of each GEMM input) -- fused kernels as in TE
    tok_sp = T / np.where(sp, tp, 1)
    ew_common = 2 * tok_sp * h * (2 + 2 + 3 + 3 + (1 if model.dropout else 0))
    # fp8 casts of GEMM inputs are fused into LayerNorm / activation kernels by Transformer Engine
    # (LayerNormLinear, fused cast-transpose); what remains is the cast of the attention output
    ew_common = ew_common + np.where(fp8, 3 * T * model.v_dim / tp, 0.0)
    act_rw = 3 if model.gated else 2
    ew_dense = 2 * T * model.ffn_hidden / tp * act_rw
    t_ew_common = ew_common * stack.elementwise / hbm

    if model.moe:
        mo = model.moe
        imb = moe_imbalance
        if capacity_factor > 0:   # tokens over capacity are dropped (GShard, Lepikhin et al. 2020 sec. 2.2)
            imb = min(imb, capacity_factor)
        local = T / tp
        routed = local * mo.top_k * imb   # tokens through this rank's experts (busiest rank)
        tok_per_expert = routed * ep / mo.experts * etp
        fl_e = F.mlp_flops(model, routed, mo.expert_ffn_hidden)
        t_experts = (g(fl_e * (model.mlp_matrices - 1) / model.mlp_matrices, tok_per_expert,
                       (model.mlp_matrices - 1) * mo.expert_ffn_hidden / etp, h)
                     + g(fl_e / model.mlp_matrices, tok_per_expert, h, mo.expert_ffn_hidden / etp)) / e.grouped_gemm
        t_shared = (mlp_time(mo.shared_expert_ffn_hidden * mo.shared_experts, T)
                    if mo.shared_experts else 0.0)
        t_router = g(2 * local * h * mo.experts, local, mo.experts, h)
        ew_moe = (2 * routed * h * 2 * 2                    # permute + unpermute copies (r+w)
                  + 2 * routed * mo.expert_ffn_hidden / etp * act_rw
                  + (2 * T * mo.shared_experts * mo.shared_expert_ffn_hidden / tp * act_rw))
        t_moe_f = t_experts + t_shared + t_router + ew_moe * stack.elementwise / hbm
        t_moe_gemm_w = (t_experts + t_shared + t_router)   # weight-gradient GEMMs = forward GEMMs
    else:
        t_moe_f = t_moe_gemm_w = 0.0

    # per-GPU forward FLOPs of one layer (to account hardware FLOPs from the actual split)
    fl_attn = (a["attn_qkv"] + a["attn_out"]) / tp + core
    fl_dense = fl_attn + F.mlp_flops(model, T) / tp
    if model.moe:
        fl_moe = (fl_attn + fl_e + 2 * local * h * mo.experts
                  + (F.mlp_flops(model, T, mo.shared_expert_ffn_hidden * mo.shared_experts) / tp
                     if mo.shared_experts else 0.0))
    else:
        fl_moe = 0.0
    t_dense_f = t_dense_mlp + ew_dense * stack.elementwise / hbm
    # layer forward = attention GEMMs + core + elementwise + MLP/MoE
    t_attn_f = t_attn_gemm + t_core_f + t_ew_common
    layer_f_dense = t_attn_f + t_dense_f
    layer_f_moe = t_attn_f + t_moe_f
    # backward: GEMMs 2x (input grad + weight grad), core 2.5x, elementwise 2x
    layer_b_dense = 2 * (t_attn_gemm + t_dense_mlp) + t_core_b + 2 * (t_ew_common + ew_dense * stack.elementwise / hbm)
    layer_b_moe = 2 * (t_attn_gemm + t_moe_f) + t_core_b + 2 * t_ew_common
    layer_w_dense = t_attn_gemm + t_dense_mlp          # weight-gradient part (for zero-bubble)
    layer_w_moe = t_attn_gemm + t_moe_gemm_w
    recomp_dense = np.select([rec == 0, rec == 1], [0.0, t_core_f], layer_f_dense)
    recomp_moe = np.select([rec == 0, rec == 1], [0.0, t_core_f], layer_f_moe)

    # ------------------------------------------------------------------ per-layer communication
    act = 2.0 * T * h                                  # one [s/cp, b, h] bf16 activation
    g_tp = group(lambda d: d["tp"], lambda d: 1.0)
    # with SP the all-reduce is an all-gather + reduce-scatter; Transformer Engine gathers fp8
    # activations under fp8 (TE LayerNormLinear with sequence_parallel), the reduce-scatter stays bf16
    t_ar = np.where(sp & fp8, 0.5 * g_tp.all_gather(act) + g_tp.reduce_scatter(act), g_tp.all_reduce(act))
    tp_colls_dense = 2.0                                # attention + MLP (Megatron, Shoeybi 2019 fig. 4)
    tp_colls_moe = 1.0 + np.where(etp > 1, 1.0, 0.0)
    rec_comm = np.where(rec == 2, 1.0, 0.0)             # full recompute repeats the forward collectives
    # TE userbuffer overlap needs the TP group inside one NVLink domain
    tp_overlap_on = c.overlap_tp & stack.tp_overlap & sp & (tp <= (cluster.domain_sizes[0] or tp))
    gemm_per_coll_dense = (t_attn_gemm + t_dense_mlp) / tp_colls_dense

    def exposed_tp(ncoll, gemm_per_coll):
        comm = ncoll * t_ar
        hidden_part = np.minimum(comm * (1 - TP_OVERLAP_RESIDUAL), ncoll * gemm_per_coll)
        return np.where(tp_overlap_on, comm - hidden_part, comm)

    tp_f_dense = exposed_tp(tp_colls_dense, gemm_per_coll_dense)
    tp_f_moe = exposed_tp(tp_colls_moe, t_attn_gemm)
    # CP: ring (p2p) passes K,V around cp-1 times (Liu et al. 2023 'Ring Attention' sec. 3;
    # Megatron-Core context_parallel p2p), backward passes K,V and dK,dV: 2x; all-gather variant
    # gathers K,V (fwd) and reduce-scatters dK,dV (bwd); a2a (Ulysses, Jacobs et al. 2023 sec. 3.2)
    # moves Q,K,V and O: 4 all-to-alls forward, 4 backward.
    # K and V of this rank's heads (kv heads split by tp; Megatron replicates them when tp > kv_heads)
    kv_split = tp if model.mla else np.minimum(tp, model.kv_heads)
    kv_local = 2.0 * T * 2 * kv_dim / kv_split
    cp_step = C.p2p(cluster, kv_local, tp)
    g_cp = group(lambda d: d["cp"], lambda d: d["tp"])
    cp_ring_f = np.maximum((cp - 1) * cp_step - t_core_f * (cp - 1) / cp, 0.0)
    cp_ring_b = np.maximum(2 * (cp - 1) * cp_step - t_core_b * (cp - 1) / cp, 0.0)
    cp_ag_f = g_cp.all_gather(kv_local * cp)
    cp_ag_b = cp_ag_f + g_cp.reduce_scatter(kv_local * cp)
    qkvo = 2.0 * T * (model.q_dim + 2 * kv_dim + model.v_dim) / tp
    cp_a2a_f = C.all_to_all(cluster, qkvo, cp, tp)
    cp_f = np.where(cp > 1, np.select([c.cp_comm == 0, c.cp_comm == 1], [cp_ring_f, cp_ag_f], cp_a2a_f), 0.0)
    cp_b = np.where(cp > 1, np.select([c.cp_comm == 0, c.cp_comm == 1], [cp_ring_b, cp_ag_b], cp_a2a_f), 0.0)
    # EP: dispatch + combine all-to-all per MoE layer forward, again in backward
    # (Megatron-Core MoEAlltoAllTokenDispatcher); dualpipe overlaps them with the other chunk
    if model.moe:
        ep_bytes = 2.0 * (T / tp) * model.moe.top_k * moe_imbalance * h
        ep_one = C.all_to_all(cluster, ep_bytes, ep, etp)
        ep_f = np.where(c.schedule == S.DUALPIPE, 0.0, 2 * ep_one)
    else:
        ep_f = 0.0

    # ------------------------------------------------------------------ stages
    Lf_given = f(c.first_stage_layers)
    Ll_given = f(c.last_stage_layers)
    n_given = (Lf_given > 0).astype(float) + (Ll_given > 0).astype(float)
    even = (L - Lf_given - Ll_given) / np.maximum(pp - n_given, 1)
    Lf = np.where(Lf_given > 0, Lf_given, even)
    Ll = np.where(pp == 1, 0.0, np.where(Ll_given > 0, Ll_given, even))
    Lf = np.where(pp == 1, float(L), Lf)
    Lm = np.where(pp > 2, even, 0.0)
    nd = float(model.dense_layers)                    # leading dense layers sit on the first stage(s)
    dense_first = np.minimum(nd, Lf)
    dense_mid = np.minimum(np.maximum(nd - Lf, 0.0), Lm)
    dense_last = np.where(pp > 1, np.maximum(nd - Lf - Lm * np.maximum(pp - 2, 0), 0.0), 0.0)

    def stage(layers, ndense):
        nmoe = layers - ndense
        fwd = ndense * layer_f_dense + nmoe * layer_f_moe
        bwd = ndense * layer_b_dense + nmoe * layer_b_moe
        w = ndense * layer_w_dense + nmoe * layer_w_moe
        rc = ndense * recomp_dense + nmoe * recomp_moe
        tpc = (ndense * tp_f_dense + nmoe * tp_f_moe) * (2 + rec_comm)
        cpc = layers * (cp_f + cp_b + rec_comm * cp_f)
        epc = nmoe * ep_f * (2 + rec_comm)
        # forward share of the per-micro-batch time (compute + exposed forward communication)
        tf = fwd + (ndense * tp_f_dense + nmoe * tp_f_moe) + layers * cp_f + nmoe * ep_f
        # hardware FLOPs per GPU per micro-batch: fwd + 2x bwd (+0.5x fwd core for the flash
        # backward's recomputed scores) + recompute
        flf = ndense * fl_dense + nmoe * fl_moe
        fl_rc = np.select([rec == 0, rec == 1], [0.0, layers * core], flf)
        fl = 3 * flf + (ATTN_BWD_FACTOR - 2) * layers * core + fl_rc
        return dict(fwd=fwd, bwd=bwd, w=w, rc=rc, tp=tpc, cp=cpc, ep=epc, tf=tf, flops=fl, flops_rc=fl_rc)

    st_first = stage(Lf, dense_first)
    st_mid = stage(Lm, dense_mid)
    st_last = stage(Ll, dense_last)
    # embedding (first stage): lookup r+w; logits + vocab-parallel cross entropy (last stage):
    # GEMM fwd + 2x bwd, fp32 logits read/written ~4 times (Megatron fused_vocab_parallel_cross_entropy)
    t_emb = 2 * 2.0 * T * h / hbm * 3
    lg_f = g(F.logits_flops(model, T) / tp, T, model.vocab / tp, h)
    ce = 4 * 4.0 * T * model.vocab / tp / hbm * stack.elementwise
    t_logits_f, t_logits_b = lg_f + ce / 2, 2 * lg_f + ce / 2
    has_last = pp > 1
    st_first["fwd"] = st_first["fwd"] + t_emb + np.where(has_last, 0.0, t_logits_f)
    st_first["tf"] = st_first["tf"] + t_emb + np.where(has_last, 0.0, t_logits_f)
    st_last["tf"] = st_last["tf"] + t_logits_f
    st_first["bwd"] = st_first["bwd"] + t_emb + np.where(has_last, 0.0, t_logits_b)
    st_first["w"] = st_first["w"] + np.where(has_last, 0.0, lg_f)
    st_last["fwd"] = st_last["fwd"] + t_logits_f
    st_last["bwd"] = st_last["bwd"] + t_logits_b
    st_last["w"] = st_last["w"] + lg_f
    fl_logits = 3 * F.logits_flops(model, T) / tp
    st_first["flops"] = st_first["flops"] + np.where(has_last, 0.0, fl_logits)
    st_last["flops"] = st_last["flops"] + fl_logits

    # ZeRO-2/3 per-micro-batch DP traffic is charged to each stage below
    dense_params_layer = model.attention_params() + model.norm_params()
    P_dense_layer_dense = dense_params_layer + model.mlp_params()
    P_dense_layer_moe = dense_params_layer + (model.moe_nonexpert_params_per_layer() if model.moe else 0)
    P_exp_layer = model.expert_params_per_layer()

    def stage_params(layers, ndense, first, last):
        nmoe = layers - ndense
        dense = (ndense * P_dense_layer_dense + nmoe * P_dense_layer_moe) / tp
        dense = dense + np.where(first, model.embedding_params() / tp, 0.0)
        # output layer; with tied embeddings and pp > 1 the last stage keeps its own copy of the
        # embedding (Megatron-Core shared_embedding_or_output_weight)
        out_p = np.where(model.tied_embeddings & (pp > 1), model.embedding_params(), model.output_params())
        dense = dense + np.where(last, out_p / tp, 0.0)
        experts = nmoe * P_exp_layer / (ep * etp)
        return dense, experts

    pf = stage_params(Lf, dense_first, True, pp == 1)
    pm = stage_params(Lm, dense_mid, False, False)
    pl = stage_params(Ll, dense_last, False, pp > 1)

    dpcp = dp * cp                                    # dense-gradient group (Megatron: dp x cp)
    # a stack that cannot pool NICs sees its DP groups as if each member sat in its own domain
    d0 = cluster.domain_sizes[0] or 1
    dstr_f = (lambda d: d["tp"]) if stack.pooled_nics else (lambda d: np.maximum(d["tp"], d0))
    estr_f = ((lambda d: d["ep"] * d["etp"]) if stack.pooled_nics
              else (lambda d: np.maximum(d["ep"] * d["etp"], d0)))
    shard = np.where(c.shard_group > 0, f(c.shard_group), dpcp)
    edp = tp * cp * dp / (ep * etp)                   # expert data-parallel group
    eshard = np.minimum(shard, edp)
    zero = c.zero
    gbytes = stack.grad_reduce_bytes

    if di is None:
        sgv = f(c.shard_group)
    else:   # generated chunks carry one shard-group value (it is a held knob, not searched)
        sgv = float(c.shard_group[0]) if len(c) else 0.0
        if len(c) and not np.all(c.shard_group == c.shard_group[0]):
            raise ValueError("candidates crossed from a degree table must share one shard_group")
    shard_of = lambda d: np.where(sgv > 0, np.minimum(sgv, d["dp"] * d["cp"]), d["dp"] * d["cp"])  # noqa: E731
    edp_of = lambda d: d["tp"] * d["cp"] * d["dp"] / (d["ep"] * d["etp"])  # noqa: E731
    g_dense = group(lambda d: d["dp"] * d["cp"], dstr_f)       # all-reduce group of dense gradients
    g_shard = group(shard_of, dstr_f)                           # ZeRO shard group (= g_dense unless HSDP)
    g_repl = group(lambda d: d["dp"] * d["cp"] / shard_of(d), lambda d: dstr_f(d) * shard_of(d))  # HSDP replicas
    g_exp = group(edp_of, estr_f)
    g_eshard = group(lambda d: np.minimum(shard_of(d), edp_of(d)), estr_f)
    hsdp = shard < dpcp

    def dp_times(params, layers):
        pd_, pe_ = params
        # gradient reduction: all-reduce (ZeRO-0) or reduce-scatter (ZeRO>=1); HSDP adds an
        # all-reduce of the shard across replicas (Zhao et al. 2023 'PyTorch FSDP' sec. 3.2.2)
        # collectives are issued per bucket / per layer, each paying the latency term again:
        # Megatron buckets of max(40M, 1M*dp) elements (distributed/param_and_grad_buffer.py);
        # ZeRO-3 / FSDP gathers and reduces one layer (FSDP unit) at a time
        n_buckets = np.maximum(np.ceil((pd_ + pe_) / np.maximum(40e6, 1e6 * dpcp)), 1.0)
        extra = np.where(zero == 3, np.maximum(layers, 1.0), n_buckets) - 1
        ar = (g_dense.all_reduce(pd_ * gbytes) + g_exp.all_reduce(pe_ * gbytes)
              + extra * (g_dense.lat_ar + g_exp.lat_ar))
        rs = (g_shard.reduce_scatter(pd_ * gbytes) + g_eshard.reduce_scatter(pe_ * gbytes)
              + np.where(hsdp, g_repl.all_reduce(pd_ * gbytes / shard), 0.0)
              + extra * (g_shard.lat_ag + g_eshard.lat_ag))
        grad = np.where(zero == 0, ar, rs)
        ag = (g_shard.all_gather(pd_ * 2.0) + g_eshard.all_gather(pe_ * 2.0)
              + extra * (g_shard.lat_ag + g_eshard.lat_ag))
        return grad, ag

    def dp_per_step_and_mb(params, layers):
        grad, ag = dp_times(params, layers)
        # ZeRO-1: grads reduced once per step, params gathered once (Megatron distributed optimizer)
        # ZeRO-2: grads reduce-scattered every micro-batch (DeepSpeed stage 2)
        # ZeRO-3: params gathered for fwd (and again for bwd), grads reduce-scattered every micro-batch
        per_step = np.where(zero <= 1, grad + np.where(zero == 1, ag, 0.0), np.where(zero == 2, ag, 0.0))
        per_mb_f = np.where(zero == 3, ag, 0.0)
        per_mb_b = np.where(zero >= 2, grad, 0.0) + np.where((zero == 3) & stack.fsdp_regather_backward, ag, 0.0)
        return per_step, per_mb_f, per_mb_b

    stages = []
    for st, prm, nl in ((st_first, pf, Lf), (st_mid, pm, Lm), (st_last, pl, Ll)):
        per_step, mb_f, mb_b = dp_per_step_and_mb(prm, nl)
        comp_f, comp_b = st["fwd"], st["bwd"] + st["rc"]
        ovl = c.overlap_dp
        dp_mb = np.where(ovl, np.maximum(mb_f - comp_f, 0.0) + np.maximum(mb_b - comp_b, 0.0), mb_f + mb_b)
        stages.append(dict(st, per_step=per_step, dp_mb=dp_mb, params=prm,
                           t=st["fwd"] + st["bwd"] + st["rc"] + st["tp"] + st["cp"] + st["ep"] + dp_mb))
    first, mid, last = stages
    t_first, t_mid, t_last = first["t"], np.where(pp > 2, mid["t"], 0.0), np.where(pp > 1, last["t"], 0.0)
    which = np.argmax(np.stack([t_first, t_mid, t_last]), axis=0)
    pick = lambda key: np.choose(which, [first[key], mid[key], last[key]])  # noqa: E731
    t_slow = pick("t")
    sum_t = t_first + t_mid * np.maximum(pp - 2, 0) + t_last
    avg_other = np.where(pp > 1, (sum_t - t_slow) / np.maximum(pp - 1, 1), 0.0)
    # bubble from the other stages' average per-micro-batch times, split into f / b / w shares
    frac_f = pick("tf") / np.maximum(t_slow, 1e-30)
    frac_w = pick("w") / np.maximum(t_slow, 1e-30)
    bubble = np.where(pp > 1, S.bubble_time(c.schedule, pp, vpp, avg_other * frac_f,
                                            avg_other * (1 - frac_f), avg_other * frac_w), 0.0)
    # PP p2p: one activation (scatter/gathered across TP under SP) per stage boundary, fwd and bwd;
    # fill and drain sit on the critical path, steady-state sends overlap unless --no-overlap pp
    p2p_bytes = act / np.where(sp, tp, 1)
    t_p2p = np.where(pp > 1, C.p2p(cluster, p2p_bytes, tp * cp * dp), 0.0)
    cross = S.p2p_crossings(c.schedule, pp, vpp, nmb)
    pp_comm = 2 * t_p2p * cross * (pp - 1) + np.where(c.overlap_pp, 0.0, 2 * t_p2p * cross * nmb)

    # DP once per step: overlapped with the last micro-batch's backward (grad reduce-scatter,
    # Megatron overlap_grad_reduce) and the first forward (param all-gather, overlap_param_gather)
    per_step = pick("per_step")
    window = np.where(c.overlap_dp, pick("bwd") + pick("rc") + pick("fwd") * np.where(zero == 1, 1.0, 0.0), 0.0)
    dp_exposed = np.maximum(per_step - window, 0.0) + pick("dp_mb") * nmb

    # optimizer step over the parameters this rank owns (sharded by ZeRO>=1)
    pd_, pe_ = pick("params")
    owned = pd_ / np.where(zero >= 1, shard, 1) + pe_ / np.where(zero >= 1, eshard, 1)
    t_opt = owned * ADAM_BYTES_PER_PARAM * S.weight_copies(c.schedule) / hbm

    compute_mb = pick("fwd") + pick("bwd")
    breakdown = {
        "compute": nmb * compute_mb,
        "recompute": nmb * pick("rc"),
        "tp_comm": nmb * pick("tp"),
        "cp_comm": nmb * pick("cp"),
        "ep_comm": nmb * pick("ep"),
        "pp_comm": pp_comm,
        "dp_comm": dp_exposed,
        "bubble": bubble,
        "optimizer": t_opt,
        "overhead": np.full(len(c), stack.step_overhead_s),
    }
    step = sum(breakdown.values())

    # ------------------------------------------------------------------ memory (peak stage)
    flash = stack.flash_attention
    imb = moe_imbalance if not capacity_factor else min(moe_imbalance, capacity_factor)
    act_dense, full_dense = M.layer_activation_bytes(model, T, tp, sp, rec, False, flash, s, etp, imb)
    if model.moe:
        act_moe, full_moe = M.layer_activation_bytes(model, T, tp, sp, rec, True, flash, s, etp, imb)
    else:
        act_moe = full_moe = 0.0
    infl = S.inflight_microbatches(c.schedule, pp, vpp, nmb)
    copies = S.weight_copies(c.schedule)
    wbytes = 2.0 + np.where(fp8, 2.0, 0.0)            # bf16 weights (+ TE fp8 weight and transpose)

    def stage_mem(layers, ndense, prm, inflight, is_last, is_first):
        pd_, pe_ = prm
        w_d, g_d, o_d = M.model_state_bytes(pd_, shard, zero, stack.grad_bytes, 1.0)
        w_e, g_e, o_e = M.model_state_bytes(pe_, eshard, zero, stack.grad_bytes, 1.0)
        weights = (w_d + w_e) * wbytes * copies
        # ZeRO-3 gathers one layer ahead (prefetch): two layers of full weights in flight
        per_layer_full = (pd_ + pe_) / np.maximum(layers, 1) * 2.0
        weights = weights + np.where(zero == 3, 2 * per_layer_full, 0.0)
        nmoe = layers - ndense
        acts = (ndense * act_dense + nmoe * act_moe) * inflight
        # recompute needs one layer's full activations live while it runs backward
        acts = acts + np.where(rec > 0, np.maximum(full_dense if model.dense_layers else 0.0,
                                                   full_moe if model.moe else 0.0), 0.0)
        acts = acts + np.where(is_first, 2.0 * T * h / np.where(sp, tp, 1) * inflight, 0.0)
        # logits: fp32 logits of one micro-batch (Korthikanti sec. 4.3: 4sbv/t)
        logits = np.where(is_last, 4.0 * T * model.vocab / tp, 0.0)
        buffers = 2 * act * np.ones(len(c))   # TP/SP all-gather in/out buffers of one activation
        return dict(weights=weights, gradients=(g_d + g_e) * copies, optimizer=(o_d + o_e) * copies,
                    activations=acts, logits=logits, buffers=buffers,
                    reserved=np.full(len(c), gpu.reserved_bytes))

    mf = stage_mem(Lf, dense_first, pf, infl, pp == 1, True)
    mm = stage_mem(Lm, dense_mid, pm, np.maximum(infl - 1, 1), False, False)
    ml = stage_mem(Ll, dense_last, pl, np.minimum(infl, 1), True, False)
    tot = [sum(x.values()) for x in (mf, mm, ml)]
    tot[1] = np.where(pp > 2, tot[1], 0.0)
    tot[2] = np.where(pp > 1, tot[2], 0.0)
    mwhich = np.argmax(np.stack(tot), axis=0)
    mem = {k: np.choose(mwhich, [mf[k], mm[k], ml[k]]) for k in MEMORY_TERMS}
    mem_total = sum(mem.values())

    # ------------------------------------------------------------------ headline figures
    tokens_step = gb * s
    mflops_tok = F.model_flops_per_token(model, int(s.flat[0]) if np.ndim(s) else int(s), causal=True) \
        if np.all(s == s.flat[0]) else None
    if mflops_tok is None:   # mixed sequence lengths: per-candidate attention share
        base = F.model_flops_per_token(model, 1, causal=True)
        core1 = 3 * model.layers * F.attention_core_flops(model, 1.0, 1.0, True)
        mflops_tok = base - core1 + core1 * s * F.mean_attended(model, s)
    model_flops = mflops_tok * tokens_step
    out = Evaluation()
    out["step_time_s"] = step
    out["tokens_per_s_per_gpu"] = tokens_step / step / world
    out["model_tflops_per_gpu"] = model_flops / step / world / 1e12
    out["mfu"] = model_flops / step / world / gpu.peak_flops["bf16"]
    # hardware FLOPs per step summed over every GPU of every stage (tp*cp*dp GPUs per stage)
    per_stage_gpus = tp * cp * dp
    hw = (first["flops"] + np.where(pp > 2, mid["flops"] * np.maximum(pp - 2, 0), 0.0)
          + np.where(pp > 1, last["flops"], 0.0)) * nmb * per_stage_gpus
    rc_fl = (first["flops_rc"] + np.where(pp > 2, mid["flops_rc"] * np.maximum(pp - 2, 0), 0.0)
             + np.where(pp > 1, last["flops_rc"], 0.0)) * nmb * per_stage_gpus
    out["model_flops_step"] = model_flops * np.ones(len(c))
    out["hardware_flops_step"] = hw
    out["recompute_flops_step"] = rc_fl
    out["hfu"] = hw / step / world / gpu.peak_flops["bf16"]
    out["memory_bytes"] = mem_total
    out["feasible"] = mem_total <= gpu.hbm_bytes
    out["micro_batches"] = nmb
    out["gpus"] = world
    out["peak_stage"] = mwhich
    for k, v in breakdown.items():
        out[f"time_{k}_s"] = v if np.shape(v) == step.shape else np.broadcast_to(v, step.shape).astype(np.float64)
    for k, v in mem.items():
        out[f"mem_{k}_bytes"] = v if np.shape(v) == step.shape else np.broadcast_to(v, step.shape).astype(np.float64)
    return out
