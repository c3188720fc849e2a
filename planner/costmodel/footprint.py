"""Phase 7, memory: each pipeline rank's model states (ZeRO sharding, fp8 weight copies, ZeRO-3
prefetch), activations of the micro-batches its schedule keeps in flight, logits, buffers and
the reserved share; the peak over ranks as a named breakdown."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import memory as M
from .. import schedules as S
from ..hardware import Cluster
from ..layout import Precision
from ..model_spec import ModelSpec
from .elements import ElementBytes
from .knobs import StepKnobs, by_code
from .records import Record
from .state import LayerParams, StageParams

MEMORY_TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "reserved")


@dataclass(frozen=True)
class MemoryBreakdown(Record):
    """Bytes per GPU by term (MEMORY_TERMS)."""
    weights: np.ndarray
    gradients: np.ndarray
    optimizer: np.ndarray
    activations: np.ndarray
    logits: np.ndarray
    buffers: np.ndarray
    reserved: np.ndarray

    def total(self):
        return sum(self.named().values())


def prefetch_bytes(model: ModelSpec, groups, k):
    """ZeRO-3 gathers one layer ahead: two layers' bf16 weights in flight (nothing is gathered
    where the shard group is one rank)."""
    p = LayerParams.of(model)
    layer = (p.dense_shard / k.tp + p.dense_repl) if model.dense_layers else 0.0
    if model.moe:
        layer = np.maximum(layer, p.moe_shard / k.tp + p.moe_repl)
    return 2 * 2.0 * (layer * (groups.shard > 1) + p.experts / (k.ep * k.etp) * (groups.eshard > 1))


def model_states(prm: StageParams, groups, zero, eb: ElementBytes) -> tuple:
    """(weights, gradients, optimizer) bytes of a rank's parameters, dense ones sharded over the
    ZeRO shard group and experts over the expert one (memory.model_state_bytes)."""
    w_d, g_d, o_d = M.model_state_bytes(prm.dense, groups.shard, zero, eb.grad, eb.weight, eb.optimizer)
    w_e, g_e, o_e = M.model_state_bytes(prm.expert, groups.eshard, zero, eb.grad, eb.weight, eb.optimizer)
    return w_d + w_e, g_d + g_e, o_d + o_e


def _by_recompute(acts, name, k: StepKnobs):
    """A layer's kept bytes under each candidate's recompute policy (rows of LayerActivations)."""
    if hasattr(acts, "by_row"):
        return acts.by_row(name, k.recompute)
    return by_code(k.recompute, k.recompute_values, list(getattr(acts, name)))


def rank_memory(cluster: Cluster, eb: ElementBytes, lt, k: StepKnobs, layers, ndense, rs, prefetch,
                inflight, first, last) -> MemoryBreakdown:
    """Memory of a rank holding `layers` layers (`ndense` dense) whose phase-4 state is `rs`
    (ranks.RankState), with `inflight` micro-batches of activations
    (schedules.inflight_microbatches), the embedding if `first`, logits if `last`."""
    a = lt.acts
    copies = S.weight_copies(k.schedule)
    fp8 = np.where(k.precision == Precision.FP8, 2.0 / eb.weight, 0.0)  # + TE fp8 weight and transpose
    weights = rs.weights * (1 + fp8) * copies + np.where(k.zero == 3, prefetch, 0.0)
    grads, opt = rs.gradients, rs.optimizer
    # recompute needs one layer's full activations live while it runs backward
    live = np.where(k.recompute > 0, a.live, 0.0)
    acts = (ndense * _by_recompute(a, "dense", k) + (layers - ndense) * _by_recompute(a, "moe", k)) * inflight + live
    acts = acts + np.where(first, a.emb * inflight, 0.0)
    return MemoryBreakdown(weights=weights, gradients=grads * copies, optimizer=opt * copies,
                           activations=acts, logits=np.where(last, a.logits, 0.0),
                           buffers=2 * lt.comm.act_bytes,   # TP/SP all-gather in/out buffers of one activation
                           reserved=np.full(k.n, cluster.gpu.reserved_bytes))


def peak_memory(cluster, eb, lt, k: StepKnobs, rt, detail: bool = True) -> tuple:
    """(breakdown of the rank with the largest total, its index 0 first / 1 middle / 2 last);
    rt: ranks.RankTerms of the candidates. detail=False: (peak bytes, None)."""
    pp, split = k.pp, rt.split
    infl = S.inflight_microbatches(k.schedule, pp, k.vpp, k.micro_batches)
    only = pp == 1
    mf = rank_memory(cluster, eb, lt, k, split.first, split.dense_first, rt.first, rt.prefetch, infl, True, only)
    if k.single_rank and not detail:
        return mf.total(), None
    mm = rank_memory(cluster, eb, lt, k, split.mid, split.dense_mid, rt.mid, rt.prefetch, np.maximum(infl - 1, 1),
                     False, False)
    ml = rank_memory(cluster, eb, lt, k, split.last, split.dense_last, rt.last, rt.prefetch, np.minimum(infl, 1),
                     False, True)
    tf_, tm_, tl_ = mf.total(), np.where(pp > 2, mm.total(), 0.0), np.where(pp > 1, ml.total(), 0.0)
    if not detail:
        return np.maximum(np.maximum(tf_, tm_), tl_), None
    which = np.where(tf_ >= tm_, np.where(tf_ >= tl_, 0, 2), np.where(tm_ >= tl_, 1, 2))
    m0, m1 = which == 0, which == 1
    pick = lambda a, b, c: np.where(m0, a, np.where(m1, b, c))  # noqa: E731
    return MemoryBreakdown(**{t: pick(getattr(mf, t), getattr(mm, t), getattr(ml, t)) for t in MEMORY_TERMS}), which
