"""Phase 4, model state: parameters each pipeline rank holds (split by TP, EP and ETP as
Megatron-Core splits them) and the data-parallel traffic of their gradients and weights under
each ZeRO stage, per step and per micro-batch."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ..model_spec import ModelSpec
from ..stacks import Stack
from .. import flops as F
from . import shapes as S
from . import traffic as X
from .elements import ElementBytes
from .records import Record, record
from ..frozen import frozen

BUCKET_ELEMENTS = 40e6      # Megatron DDP bucket: max(40M, 1M * dp) elements
BUCKET_PER_DP = 1e6         # (megatron/core/distributed/param_and_grad_buffer.py)


@record
class StageParams(Record):
    """Parameter elements on one GPU of a pipeline rank."""
    dense: np.ndarray          # reduced over the dense data-parallel group (dp x cp)
    expert: np.ndarray         # routed experts, reduced over the expert data-parallel group
    root: np.ndarray           # of dense: embedding, final norm and output layer (FSDP's root unit)
    norms: np.ndarray          # of dense: norm and router weights (sequence-parallel: gradients all-reduced over TP)
    # ZeRO-3: elements one rank of the shard group allocates, padded by the stack's rule (shapes.py);
    # the group gathers shard x these
    shard_dense: np.ndarray
    shard_root: np.ndarray
    shard_expert: np.ndarray


@frozen(eq=True)
class LayerParams:
    """Parameters of one layer on one TP rank, split into what TP shards and what it replicates.
    Column-parallel weights and biases and row-parallel weights are split over tp; norms,
    row-parallel biases and the router are whole on every tp rank (Megatron-Core
    ColumnParallelLinear / RowParallelLinear); routed experts are split over ep x etp."""
    dense_shard: float
    dense_repl: float
    moe_shard: float
    moe_repl: float
    experts: float
    final_norm: float

    @staticmethod
    def of(model: ModelSpec) -> "LayerParams":
        row_b = model.hidden if model.bias else 0
        norms = model.norm_params()
        dense_shard = model.attention_params() - row_b + model.mlp_params() - row_b
        moe_shard = moe_repl = 0
        if model.moe:
            mo = model.moe
            moe_shard = model.attention_params() - row_b + mo.shared_experts * model.mlp_params(
                mo.shared_expert_ffn_hidden)
            moe_repl = row_b + norms + model.hidden * mo.experts
        return LayerParams(dense_shard, 2 * row_b + norms, moe_shard, moe_repl, model.expert_params_per_layer(),
                           model.hidden * (2 if model.bias else 1))


def stage_params(model: ModelSpec, k, layers, ndense, first, last, shards=(1.0, 1.0), rule=S.DIM0,
                 r=0) -> StageParams:
    """Parameters of a rank holding `layers` layers (`ndense` dense), the embedding if `first`
    and the final norm and output layer if `last`. With tied embeddings and pp > 1 the last stage
    keeps its own copy of the embedding (Megatron-Core shared_embedding_or_output_weight).
    shards: the ZeRO-3 shard groups (dense, expert), r: the rank in them whose shard is counted."""
    p = LayerParams.of(model)
    nmoe = layers - ndense
    out_p = np.where(model.tied_embeddings & (k.pp > 1), model.embedding_params(), model.output_params())
    root = ((np.where(first, model.embedding_params(), 0.0) + np.where(last, out_p, 0.0)) / k.tp
            + np.where(last, p.final_norm, 0.0))
    dense = (ndense * p.dense_shard + nmoe * p.moe_shard) / k.tp + ndense * p.dense_repl + nmoe * p.moe_repl + root
    # norms and, in MoE layers, the router: replicated over TP with sequence_parallel set, their
    # gradients all-reduced over TP (Megatron-Core moe/router.py, finalize_model_grads)
    router = model.hidden * model.moe.experts if model.moe else 0.0
    norms = layers * model.norm_params() + nmoe * router + np.where(last, p.final_norm, 0.0)
    expert = nmoe * p.experts / (k.ep * k.etp)
    return StageParams(dense, expert, root, norms, *_zero3_shards(model, k, ndense, nmoe, first, last, shards, rule, r))


def _zero3_shards(model, k, ndense, nmoe, first, last, shards, rule, r):
    """shapes.stage_elements on the ZeRO-3 rows only (zero elsewhere: no ZeRO-3 term reads them)."""
    shape = np.broadcast(ndense, k.tp, k.zero).shape
    rows = np.nonzero(np.broadcast_to(np.asarray(k.zero) == 3, shape))
    out = [np.zeros(shape) for _ in range(3)]
    if rows[0].size:
        pick = lambda x: np.broadcast_to(np.asarray(x, dtype=float), shape)[rows]  # noqa: E731
        sub = SimpleNamespace(tp=pick(k.tp), pp=pick(k.pp), ep=pick(k.ep), etp=pick(k.etp))
        got = S.stage_elements(model, sub, pick(ndense), pick(nmoe), pick(first) > 0, pick(last) > 0,
                               pick(shards[0]), pick(shards[1]), rule, r)
        for o, g in zip(out, got):
            o[rows] = g
    return out


@record
class DpTimes(Record):
    per_step: np.ndarray       # once per step (ZeRO 0-1 reduction, ZeRO 1-2 parameter gather)
    per_mb_f: np.ndarray       # per micro-batch before forward (ZeRO-3 gather)
    per_mb_b: np.ndarray       # per micro-batch in backward (ZeRO-2/3 reduce-scatter, ZeRO-3 re-gather)
    serial: np.ndarray         # per micro-batch, ZeRO-3 gathers no prefetch hides (unprefetched)


@record
class DpFlows:
    """Data-parallel traffic of one pipeline rank as (Flow, DpGroups coefficient row) pairs."""
    per_step: list
    per_mb_f: list
    per_mb_b: list
    serial: list               # per micro-batch, back to back with compute (unprefetched)


def unprefetched(model: ModelSpec, tp, max_live: float) -> tuple:
    """(forward, backward) fractions of a layer's ZeRO-3 gather that DeepSpeed cannot prefetch. It
    prefetches a module's parameters while the module before it in the pass computes, but only
    while fewer than stage3_max_live_parameters elements are gathered
    (deepspeed/runtime/zero/partitioned_param_coordinator.py fetch_sub_module: max_params_to_prefetch
    = min(max_n_available_params - n_available_params, prefetch_bucket_sz)): behind a module of that
    size or more the next one is gathered on demand. Modules as Megatron-DeepSpeed fuses them (QKV,
    attention out, fc1 with the gate, fc2), each a TP shard; an MoE layer's experts are counted as
    its dense MLP. 0 for stacks without the limit (FSDP prefetches the next unit whatever its size)."""
    if not np.isfinite(max_live):
        return 0.0, 0.0
    a, mlp = F.attention_gemm_flops(model, 0.5), F.mlp_flops(model, 0.5)        # FLOPs of 1/2 token = params
    mm = model.mlp_matrices
    mods = [a["attn_qkv"] / tp, a["attn_out"] / tp, mlp * (mm - 1) / mm / tp, mlp / mm / tp]   # forward order
    big = [m >= max_live for m in mods]
    total = sum(mods)
    fwd = sum(m * big[i - 1] for i, m in enumerate(mods)) / total               # behind its predecessor
    bwd = sum(m * big[(i + 1) % len(mods)] for i, m in enumerate(mods)) / total  # backward runs in reverse
    return fwd, bwd


def _buckets(n, chunks, dpcp):
    """Gradient buckets: one buffer per model chunk (virtual stage), buckets of max(40M, 1M x dp)
    elements (megatron/core/distributed/param_and_grad_buffer.py)."""
    per_chunk = n / np.maximum(chunks, 1)
    return np.maximum(chunks, 1) * np.maximum(np.ceil(per_chunk / np.maximum(BUCKET_ELEMENTS, BUCKET_PER_DP * dpcp)),
                                              1.0)


class _Flows(list):
    """(Flow, DpGroups coefficient row) pairs for the candidates whose ZeRO stage is among
    `stages`: where no candidate is, the flow is not built at all; where all are, no mask."""

    def __init__(self, zero, zero_values, masks=None):
        super().__init__()
        self.zero, self.values = zero, zero_values
        self.masks = {} if masks is None else masks     # stages -> candidate mask, shared

    def add(self, stages, cond, label, kind, calls, nbytes, coeff) -> None:
        hit = tuple(z for z in self.values if z in stages)
        if not hit or (np.isscalar(cond) and not cond):
            return
        if len(hit) == len(self.values):
            m = cond
        else:
            if hit not in self.masks:
                self.masks[hit] = np.isin(self.zero, hit)
            m = self.masks[hit] * cond
        self.append((X.Flow(label, kind, m * calls, nbytes()), coeff))


def dp_flows(model: ModelSpec, g, k, stack: Stack, eb: ElementBytes, prm: StageParams,
             layers, nmoe, first, last) -> DpFlows:
    """ZeRO-0: gradients all-reduced per bucket once per step. ZeRO-1 (Megatron distributed
    optimizer): reduce-scattered once per step into padded shards, parameters all-gathered once.
    ZeRO-2 (DeepSpeed stage 2): reduce-scattered every micro-batch. ZeRO-3 (FSDP): each layer a
    unit gathered before forward and, resharded after it, again before backward; the root unit
    (embedding, final norm, output) gathered once; every unit reduce-scattered (Zhao et al. 2023
    'PyTorch FSDP' sec. 3; torch fully_shard). HSDP adds an all-reduce of the shard across
    replicas (sec. 3.2.2). Sequence-parallel norm gradients are all-reduced over TP (Megatron
    finalize_model_grads _allreduce_layernorm_grads); a tied embedding's two copies over the first
    and last rank once per step after the pipeline drains, ZeRO-2 included (_allreduce_embedding_grads). Routed experts reduce over the expert group."""
    pd, pe, gr, pg = prm.dense, prm.expert, eb.grad_reduce, eb.param_gather
    bd = _buckets(pd, k.vpp, g.dpcp)
    # expert buffers only in the model chunks that hold an MoE layer (Megatron-Core wraps each model
    # chunk in its own DistributedDataParallel, distributed/distributed_data_parallel.py, buffers
    # per parameter kind): a rank's dense layers (the model's first) fill its first chunks,
    # floor(dense / layers-per-chunk) of them wholly
    vpp = np.maximum(k.vpp, 1)
    moe_chunks = np.maximum(vpp - np.floor((layers - nmoe) * vpp / np.maximum(layers, 1)), 1.0)
    be = np.maximum(_buckets(pe, moe_chunks, g.dpcp), 1.0)
    units = np.maximum(layers, 1.0)
    experts = (pe > 0) * nmoe
    masks = {}
    step, mb_f, mb_b, serial = (_Flows(k.zero, k.zero_values, masks) for _ in range(4))
    # SP norm gradients: one coalesced call per step over every model chunk; under ZeRO-2 each
    # chunk's after each of its micro-batch backwards
    step.add((0, 1, 3), k.sp, "tp", "all_reduce", 1.0, lambda: prm.norms * gr, "tp_ar")
    mb_b.add((2,), k.sp, "tp", "all_reduce", k.vpp, lambda: prm.norms * gr / k.vpp, "tp_ar")
    # once per step under every stage, after the pipeline drains (finalize_model_grads)
    step.add((0, 1, 2, 3), (first | last) * (k.pp > 1) * bool(model.tied_embeddings), "embd", "all_reduce", 1.0,
             lambda: model.embedding_params() / k.tp * gr, "embd_ar")
    step.add((0,), g.dpcp > 1, "dp", "all_reduce", bd, lambda: pd * gr / bd, "dense_ar")
    step.add((0,), (g.eshard > 1) * (pe > 0), "edp", "all_reduce", be, lambda: pe * gr / be, "exp_ar")
    for where, stages in ((step, (1,)), (mb_b, (2,))):
        where.add(stages, g.shard > 1, "dp", "reduce_scatter", bd, lambda: X.pad(pd, g.shard) * gr / bd, "shard_rs")
        where.add(stages, (g.eshard > 1) * (pe > 0), "edp", "reduce_scatter", be,
                  lambda: X.pad(pe, g.eshard) * gr / be, "eshard_rs")
        where.add(stages, g.shard < g.dpcp, "dp", "all_reduce", 1.0, lambda: pd * gr / g.shard, "repl_ar")
    step.add((1, 2), g.shard > 1, "dp", "all_gather", bd, lambda: X.pad(pd, g.shard) * pg / bd, "shard_ag")
    step.add((1, 2), (g.eshard > 1) * (pe > 0), "edp", "all_gather", be, lambda: X.pad(pe, g.eshard) * pg / be,
             "eshard_ag")
    # ZeRO-3 moves the padded shards (shapes.py): shard x what one rank allocates
    zd, zr, ze = prm.shard_dense * g.shard, prm.shard_root * g.shard, prm.shard_expert * g.eshard
    xf, xb = unprefetched(model, k.tp, stack.zero3_max_live_params)
    mb_f.add((3,), 1.0 - xf, "dp", "all_gather", units + 1, lambda: zd * pg / (units + 1), "shard_ag")
    serial.add((3,), xf, "dp", "all_gather", units + 1, lambda: zd * pg / (units + 1), "shard_ag")
    mb_f.add((3,), 1.0, "edp", "all_gather", experts, lambda: ze * pg / np.maximum(nmoe, 1), "eshard_ag")
    regather = float(bool(stack.fsdp_regather_backward))
    mb_b.add((3,), regather * (1.0 - xb), "dp", "all_gather", units, lambda: (zd - zr) * pg / units, "shard_ag")
    serial.add((3,), regather * xb, "dp", "all_gather", units, lambda: (zd - zr) * pg / units, "shard_ag")
    mb_b.add((3,), regather, "edp", "all_gather", experts, lambda: ze * pg / np.maximum(nmoe, 1), "eshard_ag")
    mb_b.add((3,), 1.0, "dp", "reduce_scatter", units + 1, lambda: zd * gr / (units + 1), "shard_rs")
    mb_b.add((3,), 1.0, "edp", "reduce_scatter", experts, lambda: ze * gr / np.maximum(nmoe, 1), "eshard_rs")
    mb_b.add((3,), g.shard < g.dpcp, "dp", "all_reduce", 1.0, lambda: prm.shard_dense * gr, "repl_ar")
    return DpFlows(step, mb_f, mb_b, serial)


def flows_seconds(g, flows) -> np.ndarray:
    """Back-to-back seconds of (Flow, coefficient row of the DpGroups g) pairs: calls x (a x bytes + b)."""
    return sum((f.calls * (getattr(g, c)[0] * f.nbytes + getattr(g, c)[1]) for f, c in flows),
               np.zeros(len(g.dpcp)))


def dp_times(model, g, k, stack: Stack, eb: ElementBytes, prm: StageParams, layers, nmoe, first, last) -> DpTimes:
    """Seconds of dp_flows on the DP groups g (comm.DpGroups)."""
    fl = dp_flows(model, g, k, stack, eb, prm, layers, nmoe, first, last)
    return DpTimes(flows_seconds(g, fl.per_step), flows_seconds(g, fl.per_mb_f), flows_seconds(g, fl.per_mb_b),
                   flows_seconds(g, fl.serial))
