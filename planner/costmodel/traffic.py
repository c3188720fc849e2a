"""The collectives of a training step as data: which group, which kind, how many calls and how
many bytes each. The cost model times these flows (comm.py, state.py, pipeline.py) and step.py
counts them per rank, so what validate holds against a run is what the search ranks with.

Bytes per call follow planner/collectives.py: all-reduce the buffer, all-gather the gathered
output, reduce-scatter the full input, all-to-all and send/recv what this rank sends. Labels
name the groups as validate/ does: tp, cp, ep, pp, dp (dense gradients, dp x cp), edp (expert
data parallel), embd (the two copies of a tied embedding)."""
from __future__ import annotations

import numpy as np

from ..layout import CpComm, Precision
from ..model_spec import ModelSpec
from .elements import ElementBytes
from .knobs import LayerKnobs
from ..frozen import frozen

INDEX_BYTES = 8              # int64 token counts per expert (Megatron MoEAlltoAllTokenDispatcher metadata)
CE_ALL_REDUCES = 3           # vocab-parallel cross entropy: max, sum of exponentials, target logit
                             # (Megatron fused_vocab_parallel_cross_entropy; torch loss_parallel)
TP_PAIRS_DENSE = 2           # TP collective pairs per layer and pass: after attention and after the MLP
                             # (Megatron f/g operators, Shoeybi et al. 2019 fig. 4)


@frozen
class Flow:
    """`calls` collectives of `kind` on group `label`, `nbytes` each (arrays over rows or scalars)."""
    label: str
    kind: str
    calls: object
    nbytes: object


def _act(model: ModelSpec, k: LayerKnobs, eb: ElementBytes):
    """One [micro-batch, s/cp, h] activation, bytes."""
    return eb.act * k.tokens * model.hidden


def tp_layer(model: ModelSpec, k: LayerKnobs, eb: ElementBytes, moe_layer: bool) -> list:
    """TP collectives of one layer and one pass: per pair an all-reduce, or under SP an all-gather
    + reduce-scatter (Korthikanti et al. 2022 sec. 4.2.2); Transformer Engine gathers fp8
    activations under fp8 (TE LayerNormLinear with sequence_parallel), reduces in 16 bits. An MoE
    block adds a pair for its shared experts, split over TP like an MLP (Megatron-Core
    moe/shared_experts.py: input gathered, output reduce-scattered under SP); the routed experts'
    own gather under expert TP is EP traffic (ep_layer)."""
    shared = float(bool(model.moe and model.moe.shared_experts))
    pairs = (1.0 + shared) if moe_layer else float(TP_PAIRS_DENSE)
    pairs = pairs * (k.tp > 1)
    act = _act(model, k, eb)
    gathered = k.tokens * model.hidden * np.where(k.precision == Precision.FP8, 1.0, eb.act)
    return [Flow("tp", "all_reduce", np.where(k.sp, 0.0, pairs), act),
            Flow("tp", "all_gather", np.where(k.sp, pairs, 0.0), gathered),
            Flow("tp", "reduce_scatter", np.where(k.sp, pairs, 0.0), act)]


def tp_edges(model: ModelSpec, k: LayerKnobs, eb: ElementBytes, first: bool) -> list:
    """TP collectives of one micro-batch (forward and backward) outside the layers: the
    vocab-parallel embedding's partial sums (first rank), the output layer's input and gradient
    and the cross entropy's per-token reductions (last rank)."""
    on = (k.tp > 1).astype(float)
    act = _act(model, k, eb)
    if first:   # fwd: reduce (-scatter under SP) the lookups; bwd: all-gather the gradient under SP
        return [Flow("tp", "reduce_scatter", on * k.sp, act), Flow("tp", "all_gather", on * k.sp, act),
                Flow("tp", "all_reduce", on * ~k.sp, act)]
    return [Flow("tp", "all_gather", on * k.sp, act), Flow("tp", "reduce_scatter", on * k.sp, act),
            Flow("tp", "all_reduce", on * ~k.sp, act),
            Flow("tp", "all_reduce", on * CE_ALL_REDUCES, eb.stat * k.tokens)]


