"""Phase 2, communication: per-layer collectives of one micro-batch (TP, CP, EP, PP) as volumes
and exposed seconds, and the alpha-beta coefficients of the data-parallel groups (whose volumes
depend on the stage's parameters, phase 4)."""
from __future__ import annotations

import numpy as np

from .. import collectives as C
from ..hardware import Cluster
from ..model_spec import ModelSpec
from ..stacks import Stack
from . import traffic as X
from .compute import LayerCompute
from .elements import ElementBytes
from .knobs import LayerKnobs
from .records import Record, record, full

TP_OVERLAP_RESIDUAL = 0.2   # share of TP traffic TE userbuffer overlap leaves exposed (first/last
                            # chunk of each ring; Wang et al. 2022 'Overlap communication with dependent
                            # computation via decomposition', sec. 6: 74-85% hidden)


@record
class LayerComm(Record):
    """Per-layer communication of one micro-batch on one rank: bytes per call and exposed seconds."""
    act_bytes: np.ndarray      # one [b, s/cp, h] activation (a TP collective's buffer)
    tp_dense: np.ndarray       # exposed TP seconds per dense layer and pass
    tp_moe: np.ndarray         # exposed TP seconds per MoE layer and pass
    tp_first: np.ndarray       # TP seconds per micro-batch on the first rank (embedding)
    tp_last: np.ndarray        # TP seconds per micro-batch on the last rank (output layer, loss)
    cp_f: np.ndarray           # exposed CP seconds per layer, forward
    cp_b: np.ndarray           # exposed CP seconds per layer, backward
    ep_f: np.ndarray           # exposed EP all-to-all seconds per MoE layer and pass, overlapped where it can be
    ep_raw: np.ndarray         # the same, not overlapped (stages.ep_overlap_allowed says which applies)
    ep_meta: np.ndarray        # EP token-count all-gather per MoE layer forward
    t_p2p: np.ndarray          # one pipeline-boundary activation send


@record
class DpGroups(Record):
    """Data-parallel group sizes and, per group and collective, time = a * bytes + b as rows
    [a; b] (collectives.Group.coefficients)."""
    dpcp: np.ndarray           # dense-gradient group dp x cp (Megatron with_context_parallel=True)
    shard: np.ndarray          # ZeRO/FSDP shard group (HSDP when smaller than dp x cp)
    eshard: np.ndarray         # expert shard group
    dense_ar: np.ndarray
    shard_ag: np.ndarray
    shard_rs: np.ndarray
    repl_ar: np.ndarray        # HSDP replica all-reduce
    exp_ar: np.ndarray
    eshard_ag: np.ndarray
    eshard_rs: np.ndarray
    tp_ar: np.ndarray          # the TP group (sequence-parallel norm gradients)
    embd_ar: np.ndarray        # first and last pipeline rank (tied embedding gradients)


def _exposed(comm, hideable):
    """What overlap leaves exposed: at most (1 - residual) of the traffic hides, and no more
    than the compute it hides behind."""
    return comm - np.minimum(comm * (1 - TP_OVERLAP_RESIDUAL), hideable)


def overlapped(traffic, window, slowdown):
    """Seconds `traffic` seconds of communication cost beside `window` seconds of compute they may
    hide behind: the part that sticks out, plus `slowdown` per hidden second (Efficiency.
    overlap_slowdown: NCCL's kernels hold SMs; Lee et al. 2025, arXiv 2507.03114)."""
    hidden = np.minimum(traffic, window)
    return traffic - hidden + slowdown * hidden


def flows_time(group: C.Group, flows) -> np.ndarray:
    """Seconds of `flows` on one group, back to back (traffic.Flow: calls x bytes per call)."""
    op = {"all_reduce": group.all_reduce, "all_gather": group.all_gather,
          "reduce_scatter": group.reduce_scatter, "all_to_all": group.all_to_all}
    return sum(f.calls * op[f.kind](f.nbytes) for f in flows)


def _tp(model, cluster, stack, k: LayerKnobs, lc: LayerCompute, eb: ElementBytes, owns: bool):
    """Exposed TP seconds per (dense layer, MoE layer) and pass, and per micro-batch on the first
    and last ranks. TE userbuffer overlap needs SP and the TP group inside one NVLink domain
    (nothing overlaps on shared processors: communication is CPU work of the same ranks)."""
    g = C.Group(cluster, k.tp, 1.0)
    dense = flows_time(g, X.tp_layer(model, k, eb, False))
    moe = flows_time(g, X.tp_layer(model, k, eb, True))
    on = k.overlap_tp & stack.tp_overlap & k.sp & (k.tp <= (cluster.domain_sizes[0] or k.tp)) & owns
    return (np.where(on, _exposed(dense, lc.t_attn_gemm + lc.t_dense_mlp), dense),
            np.where(on, _exposed(moe, lc.t_attn_gemm), moe),
            flows_time(g, X.tp_edges(model, k, eb, True)), flows_time(g, X.tp_edges(model, k, eb, False)))


