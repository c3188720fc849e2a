"""Phase 5, stage assembly: how many (dense, MoE) layers each pipeline rank holds, and the sums
of the per-layer terms over a stage for one micro-batch (compute, recompute, exposed TP/CP/EP,
FLOPs), with the embedding on the first stage and the logits on the last."""
from __future__ import annotations

import numpy as np

from ..layout import Recompute, Schedule
from ..model_spec import ModelSpec
from .compute import ATTN_BWD_FACTOR
from .knobs import StepKnobs, by_code, by_recompute
from .offload import exposed_seconds
from .records import Record, record
from .records import on as _on


@record
class StageSplit(Record):
    """Layers per pipeline rank: the first, each middle one, the last (rank totals over its
    virtual stages), and how many of them are dense (leading dense layers sit on the first ranks)."""
    first: np.ndarray
    mid: np.ndarray
    last: np.ndarray
    dense_first: np.ndarray
    dense_mid: np.ndarray
    dense_last: np.ndarray


def stage_split(model: ModelSpec, k: StepKnobs) -> StageSplit:
    """Layers per rank: given first/last stage counts (Megatron --decoder-first/last-pipeline-num-
    layers), the rest even over the other ranks."""
    L, pp = model.layers, k.pp
    n_given = (k.first_given > 0).astype(float) + (k.last_given > 0).astype(float)
    even = (L - k.first_given - k.last_given) / np.maximum(pp - n_given, 1)
    first = np.where(pp == 1, float(L), np.where(k.first_given > 0, k.first_given, even))
    last = np.where(pp == 1, 0.0, np.where(k.last_given > 0, k.last_given, even))
    mid = np.where(pp > 2, even, 0.0)
    nd = float(model.dense_layers)
    return StageSplit(first, mid, last, np.minimum(nd, first), np.minimum(np.maximum(nd - first, 0.0), mid),
                      np.where(pp > 1, np.maximum(nd - first - mid * np.maximum(pp - 2, 0), 0.0), 0.0))


@record
class StageSums(Record):
    """One micro-batch through one pipeline rank (seconds; FLOPs per GPU)."""
    fwd: np.ndarray            # forward compute
    bwd: np.ndarray            # backward compute
    w: np.ndarray              # weight-gradient share of bwd (zero-bubble schedules)
    rc: np.ndarray             # recompute
    tp: np.ndarray             # exposed TP communication (forward, backward, recompute)
    cp: np.ndarray             # exposed CP communication
    ep: np.ndarray             # exposed EP all-to-all
    tf: np.ndarray             # forward share: compute + exposed forward communication
    off: np.ndarray            # exposed activation offloading (host copies and their HBM traffic)
    flops: np.ndarray          # hardware FLOPs: fwd + bwd (flash backward 2.5x core) + recompute
    flops_rc: np.ndarray       # of which recompute


def _edges(lt, first, last) -> tuple:
    """(embedding, logits forward, TP collectives of both) seconds of a rank holding them."""
    c, m = lt.compute, lt.comm
    return _on(first, c.t_emb), _on(last, c.logits_f), _on(first, m.tp_first) + _on(last, m.tp_last)


def ep_overlap_allowed(pp, schedule, recompute) -> np.ndarray:
    """Where Megatron-Core accepts --overlap-moe-expert-parallel-comm (TransformerConfig
    __post_init__: with pp > 1 only under virtual pipeline stages; never with full recompute or a
    recompute method); Schedule and Recompute codes."""
    return ((np.asarray(pp) == 1) | (np.asarray(schedule) == Schedule.INTERLEAVED)) & (
        np.asarray(recompute) != Recompute.FULL)


def stage_sums(lt, k: StepKnobs, layers, ndense, first, last, flops: bool = True, moe: bool = True) -> StageSums:
    """Sums over `layers` layers (`ndense` dense) of a rank; `first`/`last`: whether it holds
    the embedding / the logits (bool arrays). flops=False leaves the FLOP sums at 0 (ranking);
    moe=False: a dense model, whose EP terms are 0."""
    c, m = lt.compute, lt.comm
    nmoe = layers - ndense
    rv = k.recompute_values
    pick = lambda options: by_code(k.recompute, rv, options)  # noqa: E731  (Recompute codes)
    rows = lambda name: by_recompute(c, name, k)  # noqa: E731  (a row table at each candidate's code)
    rec_comm = pick(Recompute.rows(lambda r: float(r == Recompute.FULL)))  # full recompute repeats the collectives
    # DualPipe hides EP behind the other chunk; elsewhere the overlap needs what Megatron asks of it
    ep_f = np.where(k.schedule == Schedule.DUALPIPE, 0.0,
                    np.where(ep_overlap_allowed(k.pp, k.schedule, k.recompute), m.ep_f, m.ep_raw)) if moe else 0.0
    tp1 = ndense * m.tp_dense + nmoe * m.tp_moe
    fwd = ndense * c.f_dense + nmoe * c.f_moe
    rc = ndense * rows("rc_dense") + nmoe * rows("rc_moe")
    ep = tf_ep = 0.0
    if moe:
        ep = nmoe * (ep_f * (2 + rec_comm) + m.ep_meta * (1 + rec_comm))
        tf_ep = nmoe * (ep_f + m.ep_meta)
    emb, lg, tp_edges = _edges(lt, first, last)
    tf = fwd + tp1 + layers * m.cp_f + tf_ep
    fl = fl_rc = 0.0
    if flops:
        flf = ndense * (c.gemm_flops_dense + c.core_flops) + nmoe * (c.gemm_flops_moe + c.core_flops)
        fl_rc = ndense * rows("fl_rc_dense") + nmoe * rows("fl_rc_moe")
        fl = 3 * flf + (ATTN_BWD_FACTOR - 2) * layers * c.core_flops + fl_rc + _on(last, 3 * c.logits_flops)
    return StageSums(
        fwd=fwd + emb + lg, bwd=ndense * c.b_dense + nmoe * c.b_moe + emb + _on(last, c.logits_b),
        w=ndense * c.w_dense + nmoe * c.w_moe + _on(last, c.lg_f), rc=rc,
        tp=tp1 * (2 + rec_comm) + tp_edges,
        # recomputing core attention (selective, full) runs the K/V ring again too
        cp=layers * (m.cp_f + m.cp_b + pick(Recompute.rows(lambda r: float(r.reruns_core))) * m.cp_f),
        ep=ep, tf=tf + emb + lg + tp_edges / 2,
        off=exposed_seconds(lt.host, k, layers, ndense, c.f_dense, c.f_moe, c.b_dense, c.b_moe) if k.offload.any()
        else np.zeros(k.n),
        flops=fl, flops_rc=fl_rc)
