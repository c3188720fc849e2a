"""Phase 7, memory: each pipeline rank's model states (ZeRO sharding, fp8 weight copies, ZeRO-3
prefetch), activations of the micro-batches its schedule keeps in flight, logits, buffers and
the reserved share; the peak over ranks as a named breakdown."""
from __future__ import annotations

import numpy as np

from .. import memory as M
from .. import schedules as S
from ..hardware import Cluster
from ..layout import Precision
from ..model_spec import ModelSpec
from .elements import ElementBytes, fp8_params
from .knobs import StepKnobs, by_recompute
from .offload import offloaded_layers
from .records import Record, record, on
from .state import LayerParams, StageParams

MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "fragmentation",
                "reserved")


@record
class MemoryBreakdown(Record):
    """Bytes per GPU by term (MEMORY_TERMS), as live at the rank's peak."""
    weights: np.ndarray
    gradients: np.ndarray
    optimizer: np.ndarray
    activations: np.ndarray
    logits: np.ndarray
    buffers: np.ndarray
    fragmentation: np.ndarray  # the caching allocator's reserve over what is allocated (Stack.allocator_overhead)
    reserved: np.ndarray       # outside the allocator: CUDA context, NCCL and cuBLAS workspaces (the profile's)

    def total(self):
        return sum(self.named().values())

    def allocated(self):
        """What PyTorch's allocator hands out (torch.cuda.max_memory_allocated; the trackers' peak)."""
        return self.total() - self.fragmentation - self.reserved


def layer_elements(model: ModelSpec, k):
    """Parameters of the largest layer on one TP rank (an FSDP unit), routed experts apart."""
    p = LayerParams.of(model)
    layer = (p.dense_shard / k.tp + p.dense_repl) if model.dense_layers else 0.0
    if model.moe:
        layer = np.maximum(layer, p.moe_shard / k.tp + p.moe_repl)
    return layer, p.experts / (k.ep * k.etp)


def prefetch_bytes(model: ModelSpec, groups, k, max_live: float = float("inf")):
    """ZeRO-3 gathers one layer ahead: two layers' bf16 weights in flight (nothing is gathered
    where the shard group is one rank), at most `max_live` elements (DeepSpeed's cap)."""
    layer, experts = layer_elements(model, k)
    two = 2 * 2.0 * (layer * (groups.shard > 1) + experts * (groups.eshard > 1))
    return np.minimum(two, 2.0 * max_live)


def model_states(prm: StageParams, groups, zero, eb: ElementBytes) -> tuple:
    """(weights, gradients, optimizer) bytes of a rank's parameters, dense ones sharded over the
    ZeRO shard group and experts over the expert one (memory.model_state_bytes). With FSDP2's
    fp32 sharded parameters (eb.fsdp_master) ZeRO-3 weights are the master copy."""
    w_d, g_d, o_d = M.model_state_bytes(prm.dense, groups.shard, zero, eb.grad, eb.weight, eb.optimizer,
                                        prm.shard_dense)
    w_e, g_e, o_e = M.model_state_bytes(prm.expert, groups.eshard, zero, eb.grad, eb.weight, eb.optimizer,
                                        prm.shard_expert)
    w, g, o = w_d + w_e, g_d + g_e, o_d + o_e
    if eb.fsdp_master:          # weights become the fp32 master: the optimizer keeps only its moments
        master = eb.fsdp_master / eb.weight * w
        w, o = np.where(zero == 3, master, w), np.where(zero == 3, o - master, o)
    return w, g, o


def _states(eb, stack, k: StepKnobs, rs):
    """(weights, gradients that persist, gradients freed between steps, optimizer, staged) of a
    rank, with fp8 weight caches and DualPipe's second copy; under torchtitan's pipeline
    (`staged`) FSDP2 keeps the whole stage's weights gathered and its gradients unsharded in
    fp32. A term no candidate of this stack can have is the scalar 0 (no array operation)."""
    copies = S.weight_copies(k.schedule)
    fp8 = stack.fp8_weight_cache_bytes / eb.weight
    fp8 = on(k.precision == Precision.FP8, fp8) if fp8 else 0.0
    if stack.fp8_param_gather:       # the fp8 copies are the weights: no 16-bit copy beside them
        fp8 = fp8 - on(fp8_params(stack, k), 1.0)
    staged = ((k.zero == 3) & (k.pp > 1)) if stack.fsdp_pp_unsharded else False
    local = (rs.params.dense + rs.params.expert) if stack.fsdp_pp_unsharded else 0.0
    weights = rs.weights * (1 + fp8) * copies + on(staged, eb.param_gather * local)
    grads = rs.gradients * copies
    held = on(staged, eb.grad_reduce * local) + (grads if stack.grads_persist else 0.0)
    freed = 0.0 if stack.grads_persist else grads
    return weights, held, freed, rs.optimizer * copies, staged


