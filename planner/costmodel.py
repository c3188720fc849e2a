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
from .layout import Candidates
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
# kernels per layer forward (backward launches about twice as many): dense layer = 2 norms, QKV,
# RoPE, attention, out-proj, 2 residual adds, fc1, activation, fc2, plus 4 TP collectives (counted
# from Megatron-Core TransformerLayer with TE modules); an MoE block adds router GEMM, top-k,
# softmax, token histogram, permute, 2 grouped GEMMs, activation, unpermute, 2 all-to-alls and
# their metadata copies (Megatron-Core MoELayer with the all-to-all dispatcher)
KERNELS_DENSE_FWD = 16
KERNELS_MOE_FWD = 28
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


LAYER_COLS = ("tp", "pp", "dp", "cp", "ep", "etp", "micro_batch", "seq_len", "sp", "precision", "cp_comm",
              "overlap_tp", "overlap_ep", "shard_group")


def _layer_terms(model: ModelSpec, cluster: Cluster, stack: Stack, lt: dict, moe_imbalance: float,
                 capacity_factor: float) -> dict:
    """Per-layer (and per-micro-batch embedding/logits) times, FLOPs, bytes and collective-group
    coefficients. `lt` holds the columns that decide them (LAYER_COLS); everything here is
    independent of recompute, ZeRO stage, schedule and stage split, so it is computed once per
    distinct row of that table."""
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    tp, pp, dp, cp = f(lt["tp"]), f(lt["pp"]), f(lt["dp"]), f(lt["cp"])
    ep, etp, b, s = f(lt["ep"]), f(lt["etp"]), f(lt["micro_batch"]), f(lt["seq_len"])
    sp = np.asarray(lt["sp"], bool) & (tp > 1)
    prec = np.asarray(lt["precision"])
    fp8 = prec == 1
    n = len(tp)
    h = model.hidden
    e = cluster.efficiency
    gpu = cluster.gpu
    T = b * s / cp                          # tokens per micro-batch on one CP rank
    out = {}

    def peak_of(p):
        return gpu.peak_flops.get(p, gpu.peak_flops.get("bf16"))
    pk16 = peak_of("fp16") if "fp16" in gpu.peak_flops else peak_of("bf16")
    lin_peak = (np.where(fp8, peak_of("fp8"), np.where(prec == 2, pk16, peak_of("bf16"))),
                np.where(fp8, e.gemm_max.get("fp8", e.gemm_max["bf16"]),
                         np.where(prec == 2, e.gemm_max.get("fp16", e.gemm_max["bf16"]), e.gemm_max["bf16"])))
    out["lin_peak"] = lin_peak[0]
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
        bmm_peak = (np.full(n, attn_peak), np.full(n, e.gemm_max["bf16"]))
        t_bmm = _gemm_time(cluster, stack, full, s / cp, s, hd, bmm_peak)
        scores_bytes = b * (model.heads / tp) * (s / cp) * s * (4 + (5 if model.dropout else 0))
        t_core_f = t_bmm + scores_bytes * stack.elementwise / hbm
        t_core_b = 2 * t_bmm + 2 * scores_bytes * stack.elementwise / hbm
        core = full
    out["t_core_f"], out["core"] = t_core_f, core

    def mlp_time(ffn, tokens):
        fl = F.mlp_flops(model, tokens, ffn)
        up = (model.mlp_matrices - 1) * ffn
        return (g(fl * (model.mlp_matrices - 1) / model.mlp_matrices / tp, tokens, up / tp, h)
                + g(fl / model.mlp_matrices / tp, tokens, h, ffn / tp))

    t_dense_mlp = mlp_time(model.ffn_hidden, T)
    # elementwise traffic per layer forward, bytes (LayerNorm x2 r+w, two residual adds r2+w1,
    # activation r+w) -- fused kernels as in TE
    tok_sp = T / np.where(sp, tp, 1)
    ew_common = 2 * tok_sp * h * (2 + 2 + 3 + 3 + (1 if model.dropout else 0))
    # fp8 casts of GEMM inputs are fused into LayerNorm / activation kernels by Transformer Engine
    # (LayerNormLinear, fused cast-transpose); what remains is the cast of the attention output
    ew_common = ew_common + np.where(fp8, 3 * T * model.v_dim / tp, 0.0)
    act_rw = 3 if model.gated else 2
    t_ew_dense = 2 * T * model.ffn_hidden / tp * act_rw * stack.elementwise / hbm
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
        t_moe_f = t_moe_gemm_w = np.zeros(n)

    # per-GPU forward FLOPs of one layer (to account hardware FLOPs from the actual split)
    fl_attn = (a["attn_qkv"] + a["attn_out"]) / tp + core
    out["fl_dense"] = fl_attn + F.mlp_flops(model, T) / tp
    if model.moe:
        out["fl_moe"] = (fl_attn + fl_e + 2 * local * h * mo.experts
                         + (F.mlp_flops(model, T, mo.shared_expert_ffn_hidden * mo.shared_experts) / tp
                            if mo.shared_experts else 0.0))
    else:
        out["fl_moe"] = np.zeros(n)
    # fixed per-kernel launch/sync cost: what FLOP and byte counts miss for small layers
    # (+ an eager TP stack's host cost per TP-sharded layer: DTensor dispatch, measured by calibrate)
    k_tp = np.where(tp > 1, stack.tp_layer_overhead_s, 0.0)
    k_dense = KERNELS_DENSE_FWD * stack.kernel_overhead_s + k_tp
    k_moe = (KERNELS_DENSE_FWD - 3 + KERNELS_MOE_FWD) * stack.kernel_overhead_s + k_tp
    # layer forward = attention GEMMs + core + elementwise + MLP/MoE
    t_attn_f = t_attn_gemm + t_core_f + t_ew_common
    out["f_dense"] = t_attn_f + t_dense_mlp + t_ew_dense + k_dense
    out["f_moe"] = t_attn_f + t_moe_f + k_moe
    # backward: GEMMs 2x (input grad + weight grad), core 2.5x, elementwise 2x
    out["b_dense"] = 2 * (t_attn_gemm + t_dense_mlp) + t_core_b + 2 * (t_ew_common + t_ew_dense) + 2 * k_dense
    out["b_moe"] = 2 * (t_attn_gemm + t_moe_f) + t_core_b + 2 * t_ew_common + 2 * k_moe
    out["w_dense"] = t_attn_gemm + t_dense_mlp          # weight-gradient part (for zero-bubble)
    out["w_moe"] = t_attn_gemm + t_moe_gemm_w

    # ------------------------------------------------------------------ per-layer communication
    act = 2.0 * T * h                                  # one [s/cp, b, h] bf16 activation
    out["act"] = act
    g_tp = C.Group(cluster, tp, 1.0)
    # with SP the all-reduce is an all-gather + reduce-scatter; Transformer Engine gathers fp8
    # activations under fp8 (TE LayerNormLinear with sequence_parallel), the reduce-scatter stays bf16
    # (a ring all-reduce costs what its all-gather + reduce-scatter halves do, unless the profile
    # fits each collective apart, as calibrated ones do)
    t_ar = np.where(sp, np.where(fp8, 0.5, 1.0) * g_tp.all_gather(act) + g_tp.reduce_scatter(act),
                    g_tp.all_reduce(act))
    tp_colls_dense = 2.0                                # attention + MLP (Megatron, Shoeybi 2019 fig. 4)
    tp_colls_moe = 1.0 + np.where(etp > 1, 1.0, 0.0)
    # TE userbuffer overlap needs the TP group inside one NVLink domain
    # (nothing overlaps on shared processors: communication is CPU work of the same ranks)
    owns = gpu.shared_by == 1
    tp_overlap_on = (np.asarray(lt["overlap_tp"], bool) & stack.tp_overlap & sp
                     & (tp <= (cluster.domain_sizes[0] or tp)) & owns)

    def exposed(comm, hideable):
        hidden_part = np.minimum(comm * (1 - TP_OVERLAP_RESIDUAL), hideable)
        return comm - hidden_part

    out["tp_dense"] = np.where(tp_overlap_on, exposed(tp_colls_dense * t_ar, t_attn_gemm + t_dense_mlp),
                               tp_colls_dense * t_ar)
    out["tp_moe"] = np.where(tp_overlap_on, exposed(tp_colls_moe * t_ar, t_attn_gemm), tp_colls_moe * t_ar)
    # CP: ring (p2p) passes K,V around cp-1 times (Liu et al. 2023 'Ring Attention' sec. 3;
    # Megatron-Core context_parallel p2p), backward passes K,V and dK,dV: 2x; all-gather variant
    # gathers K,V (fwd) and reduce-scatters dK,dV (bwd); a2a (Ulysses, Jacobs et al. 2023 sec. 3.2)
    # moves Q,K,V and O: 4 all-to-alls forward, 4 backward.
    # K and V of this rank's heads (kv heads split by tp; Megatron replicates them when tp > kv_heads)
    kv_split = tp if model.mla else np.minimum(tp, model.kv_heads)
    kv_local = 2.0 * T * 2 * kv_dim / kv_split
    cp_step = C.ring_step(cluster, kv_local, cp, tp)
    g_cp = C.Group(cluster, cp, tp)
    hide = 1.0 if owns else 0.0                          # shared processors hide nothing (above)
    cp_ring_f = np.maximum((cp - 1) * cp_step - hide * t_core_f * (cp - 1) / cp, 0.0)
    cp_ring_b = np.maximum(2 * (cp - 1) * cp_step - hide * t_core_b * (cp - 1) / cp, 0.0)
    cp_ag_f = g_cp.all_gather(kv_local * cp)
    cp_ag_b = cp_ag_f + g_cp.reduce_scatter(kv_local * cp)
    qkvo = 2.0 * T * (model.q_dim + 2 * kv_dim + model.v_dim) / tp
    cp_a2a_f = C.all_to_all(cluster, qkvo, cp, tp)
    cpc = np.asarray(lt["cp_comm"])
    out["cp_f"] = np.where(cp > 1, np.select([cpc == 0, cpc == 1], [cp_ring_f, cp_ag_f], cp_a2a_f), 0.0)
    out["cp_b"] = np.where(cp > 1, np.select([cpc == 0, cpc == 1], [cp_ring_b, cp_ag_b], cp_a2a_f), 0.0)
    # EP: dispatch + combine all-to-all per MoE layer forward, again in backward
    # (Megatron-Core MoEAlltoAllTokenDispatcher)
    if model.moe:
        ep_bytes = 2.0 * (T / tp) * model.moe.top_k * moe_imbalance * h
        ep_comm = 2 * C.all_to_all(cluster, ep_bytes, ep, etp)
        # Megatron-Core --overlap-moe-expert-parallel-comm runs one micro-batch's dispatch/combine
        # under another's attention and expert compute (as DualPipe does, DeepSeek-V3 sec. 3.2.1);
        # what exceeds that compute, and a residual share as for TP, stays exposed
        ovl = np.asarray(lt["overlap_ep"], bool) & stack.ep_overlap & owns
        out["ep_f"] = np.where(ovl, exposed(ep_comm, t_attn_f + t_moe_f), ep_comm)
    else:
        out["ep_f"] = np.zeros(n)

    # ------------------------------------------------------------------ embedding, logits, p2p
    # embedding (first stage): lookup r+w; logits + vocab-parallel cross entropy (last stage):
    # GEMM fwd + 2x bwd, fp32 logits read/written ~4 times (Megatron fused_vocab_parallel_cross_entropy)
    out["t_emb"] = 2 * 2.0 * T * h / hbm * 3
    lg_f = g(F.logits_flops(model, T) / tp, T, model.vocab / tp, h)
    ce = 4 * 4.0 * T * model.vocab / tp / hbm * stack.elementwise
    out["lg_f"], out["logits_f"], out["logits_b"] = lg_f, lg_f + ce / 2, 2 * lg_f + ce / 2
    out["fl_logits"] = 3 * F.logits_flops(model, T) / tp
    # PP p2p: one activation (scatter/gathered across TP under SP) per stage boundary
    out["t_p2p"] = np.where(pp > 1, C.p2p(cluster, act / np.where(sp, tp, 1), tp * cp * dp), 0.0)

    # ------------------------------------------------------------------ DP groups
    d0 = cluster.domain_sizes[0] or 1
    dstr = tp if stack.pooled_nics else np.maximum(tp, d0)   # no NIC pooling: one member per domain
    estr = ep * etp if stack.pooled_nics else np.maximum(ep * etp, d0)
    dpcp = dp * cp                                    # dense-gradient group (Megatron: dp x cp)
    sg = f(lt["shard_group"])
    shard = np.where(sg > 0, np.minimum(sg, dpcp), dpcp)
    edp = tp * cp * dp / (ep * etp)                   # expert data-parallel group
    eshard = np.minimum(shard, edp)
    out["shard"], out["eshard"], out["dpcp"] = shard, eshard, dpcp
    for name, size, stride, keys in (("dense", dpcp, dstr, ("ar",)), ("shard", shard, dstr, ("ag", "rs")),
                                     ("repl", dpcp / shard, dstr * shard, ("ar",)),
                                     ("exp", edp, estr, ("ar",)), ("eshard", eshard, estr, ("ag", "rs"))):
        for k, v in C.Group(cluster, size, stride).coefficients(keys).items():
            out[f"{name}_{k}"] = v

    # ------------------------------------------------------------------ activation memory
    flash = stack.flash_attention
    imb = moe_imbalance if not capacity_factor else min(moe_imbalance, capacity_factor)
    for r in (0, 1, 2):
        rr = np.full(n, r)
        out[f"act_dense_{r}"], full_dense = M.layer_activation_bytes(model, T, tp, sp, rr, False, flash, s, etp, imb)
        if model.moe:
            out[f"act_moe_{r}"], full_moe = M.layer_activation_bytes(model, T, tp, sp, rr, True, flash, s, etp, imb)
        else:
            out[f"act_moe_{r}"], full_moe = np.zeros(n), np.zeros(n)
    # recompute needs one layer's full activations live while it runs backward
    out["act_live"] = np.maximum(full_dense if model.dense_layers else 0.0, full_moe if model.moe else 0.0)
    out["act_emb"] = 2.0 * T * h / np.where(sp, tp, 1)
    # logits: fp32 logits of one micro-batch (Korthikanti sec. 4.3: 4sbv/t)
    out["logits_bytes"] = 4.0 * T * model.vocab / tp
    return {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for k, v in out.items()}