def kv_bytes(model: ModelSpec, k: LayerKnobs, eb: ElementBytes):
    """K and V of this rank's heads for one micro-batch (kv heads split by tp; Megatron
    replicates them when tp > kv_heads)."""
    kv_split = k.tp if model.mla else np.minimum(k.tp, model.kv_heads)
    return eb.act * k.tokens * 2 * model.kv_dim / kv_split


def cp_layer(model: ModelSpec, k: LayerKnobs, eb: ElementBytes, backward: bool) -> list:
    """CP traffic of one layer and one pass. Ring (p2p): K,V pass around cp-1 times forward; in
    backward K,V and dK,dV both travel (Liu et al. 2023 'Ring Attention' sec. 3; Megatron-Core
    context_parallel p2p). All-gather: gather K,V; backward adds the reduce-scatter of dK,dV.
    a2a (Ulysses, Jacobs et al. 2023 sec. 3.2): Q,K,V and O move in one exchange per pass."""
    cp, cc = k.cp, k.cp_comm
    on = (cp > 1).astype(float)
    kv = kv_bytes(model, k, eb)
    ring = on * (cc == CpComm.P2P) * (cp - 1) * (2 if backward else 1)
    ag = on * (cc == CpComm.ALLGATHER)
    qkvo = eb.act * k.tokens * (model.q_dim + 2 * model.kv_dim + model.v_dim) / k.tp
    return [Flow("cp", "send", ring, kv), Flow("cp", "recv", ring, kv),
            Flow("cp", "all_gather", ag, kv * cp), Flow("cp", "reduce_scatter", ag * backward, kv * cp),
            Flow("cp", "all_to_all", on * (cc == CpComm.A2A), qkvo)]


def ep_layer(model: ModelSpec, k: LayerKnobs, eb: ElementBytes, imbalance, forward: bool) -> list:
    """EP traffic of one MoE layer and one pass: dispatch + combine all-to-all of the routed token
    copies (busiest rank: x its routed load, routing.routed_load), in forward the all-gather of tokens per expert,
    and under expert TP the gather of the tokens the etp group received and the reduce-scatter of
    the experts' partial outputs, one each per pass (Megatron-Core MoEAlltoAllTokenDispatcher:
    dispatch_postprocess gather_from_sequence_parallel_region over the expert-TP group,
    combine_preprocess reduce_scatter_to_sequence_parallel_region; backward swaps the two). Sizes:
    the all-to-all's buffer, the gather's output and the reduce-scatter's input."""
    if not model.moe:
        return []
    on, etp_on = (k.ep > 1).astype(float), (k.etp > 1).astype(float)
    nbytes = eb.act * (k.tokens / k.tp) * model.moe.top_k * imbalance * model.hidden
    return [Flow("ep", "all_to_all", 2 * on, nbytes),
            Flow("ep", "all_gather", on * forward, k.ep * model.moe.experts * INDEX_BYTES),
            Flow("etp", "all_gather", etp_on, k.etp * nbytes), Flow("etp", "reduce_scatter", etp_on, k.etp * nbytes)]


def pp_boundaries(rank: int, pp: int, vpp: int) -> tuple:
    """(sends, receives) per micro-batch of pipeline rank `rank`: each of its chunks (virtual
    stages rank, rank + pp, ...) receives in forward unless it is the first virtual stage, sends
    unless it is the last, and the gradients go back the other way."""
    nv = pp * vpp
    stages = [rank + i * pp for i in range(vpp)]
    first = sum(s != 0 for s in stages)
    last = sum(s != nv - 1 for s in stages)
    return first + last, first + last


def p2p_bytes(model: ModelSpec, k: LayerKnobs, eb: ElementBytes):
    """One pipeline-boundary activation (scattered over TP under SP)."""
    return _act(model, k, eb) / np.where(k.sp, k.tp, 1)


def pad(n, g):
    """n elements padded to a multiple of the group size g (Megatron-Core distributed optimizer:
    each rank owns an equal shard of the flattened buffer; validate/parallel.py does the same)."""
    return np.ceil(n / np.maximum(g, 1)) * np.maximum(g, 1)