@record
class _Moments:
    """A rank's memory terms around its three peak moments (rank_memory)."""
    weights: np.ndarray
    held: np.ndarray
    freed: np.ndarray
    opt: np.ndarray
    kept: np.ndarray
    live: np.ndarray
    logits: np.ndarray
    gathered: np.ndarray
    emb_grad: np.ndarray
    buffers: np.ndarray
    m_loss: np.ndarray
    m_layer: np.ndarray
    m_reduce: np.ndarray
    m_end: np.ndarray


def resident_activations(a, k: StepKnobs, layers, ndense):
    """Bytes of activations a rank keeps on the GPU through one micro-batch: every layer's, less
    the offloaded layers'. At the end of the forward, the peak, their copies out are long done; in
    backward they come back one or two at a time (TE's double buffer) while the kept layers'
    activations are being freed (validate memory --offload-layers: the tracker sees the same)."""
    dense, moe = by_recompute(a, "dense", k), by_recompute(a, "moe", k)
    od, om = offloaded_layers(k, layers, ndense)
    return (ndense - od) * dense + (layers - ndense - om) * moe


def _moments(eb: ElementBytes, stack, lt, k: StepKnobs, layers, ndense, rs, prefetch, inflight, first, last,
             unit) -> _Moments:
    """The terms and the three moments of rank_memory (its docstring says which)."""
    a = lt.acts
    weights, held, freed, opt, staged = _states(eb, stack, k, rs)
    z3 = (k.zero == 3) if staged is False else (k.zero == 3) & ~staged
    gathered = on(z3, prefetch)                     # two layers (prefetch_bytes)
    live = by_recompute(a, "live", k)
    kept = resident_activations(a, k, layers, ndense) * inflight
    kept = kept + on(first, a.emb * inflight)
    logits = on(last, a.logits)
    # DTensor TP's full-vocab embedding gradient at the end of the first stage's backward
    # (bf16), and its fp32 copy for the reduction: the TP shard, or whole under the pipeline's
    # no-sync accumulation (FSDPParam.to_accumulated_grad_if_needed casts the unsharded gradient)
    emb_grad = 0.0
    if stack.tp_embedding_grad_bytes > 0:
        emb_grad = on(first, a.emb_grad) * (stack.tp_embedding_grad_bytes
                                            + eb.grad_reduce * np.where(staged, 1.0, 1.0 / k.tp))
    # under torchtitan's pipeline the sharded gradients appear only as the last micro-batch's
    # reduce-scatters free the unsharded ones: the held gradients are the larger
    if staged is not False:
        freed = np.where(staged, 0.0, freed)
    # FSDP2 reduces a unit's bf16 gradients from an fp32 copy (foreach_reduce, reduce_dtype fp32)
    # (the unit itself resharded, its sharded gradient not yet made: the root's share of `freed`)
    m_reduce = 0.0
    if stack.fsdp_reduce_bytes or not isinstance(freed, float):
        big = np.maximum(unit, rs.params.root)
        local = np.maximum(rs.params.dense + rs.params.expert, 1.0)
        m_reduce = freed * (1 - np.minimum(big / local, 1.0)) + on(z3, stack.fsdp_reduce_bytes * big)
    return _Moments(weights, held, freed, opt, kept, live, logits, gathered, emb_grad,
                    2 * lt.comm.act_bytes,       # TP/SP all-gather in/out buffers of one activation
                    m_loss=kept + logits + gathered / 2, m_layer=kept + live + gathered, m_reduce=m_reduce,
                    m_end=np.maximum(freed + np.maximum(live, emb_grad) + gathered, m_reduce))