_LAYER_CACHE: dict = {}
_DETAIL_ONLY = ("fl_dense", "fl_moe", "fl_logits", "lin_peak")   # layer terms only breakdowns need


def evaluate(model: ModelSpec, cluster: Cluster, c: Candidates, stack: Stack | None = None,
             moe_imbalance: float = 1.0, capacity_factor: float = 0.0, detail: bool = True) -> Evaluation:
    """Score every candidate. detail=False returns only what ranking needs (step_time_s,
    tokens_per_s_per_gpu, memory_bytes, feasible, gpus); the search re-scores the few it keeps
    with detail=True for their breakdowns."""
    stack = stack or STACKS["megatron-core"]
    f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
    tp, pp, dp, cp = f(c.tp), f(c.pp), f(c.dp), f(c.cp)
    ep, etp, vpp, b = f(c.ep), f(c.etp), f(c.vpp), f(c.micro_batch)
    gb, s = f(c.global_batch), f(c.seq_len)
    rec = c.recompute.astype(np.int64)
    zero = c.zero
    sched = c.schedule
    L = model.layers
    gpu = cluster.gpu
    world = tp * pp * dp * cp
    nmb = gb / (dp * b)                     # micro-batches per step per pipeline
    n = len(c)

    # per-layer terms: once per distinct layer-table row (and once per table: chunks of one class
    # share it), gathered to candidates
    if c.deg_table is not None:
        key = (id(c.deg_table), id(model), id(cluster), stack, moe_imbalance, capacity_factor)
        if _LAYER_CACHE.get("key") != key:
            terms = _layer_terms(model, cluster, stack, c.deg_table, moe_imbalance, capacity_factor)
            names = [k for k in terms if k not in _DETAIL_ONLY] + [k for k in _DETAIL_ONLY if k in terms]
            _LAYER_CACHE.update(key=key, table=c.deg_table,   # keep the table alive: ids stay unique
                                names=names, stacked=np.stack([terms[k] for k in names]),
                                ncore=len(names) - len([k for k in _DETAIL_ONLY if k in terms]))
        names, stacked = _LAYER_CACHE["names"], _LAYER_CACHE["stacked"]
        rows = len(names) if detail else _LAYER_CACHE["ncore"]
        gathered = np.take(stacked[:rows], c.deg_index, axis=1)   # one gather for every term
        lq = dict(zip(names[:rows], gathered))
    else:
        lq = _layer_terms(model, cluster, stack, {k: c.cols[k] for k in LAYER_COLS}, moe_imbalance,
                          capacity_factor)
    rec0, rec1 = rec == 0, rec == 1
    recomp_dense = np.where(rec0, 0.0, np.where(rec1, lq["t_core_f"], lq["f_dense"]))
    recomp_moe = np.where(rec0, 0.0, np.where(rec1, lq["t_core_f"], lq["f_moe"]))
    rec_comm = np.where(rec == 2, 1.0, 0.0)             # full recompute repeats the forward collectives
    ep_f = np.where(sched == S.DUALPIPE, 0.0, lq["ep_f"])   # DualPipe hides EP behind the other chunk

    # ------------------------------------------------------------------ stages
    Lf_given = f(c.first_stage_layers)
    Ll_given = f(c.last_stage_layers)
    n_given = (Lf_given > 0).astype(float) + (Ll_given > 0).astype(float)
    even = (L - Lf_given - Ll_given) / np.maximum(pp - n_given, 1)
    Lf = np.where(pp == 1, float(L), np.where(Lf_given > 0, Lf_given, even))
    Ll = np.where(pp == 1, 0.0, np.where(Ll_given > 0, Ll_given, even))
    Lm = np.where(pp > 2, even, 0.0)
    nd = float(model.dense_layers)                    # leading dense layers sit on the first stage(s)
    dense_first = np.minimum(nd, Lf)
    dense_mid = np.minimum(np.maximum(nd - Lf, 0.0), Lm)
    dense_last = np.where(pp > 1, np.maximum(nd - Lf - Lm * np.maximum(pp - 2, 0), 0.0), 0.0)
    core = lq["core"]

    def stage(layers, ndense):
        nmoe = layers - ndense
        tp1 = ndense * lq["tp_dense"] + nmoe * lq["tp_moe"]
        fwd = ndense * lq["f_dense"] + nmoe * lq["f_moe"]
        if detail:
            flf = ndense * lq["fl_dense"] + nmoe * lq["fl_moe"]
            fl_rc = np.where(rec0, 0.0, np.where(rec1, layers * core, flf))
            fl = 3 * flf + (ATTN_BWD_FACTOR - 2) * layers * core + fl_rc
        else:
            fl = fl_rc = 0.0
        return dict(
            fwd=fwd, bwd=ndense * lq["b_dense"] + nmoe * lq["b_moe"],
            w=ndense * lq["w_dense"] + nmoe * lq["w_moe"],
            rc=ndense * recomp_dense + nmoe * recomp_moe,
            tp=tp1 * (2 + rec_comm),
            # selective recompute re-runs core attention, so the K/V ring runs again too
            cp=layers * (lq["cp_f"] + lq["cp_b"] + (rec >= 1) * lq["cp_f"]),
            ep=nmoe * ep_f * (2 + rec_comm),
            # forward share of the per-micro-batch time (compute + exposed forward communication)
            tf=fwd + tp1 + layers * lq["cp_f"] + nmoe * ep_f,
            # hardware FLOPs per GPU per micro-batch: fwd + 2x bwd (+0.5x fwd core for the flash
            # backward's recomputed scores) + recompute
            flops=fl, flops_rc=fl_rc)

    st_first, st_mid, st_last = stage(Lf, dense_first), stage(Lm, dense_mid), stage(Ll, dense_last)
    only = pp == 1
    st_first["fwd"] = st_first["fwd"] + lq["t_emb"] + np.where(only, lq["logits_f"], 0.0)
    st_first["tf"] = st_first["tf"] + lq["t_emb"] + np.where(only, lq["logits_f"], 0.0)
    st_first["bwd"] = st_first["bwd"] + lq["t_emb"] + np.where(only, lq["logits_b"], 0.0)
    st_first["w"] = st_first["w"] + np.where(only, lq["lg_f"], 0.0)
    for k, v in (("fwd", "logits_f"), ("tf", "logits_f"), ("bwd", "logits_b"), ("w", "lg_f")):
        st_last[k] = st_last[k] + lq[v]
    if detail:
        st_first["flops"] = st_first["flops"] + np.where(only, lq["fl_logits"], 0.0)
        st_last["flops"] = st_last["flops"] + lq["fl_logits"]

    # parameters per GPU by stage. Column-parallel weights and biases and row-parallel weights are
    # split over tp; norms, row-parallel biases and the router are whole on every tp rank
    # (Megatron-Core ColumnParallelLinear / RowParallelLinear; as planner/counts.local_params,
    # which validate/ checks exactly); routed experts are split over ep * etp.
    row_b = model.hidden if model.bias else 0
    norms = model.norm_params()
    dd_shard = model.attention_params() - row_b + model.mlp_params() - row_b
    dd_repl = 2 * row_b + norms
    if model.moe:
        mo = model.moe
        dm_shard = model.attention_params() - row_b + mo.shared_experts * model.mlp_params(mo.shared_expert_ffn_hidden)
        dm_repl = row_b + norms + model.hidden * mo.experts
    else:
        dm_shard = dm_repl = 0
    P_exp_layer = model.expert_params_per_layer()
    final_norm = model.hidden * (2 if model.bias else 1)
    # output layer; with tied embeddings and pp > 1 the last stage keeps its own copy of the
    # embedding (Megatron-Core shared_embedding_or_output_weight)
    out_p = np.where(model.tied_embeddings & (pp > 1), model.embedding_params(), model.output_params())

    def stage_params(layers, ndense, first, last):
        nmoe = layers - ndense
        dense = ((ndense * dd_shard + nmoe * dm_shard + np.where(first, model.embedding_params(), 0.0)
                  + np.where(last, out_p, 0.0)) / tp
                 + ndense * dd_repl + nmoe * dm_repl + np.where(last, final_norm, 0.0))
        return dense, nmoe * P_exp_layer / (ep * etp)

    pf = stage_params(Lf, dense_first, True, only)
    pm = stage_params(Lm, dense_mid, False, False)
    pl = stage_params(Ll, dense_last, False, pp > 1)

    shard, eshard, dpcp = lq["shard"], lq["eshard"], lq["dpcp"]
    hsdp = shard < dpcp
    gbytes = stack.grad_reduce_bytes

    def coll(name, kind, nbytes):
        return lq[f"{name}_a_{kind}"] * nbytes + lq[f"{name}_b_{kind}"]

    has_moe = model.moe is not None
    any_hsdp = bool(np.any(hsdp))

    def dp_times(params, layers):
        pd_, pe_ = params
        # gradient reduction: all-reduce (ZeRO-0) or reduce-scatter (ZeRO>=1); HSDP adds an
        # all-reduce of the shard across replicas (Zhao et al. 2023 'PyTorch FSDP' sec. 3.2.2).
        # Collectives are issued per bucket / per layer, each paying the latency term again:
        # Megatron buckets of max(40M, 1M*dp) elements (distributed/param_and_grad_buffer.py);
        # ZeRO-3 / FSDP gathers and reduces one layer (FSDP unit) at a time
        n_buckets = np.maximum(np.ceil((pd_ + pe_) / np.maximum(40e6, 1e6 * dpcp)), 1.0)
        extra = np.where(zero == 3, np.maximum(layers, 1.0), n_buckets) - 1
        ar = coll("dense", "ar", pd_ * gbytes) + extra * lq["dense_b_ar"]
        rs = coll("shard", "rs", pd_ * gbytes) + extra * lq["shard_b_rs"]
        ag = coll("shard", "ag", pd_ * 2.0) + extra * lq["shard_b_ag"]
        if has_moe:      # routed-expert gradients reduce over the expert data-parallel group
            ar = ar + coll("exp", "ar", pe_ * gbytes) + extra * lq["exp_b_ar"]
            rs = rs + coll("eshard", "rs", pe_ * gbytes) + extra * lq["eshard_b_rs"]
            ag = ag + coll("eshard", "ag", pe_ * 2.0) + extra * lq["eshard_b_ag"]
        if any_hsdp:
            rs = rs + np.where(hsdp, coll("repl", "ar", pd_ * gbytes / shard), 0.0)
        grad = np.where(zero == 0, ar, rs)
        # ZeRO-1: grads reduced once per step, params gathered once (Megatron distributed optimizer)
        # ZeRO-2: grads reduce-scattered every micro-batch (DeepSpeed stage 2)
        # ZeRO-3: params gathered for fwd (and again for bwd), grads reduce-scattered every micro-batch
        per_step = np.where(zero <= 1, grad + np.where(zero == 1, ag, 0.0), np.where(zero == 2, ag, 0.0))
        per_mb_f = np.where(zero == 3, ag, 0.0)
        per_mb_b = np.where(zero >= 2, grad, 0.0) + np.where((zero == 3) & stack.fsdp_regather_backward, ag, 0.0)
        return per_step, per_mb_f, per_mb_b

    stages = []
    shared = gpu.shared_by > 1
    ovl_dp = c.overlap_dp & (not shared)
    for st, prm, nl in ((st_first, pf, Lf), (st_mid, pm, Lm), (st_last, pl, Ll)):
        per_step, mb_f, mb_b = dp_times(prm, nl)
        dp_mb = np.where(ovl_dp, np.maximum(mb_f - st["fwd"], 0.0) + np.maximum(mb_b - st["bwd"] - st["rc"], 0.0),
                         mb_f + mb_b)
        stages.append(dict(st, per_step=per_step, dp_mb=dp_mb, pd=prm[0], pe=prm[1],
                           t=st["fwd"] + st["bwd"] + st["rc"] + st["tp"] + st["cp"] + st["ep"] + dp_mb))
    first, mid, last = stages
    t_first, t_mid, t_last = first["t"], np.where(pp > 2, mid["t"], 0.0), np.where(pp > 1, last["t"], 0.0)
    sum_t = t_first + t_mid * np.maximum(pp - 2, 0) + t_last
    if shared:
        # ranks time-share the processors (a CPU: several ranks per core): a work-conserving
        # scheduler gives a waiting rank's share to the others, so a step takes the ranks' mean
        # busy time (processor sharing, Kleinrock 1967 'Time-shared systems', J. ACM 14(2)) and a
        # pipeline bubble costs nothing while other ranks have work (shared_by >= 2: most of them do)
        n_mid = np.maximum(pp - 2, 0)
        pick = lambda key: np.where(pp > 1, (first[key] + mid[key] * n_mid + last[key]) / pp,  # noqa: E731
                                    first[key])
        t_slow = pick("t")
        bubble = np.zeros(n)
    else:
        which = np.where(t_first >= t_mid, np.where(t_first >= t_last, 0, 2), np.where(t_mid >= t_last, 1, 2))
        w0, w1 = which == 0, which == 1
        pick = lambda key: np.where(w0, first[key], np.where(w1, mid[key], last[key]))  # noqa: E731
        t_slow = pick("t")
        avg_other = np.where(pp > 1, (sum_t - t_slow) / np.maximum(pp - 1, 1), 0.0)
        # bubble from the other stages' average per-micro-batch times, split into f / b / w shares
        frac_f = pick("tf") / np.maximum(t_slow, 1e-30)
        frac_w = pick("w") / np.maximum(t_slow, 1e-30)
        bubble = np.where(pp > 1, S.bubble_time(sched, pp, vpp, avg_other * frac_f,
                                                avg_other * (1 - frac_f), avg_other * frac_w), 0.0)
    # PP p2p: fill and drain sit on the critical path; steady-state sends overlap unless --no-overlap pp
    cross = S.p2p_crossings(sched, pp, vpp, nmb)
    t_p2p = lq["t_p2p"]
    pp_comm = 2 * t_p2p * cross * (pp - 1) + np.where(c.overlap_pp, 0.0, 2 * t_p2p * cross * nmb)
    if shared:
        # on shared processors a send is the sender's and receiver's CPU work, which nothing hides:
        # every micro-batch crosses each of the pp - 1 boundaries forward and backward, a rank's
        # mean share 2 (pp - 1) / pp exchanges (the fill and drain wait costs nothing, as the bubble)
        pp_comm = 2 * t_p2p * cross * nmb * (pp - 1) / pp

    # DP once per step: overlapped with the last micro-batch's backward (grad reduce-scatter,
    # Megatron overlap_grad_reduce) and the first forward (param all-gather, overlap_param_gather);
    # nothing overlaps on shared processors, where communication is CPU work of the same ranks
    window = np.where(ovl_dp & (not shared), pick("bwd") + pick("rc") + pick("fwd") * (zero == 1), 0.0)
    dp_exposed = np.maximum(pick("per_step") - window, 0.0) + pick("dp_mb") * nmb

    # optimizer step over the parameters this rank owns (sharded by ZeRO>=1)
    pd_, pe_ = pick("pd"), pick("pe")
    sharded = zero >= 1
    owned = pd_ / np.where(sharded, shard, 1) + pe_ / np.where(sharded, eshard, 1)
    copies = S.weight_copies(sched)
    opt_bw = gpu.hbm_bandwidth * (cluster.efficiency.optimizer or cluster.efficiency.hbm)
    t_opt = owned * ADAM_BYTES_PER_PARAM * copies / opt_bw

    if not detail:
        step = (nmb * t_slow + pp_comm + bubble + np.maximum(pick("per_step") - window, 0.0) + t_opt
                + stack.step_overhead_s)
    breakdown = {} if not detail else {
        "compute": nmb * (pick("fwd") + pick("bwd")),
        "recompute": nmb * pick("rc"),
        "tp_comm": nmb * pick("tp"),
        "cp_comm": nmb * pick("cp"),
        "ep_comm": nmb * pick("ep"),
        "pp_comm": pp_comm,
        "dp_comm": dp_exposed,
        "bubble": bubble,
        "optimizer": t_opt,
        "overhead": np.full(n, stack.step_overhead_s),
    }
    if detail:
        step = sum(breakdown.values())

    # ------------------------------------------------------------------ memory (peak stage)
    act_dense = np.where(rec0, lq["act_dense_0"], np.where(rec1, lq["act_dense_1"], lq["act_dense_2"]))
    act_moe = np.where(rec0, lq["act_moe_0"], np.where(rec1, lq["act_moe_1"], lq["act_moe_2"]))
    infl = S.inflight_microbatches(sched, pp, vpp, nmb)
    wbytes = 2.0 + np.where(c.precision == 1, 2.0, 0.0)   # bf16 weights (+ TE fp8 weight and transpose)
    live = np.where(rec > 0, lq["act_live"], 0.0)
    reserved = np.full(n, gpu.reserved_bytes)
    buffers = 2 * lq["act"]                           # TP/SP all-gather in/out buffers of one activation

    layer_dense = (dd_shard / tp + dd_repl) if model.dense_layers else 0.0
    if model.moe:
        layer_dense = np.maximum(layer_dense, dm_shard / tp + dm_repl)
    prefetch = 2 * 2.0 * (layer_dense * (shard > 1) + P_exp_layer / (ep * etp) * (eshard > 1))

    def stage_mem(layers, ndense, prm, inflight, is_last, is_first):
        pd_, pe_ = prm
        w_d, g_d, o_d = M.model_state_bytes(pd_, shard, zero, stack.grad_bytes, 1.0)
        w_e, g_e, o_e = M.model_state_bytes(pe_, eshard, zero, stack.grad_bytes, 1.0)
        # ZeRO-3 gathers one layer ahead (prefetch): two layers of full weights in flight
        # (two layers' bf16 weights; nothing is gathered where the shard group is one rank)
        weights = (w_d + w_e) * wbytes * copies + np.where(zero == 3, prefetch, 0.0)
        acts = (ndense * act_dense + (layers - ndense) * act_moe) * inflight + live
        acts = acts + np.where(is_first, lq["act_emb"] * inflight, 0.0)
        return dict(weights=weights, gradients=(g_d + g_e) * copies, optimizer=(o_d + o_e) * copies,
                    activations=acts, logits=np.where(is_last, lq["logits_bytes"], 0.0), buffers=buffers,
                    reserved=reserved)

    mf = stage_mem(Lf, dense_first, pf, infl, only, True)
    mm = stage_mem(Lm, dense_mid, pm, np.maximum(infl - 1, 1), False, False)
    ml = stage_mem(Ll, dense_last, pl, np.minimum(infl, 1), True, False)
    tf_, tm_, tl_ = sum(mf.values()), np.where(pp > 2, sum(mm.values()), 0.0), np.where(pp > 1, sum(ml.values()), 0.0)
    mem_total = np.maximum(np.maximum(tf_, tm_), tl_)
    tokens_step = gb * s
    if not detail:
        out = Evaluation()
        out["step_time_s"] = step
        out["tokens_per_s_per_gpu"] = tokens_step / step / world
        out["memory_bytes"] = mem_total
        out["feasible"] = mem_total <= gpu.hbm_bytes
        out["gpus"] = world
        return out
    mwhich = np.where(tf_ >= tm_, np.where(tf_ >= tl_, 0, 2), np.where(tm_ >= tl_, 1, 2))
    m0, m1 = mwhich == 0, mwhich == 1
    mem = {k: np.where(m0, mf[k], np.where(m1, mm[k], ml[k])) for k in MEMORY_TERMS}

    # ------------------------------------------------------------------ headline figures
    if np.all(s == s.flat[0]):
        mflops_tok = F.model_flops_per_token(model, int(s.flat[0]), causal=True)
    else:   # mixed sequence lengths: per-candidate attention share
        base = F.model_flops_per_token(model, 1, causal=True)
        core1 = 3 * model.layers * F.attention_core_flops(model, 1.0, 1.0, True)
        mflops_tok = base - core1 + core1 * s * F.mean_attended(model, s)
    model_flops = mflops_tok * tokens_step
    out = Evaluation()
    out["step_time_s"] = step
    out["tokens_per_s_per_gpu"] = tokens_step / step / world
    out["model_tflops_per_gpu"] = model_flops / step / world / 1e12
    # MFU against the dense peak of the precision the linear layers run in (PaLM, Chowdhery et al.
    # 2022 appendix B: model FLOPs over the peak of the hardware as used)
    out["mfu"] = model_flops / step / world / lq["lin_peak"]
    # hardware FLOPs per step summed over every GPU of every stage (tp*cp*dp GPUs per stage)
    per_stage_gpus = tp * cp * dp * nmb
    mids = np.where(pp > 2, np.maximum(pp - 2, 0), 0.0)
    hw = (first["flops"] + mid["flops"] * mids + np.where(pp > 1, last["flops"], 0.0)) * per_stage_gpus
    rc_fl = (first["flops_rc"] + mid["flops_rc"] * mids + np.where(pp > 1, last["flops_rc"], 0.0)) * per_stage_gpus
    out["model_flops_step"] = model_flops * np.ones(n)
    out["hardware_flops_step"] = hw
    out["recompute_flops_step"] = rc_fl
    out["hfu"] = hw / step / world / lq["lin_peak"]
    out["memory_bytes"] = mem_total
    out["feasible"] = mem_total <= gpu.hbm_bytes
    out["micro_batches"] = nmb
    out["gpus"] = world
    out["peak_stage"] = mwhich
    for k, v in breakdown.items():
        out[f"time_{k}_s"] = np.broadcast_to(v, (n,))
    for k, v in mem.items():
        out[f"mem_{k}_bytes"] = np.broadcast_to(v, (n,))
    return out