def _cp(model, cluster, k: LayerKnobs, lc: LayerCompute, eb: ElementBytes, owns: bool):
    """Exposed CP seconds per layer (forward, backward) of traffic.cp_layer's flows. A ring step
    ends with its slowest hop (collectives.ring_step) and overlaps the attention of the block
    in hand (Megatron-Core p2p CP: the next K,V arrive while this block computes), slowing it by
    Efficiency.overlap_slowdown per hidden second."""
    cp, tp = k.cp, k.tp
    step = C.ring_step(cluster, X.kv_bytes(model, k, eb), cp, tp)
    g = C.Group(cluster, cp, tp)
    hide = 1.0 if owns else 0.0                          # shared processors hide nothing
    out = []
    for backward, t_core in ((False, lc.t_core_f), (True, lc.t_core_b)):
        flows = X.cp_layer(model, k, eb, backward)
        ring = overlapped(flows[0].calls * step, hide * t_core * (cp - 1) / cp, cluster.efficiency.overlap_slowdown)
        a2a = flows[4].calls * C.all_to_all(cluster, flows[4].nbytes, cp, tp)
        out.append(np.where(cp > 1, ring + flows_time(g, flows[2:4]) + a2a, 0.0))
    return out


def _ep(model, cluster, stack, k: LayerKnobs, lc: LayerCompute, eb: ElementBytes, owns: bool, moe_load):
    """(exposed EP all-to-all seconds per MoE layer and pass with and without overlap, token-count
    all-gather per forward). --overlap-moe-expert-parallel-comm runs one micro-batch's all-to-alls
    under another's attention and expert compute (as DualPipe does, DeepSeek-V3 sec. 3.2.1); what
    exceeds that compute, and a residual share as for TP, stays exposed. Whether a layout may
    overlap depends on its schedule and recompute (stages.ep_overlap_allowed)."""
    if not model.moe:
        return np.zeros(k.n), np.zeros(k.n), np.zeros(k.n)
    a2a, meta, *etp = X.ep_layer(model, k, eb, moe_load, True)
    comm = (a2a.calls * C.all_to_all(cluster, a2a.nbytes, k.ep, k.etp)
            + flows_time(C.Group(cluster, k.etp, 1.0), etp))         # expert TP: innermost of the expert mesh
    ovl = k.overlap_ep & stack.ep_overlap & owns
    return (np.where(ovl, _exposed(comm, lc.t_attn_f + lc.t_moe_f), comm), comm,
            flows_time(C.Group(cluster, k.ep, k.etp), [meta]))


def layer_comm(model: ModelSpec, cluster: Cluster, stack: Stack, k: LayerKnobs, lc: LayerCompute,
               moe_load, eb: ElementBytes) -> LayerComm:
    """Phase 2 over the rows of the layer table; moe_load: routed tokens over the mean
    (routing.routed_load: a capacity drops tokens before they are dispatched)."""
    owns = cluster.gpu.shared_by == 1
    tp_dense, tp_moe, tp_first, tp_last = _tp(model, cluster, stack, k, lc, eb, owns)
    cp_f, cp_b = _cp(model, cluster, k, lc, eb, owns)
    ep_f, ep_raw, ep_meta = _ep(model, cluster, stack, k, lc, eb, owns, moe_load)
    # PP p2p: one activation per stage boundary, to the rank tp*cp*dp away
    t_p2p = np.where(k.pp > 1, C.p2p(cluster, X.p2p_bytes(model, k, eb), k.tp * k.cp * k.dp), 0.0)
    return LayerComm(*full(k.n, eb.act * k.tokens * model.hidden, tp_dense, tp_moe, tp_first, tp_last, cp_f,
                           cp_b, ep_f, ep_raw, ep_meta, t_p2p))


def dp_groups(cluster: Cluster, stack: Stack, k: LayerKnobs) -> DpGroups:
    """Sizes and coefficients of the DP groups (rank stride from Megatron's tp-cp-ep-dp-pp order)."""
    tp, cp, dp, ep, etp = k.tp, k.cp, k.dp, k.ep, k.etp
    d0 = cluster.domain_sizes[0] or 1
    dstr = tp if stack.pooled_nics else np.maximum(tp, d0)   # no NIC pooling: one member per domain
    estr = ep * etp if stack.pooled_nics else np.maximum(ep * etp, d0)
    dpcp = dp * cp
    shard = np.where(k.shard_group > 0, np.minimum(k.shard_group, dpcp), dpcp)
    edp = tp * cp * dp / (ep * etp)                   # expert data-parallel group
    eshard = np.minimum(shard, edp)

    def coeff(size, stride, key):
        c = C.Group(cluster, size, stride).coefficients((key,))
        return np.stack(full(k.n, c[f"a_{key}"], c[f"b_{key}"]))

    return DpGroups(*full(k.n, dpcp, shard, eshard), dense_ar=coeff(dpcp, dstr, "ar"),
                    shard_ag=coeff(shard, dstr, "ag"), shard_rs=coeff(shard, dstr, "rs"),
                    repl_ar=coeff(dpcp / shard, dstr * shard, "ar"), exp_ar=coeff(edp, estr, "ar"),
                    eshard_ag=coeff(eshard, estr, "ag"), eshard_rs=coeff(eshard, estr, "rs"),
                    tp_ar=coeff(tp, 1.0, "ar"),
                    embd_ar=coeff(np.where(k.pp > 1, 2.0, 1.0), np.maximum(k.pp - 1, 1) * tp * cp * dp, "ar"))