def rank_memory(cluster: Cluster, eb: ElementBytes, stack, lt, k: StepKnobs, layers, ndense, rs, prefetch,
                inflight, first, last, unit=0.0) -> MemoryBreakdown:
    """Memory of a rank holding `layers` layers (`ndense` dense) whose phase-4 state is `rs`
    (ranks.RankState), with `inflight` micro-batches of activations
    (schedules.inflight_microbatches), the embedding if `first`, logits if `last`. The peak is the
    largest of these moments: the loss backward (every kept activation and the loss's tensors;
    ZeRO-3 holds the last layer gathered), the first layer backward (a recomputed layer's full
    activations instead of the loss's; ZeRO-3 gathers the next layer too), and the end of
    backward where gradients freed between steps have all been made again, beside its largest
    transient: a recomputed layer, the full-vocab embedding gradient, or FSDP2's reduce-scatter
    of its largest unit (`unit` elements: a layer, or the root with the embedding and output)."""
    mo = _moments(eb, stack, lt, k, layers, ndense, rs, prefetch, inflight, first, last, unit)
    gathered, live, emb_grad, freed = mo.gathered, mo.live, mo.emb_grad, mo.freed
    at_loss = (mo.m_loss >= mo.m_layer) & (mo.m_loss >= mo.m_end)
    at_end = ~at_loss & (mo.m_end > mo.m_layer)
    weights = mo.weights + np.where(at_loss, gathered / 2, gathered)
    red = at_end & (mo.m_reduce >= freed + np.maximum(live, emb_grad) + gathered)   # at FSDP2's last reduce
    emb = at_end & ~red & (emb_grad > live)
    weights = np.where(red, weights - gathered, weights)
    grads = mo.held + np.where(red, mo.m_reduce, np.where(at_end, freed + np.where(emb, emb_grad, 0.0), 0.0))
    acts = np.where(at_loss, mo.kept, np.where(at_end, np.where(red | emb, 0.0, live), mo.kept + live))
    logits = np.where(at_loss, mo.logits, 0.0)
    allocated = weights + grads + mo.opt + acts + logits + mo.buffers
    return MemoryBreakdown(weights=weights, gradients=grads, optimizer=mo.opt, activations=acts, logits=logits,
                           buffers=mo.buffers, fragmentation=stack.allocator_overhead * allocated,
                           reserved=np.full(k.n, cluster.gpu.reserved_bytes))


def rank_total(cluster: Cluster, eb: ElementBytes, stack, lt, k: StepKnobs, layers, ndense, rs, prefetch,
               inflight, first, last, unit=0.0) -> np.ndarray:
    """rank_memory(...).total() without the breakdown (the search ranks on the peak alone): at each
    moment everything but the moment's own terms is the same, so the allocated peak is that base
    plus the largest moment."""
    mo = _moments(eb, stack, lt, k, layers, ndense, rs, prefetch, inflight, first, last, unit)
    allocated = (mo.weights + mo.held + mo.opt + mo.buffers
                 + np.maximum(np.maximum(mo.m_loss, mo.m_layer), mo.m_end))
    return allocated * (1 + stack.allocator_overhead) + cluster.gpu.reserved_bytes


def rank_breakdowns(cluster, eb, stack, lt, k: StepKnobs, rt, detail: bool = True, of=rank_memory) -> list:
    """[first, middle, last] pipeline rank's MemoryBreakdown (`of`=rank_total: its total) and
    micro-batches in flight; only the first where no candidate has a pipeline and no detail is asked."""
    split = rt.split
    infl = S.inflight_microbatches(k.schedule, k.pp, k.vpp, k.micro_batches)
    u = rt.unit
    mf = of(cluster, eb, stack, lt, k, split.first, split.dense_first, rt.first, rt.prefetch, infl, True, k.pp == 1, u)
    if k.single_rank and not detail:
        return [(mf, infl)]
    im, il = np.maximum(infl - 1, 1), np.minimum(infl, 1)
    mm = of(cluster, eb, stack, lt, k, split.mid, split.dense_mid, rt.mid, rt.prefetch, im, False, False, u)
    ml = of(cluster, eb, stack, lt, k, split.last, split.dense_last, rt.last, rt.prefetch, il, False, True, u)
    return [(mf, infl), (mm, im), (ml, il)]


def peak_memory(cluster, eb, stack, lt, k: StepKnobs, rt, detail: bool = True) -> tuple:
    """(breakdown of the rank with the largest total, its index 0 first / 1 middle / 2 last);
    rt: ranks.RankTerms of the candidates. detail=False: (peak bytes, None), from the totals alone."""
    pp = k.pp
    if not detail:
        ranks = rank_breakdowns(cluster, eb, stack, lt, k, rt, False, of=rank_total)
        if len(ranks) == 1:
            return ranks[0][0], None
        (tf_, _), (tm_, _), (tl_, _) = ranks
        return np.maximum(np.maximum(tf_, np.where(pp > 2, tm_, 0.0)), np.where(pp > 1, tl_, 0.0)), None
    ranks = rank_breakdowns(cluster, eb, stack, lt, k, rt, detail)
    (mf, _), (mm, _), (ml, _) = ranks
    tf_, tm_, tl_ = mf.total(), np.where(pp > 2, mm.total(), 0.0), np.where(pp > 1, ml.total(), 0.0)
    which = np.where(tf_ >= tm_, np.where(tf_ >= tl_, 0, 2), np.where(tm_ >= tl_, 1, 2))
    m0, m1 = which == 0, which == 1
    pick = lambda a, b, c: np.where(m0, a, np.where(m1, b, c))  # noqa: E731
    return MemoryBreakdown(**{t: pick(getattr(mf, t), getattr(mm, t), getattr(ml, t)) for t in MEMORY_TERMS}), which
